"""More data than labels for the classification recipe: a transfer set of unlabelled text, and augmented copies of
the training text (`augmentation.py`), both mixed into the training set with label -100.

The trainer then trains every row on the KD term (the teacher labels it with its soft targets) and only the labelled
rows on the hard loss: for sequence classification a -100 label is left out of the cross-entropy and of its
average (`task_loss.hard_label_loss`), never out of KD (`task_loss.align_positions`).

KD-only rows come from four places: `--transfer_file`; `--transfer_split NAME`, a split of the loaded dataset (IMDB's
`unsupervised`); the rows of the training data without a label, with `--use_unlabelled_rows`; and augmentation.
A missing label is an empty cell (CSV), a null (JSON), or -1 in a `ClassLabel` column (the `datasets` convention,
GLUE's test splits). In a plain integer column -1 is a class like any other (files with -1/0/1 sentiment exist).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import ClassLabel, Dataset, DatasetDict, Value, concatenate_datasets, load_dataset
from transformers.utils import logging

logger = logging.get_logger(__name__)

IGNORE_LABEL = -100
TRANSFER_BUILDERS = {
    ".txt": "text",
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}


@dataclass
class TransferArguments:
    """Unlabelled text and augmentation added to the training set, trained on KD only."""

    transfer_file: str | None = field(
        default=None,
        metadata={
            "help": "Unlabelled text the teacher labels with its soft targets, mixed into the training set (KD on "
            "every row, the hard loss on the labelled rows only): .txt (one text per line) or .csv/.tsv/.json/"
            ".jsonl/.parquet with the task's text column(s) and no labels."
        },
    )
    transfer_split: str | None = field(
        default=None,
        metadata={
            "help": "A split of the loaded dataset without labels (IMDB's 'unsupervised', a GLUE test split) to train "
            "on KD only; it is taken out of the evaluation and prediction splits. A split with labels is refused."
        },
    )
    use_unlabelled_rows: bool = field(
        default=False,
        metadata={
            "help": "Train the training rows that have no label (an empty cell, null, or -1 in a ClassLabel "
            "column) on KD only, with label -100. Without it such rows are an error, since a missing label is as "
            "often a broken export as a deliberate one."
        },
    )
    augment_copies: int = field(
        default=0,
        metadata={
            "help": "TinyBERT-style augmentation: this many new texts per training text, made by replacing words "
            "with their nearest neighbours in the teacher's input embeddings, or with a masked LM's predictions "
            "(--augment_model_name_or_path) (augmentation.py); written once to --augment_dir with a manifest and "
            "reused. 0 = off."
        },
    )
    augment_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A masked LM (with its own tokenizer, e.g. a bert-base-uncased folder) whose top "
            "--augment_neighbours predictions replace each single-piece word, masked one at a time (TinyBERT); "
            "multi-piece words are kept. Default: embedding neighbours. Needs --augment_copies."
        },
    )
    augment_replace_prob: float = field(
        default=0.4, metadata={"help": "Probability that a whole word is replaced (TinyBERT: 0.4)."}
    )
    augment_neighbours: int = field(
        default=15, metadata={"help": "Candidates per word: its nearest neighbours by cosine (TinyBERT: 15)."}
    )
    augment_dir: str | None = field(
        default=None, metadata={"help": "Where the augmented texts go (default <output_dir>/augmented)."}
    )

    def __post_init__(self):
        if self.transfer_file is not None:
            suffix = Path(self.transfer_file).suffix.lower()
            if suffix not in TRANSFER_BUILDERS:
                raise ValueError(
                    f"--transfer_file {self.transfer_file!r} has an unknown format {suffix!r}; use one of "
                    f"{sorted(TRANSFER_BUILDERS)} (.txt: one text per line)."
                )
        if self.augment_copies < 0:
            raise ValueError(f"augment_copies must be >= 0, got {self.augment_copies}.")
        if not 0.0 < self.augment_replace_prob <= 1.0:
            raise ValueError(f"augment_replace_prob must be in (0, 1], got {self.augment_replace_prob}.")
        if self.augment_neighbours < 1:
            raise ValueError(f"augment_neighbours must be >= 1, got {self.augment_neighbours}.")
        if self.augment_model_name_or_path is not None and self.augment_copies == 0:
            raise ValueError(
                f"augment_model_name_or_path {self.augment_model_name_or_path!r} is set but augment_copies is 0: "
                "pass --augment_copies N (new texts per training text), or drop --augment_model_name_or_path."
            )
        if self.transfer_split is not None and self.transfer_split.split("[")[0] == "train":
            raise ValueError(
                "transfer_split 'train' is the labelled training split; name another split (e.g. 'unsupervised'), "
                "or pass --use_unlabelled_rows to train only the training rows without a label on KD."
            )


def load_transfer_texts(path: str, text_columns: tuple[str, ...], label_column: str) -> Dataset:
    """The transfer file as a dataset with the task's text columns only.

    Raises before training on a missing file, an unknown format, missing text columns, or a label column with
    values in it (labelled data belongs in --train_file: the transfer set is trained on KD alone).
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"--transfer_file {path!r} does not exist.")
    suffix = source.suffix.lower()
    if suffix not in TRANSFER_BUILDERS:
        raise ValueError(
            f"--transfer_file {path!r}: unknown format {suffix!r}; use one of {sorted(TRANSFER_BUILDERS)}."
        )
    options: dict[str, Any] = {"delimiter": "\t"} if suffix == ".tsv" else {}
    dataset = load_dataset(
        TRANSFER_BUILDERS[suffix], data_files={"train": str(source)}, split="train", **options
    )
    if suffix == ".txt":
        if len(text_columns) != 1:
            raise ValueError(
                f"--transfer_file {path!r} is plain text (one text per line), but the task reads two text columns "
                f"{list(text_columns)}; give a .csv/.jsonl with those columns."
            )
        dataset = dataset.filter(lambda row: bool(row["text"].strip()))
        return dataset if text_columns[0] == "text" else dataset.rename_column("text", text_columns[0])
    if label_column in dataset.column_names and any(
        value is not None and value != "" for value in dataset.unique(label_column)
    ):
        raise ValueError(
            f"--transfer_file {path!r} has a label column {label_column!r} with values in it: the transfer set is "
            "unlabelled text, trained on the teacher's soft targets only. Put labelled rows in --train_file, or "
            "drop the column."
        )
    missing = [column for column in text_columns if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"--transfer_file {path!r} lacks the text column(s) {missing}; columns found: {dataset.column_names}."
        )
    return dataset.select_columns(list(text_columns))


