"""Pooling against float64 formulas written here and against sentence-transformers' own Pooling module; the
Pooling config in both of the forms sentence-transformers has written."""

from __future__ import annotations

import pytest
import torch

from hf_distill.embeddings.pooling import POOLING_MODES, pool, pooling_config, pooling_mode_of


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(3, 6, 5, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    return tokens, mask


def _reference(tokens: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    rows = []
    for row, row_mask in zip(tokens.double(), mask):
        real = row[row_mask.bool()]  # the real tokens, in order
        if mode == "mean":
            rows.append(real.sum(0) / len(real))
        elif mode == "mean_sqrt_len_tokens":
            rows.append(real.sum(0) / len(real) ** 0.5)
        elif mode == "max":
            rows.append(real.max(0).values)
        elif mode == "cls":
            rows.append(real[0])
        else:
            rows.append(real[-1])
    return torch.stack(rows)


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pooling_equals_its_formula(mode):
    tokens, mask = _batch()
    assert torch.allclose(pool(tokens, mask, mode).double(), _reference(tokens, mask, mode), atol=1e-6)


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pooling_equals_sentence_transformers(mode):
    from sentence_transformers.models import Pooling

    tokens, mask = _batch(seed=1)
    theirs = Pooling(5, pooling_mode=mode)({"token_embeddings": tokens, "attention_mask": mask})[
        "sentence_embedding"
    ]
    assert torch.allclose(pool(tokens, mask, mode), theirs, atol=1e-6)


def test_left_padding_picks_the_first_and_last_real_tokens():
    tokens, _ = _batch()
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]])
    for mode in ("cls", "lasttoken", "mean"):
        assert torch.allclose(pool(tokens, mask, mode).double(), _reference(tokens, mask, mode), atol=1e-6)


def test_config_forms_and_refusals():
    legacy = {
        "word_embedding_dimension": 384,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
    }
    assert pooling_mode_of(legacy, "x") == "mean"
    assert pooling_mode_of({"embedding_dimension": 8, "pooling_mode": "cls"}, "x") == "cls"
    assert pooling_mode_of({"pooling_mode": ["max"]}, "x") == "max"
    with pytest.raises(ValueError, match="--pooling"):
        pooling_mode_of({"pooling_mode": ["mean", "max"]}, "two modes")
    with pytest.raises(ValueError, match="not supported"):
        pooling_mode_of({"pooling_mode_weightedmean_tokens": True}, "weighted")
    with pytest.raises(ValueError, match="include_prompt"):
        pooling_mode_of({"pooling_mode": "mean", "include_prompt": False}, "prompt")
    # written back in the teacher's form, with the student's width
    assert pooling_config("mean", 192, like=legacy)["word_embedding_dimension"] == 192
    assert pooling_mode_of(pooling_config("max", 192, like=legacy), "y") == "max"
    modern = pooling_config(
        "cls", 64, like={"embedding_dimension": 384, "pooling_mode": "mean", "include_prompt": True}
    )
    assert modern == {"embedding_dimension": 64, "pooling_mode": "cls", "include_prompt": True}
