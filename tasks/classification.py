"""Sequence classification and regression (GLUE and local files): data, labels, metrics, models.

The data and metric functions are pure (datasets and arrays in, datasets and numbers out) so they can be
tested without a model; model loading checks the teacher against the data before anything trains.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Value, load_dataset
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    default_data_collator,
)
from transformers.utils import logging

from .common import (
    LoadingArguments,
    ModelArguments,
    ReportArguments,
    build_student,
    load_hub_dataset,
    load_pretrained,
)

logger = logging.get_logger(__name__)

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

# Local files: accuracy (primary) and macro F1 for classes, correlations for regression.
FILE_CLASSIFICATION_METRICS = ("accuracy", "f1_macro")
FILE_REGRESSION_METRICS = ("pearson", "spearmanr", "combined_score")

_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Short names for the metric keys of the extra evaluation splits (MNLI mismatched -> eval_accuracy_mm).
_SPLIT_SUFFIXES = {"validation_mismatched": "mm", "test_mismatched": "mm"}


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


@dataclass
class DataArguments:
    """Which data to train and evaluate on, and how to turn it into model inputs."""

    task_name: str | None = field(
        default=None,
        metadata={
            "help": f"A GLUE task: {', '.join(GLUE_TASKS)}. Loads {GLUE_DATASET} from the Hub, or, with "
            "--train_file/--validation_file, gives local files the task's columns and metrics."
        },
    )
    dataset_name: str | None = field(default=None, metadata={"help": "Another dataset on the Hub."})
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration of --dataset_name."}
    )
    train_file: str | None = field(
        default=None, metadata={"help": "Training data: .csv, .tsv, .json, .jsonl or .parquet."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation data, same format."})
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
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training examples."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N evaluation examples."}
    )
    max_predict_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N prediction examples."}
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute the tokenized datasets."})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenization."}
    )

    def __post_init__(self):
        if self.task_name is not None:
            self.task_name = self.task_name.lower()
            if self.task_name not in GLUE_TASKS:
                raise ValueError(
                    f"Unknown task_name {self.task_name!r}; valid GLUE tasks are {', '.join(GLUE_TASKS)}. For other "
                    "data pass --train_file/--validation_file instead."
                )
        files = [f for f in (self.train_file, self.validation_file, self.test_file) if f is not None]
        if self.task_name is None and self.dataset_name is None and not files:
            raise ValueError(
                "No data: pass --task_name (a GLUE task), --dataset_name, or --train_file/--validation_file."
            )
        suffixes = {Path(f).suffix.lower() for f in files}
        unknown = suffixes - set(_FILE_BUILDERS)
        if unknown:
            raise ValueError(
                f"Unsupported data file type {sorted(unknown)}; use one of {sorted(_FILE_BUILDERS)}."
            )
        if len({_FILE_BUILDERS[s] for s in suffixes}) > 1:
            raise ValueError(f"Data files must share one format, got {files}.")
        if self.max_seq_length < 1:
            raise ValueError(f"max_seq_length must be >= 1, got {self.max_seq_length}.")

    @property
    def data_files(self) -> dict[str, str]:
        named = {"train": self.train_file, "validation": self.validation_file, "test": self.test_file}
        return {split: path for split, path in named.items() if path is not None}


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


# --------------------------------------------------------------------------------------------- data
def load_raw_datasets(data_args: DataArguments, loading_args: LoadingArguments | None = None) -> DatasetDict:
    """The raw splits: local files when given (each file loaded on its own, so a test file may lack the
    label column), else the GLUE task or --dataset_name from the Hub."""
    cache_dir = loading_args.cache_dir if loading_args else None
    files = data_args.data_files
    if files:
        raw = DatasetDict()
        for split, path in files.items():
            if not Path(path).is_file():
                raise FileNotFoundError(f"--{split}_file {path!r} does not exist.")
            suffix = Path(path).suffix.lower()
            extra = {"delimiter": "\t"} if suffix == ".tsv" else {}
            raw[split] = load_dataset(
                _FILE_BUILDERS[suffix], data_files={split: path}, split=split, cache_dir=cache_dir, **extra
            )
        return raw
    name, config = (
        (GLUE_DATASET, data_args.task_name)
        if data_args.dataset_name is None
        else (data_args.dataset_name, data_args.dataset_config_name)
    )
    return load_hub_dataset(
        name,
        config,
        local_files="local csv, json/jsonl or parquet files",
        cache_dir=cache_dir,
        token=loading_args.token if loading_args else None,
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


def split_suffix(split: str) -> str:
    """Short name of a split used in metric keys (validation_mismatched -> mm)."""
    return _SPLIT_SUFFIXES.get(split, split)


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
            num_proc=data_args.preprocessing_num_workers,
            load_from_cache_file=not data_args.overwrite_cache,
            desc=f"Tokenizing {split}",
        )
    return tokenized


def data_collator(
    tokenizer: PreTrainedTokenizerBase, data_args: DataArguments, fp16: bool = False
) -> Callable:
    if data_args.pad_to_max_length:
        return default_data_collator
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if fp16 else None)


# --------------------------------------------------------------------------------------------- metrics
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


def write_predictions(
    path: str | os.PathLike, predictions: np.ndarray, spec: TaskSpec, id2label: Mapping
) -> None:
    """`index<TAB>prediction` per example: a label name, or a value for regression."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("index\tprediction\n")
        for index, prediction in enumerate(predictions):
            value = f"{float(prediction):.3f}" if spec.is_regression else id2label[int(prediction)]
            handle.write(f"{index}\t{value}\n")


