"""Running a recipe: resume, train, evaluate, save metrics, write the distillation report, end every rank together."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import transformers
from transformers import TrainingArguments
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from hf_distill.tasks.common.arguments import ReportArguments
from hf_distill.training.checkpoints import resume_flag
from hf_distill.training.processes import finish_processes  # noqa: F401 - scripts call it as common.finish_processes

logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------------- running
def resume_checkpoint(training_args: TrainingArguments) -> str | bool | None:
    """What to pass as `trainer.train(resume_from_checkpoint=...)`.

    An explicit --resume_from_checkpoint wins; otherwise, if the output directory already holds checkpoints,
    the run resumes (True lets the trainer pick the last complete one) instead of starting over.
    """
    if training_args.resume_from_checkpoint is not None:
        return resume_flag(training_args.resume_from_checkpoint)  # "true"/"false" from the command line
    if os.path.isdir(training_args.output_dir) and get_last_checkpoint(training_args.output_dir) is not None:
        logger.info(
            f"Checkpoints found in {training_args.output_dir}: resuming training from the last complete one. "
            "Use another --output_dir to start from scratch."
        )
        return True
    return None


def save_metrics(trainer: transformers.Trainer, split: str, metrics: Mapping[str, float]) -> None:
    """Log `metrics` and write `{split}_results.json`, merged into `all_results.json` (main process only)."""
    trainer.log_metrics(split, dict(metrics))
    trainer.save_metrics(split, dict(metrics))


def train_and_save(
    trainer: transformers.Trainer, train_dataset: Any, resume_from_checkpoint: Any = None
) -> dict:
    """Train, then save the model, `train_results.json` and the trainer state, as HF's example scripts do."""
    train_result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.save_model()
    metrics = dict(train_result.metrics)
    try:
        metrics["train_samples"] = len(train_dataset)
    except TypeError:  # a streaming dataset has no length
        pass
    save_metrics(trainer, "train", metrics)
    trainer.save_state()
    return metrics


def evaluate_datasets(
    trainer: transformers.Trainer, eval_datasets: Mapping[str, Any], prefix: str = "eval"
) -> dict[str, float]:
    """Evaluate each dataset; the first one's metrics keep `prefix_` keys, the others get `_{name}` appended
    to each key (e.g. eval_accuracy_mm), as run_glue does for MNLI mismatched."""
    combined: dict[str, float] = {}
    for index, (name, dataset) in enumerate(eval_datasets.items()):
        metrics = trainer.evaluate(eval_dataset=dataset, metric_key_prefix=prefix)
        metrics[f"{prefix}_samples"] = len(dataset)
        combined.update(metrics if index == 0 else {f"{key}_{name}": value for key, value in metrics.items()})
    return combined


def strip_prefix(
    metrics: Mapping[str, float], prefix: str, keep: Sequence[str] | None = None
) -> dict[str, float]:
    """`{"eval_accuracy": x, ...}` -> `{"accuracy": x}`, keeping only the names in `keep` when given."""
    stripped = {
        key[len(prefix) + 1 :]: value for key, value in metrics.items() if key.startswith(f"{prefix}_")
    }
    return {key: value for key, value in stripped.items() if keep is None or key in keep}


def batch_maker(
    dataset: Any, collator: Callable[[list[dict]], Mapping[str, Any]], drop: Sequence[str] = ("labels",)
) -> Callable[[int], dict[str, Any]]:
    """`make_inputs(batch_size)` for latency measurement: the first `batch_size` examples of `dataset`
    (cycled when it is smaller), collated as in training, without the `drop` columns."""

    def make_inputs(batch_size: int) -> dict[str, Any]:
        rows = [dataset[i % len(dataset)] for i in range(batch_size)]
        batch = collator([{key: value for key, value in row.items() if key not in drop} for row in rows])
        return {key: value for key, value in batch.items() if key not in drop}

    return make_inputs


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return f"cpu, {threads} thread{'s' if threads != 1 else ''}"
    return str(device)


def write_distillation_report(
    trainer: transformers.Trainer,
    models: Mapping[str, Mapping[str, Any]],
    *,
    primary_metric: str,
    make_inputs: Callable[[int], Mapping[str, torch.Tensor]],
    report_args: ReportArguments,
    greater_is_better: bool = True,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Measure each model, then write the report files into the trainer's output directory.

    models: name -> {"model": module, "metrics": {metric: value}, ...}; other keys (e.g. "name_or_path") are
    kept in the report. Only the main process measures and writes; the others return None.
    """
    from hf_distill.reporting.report import build_report, profile_models, write_report

    if not trainer.is_world_process_zero():
        return None
    device = trainer.args.device
    logger.info(f"Measuring size and latency of {', '.join(models)} on {device}, timed alternately")
    # One round times every model once, so load from other jobs falls on all of them alike.
    profiles = profile_models(
        {name: entry["model"].to(device) for name, entry in models.items()},
        make_inputs,
        report_args.batch_sizes,
        warmup=report_args.latency_warmup,
        repeats=report_args.latency_repeats,
        device=device,
    )
    measured = {}
    for name, entry in models.items():
        measured[name] = {key: value for key, value in entry.items() if key != "model"}
        measured[name].update(profiles[name])
    report = build_report(
        measured,
        primary_metric=primary_metric,
        greater_is_better=greater_is_better,
        metadata={"device": device_description(device), **(metadata or {})},
    )
    write_report(report, trainer.args.output_dir)
    return report
