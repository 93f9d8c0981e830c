"""Feature losses: distances between hidden states and KL between attention maps of matched layers (the learned
projections and layer maps that feed them live in `hf_distill.training.matching`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hf_distill.losses._common import _flat_mask, _mean_or_sum

_HIDDEN_KINDS = ("mse", "cosine")
ATTENTION_HEAD_MAPPINGS = ("per_head", "mean")


def hidden_state_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    *,
    kind: str = "mse",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over unmasked positions of a per-position distance between hidden states.

    student_hidden, teacher_hidden: (..., H), the student already projected to the teacher's width.
    mask: (...) bool, True = counts. Returns a float32 scalar; 0.0 (zero gradient) when nothing is unmasked.
      mse:    mean over H of (student - teacher)**2
      cosine: 1 - cos(student, teacher) (eps 1e-8 on the norms)
    teacher_hidden is treated as a constant.
    """
    if kind not in _HIDDEN_KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid kinds are 'mse' and 'cosine'.")
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"student_hidden has shape {tuple(student_hidden.shape)} but teacher_hidden {tuple(teacher_hidden.shape)}: "
            "project the student to the teacher's width (matching.HiddenProjections) and align the positions."
        )
    student = student_hidden.float()
    teacher = teacher_hidden.detach().float()
    if kind == "mse":
        per_position = (student - teacher).pow(2).mean(-1)
    else:
        per_position = 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
    flat_mask = _flat_mask(mask, student_hidden.shape[:-1], "the hidden states")
    per_position = per_position.reshape(-1)
    if flat_mask is not None:
        per_position = per_position[flat_mask]
    return _mean_or_sum(per_position.sum(), per_position.shape[0], "mean")


def attention_distillation_loss(
    student_attentions: torch.Tensor,
    teacher_attentions: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    heads: str = "per_head",
) -> torch.Tensor:
    """KL(teacher row || student row) of attention probabilities, averaged over heads and unmasked queries.

    student_attentions, teacher_attentions: (batch, heads, q, k), rows summing to 1.
    mask: (batch, q) bool padding mask, True = real token, or None. Returns a float32 scalar; 0.0 (zero gradient)
    when no query is unmasked.
    heads: "per_head" compares head i with head i (the head counts must match); "mean" compares the maps
    averaged over heads (each a distribution over keys too), so the head counts may differ, as they do for a
    student pruned to fewer heads.

    Per (batch, head, query) row: sum_k p_t * (log p_t - log p_s), with probabilities clamped to >= 1e-12 inside
    the logs so exact zeros (padded keys, causal masking) contribute 0. When q == k (self-attention) the key
    positions the mask marks as padding are also dropped from the sum explicitly. The mean runs over heads and
    unmasked (batch, query) positions. teacher_attentions is treated as a constant.
    """
    if heads not in ATTENTION_HEAD_MAPPINGS:
        raise ValueError(f"unknown heads {heads!r}; valid values are {ATTENTION_HEAD_MAPPINGS}.")
    if heads == "mean" and student_attentions.dim() == 4 and teacher_attentions.dim() == 4:
        student_attentions = student_attentions.float().mean(1, keepdim=True)
        teacher_attentions = teacher_attentions.float().mean(1, keepdim=True)
    if student_attentions.dim() != 4 or student_attentions.shape != teacher_attentions.shape:
        raise ValueError(
            f"student_attentions has shape {tuple(student_attentions.shape)} and teacher_attentions "
            f"{tuple(teacher_attentions.shape)}: both must be (batch, heads, q, k) with the same sizes; map student "
            "layers to teacher layers with the same number of heads, or compare head-averaged maps (heads='mean')."
        )
    batch, _, queries, keys = student_attentions.shape
    student = student_attentions.float()
    teacher = teacher_attentions.detach().float()
    eps = 1e-12
    terms = teacher * (teacher.clamp_min(eps).log() - student.clamp_min(eps).log())  # (b, heads, q, k)
    query_mask = None
    if mask is not None:
        if tuple(mask.shape) != (batch, queries):
            raise ValueError(
                f"mask has shape {tuple(mask.shape)}, expected (batch, q) = ({batch}, {queries}): pass the "
                "attention_mask of the sequence whose tokens are the queries."
            )
        query_mask = mask if mask.dtype == torch.bool else mask != 0
        if keys == queries:
            terms = terms * query_mask[:, None, None, :].to(terms.dtype)  # drop padded keys explicitly
    per_query = terms.sum(-1).mean(1)  # (batch, q): KL per row, averaged over heads
    if query_mask is not None:
        per_query = per_query[query_mask]
    return _mean_or_sum(per_query.sum(), per_query.numel(), "mean")