# --------------------------------------------------------------------------------------------- labels
def has_named_labels(config: PretrainedConfig) -> bool:
    """False for the LABEL_0, LABEL_1... that transformers assigns when a model was saved without names."""
    return any(config.id2label.get(i) != f"LABEL_{i}" for i in range(config.num_labels))


@dataclass
class LabelAlignment:
    label_to_id: dict[Any, int]  # raw label value -> output index of the model
    id2label: dict[int, str]


def align_labels(spec: TaskSpec, config: PretrainedConfig, role: str = "teacher") -> LabelAlignment:
    """Map the data's labels onto the outputs of a model with `config`.

    A model with named labels keeps its order (data labels are matched by name, then case-insensitively);
    an unnamed one takes the data's sorted order. Raises when the counts or the names differ.
    """
    config_names = [config.id2label.get(i, f"LABEL_{i}") for i in range(config.num_labels)]
    fix = (
        "pass a teacher fine-tuned on this data (scripts/train_teacher.py fine-tunes one)"
        if role == "teacher"
        else f"pass a {role} whose classification head matches the data"
    )
    if spec.is_regression:
        if config.num_labels != 1:
            raise ValueError(
                f"The {role} has {config.num_labels} labels {config_names}, but the task is regression (1 output); "
                f"{fix}."
            )
        return LabelAlignment({}, {0: config_names[0]})
    if config.num_labels != spec.num_labels:
        raise ValueError(
            f"The {role} has {config.num_labels} labels {config_names}, the data has {spec.describe_labels()}; "
            f"{fix}."
        )
    named = has_named_labels(config)
    if spec.label_names is None:
        # Bare integer labels: value order is output order.
        id2label = (
            dict(enumerate(config_names)) if named else {i: str(v) for i, v in enumerate(spec.label_values)}
        )
        return LabelAlignment({v: i for i, v in enumerate(spec.label_values)}, id2label)
    if not named:
        return LabelAlignment(
            {v: i for i, v in enumerate(spec.label_values)}, dict(enumerate(spec.label_names))
        )
    for normalise in (lambda s: s, str.lower):
        config_ids = {normalise(name): i for i, name in enumerate(config_names)}
        if set(config_ids) == {normalise(n) for n in spec.label_names}:
            label_to_id = {v: config_ids[normalise(n)] for v, n in zip(spec.label_values, spec.label_names)}
            return LabelAlignment(label_to_id, dict(enumerate(config_names)))
    raise ValueError(
        f"The {role}'s labels {config_names} differ from the data's labels {spec.label_names}; {fix}, or rename "
        "the labels in the data to match."
    )


