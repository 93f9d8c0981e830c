"""How token embeddings become one sentence embedding: the pooling modes of sentence-transformers' Pooling module,
read from its config file in either of the two forms sentence-transformers has written.

    mean                  sum of the real tokens' embeddings / their number
    mean_sqrt_len_tokens  sum of the real tokens' embeddings / sqrt(their number)
    cls                   the first real token's embedding ([CLS] with right padding)
    max                   the element-wise maximum over the real tokens
    lasttoken             the last real token's embedding

Real tokens are those the attention mask marks (nonzero). Pooling runs in float32 for half-precision inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

POOLING_MODES = ("mean", "mean_sqrt_len_tokens", "cls", "max", "lasttoken")
# The boolean keys sentence-transformers wrote before version 5.4 ({"pooling_mode_mean_tokens": true, ...}).
LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# The key naming the token embeddings' width, old and new.
DIMENSION_KEYS = ("word_embedding_dimension", "embedding_dimension")


def check_pooling_mode(mode: str, where: str = "pooling") -> str:
    if mode not in POOLING_MODES:
        raise ValueError(
            f"{where}: pooling mode {mode!r} is not supported; use one of {', '.join(POOLING_MODES)}."
        )
    return mode


def pooling_mode_of(config: Mapping[str, Any], where: str) -> str:
    """The one pooling mode a sentence-transformers Pooling config (1_Pooling/config.json) asks for, in either the
    `"pooling_mode": "mean"` form or the legacy boolean form. Several modes at once (a concatenation), weighted mean
    and prompt-excluding pooling are refused, naming the file."""
    if "pooling_mode" in config:
        modes = config["pooling_mode"]
        modes = [modes] if isinstance(modes, str) else list(modes)
    else:
        modes = [mode for key, mode in LEGACY_POOLING_KEYS.items() if config.get(key)]
    if len(modes) != 1:
        raise ValueError(
            f"{where} asks for the pooling modes {modes or 'none'}; hf_distill pools with exactly one of "
            f"{', '.join(POOLING_MODES)}. Pass --pooling to choose one."
        )
    if config.get("include_prompt", True) is False:
        raise ValueError(
            f"{where} excludes prompt tokens from pooling (include_prompt: false), which hf_distill does not "
            "reproduce; pass --pooling to pool every token."
        )
    return check_pooling_mode(modes[0], where)


def pooling_config(mode: str, dimension: int, like: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A Pooling config for `mode` over token embeddings of width `dimension`, written in the form of `like` (the
    teacher's config: legacy boolean keys or `pooling_mode`), so a student's folder loads wherever its teacher's
    does; without `like`, the legacy form, which every sentence-transformers version reads."""
    check_pooling_mode(mode)
    like = dict(like or {})
    if "pooling_mode" in like:
        config = {key: value for key, value in like.items() if key not in DIMENSION_KEYS}
        config["pooling_mode"] = mode
        dimension_key = next((key for key in DIMENSION_KEYS if key in like), "embedding_dimension")
        return {dimension_key: dimension, **config}
    config = {"word_embedding_dimension": dimension}
    for key, legacy_mode in LEGACY_POOLING_KEYS.items():
        if key in like or legacy_mode in POOLING_MODES:
            config[key] = legacy_mode == mode
    for key, value in like.items():  # anything else the teacher's file said (include_prompt, ...)
        config.setdefault(key, value)
    return config


def pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """(batch, seq, hidden) token embeddings -> (batch, hidden) sentence embeddings by `mode` (module docstring).

    attention_mask: (batch, seq), nonzero = a real token; None = every token is real. A row without real tokens
    gives zeros (mean, mean_sqrt_len_tokens), the first or last position (cls, lasttoken) or -inf (max)."""
    check_pooling_mode(mode)
    dtype = token_embeddings.dtype
    embeddings = token_embeddings.float() if dtype in (torch.float16, torch.bfloat16) else token_embeddings
    batch, length, _ = embeddings.shape
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.long, device=embeddings.device)
    real = attention_mask.to(embeddings.device) != 0  # (batch, seq)
    if mode in ("mean", "mean_sqrt_len_tokens"):
        weights = real.unsqueeze(-1).to(embeddings.dtype)
        total = (embeddings * weights).sum(dim=1)
        count = weights.sum(dim=1).clamp(min=1e-9)
        pooled = total / (count if mode == "mean" else count.sqrt())
    elif mode == "max":
        pooled = embeddings.masked_fill(~real.unsqueeze(-1), float("-inf")).amax(dim=1)
    else:
        positions = torch.arange(length, device=embeddings.device).expand(batch, length)
        if mode == "cls":  # the first real position; 0 when there is none
            index = torch.where(real, positions, length).amin(dim=1).clamp(max=length - 1)
        else:  # lasttoken: the last real position; length - 1 when there is none
            index = torch.where(real, positions, -1).amax(dim=1)
            index = torch.where(index < 0, length - 1, index)
        pooled = embeddings[torch.arange(batch, device=embeddings.device), index]
    return pooled.to(dtype)
