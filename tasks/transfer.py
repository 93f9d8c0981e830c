"""More data than labels for the classification recipe: a transfer set of unlabelled text, and augmented copies of
the training text (`augmentation.py`), both mixed into the training set with label -100.

The trainer then trains every row on the KD term (the teacher labels it with its soft targets) and only the labelled
rows on the hard loss: for sequence classification a -100 label is left out of the cross-entropy and of its
average (`task_loss.hard_label_loss`), never out of KD (`task_loss.align_positions`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, concatenate_datasets, load_dataset

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
    augment_copies: int = field(
        default=0,
        metadata={
            "help": "TinyBERT-style augmentation: this many new texts per training text, made by replacing words "
            "with their nearest neighbours in the teacher's input embeddings (augmentation.py); written once to "
            "--augment_dir with a manifest and reused. 0 = off."
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
