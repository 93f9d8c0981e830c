"""Checks on the user's training data that run when the trainer is built, so that data the student cannot
learn from fails with a message naming the column and the fix, not deep inside the collator at step 1."""

from __future__ import annotations

from typing import Any

from hf_distill.training.task_loss import QUESTION_ANSWERING, TaskKind

# Columns that hold targets; the collators rename `label`/`label_ids` to `labels`.
LABEL_COLUMNS = ("labels", "label", "label_ids", "start_positions", "end_positions")


def _first_row(dataset: Any) -> dict[str, Any] | None:
    try:
        row = dataset[0]
    except (IndexError, KeyError, TypeError, NotImplementedError):
        return None
    return row if isinstance(row, dict) else None


def _holds_strings(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if isinstance(value, (list, tuple)) and value:
        return _holds_strings(value[0])
    return False


def check_training_data(dataset: Any, task: TaskKind) -> None:
    """Raise ValueError when `dataset` is empty or its label column holds strings.

    Streaming (iterable) datasets are not read here: they have no length, and peeking would consume them.
    """
    try:
        length = len(dataset)
    except TypeError:
        return
    if length == 0:
        raise ValueError(
            "the training set is empty (0 rows): nothing to train on. Check the data files, the split name and any "
            "filtering or --max_train_samples that removed every row."
        )
    row = _first_row(dataset)
    if row is None:
        return
    for column in LABEL_COLUMNS:
        value = row.get(column)
        if _holds_strings(value):
            fix = (
                "answer character spans must be turned into token start/end positions (as run_qa.py's "
                "prepare_train_features does)"
                if task.kind == QUESTION_ANSWERING
                else f"map them to class ids first, e.g. dataset.class_encode_column({column!r}) or "
                f"dataset.map(lambda row: {{{column!r}: label2id[row[{column!r}]]}}), and give the model the same "
                "label2id/id2label"
            )
            raise ValueError(
                f"column {column!r} of the training set holds strings (first row: {value!r}), but the loss needs "
                f"integer ids; {fix}."
            )
