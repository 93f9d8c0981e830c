"""The embedding recipe's flow (scripts/distill_embeddings.py, `hf-distill embeddings`): the teacher's folder and
pooling, the student (cut or pruned, with its projection), distillation on unlabelled text with
`DistillationTrainer`, the student saved as a sentence-transformers folder, its INT8 deployment, and the report.

<output_dir>/
    data/                   the BBC split (--bbc_demo)
    training/               the trainer's checkpoints (a killed run resumes from the last complete one)
    student/                the student: sentence-transformers folder (README.md, modules.json, 1_Pooling, 2_Dense)
    student_onnx/           the student exported whole to ONNX (float32)           with --int8
    student_int8/           the same in INT8 for ONNX Runtime                        with --int8
    embedding_report.{json,md,png}
    run.json                the settings of the run; a later run in this folder must have the same ones
"""

from __future__ import annotations

import copy
import json
import logging as py_logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorWithPadding, set_seed
from transformers.utils import logging

from hf_distill import DistillationTrainer
from hf_distill.embeddings import (
    embedder_weight_bytes,
    embedding_student,
    fit_projection,
    load_sentence_embedder,
    save_sentence_embedder,
)
from hf_distill.reporting.base_model import display_name
from hf_distill.reporting.model_card import build_model_card
from hf_distill.reporting.report import count_parameters
from hf_distill.sources.embeddings import TEACHER_EMBEDDING_COLUMN
from hf_distill.storage.atomic import atomic_write_text
from hf_distill.storage.sizes import size_on_disk
from hf_distill.tasks import common
from hf_distill.tasks.embeddings import arguments, data, evaluation, report

logger = logging.get_logger("distill_embeddings")

RUN_FILE = "run.json"
# Settings that decide what is trained; a rerun in the same folder with others would mix two runs.
_RUN_KEYS = (
    "teacher_model_name_or_path", "pooling", "normalize", "student_num_layers", "student_layers", "student_hidden",
    "student_heads", "student_ffn", "fit_projection", "freeze_embeddings", "bbc_demo", "split_seed", "train_file", "max_seq_length",
    "passages_per_text", "max_train_texts", "calibration_texts", "embedding_mse_weight", "embedding_cosine_weight",
    "embedding_similarity_weight", "num_train_epochs", "max_steps", "learning_rate", "per_device_train_batch_size",
    "seed",
)  # fmt: skip


def _check_run(output_dir: Path, settings: dict[str, Any]) -> None:
    """Refuse a folder that holds a run with other settings; record this run's otherwise."""
    path = output_dir / RUN_FILE
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = {
            key: (before.get(key), value) for key, value in settings.items() if before.get(key) != value
        }
        if changed:
            raise ValueError(
                f"{output_dir} holds a run with other settings ({changed}: before, now); pass another --output_dir "
                "or delete that folder to start over."
            )
        logger.info(f"{output_dir} holds a run with these settings: resuming it")
    atomic_write_text(path, json.dumps(settings, indent=2, default=str))


def _student(teacher, model_args, calibration) -> Any:
    return embedding_student(
        teacher,
        num_layers=model_args.student_num_layers,
        layers=model_args.layer_indices(),
        hidden=model_args.student_hidden,
        heads=model_args.student_heads,
        ffn=model_args.student_ffn,
        calibration=calibration,
    )


def _train(
    teacher, tokenizer, texts, model_args, data_args, training_args, output_dir: Path
) -> dict[str, Any]:
    """Build and distil the student; write it to <output_dir>/student. Returns what the report says of it."""
    set_seed(training_args.seed)
    calibration = data.batches(
        texts.train[: data_args.calibration_texts], tokenizer, data_args.max_seq_length
    )
    student = _student(teacher, model_args, calibration)
    fit = None
    if model_args.fit_projection and student.hidden_size != teacher.hidden_size:
        fit = fit_projection(student, teacher, calibration)
    if model_args.freeze_embeddings:
        student.encoder.get_input_embeddings().requires_grad_(False)
    dataset = data.tokenized(texts.train, tokenizer, data_args.max_seq_length)
    seconds = {}
    if model_args.cache_teacher_embeddings:
        started = time.perf_counter()
        targets = teacher.encode(texts.train, tokenizer, batch_size=64, max_length=data_args.max_seq_length)
        dataset = dataset.add_column(TEACHER_EMBEDDING_COLUMN, targets.tolist())
        seconds["teacher_embeddings"] = time.perf_counter() - started
    train_args = copy.deepcopy(training_args)
    train_args.output_dir = str(output_dir / "training")
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=train_args,
        train_dataset=dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=common.resume_checkpoint(train_args))
    seconds["training"] = time.perf_counter() - started
    common.save_metrics(trainer, "train", result.metrics)
    trainer.save_state()
    card = build_model_card(
        trainer,
        model_name=f"{output_dir.name}-student",
        teacher_name=model_args.teacher_model_name_or_path,
        tasks="sentence-similarity",
        dataset="BBC News" if data_args.bbc_demo else None,
    )
    save_sentence_embedder(student, tokenizer, output_dir / "student", card=str(card))
    return {"train_metrics": result.metrics, "projection_fit": fit, "seconds": seconds}


