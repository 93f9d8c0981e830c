"""KD against a teacher given by log-probabilities rather than logits: the weighted mixture of several teachers'
softened distributions (`teacher_mixture_logprobs`) and the divergence of the student from it
(`logprob_distillation_loss`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._common import (
    DIVERGENCE_KINDS,
    _check_logit_shapes,
    _check_options,
    _flat_mask,
    _jsd_endpoint,
    _mean_or_sum,
)
from .dense import _divergence_from_logprobs

_WEIGHT_SUM_TOLERANCE = 1e-4


def _checked_weights(weights: torch.Tensor, stacked_shape: torch.Size) -> torch.Tensor:
    """The mixture weights as float32, after checking their shape, signs, finiteness and per-position sums."""
    if not isinstance(weights, torch.Tensor):
        weights = torch.as_tensor(weights)
    teachers = stacked_shape[0]
    leading = tuple(stacked_shape[1:-1])
    if (
        weights.dim() == 0
        or weights.shape[0] != teachers
        or tuple(weights.shape[1:]) != leading[: weights.dim() - 1]
    ):
        raise ValueError(
            f"weights have shape {tuple(weights.shape)}; expected ({teachers},) one per teacher, or ({teachers}, ...) "
            f"per position with the logits' leading dims {leading} (or a prefix of them)."
        )
    weights = weights.detach().float()
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError(
            f"teacher weights must be finite and >= 0, got {weights.flatten()[:8].tolist()}: a negative or NaN "
            "weight makes the mixture NaN. Pass non-negative weights (hf_distill.ensemble.normalised_weights checks "
            "them)."
        )
    sums = weights.sum(0)
    worst = float((sums - 1.0).abs().max())
    if worst > _WEIGHT_SUM_TOLERANCE:
        raise ValueError(
            f"teacher weights must sum to 1 over the teachers (at every position), got sums from "
            f"{float(sums.min()):.6g} to {float(sums.max()):.6g}: the mixture would put that mass, not 1, in each "
            "row. Divide them by their sum first (weights / weights.sum(0))."
        )
    return weights


def teacher_mixture_logprobs(
    teacher_logits: Sequence[torch.Tensor],
    weights: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log(sum_i w_i * softmax(teacher_i / T)), computed as logsumexp_i(log w_i + log_softmax(teacher_i / T)).

    teacher_logits: K tensors (..., V), one per teacher, same shape.
    weights: (K,) one weight per teacher, or (K, ...) per position (the leading dims of the logits); every weight
        finite and >= 0 and, per position, summing to 1 within 1e-4 (a zero weight drops that teacher there).
        Weights are checked, never renormalised here: weights summing to 2 would give each row a mass of 2, so they
        are refused (divide them by their sum first).
    Returns (..., V) float32 log-probabilities, no gradient.
    """
    if len(teacher_logits) == 0:
        raise ValueError("teacher_mixture_logprobs needs at least one teacher's logits.")
    shape = teacher_logits[0].shape
    for index, logits in enumerate(teacher_logits):
        if logits.shape != shape:
            raise ValueError(
                f"teacher {index} has logits of shape {tuple(logits.shape)}, teacher 0 {tuple(shape)}: every teacher "
                "must score the same positions over the same classes or vocabulary."
            )
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")
    with torch.no_grad():
        stacked = torch.stack([logits.detach().float() for logits in teacher_logits])  # (K, ..., V)
        log_probs = F.log_softmax(stacked / temperature, dim=-1)
        weights = _checked_weights(weights, stacked.shape).to(stacked.device)
        weights = weights.reshape(weights.shape + (1,) * (stacked.dim() - weights.dim()))
        # log(0) = -inf drops a teacher with zero weight; logsumexp stays finite while one weight is positive.
        return torch.logsumexp(weights.log() + log_probs, dim=0)


def logprob_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    temperature: float = 1.0,
    kind: str = "forward_kl",
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Divergence between the student's softened distribution and a teacher distribution given as log-probabilities.

    student_logits: (..., V); teacher_logprobs: (..., V), log q with q summing to 1 over V (already softened: a
    mixture from `teacher_mixture_logprobs` at the same temperature); mask: (...) bool, True = counts.
    With p_s = softmax(student / T), per position:
      forward_kl: T**2 * KL(q || p_s);  reverse_kl: T**2 * KL(p_s || q);
      jsd:        T**2 * (beta * KL(q || m) + (1 - beta) * KL(p_s || m)),  m = beta * q + (1 - beta) * p_s.
    Equals `logit_distillation_loss(student_logits, teacher_logits)` when teacher_logprobs =
    log_softmax(teacher_logits / T). Reductions as there ("mean" over unmasked positions, or "sum"); float32;
    teacher_logprobs never receive a gradient.
    """
    _check_options(kind, DIVERGENCE_KINDS, temperature, beta, reduction)
    kind = _jsd_endpoint(kind, beta)
    _check_logit_shapes(student_logits, teacher_logprobs)
    flat_mask = _flat_mask(mask, student_logits.shape[:-1], "the logits")
    vocab = student_logits.shape[-1]
    student_rows = student_logits.float().reshape(-1, vocab)  # (N, V)
    teacher_rows = teacher_logprobs.detach().float().reshape(-1, vocab)
    if flat_mask is not None:
        student_rows, teacher_rows = student_rows[flat_mask], teacher_rows[flat_mask]
    log_p_student = F.log_softmax(student_rows / temperature, dim=-1)
    per_row = _divergence_from_logprobs(log_p_student, teacher_rows, kind, beta) * temperature**2
    return _mean_or_sum(per_row.sum(), per_row.shape[0], reduction)