def _set_labels(config: PretrainedConfig, spec: TaskSpec, id2label: Mapping[int, str]) -> None:
    config.num_labels = spec.num_labels
    config.id2label = dict(id2label)
    config.label2id = {name: i for i, name in id2label.items()}
    config.problem_type = "regression" if spec.is_regression else "single_label_classification"


# --------------------------------------------------------------------------------------------- models
def _load_classifier(
    path: str, config: PretrainedConfig, role: str, loading_args: LoadingArguments, **kwargs: Any
) -> tuple[PreTrainedModel, dict[str, Any]]:
    model, info = load_pretrained(
        AutoModelForSequenceClassification,
        path,
        role=role,
        loading_args=loading_args,
        config=config,
        output_loading_info=True,
        **kwargs,
    )
    return model, info


def load_tokenizer(name_or_path: str, loading_args: LoadingArguments) -> PreTrainedTokenizerBase:
    return load_pretrained(
        AutoTokenizer,
        loading_args.tokenizer_name or name_or_path,
        role="tokenizer",
        loading_args=loading_args,
    )


@dataclass
class DistillationModels:
    teacher: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    label_to_id: dict[Any, int]
    # A fresh student on each call, initialised the same way (from the teacher, or loaded under the run's seed).
    make_student: Callable[[], PreTrainedModel]


def load_distillation_models(model_args: ModelArguments, spec: TaskSpec) -> DistillationModels:
    """Teacher, tokenizer and student factory, with the teacher checked against the data first.

    Errors (before training): label count or names differ, the teacher has no trained head, a model
    cannot be found offline.
    """
    teacher_path = model_args.teacher_model_name_or_path
    teacher_config = load_pretrained(AutoConfig, teacher_path, role="teacher", loading_args=model_args)
    teacher_alignment = align_labels(spec, teacher_config, role="teacher")

    # Data labels are encoded in the student's output order: the trainer reorders the teacher's logits.
    student_config = None
    student_alignment = teacher_alignment
    if model_args.student_model_name_or_path is not None:
        student_config = load_pretrained(
            AutoConfig, model_args.student_model_name_or_path, role="student", loading_args=model_args
        )
        if student_config.num_labels == spec.num_labels and has_named_labels(student_config):
            student_alignment = align_labels(spec, student_config, role="student")

    if not has_named_labels(teacher_config):
        _set_labels(teacher_config, spec, teacher_alignment.id2label)
    teacher_config.problem_type = "regression" if spec.is_regression else "single_label_classification"
    tokenizer = load_tokenizer(teacher_path, model_args)
    teacher, info = _load_classifier(teacher_path, teacher_config, "teacher", model_args)
    if info.get("missing_keys"):
        raise ValueError(
            f"The teacher {teacher_path!r} has no trained weights for {sorted(info['missing_keys'])}: its "
            "classification head would be random. Fine-tune it on this data first with scripts/train_teacher.py "
            "and pass the result as --teacher_model_name_or_path."
        )

    def make_student() -> PreTrainedModel:
        def load_student(path: str) -> PreTrainedModel:
            config = copy.deepcopy(student_config)
            mismatched = config.num_labels != spec.num_labels
            _set_labels(config, spec, student_alignment.id2label)
            if getattr(config, "vocab_size", len(tokenizer)) < len(tokenizer):
                raise ValueError(
                    f"The student's vocabulary ({config.vocab_size}) is smaller than the teacher's tokenizer "
                    f"({len(tokenizer)}); teacher and student must share a tokenizer."
                )
            model, _ = _load_classifier(
                path, config, "student", model_args, ignore_mismatched_sizes=mismatched
            )
            return model

        return build_student(model_args, teacher, load_student)

    return DistillationModels(teacher, tokenizer, student_alignment.label_to_id, make_student)