def unlabelled(tokenized: Dataset) -> Dataset:
    """A tokenized split with every row labelled -100 (KD only)."""
    if "labels" in tokenized.column_names:
        tokenized = tokenized.remove_columns("labels")
    return tokenized.add_column("labels", [IGNORE_LABEL] * len(tokenized))


def mixed_training_set(train: Dataset, extra: list[Dataset], seed: int) -> Dataset:
    """The labelled training rows plus the unlabelled ones (each already `unlabelled`), shuffled together once so
    that batches mix both kinds (the Trainer shuffles again each epoch)."""
    if not extra:
        return train
    parts = [train] + [part.cast(train.features) for part in extra]
    return concatenate_datasets(parts).shuffle(seed=seed).flatten_indices()


def tokenize_unlabelled(texts: Dataset, tokenize: Any) -> Dataset:
    """Tokenize raw unlabelled texts with the recipe's `tokenize(DatasetDict) -> DatasetDict` and label them -100."""
    return unlabelled(tokenize(DatasetDict({"transfer": texts}))["transfer"])


# ---- unlabelled rows and splits of the dataset ---------------------------------------------------------------
def _is_missing(value: Any, class_label: bool) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, str) and not value.strip():
        return True
    return class_label and value == -1


def missing_labels(dataset: Dataset, label_column: str) -> list[bool]:
    """Per row, whether its label is missing: None (an empty CSV cell, a JSON null), NaN, a blank string, or -1 in
    a `ClassLabel` column."""
    class_label = isinstance(dataset.features[label_column], ClassLabel)
    return [_is_missing(value, class_label) for value in dataset[label_column]]


def _whole_numbers(dataset: Dataset, label_column: str) -> Dataset:
    """A float label column of whole numbers (pandas reads an integer CSV column with empty cells as floats) cast
    back to integers, so that it means classes as it would have without the empty cells."""
    feature = dataset.features[label_column]
    if not (isinstance(feature, Value) and feature.dtype.startswith("float")):
        return dataset
    if all(float(value).is_integer() for value in dataset.unique(label_column)):
        return dataset.cast_column(label_column, Value("int64"))
    return dataset