def _int8(student_dir: Path, texts, data_args, output_dir: Path) -> Path:
    from hf_distill.embeddings.deployment import export_embedder_onnx, quantize_embedder_int8

    student, tokenizer = load_sentence_embedder(student_dir)
    onnx_dir, int8_dir = output_dir / "student_onnx", output_dir / "student_int8"
    if not onnx_dir.is_dir():
        export_embedder_onnx(student, tokenizer, onnx_dir, max_length=data_args.max_seq_length)
    if not int8_dir.is_dir():
        calibration = data.batches(
            texts.train[: data_args.calibration_texts], tokenizer, data_args.max_seq_length, tensors="np"
        )
        quantize_embedder_int8(onnx_dir, int8_dir, calibration=calibration)
    return int8_dir


def _candidates(teacher, tokenizer, teacher_path: str, output_dir: Path, int8: bool, max_length: int) -> list:
    """Teacher, student (read back from its folder) and INT8 student, each encoding texts end to end."""
    from hf_distill.tasks.embeddings.evaluation import Candidate

    def torch_encoder(model, model_tokenizer):
        return lambda texts: model.encode(
            texts, model_tokenizer, batch_size=32, max_length=max_length
        ).numpy()

    student, student_tokenizer = load_sentence_embedder(output_dir / "student", max_seq_length=max_length)
    candidates = [
        Candidate("teacher", torch_encoder(teacher, tokenizer), count_parameters(teacher),
                  embedder_weight_bytes(teacher_path), "pytorch", display_name(teacher_path)),
        Candidate("student", torch_encoder(student, student_tokenizer), count_parameters(student),
                  embedder_weight_bytes(output_dir / "student"), "pytorch", "student"),
    ]  # fmt: skip
    if int8:
        from hf_distill.embeddings.deployment import OnnxSentenceEmbedder

        deployed = OnnxSentenceEmbedder(output_dir / "student_int8", num_threads=torch.get_num_threads())
        candidates.append(
            Candidate("student_int8", lambda texts: deployed.encode(texts, batch_size=32, max_length=max_length),
                      count_parameters(student), size_on_disk(output_dir / "student_int8"), "onnxruntime-int8",
                      "student_int8")
        )  # fmt: skip
    return candidates


def run(argv: list[str] | None = None, *, description: str | None = None) -> dict[str, Any]:
    """The recipe: parse and check the flags, load the teacher (refused without pooling information), build and
    distil the student, save it, deploy it in INT8, measure everything, write the report."""
    model_args, data_args, report_args, training_args = arguments.parse(argv, description)
    common.setup_logging(training_args)
    for name in (
        "distill_embeddings",
        "hf_distill",
    ):  # this recipe's progress (fit, timings, report) on the main rank
        py_logging.getLogger(name).setLevel(training_args.get_process_log_level())
    output_dir = Path(training_args.output_dir)
    teacher_path = arguments.resolve_model_path(model_args.teacher_model_name_or_path)
    teacher, tokenizer = load_sentence_embedder(
        teacher_path,
        pooling=model_args.pooling,
        normalize=model_args.normalize,
        max_seq_length=data_args.max_seq_length,
    )
    settings = {key: getattr(args, key) for args in (model_args, data_args, training_args)
                for key in _RUN_KEYS if hasattr(args, key)}  # fmt: skip
    output_dir.mkdir(parents=True, exist_ok=True)
    _check_run(output_dir, settings)
    texts = data.load_texts(data_args, str(output_dir), tokenizer, training_args.seed)
    trained: dict[str, Any] = {}
    if not (output_dir / "student").is_dir():
        trained = _train(teacher, tokenizer, texts, model_args, data_args, training_args, output_dir)
    else:
        logger.info(f"{output_dir / 'student'} exists: training is done; measuring")
    if report_args.int8:
        _int8(output_dir / "student", texts, data_args, output_dir)
    if not report_args.measure:
        return {"student": str(output_dir / "student"), "training": trained or None}
    candidates = _candidates(
        teacher, tokenizer, teacher_path, output_dir, report_args.int8, data_args.max_seq_length
    )
    rows = evaluation.measure(
        candidates,
        texts,
        k=report_args.knn_k,
        warmup=report_args.latency_warmup,
        repeats=report_args.latency_repeats,
    )
    results = report.build(rows, texts, report_args, settings, trained, threads=torch.get_num_threads())
    report.write(results, output_dir)
    return results


def main(argv: list[str] | None = None, description: str | None = None) -> dict[str, Any]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run(argv, description=description)
