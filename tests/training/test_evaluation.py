"""Trimming the repeats that pad the last evaluation batch under several processes."""

from __future__ import annotations

import numpy as np
from transformers import EvalPrediction

from hf_distill.training.evaluation import dataset_length, first_rows, first_rows_prediction


def test_first_rows_cuts_arrays_and_nested_containers():
    logits, hidden = np.arange(16).reshape(8, 2), np.zeros((8, 3, 4))
    cut = first_rows((logits, hidden), 7)
    assert cut[0].shape == (7, 2) and cut[1].shape == (7, 3, 4)
    assert np.array_equal(cut[0], logits[:7])
    assert first_rows({"a": logits}, 7)["a"].shape == (7, 2)
    assert first_rows(logits, 8) is logits  # nothing repeated: untouched
    assert first_rows(np.float32(1.5), 7) == np.float32(1.5)


def test_first_rows_prediction_and_dataset_length():
    prediction = EvalPrediction(predictions=np.ones((5, 3)), label_ids=np.array([0, 1, 2, 0, 1]))
    cut = first_rows_prediction(prediction, 4)
    assert cut.predictions.shape == (4, 3) and cut.label_ids.tolist() == [0, 1, 2, 0]
    assert dataset_length(type("Loader", (), {"dataset": [1, 2, 3]})()) == 3
    assert dataset_length(type("Loader", (), {"dataset": iter([1])})()) is None