def set_aside_kd_only_rows(
    raw: DatasetDict,
    label_column: str,
    transfer_args: TransferArguments,
    max_train_samples: int | None = None,
) -> tuple[DatasetDict, dict[str, Dataset]]:
    """(raw without the rows trained on KD only, source name -> those rows with all their columns).

    With --transfer_split NAME that split is taken out; with --use_unlabelled_rows the training rows without a label
    are (after --max_train_samples, which counts every row). Raises before training on a missing split, a transfer
    split with labels, training rows without a label when the flag is off, and evaluation data partly unlabelled.
    """
    raw = DatasetDict(raw)
    sources: dict[str, Dataset] = {}
    name = transfer_args.transfer_split
    if name is not None:
        if name not in raw:
            raise ValueError(
                f"--transfer_split {name!r} is not a split of the loaded data; its splits are {list(raw)} (for a "
                "local file of unlabelled text use --transfer_file)."
            )
        split = raw.pop(name)
        if label_column in split.column_names and not all(missing_labels(split, label_column)):
            raise ValueError(
                f"--transfer_split {name!r} has labels in column {label_column!r}: the transfer split is trained on "
                "the teacher's soft targets only. Name a split without labels (IMDB's 'unsupervised'), or train on "
                "its labels as --train_file."
            )
        sources[f"split {name!r}"] = split
    if "train" in raw and label_column in raw["train"].column_names:
        train = raw["train"]
        if max_train_samples is not None:
            train = train.select(range(min(max_train_samples, len(train))))
        missing = missing_labels(train, label_column)
        count = sum(missing)
        if count and not transfer_args.use_unlabelled_rows:
            raise ValueError(
                f"{count} of {len(train)} training rows have no label in column {label_column!r} (an empty cell, "
                "null, or -1 in a ClassLabel column). Pass --use_unlabelled_rows to train them on the teacher's soft "
                "targets only (KD, label -100), or fill in or drop those rows."
            )
        if count:
            sources["unlabelled training rows"] = train.select([i for i, gone in enumerate(missing) if gone])
            kept = train.select([i for i, gone in enumerate(missing) if not gone])
            raw["train"] = _whole_numbers(kept, label_column)
    for split, dataset in raw.items():
        if split == "train" or label_column not in dataset.column_names:
            continue
        missing = missing_labels(dataset, label_column)
        if 0 < sum(missing) < len(dataset):
            raise ValueError(
                f"{sum(missing)} of {len(dataset)} rows of the {split} data have no label in column {label_column!r}; "
                "evaluation needs a label on every row (or none, for prediction only): fill in or drop them "
                "(--use_unlabelled_rows applies to the training data)."
            )
    return raw, sources


def kd_only_texts(
    sources: Mapping[str, Dataset],
    text_columns: tuple[str, ...],
    label_column: str,
    transfer_args: TransferArguments,
    is_regression: bool = False,
) -> dict[str, Dataset]:
    """Source name -> the texts (the task's text columns) of every KD-only source: the rows `set_aside_kd_only_rows`
    took out and the --transfer_file. Raises before training on missing text columns, and on a regression task,
    whose loss has no ignored label value (-100 would be a target)."""
    texts = {}
    for source, dataset in sources.items():
        missing = [column for column in text_columns if column not in dataset.column_names]
        if missing:
            raise ValueError(
                f"KD-only rows from {source} lack the text column(s) {missing}; columns found: "
                f"{dataset.column_names}."
            )
        texts[source] = dataset.select_columns(list(text_columns))
    if transfer_args.transfer_file is not None:
        texts["--transfer_file"] = load_transfer_texts(
            transfer_args.transfer_file, text_columns, label_column
        )
    if is_regression and (texts or transfer_args.augment_copies):
        raise ValueError(
            f"KD-only rows ({', '.join(list(texts) + (['augmentation'] if transfer_args.augment_copies else []))}) "
            "need a classification task: the regression loss has no ignored label, so a -100 row would be a target. "
            "Drop the transfer/augmentation flags for regression."
        )
    return texts


def describe_training_rows(labelled: int, kd_only: Mapping[str, int]) -> dict[str, int]:
    """Logs how many training rows carry a label and how many are KD only, per source; returns the counts as the
    metrics `train_labelled_samples` and `train_kd_only_samples`."""
    total = sum(kd_only.values())
    if total:
        parts = ", ".join(f"{source} {count}" for source, count in kd_only.items())
        logger.info(
            f"Training rows: {labelled} labelled (task loss + KD), {total} KD only (label -100): {parts}"
        )
    return {"train_labelled_samples": labelled, "train_kd_only_samples": total}
