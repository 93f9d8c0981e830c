"""KD against a teacher given by log-probabilities rather than logits: the weighted mixture of several teachers'
softened distributions (`teacher_mixture_logprobs`) and the divergence of the student from it
(`logprob_distillation_loss`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hf_distill.losses._common import (
    DIVERGENCE_KINDS,
    _check_logit_shapes,
    _check_options,
    _flat_mask,
    _jsd_endpoint,
    _mean_or_sum,
)
from hf_distill.losses.dense import _divergence_from_logprobs

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
            "weight makes the mixture NaN. Pass non-negative weights (hf_distill.sources.ensemble.normalised_weights checks "
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


def normalised_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """`weights` divided by their sum (equal weights when None); raises on a wrong count, a negative or
    non-finite weight, or a sum that is not positive."""
    if weights is None:
        return [1.0 / count] * count
    weights = [float(weight) for weight in weights]
    if len(weights) != count:
        raise ValueError(
            f"teacher_weights has {len(weights)} values {weights} for {count} teacher(s); give one weight per "
            "teacher, in the teachers' order, or none for equal weights."
        )
    if any(not math.isfinite(weight) or weight < 0 for weight in weights):
        raise ValueError(f"teacher_weights must be finite and >= 0, got {weights}.")
    total = sum(weights)
    if not total > 0:
        raise ValueError(
            f"teacher_weights {weights} sum to {total}; they must sum to a positive number (they are normalised "
            "to sum to 1)."
        )
    return [weight / total for weight in weights]


def confidence_weights(
    weights: torch.Tensor, teacher_logits: Sequence[torch.Tensor], labels: torch.Tensor
) -> torch.Tensor:
    """Per-position teacher weights for `teacher_weighting="confidence"`: (K, ...) w_i * p_i(gold) renormalised
    over the teachers, with p_i = softmax(teacher_i) at temperature 1; positions labelled -100 (or where every
    teacher gives the gold label probability 0) keep the fixed weights w (K,).

    teacher_logits: K tensors (..., C); labels: (...) long, the gold class (or next token) per position.
    """
    labelled = labels.ne(-100)
    gold = labels.clamp(min=0).unsqueeze(-1)
    with torch.no_grad():
        gold_probs = torch.stack(
            [torch.softmax(logits.float(), dim=-1).gather(-1, gold).squeeze(-1) for logits in teacher_logits]
        )  # (K, ...)
        fixed = weights.reshape(weights.shape + (1,) * labels.dim())
        confident = fixed * gold_probs
        total = confident.sum(0, keepdim=True)
        usable = labelled & total.squeeze(0).gt(0)
        return torch.where(usable, confident / total.clamp(min=1e-30), fixed.expand_as(confident))
