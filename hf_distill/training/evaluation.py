"""Evaluation that counts each example once.

Under several processes the last evaluation batch is padded with repeats of the first examples so that every
process gets a full batch; `gather_for_metrics` is meant to drop them but, with this transformers/accelerate
pair, sequence-to-sequence batches come back with the repeats in place. Evaluation samplers are sequential, so
the repeats are always the rows past the dataset's length: cutting every gathered array there is exact, and a
no-op when nothing was repeated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from transformers import EvalPrediction


def dataset_length(dataloader: Any) -> int | None:
    dataset = getattr(dataloader, "dataset", None)
    try:
        return len(dataset)
    except TypeError:
        return None


def first_rows(value: Any, count: int) -> Any:
    """`value` cut to its first `count` rows; tuples/lists/dicts of arrays are cut element-wise."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        return type(value)(first_rows(item, count) for item in value)
    if isinstance(value, dict):
        return {key: first_rows(item, count) for key, item in value.items()}
    if isinstance(value, np.ndarray) and value.ndim > 0 and value.shape[0] > count:
        return value[:count]
    return value


def first_rows_prediction(prediction: EvalPrediction, count: int) -> EvalPrediction:
    return EvalPrediction(
        predictions=first_rows(prediction.predictions, count),
        label_ids=first_rows(prediction.label_ids, count),
        inputs=first_rows(prediction.inputs, count),
        losses=first_rows(prediction.losses, count),
    )


@contextlib.contextmanager
def counted_once(trainer: Any, dataloader: Any) -> Iterator[Callable[[Any], Any]]:
    """Around `Trainer.evaluation_loop`: `compute_metrics` sees the first `len(dataset)` rows only, and the
    yielded function cuts the loop's output (predictions, label ids) the same way."""
    count = dataset_length(dataloader)
    compute_metrics = trainer.compute_metrics
    if count is not None and compute_metrics is not None and not trainer.args.batch_eval_metrics:
        trainer.compute_metrics = lambda prediction: compute_metrics(first_rows_prediction(prediction, count))

    def finish(output: Any) -> Any:
        if count is None:
            return output
        return output._replace(
            predictions=first_rows(output.predictions, count), label_ids=first_rows(output.label_ids, count)
        )

    try:
        yield finish
    finally:
        trainer.compute_metrics = compute_metrics
