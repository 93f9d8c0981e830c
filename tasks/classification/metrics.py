"""Classification metrics: accuracy, F1, Matthews and correlations of predicted classes (or regression values)
against the references, `compute_metrics` for the Trainer, and the prediction files of the test splits."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from datasets import DatasetDict
from transformers import EvalPrediction

if TYPE_CHECKING:  # classification.py imports this module; the spec is only read here
    from hf_distill.tasks.classification.spec import TaskSpec

# Short names for the metric keys of the extra evaluation splits (MNLI mismatched -> eval_accuracy_mm).
_SPLIT_SUFFIXES = {"validation_mismatched": "mm", "test_mismatched": "mm"}


def compute_task_metrics(
    predictions: np.ndarray, references: np.ndarray, metrics: Sequence[str]
) -> dict[str, float]:
    """Metrics of predicted class ids (or regression values) against the references.

    accuracy; f1 (binary, positive class 1); f1_macro; matthews_correlation; pearson; spearmanr;
    combined_score (mean of the metrics listed before it).
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    predictions, references = np.asarray(predictions), np.asarray(references)
    functions = {
        "accuracy": lambda: accuracy_score(references, predictions),
        "f1": lambda: f1_score(references, predictions),
        "f1_macro": lambda: f1_score(references, predictions, average="macro"),
        "matthews_correlation": lambda: matthews_corrcoef(references, predictions),
        "pearson": lambda: pearsonr(predictions, references)[0],
        "spearmanr": lambda: spearmanr(predictions, references)[0],
    }
    results: dict[str, float] = {}
    for name in metrics:
        if name == "combined_score":
            results[name] = float(np.mean(list(results.values())))
        elif name in functions:
            results[name] = float(functions[name]())
        else:
            raise ValueError(f"Unknown metric {name!r}; known: {sorted(functions) + ['combined_score']}.")
    return results


def predictions_from_logits(logits: Any, is_regression: bool) -> np.ndarray:
    """Class ids (argmax) or regression values from model outputs (the logits may come in a tuple)."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    logits = np.asarray(logits)
    return np.squeeze(logits, axis=-1) if is_regression else np.argmax(logits, axis=-1)


def make_compute_metrics(spec: TaskSpec) -> Callable[[EvalPrediction], dict[str, float]]:
    def compute_metrics(eval_prediction: EvalPrediction) -> dict[str, float]:
        predictions = predictions_from_logits(eval_prediction.predictions, spec.is_regression)
        return compute_task_metrics(predictions, eval_prediction.label_ids, spec.metrics)

    return compute_metrics


def split_suffix(split: str) -> str:
    """Short name of a split used in metric keys (validation_mismatched -> mm)."""
    return _SPLIT_SUFFIXES.get(split, split)


def write_predictions(
    path: str | os.PathLike, predictions: np.ndarray, spec: TaskSpec, id2label: Mapping
) -> None:
    """`index<TAB>prediction` per example: a label name, or a value for regression."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("index\tprediction\n")
        for index, prediction in enumerate(predictions):
            value = f"{float(prediction):.3f}" if spec.is_regression else id2label[int(prediction)]
            handle.write(f"{index}\t{value}\n")


def predict_and_write(
    trainer: Any,
    tokenized: DatasetDict,
    spec: TaskSpec,
    output_dir: str,
    id2label: Mapping,
    prefix: str = "test",
    file_suffix: str = "",
) -> dict[str, float]:
    """Predict every test split, writing predict_results_<task><file_suffix>.txt (run_glue's -mm for MNLI's
    second split); returns the metrics (keys `<prefix>_...`, `<prefix>_mm_...`) of the splits with labels."""
    metrics: dict[str, float] = {}
    for index, split in enumerate(spec.predict_splits):
        dataset = tokenized[split]
        key = prefix if index == 0 else f"{prefix}_{split_suffix(split)}"
        output = trainer.predict(dataset, metric_key_prefix=key)
        if "labels" in dataset.column_names:
            metrics.update(output.metrics, **{f"{key}_samples": len(dataset)})
        if trainer.is_world_process_zero():
            name = spec.name if index == 0 else f"{spec.name}-{split_suffix(split)}"  # run_glue's mnli-mm
            path = Path(output_dir) / f"predict_results_{name}{file_suffix}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            predictions = predictions_from_logits(output.predictions, spec.is_regression)
            write_predictions(path, predictions, spec, id2label)
    return metrics
