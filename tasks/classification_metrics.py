"""Classification metrics: accuracy, F1, Matthews and correlations of predicted classes (or regression values)
against the references, and `compute_metrics` for the Trainer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from transformers import EvalPrediction

if TYPE_CHECKING:  # classification.py imports this module; the spec is only read here
    from .classification import TaskSpec


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
