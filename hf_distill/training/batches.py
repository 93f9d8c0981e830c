"""What the models are called with: a collated batch without its targets (the trainer computes the task loss
itself) and without the columns other parts of the step read (the trainer names them: cached teacher logits, the
teacher's own tokenization of the text)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from torch import nn

from hf_distill.args import SEQ2SEQ

# Batch entries that are targets, not model inputs.
LABEL_KEYS = ("labels", "start_positions", "end_positions")


def model_inputs(
    batch: dict[str, Any], task_kind: str, student: nn.Module, other_columns: Collection[str] = ()
) -> dict[str, Any]:
    """The batch without targets and `other_columns`. Encoder-decoder models get `decoder_input_ids` built from the labels once (by the
    student's `prepare_decoder_input_ids_from_labels`), so teacher and student decode the same prefix."""
    inputs = {
        key: value for key, value in batch.items() if key not in LABEL_KEYS and key not in other_columns
    }
    labels = batch.get("labels")
    if task_kind == SEQ2SEQ and labels is not None and "decoder_input_ids" not in batch:
        if hasattr(student, "prepare_decoder_input_ids_from_labels"):
            inputs["decoder_input_ids"] = student.prepare_decoder_input_ids_from_labels(labels=labels)
        else:
            inputs["labels"] = labels
    return inputs