def load_model_for_finetuning(
    model_name_or_path: str, spec: TaskSpec, loading_args: LoadingArguments
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[Any, int]]:
    """A model with a classification head sized for the data (a new head when the sizes differ)."""
    config = load_pretrained(AutoConfig, model_name_or_path, role="model", loading_args=loading_args)
    mismatched = config.num_labels != spec.num_labels
    if not mismatched and has_named_labels(config):
        try:
            alignment = align_labels(spec, config, role="model")
        except ValueError:
            alignment = None  # labels of another task: train a new head in the data's order
    else:
        alignment = None
    if alignment is None:
        natural = align_labels(spec, PretrainedConfig(num_labels=spec.num_labels), role="model")
        _set_labels(config, spec, natural.id2label)
        alignment = natural
    config.problem_type = "regression" if spec.is_regression else "single_label_classification"
    tokenizer = load_tokenizer(model_name_or_path, loading_args)
    model, _ = _load_classifier(
        model_name_or_path, config, "model", loading_args, ignore_mismatched_sizes=mismatched
    )
    return model, tokenizer, alignment.label_to_id


# --------------------------------------------------------------------------------------------- running
def check_splits(spec: TaskSpec, raw: DatasetDict, do_train: bool, do_eval: bool, do_predict: bool) -> None:
    """Fail before any model is loaded when a requested stage has no data."""
    wanted = {"--do_train": (do_train, ("train",) if do_train else ())}
    wanted["--do_eval"] = (do_eval, spec.eval_splits)
    wanted["--do_predict"] = (do_predict, spec.predict_splits)
    for flag, (requested, splits) in wanted.items():
        if requested and (not splits or any(split not in raw for split in splits)):
            kind = {"--do_train": "train", "--do_eval": "validation", "--do_predict": "test"}[flag]
            raise ValueError(
                f"{flag} needs {kind} data, but the loaded splits are {list(raw)}; pass --{kind}_file or drop {flag}."
            )


def train_evaluate_predict(
    trainer: Any, tokenized: DatasetDict, spec: TaskSpec, args: Any, resume_from_checkpoint: Any = None
) -> dict[str, dict[str, float]]:
    """The HF-examples flow for one trainer: train (then save the model, metrics and state), evaluate every
    evaluation split, predict every test split (writing predictions, and metrics where labels exist).

    Returns {"train": ..., "eval": ..., "predict": ...} for the stages that ran.
    """
    from .common import evaluate_datasets, save_metrics, train_and_save

    results: dict[str, dict[str, float]] = {}
    if args.do_train:
        results["train"] = train_and_save(trainer, tokenized["train"], resume_from_checkpoint)
    if args.do_eval:
        metrics = evaluate_datasets(trainer, {split_suffix(s): tokenized[s] for s in spec.eval_splits})
        save_metrics(trainer, "eval", metrics)
        results["eval"] = metrics
    if args.do_predict:
        predict_metrics: dict[str, float] = {}
        id2label = trainer.model.config.id2label
        for index, split in enumerate(spec.predict_splits):
            dataset = tokenized[split]
            prefix = "test" if index == 0 else f"test_{split_suffix(split)}"
            output = trainer.predict(dataset, metric_key_prefix=prefix)
            if "labels" in dataset.column_names:
                predict_metrics.update(output.metrics, **{f"{prefix}_samples": len(dataset)})
            if trainer.is_world_process_zero():
                name = spec.name if index == 0 else f"{spec.name}-{split_suffix(split)}"  # run_glue's mnli-mm
                path = Path(args.output_dir) / f"predict_results_{name}.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                predictions = predictions_from_logits(output.predictions, spec.is_regression)
                write_predictions(path, predictions, spec, id2label)
        if predict_metrics:
            save_metrics(trainer, "predict", predict_metrics)
            results["predict"] = predict_metrics
    return results
