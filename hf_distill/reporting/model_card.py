"""The model card of a distilled student: what it was distilled from, how, and what it kept.

The metadata is a `huggingface_hub.ModelCardData`, written by its YAML dumper, so every value (a tag such as
"my-tag: v1" included) reads back as it was given. It follows `transformers.Trainer.create_model_card`: the same
arguments, `model-index` from the last evaluation when a task and a dataset are known, and the tags of a README
already in the folder kept. Two things differ on purpose:

- `base_model` is only ever a Hub repo id (`is_hub_repo_id`); a teacher loaded from a local folder is described in
  the text instead, because the Hub rejects a card whose `base_model` is not a model it hosts;
- a PEFT student's card stays a PEFT card (`library_name: peft`, the adapter's base as `base_model`), and any other
  metadata PEFT or a person put in the README is kept: the keys computed here are replaced, the rest merged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
import transformers
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers.modelcard import METRIC_TAGS, TASK_MAPPING, TASK_TAG_TO_NAME_MAPPING
from transformers.utils import logging

from hf_distill.reporting.base_model import base_model as _base_model
from hf_distill.reporting.base_model import display_name, is_hub_repo_id
from hf_distill.reporting.base_model import peft_model as _peft_model
from hf_distill.reporting.report import count_parameters
from hf_distill.storage.atomic import atomic_write_text
from hf_distill.training.teacher import unwrap_model

logger = logging.get_logger(__name__)

HF_DISTILL_TAGS = ("hf-distill", "distillation", "knowledge-distillation")
# Metadata computed from this run on every write; an existing README's value of these keys is never kept.
_COMPUTED_METADATA = ("library_name", "base_model", "metrics", "model-index", "model_name", "eval_results")
# `datasets` builders that name a file format, not a dataset on the Hub (TrainingSummary skips the same ones).
_FILE_BUILDERS = (
    "csv",
    "json",
    "pandas",
    "parquet",
    "text",
    "arrow",
    "generator",
    "imagefolder",
    "audiofolder",
)

DISTILLATION_SETTINGS = (
    "temperature",
    "alpha",
    "kd_loss",
    "jsd_beta",
    "hidden_weight",
    "hidden_loss",
    "layer_map",
    "decoder_layer_map",
    "attention_weight",
    "attention_head_mapping",
    "teacher_dtype",
)


def _decoder_layers(config: Any) -> int | None:
    if not getattr(config, "is_encoder_decoder", False):
        return None
    return getattr(config, "decoder_layers", None) or getattr(config, "num_decoder_layers", None)


_ARCHITECTURE_ROWS = (
    ("Layers", lambda config: getattr(config, "num_hidden_layers", None)),
    ("Decoder layers", _decoder_layers),
    ("Hidden size", lambda config: getattr(config, "hidden_size", None)),
)


def model_name_or_path(model: torch.nn.Module) -> str:
    config = getattr(unwrap_model(model), "config", None)
    return getattr(config, "_name_or_path", "") or type(unwrap_model(model)).__name__


def card_arguments(
    language: str | list[str] | None = None,
    license: str | None = None,
    tags: str | list[str] | None = None,
    model_name: str | None = None,
    finetuned_from: str | None = None,
    tasks: str | list[str] | None = None,
    dataset_tags: str | list[str] | None = None,
    dataset: str | list[str] | None = None,
    dataset_args: str | list[str] | None = None,
    *,
    teacher_name: str | None = None,
    teacher_parameters: int | None = None,
) -> dict[str, Any]:
    """The arguments of `Trainer.create_model_card`, in its order, as a dict of those that were given, plus this
    card's own `teacher_name` and `teacher_parameters` (see `build_model_card`). Lists are copied:
    `Trainer.push_to_hub` appends to the tags list it passes."""
    given = {
        "language": language,
        "license": license,
        "tags": tags,
        "model_name": model_name,
        "finetuned_from": finetuned_from,
        "tasks": tasks,
        "dataset_tags": dataset_tags,
        "dataset": dataset,
        "dataset_args": dataset_args,
        "teacher_name": teacher_name,
        "teacher_parameters": teacher_parameters,
    }
    return {
        name: list(value) if isinstance(value, (list, tuple)) else value
        for name, value in given.items()
        if value is not None
    }


def build_model_card(
    trainer: Any,
    *,
    existing_metadata: Mapping[str, Any] | None = None,
    language: str | list[str] | None = None,
    license: str | None = None,
    tags: str | list[str] | None = None,
    model_name: str | None = None,
    finetuned_from: str | None = None,
    tasks: str | list[str] | None = None,
    dataset_tags: str | list[str] | None = None,
    dataset: str | list[str] | None = None,
    dataset_args: str | list[str] | None = None,
    teacher_name: str | None = None,
    teacher_parameters: int | None = None,
) -> ModelCard:
    """The card of `trainer.model`, distilled from `trainer.teacher_model` (or a teacher-logits cache).

    The other arguments are `Trainer.create_model_card`'s and mean the same; `existing_metadata` is the metadata of
    a README already in the folder, whose keys this run does not compute are kept (tags are merged).
    `teacher_name` and `teacher_parameters` describe the teacher when the model trained from stands in for it (e.g.
    the vocabulary-pruned view of a teacher that scripts/compress.py distils from): its Hub id or folder and its
    parameter count. Models are named by Hub id or relative path; an absolute path only by its folder's name
    (`display_name`), anywhere in the card.
    """
    args = trainer.args
    peft_student = _peft_model(trainer.model)
    student = unwrap_model(trainer.model)
    teacher = unwrap_model(trainer.teacher_model) if trainer.teacher_model is not None else None
    if teacher_name is None:
        teacher_name = model_name_or_path(teacher) if teacher is not None else _cached_teacher_name(args)
    model_name = display_name(model_name or _default_model_name(args))
    student_params = count_parameters(unwrap_model(student))
    teacher_params = teacher_parameters
    if teacher_params is None and teacher is not None:
        teacher_params = count_parameters(unwrap_model(teacher))
    base_model, base_model_note = _base_model(peft_student, student, teacher_name, finetuned_from)
    teacher_name = display_name(teacher_name)

    datasets = _datasets(trainer, dataset_tags, dataset, dataset_args)
    metrics = _last_eval_metrics(trainer)
    hub_metrics = _hub_metrics(metrics)
    eval_results = [
        EvalResult(
            task_type=task,
            task_name=TASK_TAG_TO_NAME_MAPPING.get(task),
            dataset_type=entry["type"],
            dataset_name=entry["name"],
            dataset_config=entry.get("config"),
            dataset_split=entry.get("split"),
            dataset_args=entry.get("args"),
            metric_type=metric_type,
            metric_name=metric_name,
            metric_value=value,
        )
        for task in _tasks(tasks, student)
        for entry in datasets
        for metric_type, (metric_name, value) in hub_metrics.items()
    ]

    metadata = {k: v for k, v in (existing_metadata or {}).items() if k not in _COMPUTED_METADATA}
    # A student class may name the library that loads it and its Hub task as class attributes (SentenceEmbedder:
    # sentence-transformers, sentence-similarity).
    metadata["library_name"] = (
        "peft" if peft_student is not None else getattr(type(student), "library_name", "transformers")
    )
    if getattr(type(student), "pipeline_tag", None):
        metadata["pipeline_tag"] = type(student).pipeline_tag
    if base_model is not None:
        metadata["base_model"] = base_model
    if language is not None:
        metadata["language"] = _listify(language)
    if license is not None:
        metadata["license"] = license
    if datasets:
        metadata["datasets"] = [entry["type"] for entry in datasets]
    if hub_metrics:
        metadata["metrics"] = list(hub_metrics)
    metadata["tags"] = _merge_tags(HF_DISTILL_TAGS, _listify(tags), _listify(metadata.get("tags")))
    card_data = ModelCardData(
        **metadata, eval_results=eval_results or None, model_name=model_name if eval_results else None
    )

    size = f"it has {_millions(student_params)} parameters"
    if teacher_params:
        size += f", {student_params / teacher_params:.1%} of the teacher's {_millions(teacher_params)}"
    dataset_names = _listify(dataset) or [entry["name"] for entry in datasets]
    trained_on = f" on {_dataset_phrase(dataset_names)}" if dataset_names else ""
    lines = [
        f"# {model_name}",
        "",
        f"This model was distilled from **{teacher_name}** with [hf_distill](https://pypi.org/project/hf-distill/)"
        f"{trained_on}: {size}.",
        "",
        base_model_note,
        "",
        "## Teacher and student",
        "",
        "| | Teacher | Student |",
        "|---|---|---|",
        f"| Model | {teacher_name} | {model_name} |",
        f"| Architecture | {type(teacher).__name__ if teacher is not None else 'cached top-k logits'} "
        f"| {type(student).__name__} |",
        f"| Parameters | {f'{teacher_params:,}' if teacher_params else 'unknown'} | {student_params:,} |",
    ]
    for label, read in _ARCHITECTURE_ROWS:
        teacher_value = read(teacher.config) if teacher is not None else None
        student_value = read(student.config)
        if label == "Layers" and getattr(student.config, "is_encoder_decoder", False):
            label = "Encoder layers"
        if student_value is not None:
            lines.append(
                f"| {label} | {teacher_value if teacher_value is not None else '?'} | {student_value} |"
            )
    lines += ["", "## Distillation settings", "", "| Setting | Value |", "|---|---|"]
    lines += [f"| {name} | {getattr(args, name)} |" for name in DISTILLATION_SETTINGS if hasattr(args, name)]

    if metrics:
        lines += ["", "## Evaluation of the student", "", "| Metric | Value |", "|---|---|"]
        lines += [f"| {name} | {_format(value)} |" for name, value in sorted(metrics.items())]
    report = getattr(trainer, "distillation_report", None)
    if report:
        from hf_distill.reporting.report import report_to_markdown

        lines += ["", "## Student against teacher", "", report_to_markdown(report)]
    lines += [
        "",
        "## Training",
        "",
        f"- learning rate {args.learning_rate}, per-device batch {args.per_device_train_batch_size}, "
        f"gradient accumulation {args.gradient_accumulation_steps}, seed {args.seed}",
        f"- steps {trainer.state.global_step}, epochs {_format(trainer.state.epoch or 0)}, "
        f"bf16 {args.bf16}, fp16 {args.fp16}",
        f"- transformers {transformers.__version__}, torch {torch.__version__}" + _peft_version(peft_student),
        "",
    ]
    # Parsed back before it is written, so a card the Hub library cannot read fails here, not at upload.
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_model_card(trainer: Any, output_dir: str, **card_arguments: Any) -> str:
    """Write `output_dir`/README.md (atomically), keeping what an existing README's metadata says that this run
    does not compute (e.g. what PEFT's `save_pretrained` wrote). `card_arguments` are `build_model_card`'s."""
    path = os.path.join(output_dir, "README.md")
    card = build_model_card(trainer, existing_metadata=_read_metadata(path), **card_arguments)
    atomic_write_text(path, str(card))
    return path


def _cached_teacher_name(args: Any) -> str:
    """The teacher named in the manifest of a teacher-logits cache."""
    try:
        with open(os.path.join(args.teacher_logits_cache, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError, TypeError):
        return "a cached teacher"
    return str(manifest.get("teacher") or manifest.get("teacher_name_or_path") or "a cached teacher")


def _last_eval_metrics(trainer: Any) -> dict[str, float]:
    for entry in reversed(trainer.state.log_history):
        metrics = {k: v for k, v in entry.items() if k.startswith("eval_") and isinstance(v, (int, float))}
        if metrics:
            return {k: v for k, v in metrics.items() if not k.endswith(("_runtime", "_per_second"))}
    return {}


def _read_metadata(path: str) -> dict[str, Any]:
    """The metadata of the README at `path`; {} when there is none, or (with a warning) when it cannot be read."""
    if not os.path.isfile(path):
        return {}
    try:
        return ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()
    except (ValueError, TypeError, yaml.YAMLError) as error:
        logger.warning(
            f"The metadata of {path} cannot be read ({error}); the new model card replaces it. Fix that README's "
            "YAML block before saving to keep what it said."
        )
        return {}


def _default_model_name(args: Any) -> str:
    """The repo's name, as `Trainer.push_to_hub` names the model: the last part of hub_model_id, else output_dir's."""
    if args.hub_model_id:
        return args.hub_model_id.split("/")[-1]
    return os.path.basename(os.path.abspath(args.output_dir))


def _datasets(trainer: Any, dataset_tags: Any, dataset: Any, dataset_args: Any) -> list[dict[str, Any]]:
    """One dict per dataset: "type" (the Hub dataset id), "name", and when known "config", "split" and "args" (keyword
    arguments of load_dataset). From the arguments as `Trainer.create_model_card` reads them (a string in
    dataset_args is a config name, as run_glue.py passes the GLUE task), or else, as `TrainingSummary.from_trainer`
    does, from a Hub dataset that the trainer holds."""
    if dataset_tags is not None:
        entries: list[dict[str, Any]] = [{"type": tag} for tag in _listify(dataset_tags)]
        extras = [dataset_args] if isinstance(dataset_args, (str, Mapping)) else list(dataset_args or [])
        for entry, extra in zip(entries, extras):
            if isinstance(extra, Mapping):
                entry["args"] = dict(extra)
            elif extra is not None:
                entry["config"] = str(extra)
    else:
        entries = _hub_dataset(trainer)
    names = _listify(dataset)
    for index, entry in enumerate(entries):
        entry["name"] = names[index] if index < len(names) else entry["type"]
    return entries


def _hub_dataset(trainer: Any) -> list[dict[str, Any]]:
    """The evaluation (else training) dataset as a model-index dataset, when it was loaded from the Hub."""
    one = trainer.eval_dataset if trainer.eval_dataset is not None else trainer.train_dataset
    if isinstance(one, Mapping):
        one = next(iter(one.values()), None)
    builder = getattr(one, "builder_name", None)
    if not isinstance(builder, str) or not builder or builder in _FILE_BUILDERS:
        return []
    split = getattr(one, "split", None)
    return [
        {
            "type": builder,
            "config": getattr(one, "config_name", None),
            "split": None if split is None else str(split),
        }
    ]


def _tasks(tasks: Any, student: torch.nn.Module) -> list[str]:
    """The Hub task ids: `tasks` as given, or the task whose transformers auto-class includes the student's class
    (the last match, as `TrainingSummary.from_trainer` takes)."""
    if tasks is not None:
        return _listify(tasks)
    class_name = type(student).__name__
    found = []
    for task, mapping in TASK_MAPPING.items():
        names = [
            name for value in mapping.values() for name in ([value] if isinstance(value, str) else value)
        ]
        if class_name in names:
            found.append(task)
    return found[-1:]


def _hub_metrics(metrics: Mapping[str, float]) -> dict[str, tuple[str, float]]:
    """Hub metric id -> (display name, value) for the evaluation metrics the Hub has an id for, picked and named as
    `TrainingSummary` does: eval_matthews_correlation -> ("matthews_correlation", "Matthews Correlation")."""
    found = {}
    for key, value in metrics.items():
        name = key.removeprefix("eval_")
        if name.lower() in METRIC_TAGS:
            metric_type = name.lower()
        elif name.lower() == "rouge1":
            metric_type = "rouge"
        else:
            continue
        found[metric_type] = (" ".join(part.capitalize() for part in name.split("_")), float(value))
    return found


def _merge_tags(*groups: list[Any]) -> list[str]:
    """The tags of all groups in order, each once. Left out: anything but a string (a README written before tags
    were quoted reads "my-tag: v1" as a mapping) and a `base_model:...` tag naming no Hub repo (PEFT writes
    `base_model:adapter:<path>` for a local base)."""
    merged: list[str] = []
    for group in groups:
        for tag in group:
            if not isinstance(tag, str) or tag in merged:
                continue
            if tag.startswith("base_model:") and not is_hub_repo_id(tag.rsplit(":", 1)[-1]):
                continue
            merged.append(tag)
    return merged


def _listify(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, Mapping)):
        return [value]
    return list(value)


def _dataset_phrase(names: list[str]) -> str:
    if len(names) == 1:
        return f"the {names[0]} dataset"
    return ", ".join(f"the {name}" for name in names[:-1]) + f" and the {names[-1]} datasets"


def _peft_version(peft_student: torch.nn.Module | None) -> str:
    if peft_student is None:
        return ""
    import peft

    return f", peft {peft.__version__}"


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 1e5 else f"{count:,}"


def _format(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
