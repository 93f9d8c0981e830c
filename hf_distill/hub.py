"""The model card of a distilled student: what it was distilled from, how, and what it kept."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch
import transformers

from .report import count_parameters
from .teacher import unwrap_model

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


def write_atomic(path: str, text: str) -> None:
    """Write through a temporary file in the same folder and rename it, so a reader never sees half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def build_model_card(
    trainer: Any, model_name: str | None = None, tags: list[str] | str | None = None, **_: Any
) -> str:
    """Markdown with Hub metadata for `trainer.model`, distilled from `trainer.teacher_model`."""
    args = trainer.args
    student = unwrap_model(trainer.model)
    teacher = unwrap_model(trainer.teacher_model) if trainer.teacher_model is not None else None
    teacher_name = model_name_or_path(teacher) if teacher is not None else _cached_teacher_name(args)
    model_name = model_name or (args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)))
    student_params = count_parameters(unwrap_model(student))
    teacher_params = count_parameters(unwrap_model(teacher)) if teacher is not None else None

    all_tags = ["hf-distill", "distillation", "knowledge-distillation"]
    for tag in [tags] if isinstance(tags, str) else tags or []:
        if tag not in all_tags:
            all_tags.append(tag)
    front_matter = ["---", "library_name: transformers"]
    if teacher_name and not os.path.isabs(teacher_name):
        front_matter.append(f"base_model: {teacher_name}")
    front_matter += ["tags:"] + [f"- {tag}" for tag in all_tags] + ["---", ""]

    size = f"it has {_millions(student_params)} parameters"
    if teacher_params:
        size += f", {student_params / teacher_params:.1%} of the teacher's {_millions(teacher_params)}"
    lines = [
        f"# {model_name}",
        "",
        f"This model was distilled from **{teacher_name}** with [hf_distill](https://pypi.org/project/hf-distill/): "
        f"{size}.",
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

    metrics = _last_eval_metrics(trainer)
    if metrics:
        lines += ["", "## Evaluation of the student", "", "| Metric | Value |", "|---|---|"]
        lines += [f"| {name} | {_format(value)} |" for name, value in sorted(metrics.items())]
    report = getattr(trainer, "distillation_report", None)
    if report:
        from .report import report_to_markdown

        lines += ["", "## Student against teacher", "", report_to_markdown(report)]
    lines += [
        "",
        "## Training",
        "",
        f"- learning rate {args.learning_rate}, per-device batch {args.per_device_train_batch_size}, "
        f"gradient accumulation {args.gradient_accumulation_steps}, seed {args.seed}",
        f"- steps {trainer.state.global_step}, epochs {_format(trainer.state.epoch or 0)}, "
        f"bf16 {args.bf16}, fp16 {args.fp16}",
        f"- transformers {transformers.__version__}, torch {torch.__version__}",
        "",
    ]
    return "\n".join(front_matter + lines)


def write_model_card(trainer: Any, output_dir: str, *args: Any, **kwargs: Any) -> str:
    path = os.path.join(output_dir, "README.md")
    write_atomic(path, build_model_card(trainer, *args, **kwargs))
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


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 1e5 else f"{count:,}"


def _format(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
