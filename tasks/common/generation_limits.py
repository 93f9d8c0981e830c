"""What a model may be asked to generate or read: token ids inside the vocabulary that teacher, student and
tokenizer share, and sequence lengths inside a model's table of position embeddings.

Two ways a teacher can hand a student something it cannot read:

- ids past the tokenizer. A teacher's embedding matrix is often padded past its tokenizer (to a multiple of 8 or
  64 rows). Those rows were never trained, yet nothing stops `generate` from picking one; a student whose
  embedding has exactly the tokenizer's rows then fails on it (`IndexError: index out of range in self`).
  `SharedVocabularyLogitsProcessor` sets their logits to -inf (and renormalises the rest), so no search can
  choose them.
- lengths past the position table. Models with absolute position embeddings (Marian, BART/mBART, GPT-2, OPT)
  fail the same way on a sequence longer than `max_position_embeddings` (`n_positions` for GPT-2).
  `bound_length` lowers a length flag to that limit with a warning, as run_clm.py does for --block_size.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PretrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)


class SharedVocabularyLogitsProcessor(LogitsProcessor):
    """Generation inside the shared vocabulary: the scores of ids >= `vocab_size` become -inf, and the rest are
    renormalised, log_softmax(scores[:vocab_size]), i.e. log p(token | token < vocab_size).

    The renormalisation matters for beam search, which hands processors log-probabilities over the model's whole
    vocabulary: without it each beam would be penalised by the probability its teacher put on unusable ids, and
    the search would differ from that of the same teacher with its padded rows cut off. For greedy search and
    sampling it changes nothing (softmax and argmax ignore a constant shift).

    scores: (batch * beams, model vocab) -> same shape.
    """

    def __init__(self, vocab_size: int):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}.")
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[-1] <= self.vocab_size:
            return scores
        outside = torch.arange(scores.shape[-1], device=scores.device) >= self.vocab_size  # (model vocab,)
        return scores.masked_fill(outside, -float("inf")).log_softmax(dim=-1)


def model_vocab_size(model_or_config: Any) -> int:
    """Rows of a model's output vocabulary (its config's vocab_size)."""
    config = getattr(model_or_config, "config", model_or_config)
    return int(config.get_text_config().vocab_size)


def vocabulary_constraint(model: Any, vocab_size: int | None) -> dict[str, Any]:
    """Keyword arguments for `model.generate` that keep it inside the first `vocab_size` ids: a logits processor
    when the model's vocabulary is larger, nothing otherwise (or when `vocab_size` is None)."""
    if vocab_size is None or model_vocab_size(model) <= vocab_size:
        return {}
    return {"logits_processor": LogitsProcessorList([SharedVocabularyLogitsProcessor(vocab_size)])}


def shared_vocab_size(tokenizer: Any, student_vocab_size: int | None = None) -> int:
    """The ids a student can read and a tokenizer can decode: min(len(tokenizer), the student's vocab_size)."""
    if student_vocab_size is None:
        return len(tokenizer)
    return min(len(tokenizer), int(student_vocab_size))


def check_token_ids(token_lists: Iterable[Sequence[int]], vocab_size: int, *, what: str, fix: str) -> None:
    """Raise ValueError naming the first id outside [0, vocab_size) in `token_lists` (rows of token ids)."""
    for row, ids in enumerate(token_lists):
        bad = [int(token) for token in ids if not 0 <= int(token) < vocab_size]
        if bad:
            raise ValueError(
                f"{what} holds token id {bad[0]} (row {row}), outside the {vocab_size} ids that the student and "
                f"the tokenizer share, so the student's embedding cannot read it. {fix}"
            )


def max_positions(config: PretrainedConfig | None) -> int | None:
    """The longest sequence a model's position embeddings cover (max_position_embeddings, n_positions for GPT-2),
    or None for models without such a table (T5's relative positions)."""
    if config is None:
        return None
    text_config = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def min_positions(*configs: PretrainedConfig | None) -> int | None:
    """The smallest position limit among `configs` (None when none has one)."""
    limits = [limit for limit in map(max_positions, configs) if limit is not None]
    return min(limits) if limits else None


def bound_length(value: int, limit: int | None, flag: str, whose: str = "the model") -> int:
    """`value`, or `limit` with a warning naming `flag` when `value` exceeds it."""
    if limit is None or value <= limit:
        return value
    logger.warning(
        f"{flag} {value} exceeds the {limit} positions of {whose} (max_position_embeddings); using {limit}. "
        f"Pass {flag} {limit} or less to silence this warning."
    )
    return limit
