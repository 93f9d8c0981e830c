"""Text-classification data: the data flags, loading GLUE or local files, resolving the task from them, tokenizing,
collating, and the split checks made before training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from datasets import ClassLabel, Dataset, DatasetDict, Value
from transformers import (
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
    default_data_collator,
)
from transformers.utils import logging

from hf_distill.tasks.classification.spec import (
    FILE_CLASSIFICATION_METRICS,
    FILE_REGRESSION_METRICS,
    FILE_SUFFIXES,
    GLUE_DATASET,
    GLUE_TASKS,
    TaskSpec,
)
from hf_distill.tasks.common import raw_data
from hf_distill.tasks.common.arguments import LoadingArguments

logger = logging.get_logger(__name__)


@dataclass
class DataArguments(raw_data.DataArguments):
    """Which data to train and evaluate on, and how to turn it into model inputs."""

    task_name: str | None = field(
        default=None,
        metadata={
            "help": f"A GLUE task: {', '.join(GLUE_TASKS)}. Loads {GLUE_DATASET} from the Hub, or, with "
            "--train_file/--validation_file, gives local files the task's columns and metrics."
        },
    )
    dataset_name: str | None = field(default=None, metadata={"help": "Another dataset on the Hub."})
    train_file: str | None = field(
        default=None, metadata={"help": "Training data: .csv, .tsv, .json, .jsonl or .parquet."}
    )
    test_file: str | None = field(
        default=None,
        metadata={"help": "Prediction data, same format; with a label column its metrics are computed too."},
    )
    text_column_names: str | None = field(
        default=None,
        metadata={
            "help": "One or two text columns, comma-separated ('sentence1,sentence2'). Default: the task's "
            "columns, else sentence1/sentence2, else the first one or two text columns other than the label."
        },
    )
    label_column_name: str = field(
        default="label",
        metadata={"help": "Label column: strings or ints are classes, floats mean regression."},
    )
    max_seq_length: int = field(
        default=128, metadata={"help": "Tokens per example after tokenization; longer inputs are truncated."}
    )
    pad_to_max_length: bool = field(
        default=False,
        metadata={
            "help": "Pad every example to max_seq_length (static shapes, e.g. for TPUs). By default batches "
            "are padded to their longest example, which is faster on CPU and GPU."
        },
    )
    max_predict_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N prediction examples."}
    )

    def __post_init__(self):
        if self.task_name is not None:
            self.task_name = self.task_name.lower()
            if self.task_name not in GLUE_TASKS:
                raise ValueError(
                    f"Unknown task_name {self.task_name!r}; valid GLUE tasks are {', '.join(GLUE_TASKS)}. For other "
                    "data pass --train_file/--validation_file instead."
                )
        if self.task_name is None and self.dataset_name is None and not self.data_files:
            raise ValueError(
                "No data: pass --task_name (a GLUE task), --dataset_name, or --train_file/--validation_file."
            )
        raw_data.check_file_types(self.data_files.values(), FILE_SUFFIXES)
        if self.max_seq_length < 1:
            raise ValueError(f"max_seq_length must be >= 1, got {self.max_seq_length}.")


# --------------------------------------------------------------------------------------------- data
def load_raw_datasets(data_args: DataArguments, loading_args: LoadingArguments | None = None) -> DatasetDict:
    """The raw splits: local files when given (each file loaded on its own, so a test file may lack the
    label column), else the GLUE task or --dataset_name from the Hub."""
    return raw_data.load_raw_datasets(
        data_args,
        loading_args,
        local_files="local csv, json/jsonl or parquet files",
        hub_dataset=(GLUE_DATASET, data_args.task_name) if data_args.dataset_name is None else None,
    )


def _is_float(feature: Any) -> bool:
    return isinstance(feature, Value) and feature.dtype.startswith("float")


def _is_text(feature: Any) -> bool:
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


def _labelled(dataset: Dataset, label_column: str) -> bool:
    """Whether a split carries usable labels (GLUE test splits hold -1 everywhere)."""
    if label_column not in dataset.column_names or len(dataset) == 0:
        return False
    values = dataset.unique(label_column)
    return any(value is not None and value != -1 for value in values)


def resolve_task(raw: DatasetDict, data_args: DataArguments) -> TaskSpec:
    """Text columns, label set, metrics and splits of the run; raises before training on anything missing."""
    if len(raw) == 0:
        raise ValueError("No data splits were loaded.")
    task = GLUE_TASKS.get(data_args.task_name) if data_args.task_name else None
    label_column = data_args.label_column_name
    reference_split = "train" if "train" in raw else next(iter(raw))
    features = raw[reference_split].features

    if task is not None:
        eval_splits = tuple(s for s in task.eval_splits if s in raw) or tuple(
            s for s in ("validation",) if s in raw
        )
        predict_splits = tuple(s for s in task.predict_splits if s in raw) or tuple(
            s for s in ("test",) if s in raw
        )
    else:
        eval_splits = tuple(s for s in ("validation",) if s in raw)
        predict_splits = tuple(s for s in ("test",) if s in raw)
    labelled_splits = [s for s in raw if s not in predict_splits]

    for split in labelled_splits:
        if label_column not in raw[split].column_names:
            raise ValueError(
                f"Label column {label_column!r} not found in the {split} data; columns found: "
                f"{raw[split].column_names}. Pass --label_column_name."
            )

    # Text columns: explicit flag, then the task's, then guessed from the string columns.
    if data_args.text_column_names:
        text_columns = tuple(c.strip() for c in data_args.text_column_names.split(",") if c.strip())
    elif task is not None:
        text_columns = task.text_columns
    else:
        candidates = [
            c for c in raw[reference_split].column_names if c != label_column and _is_text(features[c])
        ]
        if {"sentence1", "sentence2"} <= set(candidates):
            text_columns = ("sentence1", "sentence2")
        else:
            text_columns = tuple(candidates[:2])
        if not text_columns:
            raise ValueError(
                f"No text column found in the {reference_split} data; columns found: "
                f"{raw[reference_split].column_names} (label column {label_column!r}). Pass --text_column_names."
            )
    if not 1 <= len(text_columns) <= 2:
        raise ValueError(f"text_column_names must name one or two columns, got {list(text_columns)}.")
    for split, dataset in raw.items():
        missing = [c for c in text_columns if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"Text column(s) {missing} not found in the {split} data; columns found: {dataset.column_names}. "
                "Pass --text_column_names."
            )

    label_feature = features.get(label_column) if label_column in features else None
    if task is not None:
        is_regression = task.num_labels == 1
    else:
        is_regression = _is_float(label_feature)

    label_values: list[Any] = []
    label_names: list[str] | None = None
    if not is_regression:
        if isinstance(label_feature, ClassLabel):
            label_values, label_names = list(range(label_feature.num_classes)), list(label_feature.names)
        else:
            sources = ["train"] if "train" in raw else labelled_splits
            seen = {
                value for split in sources for value in raw[split].unique(label_column) if value is not None
            }
            if _is_float(label_feature):
                raise ValueError(
                    f"Task {data_args.task_name} is a classification task but label column {label_column!r} holds "
                    "floats; pass integer or string labels."
                )
            label_values = sorted(seen, key=lambda v: (isinstance(v, str), v))
            if any(isinstance(v, str) for v in label_values):
                label_values = sorted(str(v) for v in label_values)
                label_names = list(label_values)
        if not label_values:
            raise ValueError(f"Label column {label_column!r} holds no labels.")
        known = set(label_values)
        for split in labelled_splits:
            if isinstance(label_feature, ClassLabel):
                continue
            values = raw[split].unique(label_column)
            unknown = sorted(str(v) for v in values if v is not None and v not in known)
            if unknown:
                raise ValueError(
                    f"The {split} data has labels {unknown} that the training data lacks (labels: {label_values})."
                )
        if task is not None and len(label_values) != task.num_labels:
            raise ValueError(
                f"Task {data_args.task_name} has {task.num_labels} labels but the data has {len(label_values)}: "
                f"{label_values}."
            )

    if task is not None:
        metrics, primary = task.metrics, task.primary_metric
    elif is_regression:
        metrics, primary = FILE_REGRESSION_METRICS, "combined_score"
    else:
        metrics, primary = FILE_CLASSIFICATION_METRICS, "accuracy"
    return TaskSpec(
        name=data_args.task_name or data_args.dataset_name or "custom",
        text_columns=text_columns,
        label_column=label_column,
        is_regression=is_regression,
        label_values=label_values,
        label_names=label_names,
        metrics=metrics,
        primary_metric=primary,
        eval_splits=eval_splits,
        predict_splits=predict_splits,
    )


def tokenize_datasets(
    raw: DatasetDict,
    spec: TaskSpec,
    tokenizer: PreTrainedTokenizerBase,
    label_to_id: Mapping[Any, int],
    data_args: DataArguments,
) -> DatasetDict:
    """Tokenized splits with a `labels` column (class ids, or floats for regression) where labels exist.

    Applies --max_*_samples first so that nothing is tokenized for nothing.
    """
    limits = {"train": data_args.max_train_samples}
    limits.update({split: data_args.max_eval_samples for split in spec.eval_splits})
    limits.update({split: data_args.max_predict_samples for split in spec.predict_splits})
    max_length = min(data_args.max_seq_length, tokenizer.model_max_length)
    if max_length < data_args.max_seq_length:
        logger.warning(
            f"max_seq_length {data_args.max_seq_length} exceeds the tokenizer's maximum "
            f"({tokenizer.model_max_length}); using {max_length}."
        )
    padding = "max_length" if data_args.pad_to_max_length else False

    tokenized = DatasetDict()
    for split, dataset in raw.items():
        limit = limits.get(split)
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        with_labels = _labelled(dataset, spec.label_column)

        def encode(batch: dict[str, list], with_labels: bool = with_labels) -> dict[str, list]:
            texts = [
                ["" if text is None else str(text) for text in batch[column]] for column in spec.text_columns
            ]
            encoded = tokenizer(*texts, padding=padding, max_length=max_length, truncation=True)
            if with_labels:
                values = batch[spec.label_column]
                encoded["labels"] = (
                    [float(v) for v in values] if spec.is_regression else [label_to_id[v] for v in values]
                )
            return encoded

        tokenized[split] = dataset.map(
            encode,
            batched=True,
            remove_columns=dataset.column_names,
            **data_args.map_options(split),
        )
    return tokenized


def data_collator(
    tokenizer: PreTrainedTokenizerBase, data_args: DataArguments, fp16: bool = False
) -> Callable:
    if data_args.pad_to_max_length:
        return default_data_collator
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if fp16 else None)


# --------------------------------------------------------------------------------------------- running
def check_splits(spec: TaskSpec, raw: DatasetDict, do_train: bool, do_eval: bool, do_predict: bool) -> None:
    """Fail before any model is loaded when a requested stage has no data."""
    needs = raw_data.stage_needs(do_train, do_eval, do_predict, spec.eval_splits, spec.predict_splits)
    raw_data.require_splits(raw, needs)
