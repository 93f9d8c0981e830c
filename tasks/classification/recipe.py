"""The classification recipe's flow: train, evaluate, predict; its report flags."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from datasets import DatasetDict

from hf_distill.tasks.classification.metrics import (
    predict_and_write,
    split_suffix,
)
from hf_distill.tasks.classification.spec import TaskSpec
from hf_distill.tasks.common.arguments import ReportArguments


@dataclass
class ClassificationReportArguments(ReportArguments):
    """The report flags, plus a student trained without the teacher for comparison."""

    compare_no_kd: bool = field(
        default=False,
        metadata={
            "help": "Also train the same student initialisation on the task labels alone (no teacher) and add "
            "it to the report as student_no_kd, to show what distillation added."
        },
    )


def train_evaluate_predict(
    trainer: Any,
    tokenized: DatasetDict,
    spec: TaskSpec,
    args: Any,
    resume_from_checkpoint: Any = None,
    train_metrics: Mapping[str, float] | None = None,
) -> dict[str, dict[str, float]]:
    """The HF-examples flow for one trainer: train (then save the model, metrics and state), evaluate every
    evaluation split, predict every test split (writing predictions, and metrics where labels exist).

    `train_metrics` (e.g. the labelled / KD-only row counts) are added to train_results.json.
    Returns {"train": ..., "eval": ..., "predict": ...} for the stages that ran.
    """
    from hf_distill.tasks.common.running import evaluate_datasets, save_metrics, train_and_save

    results: dict[str, dict[str, float]] = {}
    if args.do_train:
        results["train"] = train_and_save(trainer, tokenized["train"], resume_from_checkpoint)
        if train_metrics:  # train_results.json written again, with them
            results["train"].update(train_metrics)
            trainer.save_metrics("train", results["train"])
    if args.do_eval:
        metrics = evaluate_datasets(trainer, {split_suffix(s): tokenized[s] for s in spec.eval_splits})
        save_metrics(trainer, "eval", metrics)
        results["eval"] = metrics
    if args.do_predict:
        predict_metrics = predict_and_write(
            trainer, tokenized, spec, args.output_dir, trainer.model.config.id2label
        )
        if predict_metrics:
            save_metrics(trainer, "predict", predict_metrics)
            results["predict"] = predict_metrics
    return results
