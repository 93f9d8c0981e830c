"""What a text-classification task is (`TaskSpec`: columns, labels, problem type, metrics) and the GLUE tasks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GLUE_DATASET = "nyu-mll/glue"


# --------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class GlueTask:
    text_columns: tuple[str, ...]
    num_labels: int  # 1 = regression
    metrics: tuple[str, ...]
    primary_metric: str
    eval_splits: tuple[str, ...] = ("validation",)
    predict_splits: tuple[str, ...] = ("test",)


# Local files: accuracy (primary) and macro F1 for classes, correlations for regression.
FILE_CLASSIFICATION_METRICS = ("accuracy", "f1_macro")


FILE_REGRESSION_METRICS = ("pearson", "spearmanr", "combined_score")


FILE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")


@dataclass
class TaskSpec:
    """Everything the run needs to know about the task, resolved from the flags and the data."""

    name: str
    text_columns: tuple[str, ...]
    label_column: str
    is_regression: bool
    label_values: list[Any]  # distinct raw label values, sorted; empty for regression
    label_names: list[str] | None  # name of each value (None when the values are bare ints)
    metrics: tuple[str, ...]
    primary_metric: str
    eval_splits: tuple[str, ...]
    predict_splits: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_values)

    def describe_labels(self) -> str:
        if self.is_regression:
            return "a regression target (1 output)"
        return f"{self.num_labels} labels {self.label_names or self.label_values}"


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask(("sentence",), 2, ("matthews_correlation",), "matthews_correlation"),
    "sst2": GlueTask(("sentence",), 2, ("accuracy",), "accuracy"),
    "mrpc": GlueTask(("sentence1", "sentence2"), 2, ("accuracy", "f1", "combined_score"), "combined_score"),
    "qqp": GlueTask(("question1", "question2"), 2, ("accuracy", "f1", "combined_score"), "combined_score"),
    "stsb": GlueTask(
        ("sentence1", "sentence2"), 1, ("pearson", "spearmanr", "combined_score"), "combined_score"
    ),
    "mnli": GlueTask(
        ("premise", "hypothesis"),
        3,
        ("accuracy",),
        "accuracy",
        eval_splits=("validation_matched", "validation_mismatched"),
        predict_splits=("test_matched", "test_mismatched"),
    ),
    "qnli": GlueTask(("question", "sentence"), 2, ("accuracy",), "accuracy"),
    "rte": GlueTask(("sentence1", "sentence2"), 2, ("accuracy",), "accuracy"),
    "wnli": GlueTask(("sentence1", "sentence2"), 2, ("accuracy",), "accuracy"),
}
