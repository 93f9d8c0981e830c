"""The stages of scripts/compress.py for text classification: fine-tune, prune, distil, quantize, evaluate.

Each stage reads a model folder and writes its own folder atomically (hf_distill.storage.atomic), with `stage.json`
recording its settings, so that a killed run resumes at the stage it was in (training stages also resume
from their Trainer checkpoints under <output_dir>/work/<stage>). Models are ordinary Hugging Face folders; the
quantized stages are ONNX Runtime folders (hf_distill.compression.quantization).
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging

from hf_distill.compression.pruning.portable_tokenizer import make_tokenizer_folder_portable
from hf_distill.compression.recipe import DistillStage, PruneStage, QuantizeStage, Recipe
from hf_distill.storage.atomic import atomic_directory, atomic_write_text

logger = logging.get_logger(__name__)

STAGE_FILE = "stage.json"
# What a training stage keeps of its Trainer run: the model, its tokenizer and the run's results.
_MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "README.md",
    "train_results.json",
    "all_results.json",
)


@dataclass
class StageData:
    """The data files every stage reads, and the settings shared by the training stages."""

    files: dict[str, str]  # train, validation (optional), test
    max_seq_length: int
    calibration_examples: int


def stage_settings(stage: Any) -> dict[str, Any]:
    return {"type": type(stage).__name__, **asdict(stage)}


def is_done(folder: Path, settings: Mapping[str, Any]) -> bool:
    """Whether `folder` holds a finished stage built with `settings` (a different recipe is an error)."""
    marker = folder / STAGE_FILE
    if not marker.is_file():
        return False
    recorded = json.loads(marker.read_text())["settings"]
    if recorded != dict(settings):
        raise ValueError(
            f"{folder} was built by a different recipe ({recorded}) than this one ({dict(settings)}); delete that "
            "folder to rebuild this stage and the ones after it, or use another --output_dir."
        )
    return True


def _finish(folder: Path, settings: Mapping[str, Any], started: float, **extra: Any) -> None:
    record = {"settings": dict(settings), "seconds": round(time.perf_counter() - started, 1), **extra}
    (folder / STAGE_FILE).write_text(json.dumps(record, indent=2))


def read_texts(path: str, text_column: str = "text") -> list[str]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [row[text_column] for row in csv.DictReader(handle)]


def read_labels(path: str, label_column: str = "label") -> list[str]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [row[label_column] for row in csv.DictReader(handle)]


def _training_flags(
    recipe: Recipe, data: StageData, output_dir: Path, epochs: float, lr: float | None
) -> list[str]:
    training = recipe.training
    flags = [
        "--train_file", data.files["train"], "--max_seq_length", str(data.max_seq_length),
        "--output_dir", str(output_dir), "--do_train",
        "--num_train_epochs", str(epochs),
        "--learning_rate", str(training.learning_rate if lr is None else lr),  # 0 is a learning rate, None is not
        "--per_device_train_batch_size", str(training.batch_size), "--per_device_eval_batch_size", "64",
        "--warmup_steps", "0.1", "--weight_decay", "0.01",
        "--save_strategy", "epoch", "--save_total_limit", "1", "--eval_strategy", "no",
        "--logging_steps", "20", "--log_level", "warning", "--report_to", "none",
        "--seed", str(training.seed), "--dataloader_pin_memory", "false",
    ]  # fmt: skip
    if "validation" in data.files:
        flags += ["--validation_file", data.files["validation"]]
    return flags


def _keep_model_files(run_dir: Path, folder: Path) -> None:
    for name in _MODEL_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, folder / name)


def finetune_teacher(
    recipe: Recipe, data: StageData, model_name_or_path: str, folder: Path, work_dir: Path, state: Any
) -> None:
    """Fine-tune the teacher (scripts/train_teacher.py, on every process) into `folder` (written by the main one)."""
    from hf_distill.tasks.classification import teacher as train_teacher

    settings = {"type": "finetune", "model": model_name_or_path, "epochs": recipe.teacher.finetune_epochs}
    if is_done(folder, settings):
        return
    started = time.perf_counter()
    run_dir = work_dir / "teacher"
    train_teacher.run(
        ["--model_name_or_path", model_name_or_path, "--freeze_embeddings"]
        + _training_flags(
            recipe, data, run_dir, recipe.teacher.finetune_epochs, recipe.teacher.finetune_learning_rate
        )
    )
    if state.is_main_process:
        with atomic_directory(folder, overwrite=True) as building:
            _keep_model_files(run_dir, building)
            AutoTokenizer.from_pretrained(run_dir).save_pretrained(building)
            make_tokenizer_folder_portable(building)
            _finish(building, settings, started)
    state.wait_for_everyone()


def _calibration_batches(model_dir: Path, texts: Sequence[str], max_length: int, batch_size: int = 16):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for start in range(0, len(texts), batch_size):
        yield dict(
            tokenizer(
                list(texts[start : start + batch_size]),
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
        )


def pruning_spec(stage: PruneStage):
    from hf_distill.compression.pruning import PruningSpec

    return PruningSpec(heads=stage.heads, ffn=stage.ffn, hidden=stage.hidden, layers=stage.layers)


def prune(stage: PruneStage, data: StageData, source_dir: Path, folder: Path) -> None:
    """Structured pruning by measured importance, then (vocab: data) the vocabulary the training split uses."""
    from hf_distill.compression.pruning import measure_importance, prune_model, prune_vocabulary, tokens_used

    settings = stage_settings(stage)
    if is_done(folder, settings):
        return
    started = time.perf_counter()
    model = AutoModelForSequenceClassification.from_pretrained(source_dir)
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    params_before = sum(p.numel() for p in model.parameters())
    spec = pruning_spec(stage)
    train_texts = read_texts(data.files["train"])
    importance = None
    if stage.heads or stage.ffn or stage.hidden is not None:
        calibration = train_texts[: data.calibration_examples]
        importance = measure_importance(
            model, _calibration_batches(source_dir, calibration, data.max_seq_length)
        )
    pruned = prune_model(model, spec, importance)
    kept_tokens = None
    if stage.vocab == "data":
        keep = tokens_used(tokenizer, train_texts, max_length=data.max_seq_length)
        pruned, tokenizer = prune_vocabulary(pruned, tokenizer, keep)
        kept_tokens = len(keep)
    with atomic_directory(folder, overwrite=True) as building:
        pruned.save_pretrained(building)
        tokenizer.save_pretrained(building)
        make_tokenizer_folder_portable(building)  # loads in transformers 4 too (optimum, pipelines)
        _finish(
            building,
            settings,
            started,
            params_before=params_before,
            params_after=sum(p.numel() for p in pruned.parameters()),
            vocabulary=kept_tokens,
            config={
                key: getattr(pruned.config, key, None)
                for key in ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers")
            },
        )


def teacher_for(student_dir: Path, teacher_dir: Path, work_dir: Path) -> Path:
    """The teacher as the student's tokenizer sees it.

    A vocabulary-pruned student reads ids of its own, smaller vocabulary. The teacher is given the same
    vocabulary (its embedding rows of the student's tokens, hf_distill.compression.pruning.prune_vocabulary), which changes
    nothing on text made of those tokens, so both read the same `input_ids`.
    """
    from hf_distill.compression.pruning import prune_vocabulary

    student_vocab = AutoTokenizer.from_pretrained(student_dir).get_vocab()
    teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher_vocab = teacher_tokenizer.get_vocab()
    if student_vocab == teacher_vocab:
        return teacher_dir
    missing = sorted(set(student_vocab) - set(teacher_vocab))
    if missing:
        raise ValueError(
            f"The student in {student_dir} has {len(missing)} tokens its teacher {teacher_dir} lacks (e.g. "
            f"{missing[:5]}); distil from a teacher whose vocabulary contains the student's."
        )
    view = work_dir / "teacher_view"
    if not (view / "config.json").is_file():
        by_id = sorted(student_vocab, key=student_vocab.get)
        keep = [teacher_vocab[token] for token in by_id]
        teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
        teacher, tokenizer = prune_vocabulary(teacher, teacher_tokenizer, keep)
        with atomic_directory(view, overwrite=True) as building:
            teacher.save_pretrained(building)
            tokenizer.save_pretrained(building)
            make_tokenizer_folder_portable(building)
    return view


def distill(
    recipe: Recipe,
    stage: DistillStage | QuantizeStage,
    data: StageData,
    source_dir: Path,
    teacher_dir: Path,
    folder: Path,
    work_dir: Path,
    state: Any,
    *,
    quantization_aware: bool = False,
) -> None:
    """Distil the model in `source_dir` from `teacher_dir` (scripts/distill_glue.py) into `folder`.

    Training runs on every process; the teacher's view and the stage folder are written by the main one."""
    from hf_distill.tasks.classification import distill as distill_glue

    settings = stage_settings(stage)
    if quantization_aware:
        settings["quantization_aware"] = True
    if is_done(folder, settings):
        return
    started = time.perf_counter()
    stage_work = work_dir / stage.name
    with state.main_process_first():  # the main process writes the teacher's view, the others then read it
        teacher = teacher_for(source_dir, teacher_dir, stage_work)
    training = recipe.training
    flags = [
        "--teacher_model_name_or_path", str(teacher), "--student_model_name_or_path", str(source_dir),
        "--temperature", str(training.temperature if stage.temperature is None else stage.temperature),
        "--alpha", str(stage.alpha if stage.alpha is not None else training.alpha),
        "--hidden_weight", str(stage.hidden_weight),
        # The card names this stage and the real teacher (its folder or Hub id, its parameters), not the view.
        "--model_card_name", stage.name, "--model_card_teacher", str(teacher_dir),
    ] + _training_flags(recipe, data, stage_work / "run", stage.epochs, stage.learning_rate)  # fmt: skip
    if isinstance(stage, DistillStage):
        flags += [
            "--attention_weight", str(stage.attention_weight),
            "--attention_head_mapping", stage.attention_head_mapping,
            "--kd_loss", stage.kd_loss,
        ]  # fmt: skip
    if quantization_aware:
        flags += ["--quantization_aware_training", "--qat_per_channel", str(stage.per_channel).lower()]
    results = distill_glue.run(flags)
    if state.is_main_process:
        with atomic_directory(folder, overwrite=True) as building:
            _keep_model_files(stage_work / "run", building)
            AutoTokenizer.from_pretrained(stage_work / "run").save_pretrained(building)
            make_tokenizer_folder_portable(building)
            _finish(building, settings, started, train=results.get("train", {}), teacher=str(teacher_dir))
    state.wait_for_everyone()


def quantize(
    recipe: Recipe,
    stage: QuantizeStage,
    data: StageData,
    source_dir: Path,
    teacher_dir: Path,
    folder: Path,
    work_dir: Path,
    state: Any,
) -> None:
    """INT8 in ONNX Runtime: of the `from` model (ptq: input ranges calibrated on `data.calibration_examples` training
    texts), or of it distilled with fake quantization (qat: deployed with the input ranges it trained with).

    The distillation of `qat` runs on every process; export and quantization on the main one. stage.json records the
    CPU it ran on (hf_distill.reporting.machine), the folder's quantization.json the scheme and its ranges."""
    from hf_distill.compression.quantization import INT8_SCHEME
    from hf_distill.reporting.machine import describe_cpu

    # The scheme is part of the settings: a folder quantized by an older scheme is not reused (is_done says so).
    settings = {**stage_settings(stage), "int8_scheme": INT8_SCHEME}
    if is_done(folder, settings):
        return
    started = time.perf_counter()
    model_dir = source_dir
    if stage.method == "qat":
        model_dir = work_dir / stage.name / "qat_model"
        distill(
            recipe, stage, data, source_dir, teacher_dir, model_dir, work_dir, state, quantization_aware=True
        )
    if state.is_main_process:
        from hf_distill.compression.deployed import probe_u8s8_kernel

        onnx_dir = work_dir / stage.name / "onnx_fp32"
        _export_int8(model_dir, onnx_dir, folder, data, stage.per_channel, qat=stage.method == "qat")
        # The CPU it was built on and the u8 x s8 kernel family that ran there (the graph is the same for every
        # x86 CPU: quantization.json's "graph"; benchmarks/bench_int8_profile.py times it on each kind).
        _finish(
            folder,
            settings,
            started,
            quantized_from=str(model_dir),
            cpu=describe_cpu(),
            u8s8_probe=probe_u8s8_kernel(),
        )
    state.wait_for_everyone()


def _export_int8(
    model_dir: Path, onnx_dir: Path, folder: Path, data: StageData, per_channel: bool, *, qat: bool = False
) -> None:
    """Export and quantize `model_dir`. Static input ranges: those a QAT model trained with (in its config.json, from
    hf_distill.compression.qat.strip_qat), else calibrated on the first `data.calibration_examples` training texts."""
    from hf_distill.compression.qat import CONFIG_KEY
    from hf_distill.compression.quantization import export_onnx, quantize_int8

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    export_onnx(model, tokenizer, onnx_dir, max_length=data.max_seq_length, overwrite=True)
    calibration = None
    if not (qat and (getattr(model.config, CONFIG_KEY, None) or {}).get("activation_ranges")):
        if qat:
            logger.warning(f"{model_dir} has no QAT input ranges in its config.json; calibrating instead.")
        texts = read_texts(data.files["train"])[: data.calibration_examples]
        calibration = _calibration_batches(model_dir, texts, data.max_seq_length)
    quantize_int8(onnx_dir, folder, per_channel=per_channel, calibration=calibration, overwrite=True)


def quantize_reference(teacher_dir: Path, work_dir: Path, data: StageData) -> None:
    """The teacher itself in INT8 ONNX Runtime (work_dir/int8, PTQ), built once per scheme: the report's runtime
    reference."""
    from hf_distill.compression.quantization import INT8_SCHEME

    info = work_dir / "int8" / "quantization.json"
    recorded = json.loads(info.read_text()) if info.is_file() else {}
    # Rebuilt for another scheme, or when built before the graph was recorded (every token through every layer).
    if recorded.get("scheme") != INT8_SCHEME or "graph" not in recorded:
        _export_int8(teacher_dir, work_dir / "onnx_fp32", work_dir / "int8", data, per_channel=True)


# --- evaluation -------------------------------------------------------------------------------------------


@dataclass
class LoadedStage:
    """A stage's model ready to run: `logits(texts)` and `batch(texts)` -> inputs, `run(inputs)`."""

    name: str
    path: Path
    runtime: str  # "pytorch" or "onnxruntime-int8"
    labels: list[str]  # id -> label name
    tokenize: Callable[[list[str]], dict[str, Any]]
    run: Callable[[dict[str, Any]], np.ndarray]
    params: int


def load_stage(name: str, path: Path, max_length: int, num_threads: int | None) -> LoadedStage:
    from hf_distill.compression.deployed import OnnxSequenceClassifier

    tokenizer = AutoTokenizer.from_pretrained(path)

    def tokenize(texts: list[str]) -> dict[str, Any]:
        return dict(
            tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        )

    if (path / "model.onnx").is_file():
        # Idle ORT threads sleep rather than spin, so they take no cores from the models timed after them.
        from hf_distill.compression.quantization import INT8_SCHEME

        session = OnnxSequenceClassifier(path, num_threads=num_threads, allow_spinning=False)
        info = session.quantization
        if info is not None and info.get("scheme") != INT8_SCHEME:
            logger.warning(
                f"{path} was quantized by an older INT8 scheme ({info.get('method', info.get('scheme'))}): its "
                "predictions depend on the rest of the batch and may saturate on CPUs without VNNI; rebuild it."
            )
        elif info is not None and "graph" not in info:
            logger.warning(
                f"{path} was built before fused attention and the one-token last layer (the same model, slower: "
                "~2x at batch 32, benchmarks/bench_int8_profile.py); delete the folder to rebuild it."
            )
        config = json.loads((path / "config.json").read_text())
        labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
        params = _onnx_parameter_count(path)
        return LoadedStage(name, path, "onnxruntime-int8", labels, tokenize, session.predict_logits, params)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()

    @torch.inference_mode()
    def run(inputs: dict[str, Any]) -> np.ndarray:
        return model(**inputs).logits.float().numpy()

    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return LoadedStage(
        name, path, "pytorch", labels, tokenize, run, sum(p.numel() for p in model.parameters())
    )


def _onnx_parameter_count(path: Path) -> int:
    """Parameters of an ONNX model: the elements of its weight initializers (INT8 weights count once)."""
    import onnx

    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    count = 0
    for tensor in model.graph.initializer:
        if tensor.data_type in (
            onnx.TensorProto.INT8,
            onnx.TensorProto.UINT8,
            onnx.TensorProto.FLOAT,
        ) and len(tensor.dims):
            elements = int(np.prod(tensor.dims))
            if elements > 1:  # skip the quantization scales and zero points
                count += elements
    return count


def accuracy(stage: LoadedStage, texts: Sequence[str], labels: Sequence[str], batch_size: int = 64) -> float:
    predictions: list[str] = []
    for start in range(0, len(texts), batch_size):
        logits = stage.run(stage.tokenize(list(texts[start : start + batch_size])))
        predictions.extend(stage.labels[int(i)] for i in logits.argmax(-1))
    return float(np.mean([p == gold for p, gold in zip(predictions, labels)]))


def write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2))
