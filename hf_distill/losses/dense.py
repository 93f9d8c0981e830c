"""Losses over full logits with plain autograd: `logit_distillation_loss` (the reference path; chunk_size=N hands
the same loss to the chunked Function in `chunked.py`) and `bernoulli_distillation_loss` for multi-label heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hf_distill.losses._common import (
    DIVERGENCE_KINDS,
    LOGIT_KINDS,
    _check_chunk_size,
    _check_logit_shapes,
    _check_options,
    _flat_mask,
    _jsd_endpoint,
    _log_mixture,
    _mean_or_sum,
)
from hf_distill.losses.chunked import _ChunkedLogitDistillation


def _divergence_rows(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, temperature: float, beta: float
) -> torch.Tensor:
    """(n, V) float32 student/teacher logits -> (n,) per-position loss; T**2 already applied to the KL kinds."""
    if kind == "mse":
        return (student_logits - teacher_logits).pow(2).mean(-1)
    if temperature != 1.0:  # at T = 1 the division would only copy both (N, V) tensors
        student_logits, teacher_logits = student_logits / temperature, teacher_logits / temperature
    log_p_student = F.log_softmax(student_logits, dim=-1)
    if kind == "forward_kl":
        # KL(p_t || p_s) = sum p_t log p_t - sum p_t log p_s. The first sum is the teacher's alone (no graph), and
        # xlogy gives 0 where p_t = 0; the second is the only (N, V) product autograd keeps. 2.4x faster than the
        # general formula below at (1024, 32000) on CPU, same value and gradient.
        with torch.no_grad():
            p_teacher = F.softmax(teacher_logits, dim=-1)
            teacher_term = torch.xlogy(p_teacher, p_teacher).sum(-1)
        return (teacher_term - (p_teacher * log_p_student).sum(-1)) * temperature**2
    log_p_teacher = F.log_softmax(teacher_logits, dim=-1)
    return _divergence_from_logprobs(log_p_student, log_p_teacher, kind, beta) * temperature**2


def _divergence_from_logprobs(
    log_p_student: torch.Tensor, log_p_teacher: torch.Tensor, kind: str, beta: float
) -> torch.Tensor:
    """(n, V) float32 log-probabilities -> (n,) forward KL, reverse KL or JSD, without the T**2 factor. Teacher
    terms with probability 0 add 0 (q log q -> 0), not NaN, so a class no teacher gives mass to is harmless."""
    if kind == "forward_kl":
        return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).nan_to_num(0.0).sum(-1)
    if kind == "reverse_kl":
        return (log_p_student.exp() * (log_p_student - log_p_teacher)).sum(-1)
    log_m = _log_mixture(log_p_teacher, log_p_student, beta)
    kl_teacher = (log_p_teacher.exp() * (log_p_teacher - log_m)).nan_to_num(0.0).sum(-1)
    kl_student = (log_p_student.exp() * (log_p_student - log_m)).sum(-1)
    return beta * kl_teacher + (1.0 - beta) * kl_student


def logit_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    kind: str = "forward_kl",
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Divergence between temperature-softened student and teacher distributions, per position, reduced.

    student_logits, teacher_logits: (..., V), any float dtype; every leading dim is a position.
    mask: (...) bool over the leading dims, True = counts; None = every position counts.
    Returns a float32 scalar.

    With p_s = softmax(student / T) and p_t = softmax(teacher / T), the per-position loss is
      forward_kl: T**2 * KL(p_t || p_s)                               (Hinton et al., 2015)
      reverse_kl: T**2 * KL(p_s || p_t)
      jsd:        T**2 * (beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)),  m = beta * p_t + (1 - beta) * p_s
                  (log m via logaddexp); as in TRL, beta = 0 is forward_kl and beta = 1 is reverse_kl
      mse:        mean over V of (student - teacher)**2, no temperature (regression heads, V = 1)
    reduction="mean" averages over unmasked positions (0.0 with a zero gradient if there are none);
    reduction="sum" sums them (divide by the Trainer's num_items_in_batch outside).

    Inputs are upcast to float32 before any arithmetic; teacher_logits never receive a gradient.
    chunk_size=None uses plain autograd over the full (N, V) tensors. chunk_size=N runs a custom autograd Function
    over N unmasked positions at a time, holding at most one chunk of float32 (N, V) intermediates plus the
    gradient buffer (input dtype and shape), with the same value and gradient; a mask adds no memory (masked
    positions are zeroed inside their chunk). Backward through it once only.
    """
    _check_options(kind, LOGIT_KINDS, temperature, beta, reduction)
    kind = _jsd_endpoint(kind, beta)
    _check_chunk_size(chunk_size)
    _check_logit_shapes(student_logits, teacher_logits)
    flat_mask = _flat_mask(mask, student_logits.shape[:-1], "the logits")
    teacher_logits = teacher_logits.detach()

    if chunk_size is None:
        vocab = student_logits.shape[-1]
        student_rows = student_logits.float().reshape(-1, vocab)  # (N, V)
        teacher_rows = teacher_logits.float().reshape(-1, vocab)
        per_position = _divergence_rows(student_rows, teacher_rows, kind, temperature, beta)  # (N,)
        if flat_mask is None:
            return _mean_or_sum(per_position.sum(), per_position.shape[0], reduction)
        # Masked rows are computed and dropped by `where`, which is cheaper than copying the kept rows out. Rows
        # of garbage (inf or NaN logits, e.g. fully masked padding) would still reach the gradient as NaN, so
        # then, and only then, the loss is recomputed on the kept rows alone.
        if not bool(torch.isfinite(per_position.detach()[~flat_mask]).all()):
            per_position = _divergence_rows(
                student_rows[flat_mask], teacher_rows[flat_mask], kind, temperature, beta
            )
            return _mean_or_sum(per_position.sum(), per_position.shape[0], reduction)
        total = torch.where(flat_mask, per_position, 0.0).sum()
        return _mean_or_sum(total, int(flat_mask.sum()), reduction)

    if flat_mask is not None and bool(flat_mask.all()):
        flat_mask = None
    want_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return _ChunkedLogitDistillation.apply(
        student_logits,
        teacher_logits,
        flat_mask,
        kind,
        float(temperature),
        float(beta),
        chunk_size,
        reduction,
        want_grad,
    )


def bernoulli_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    kind: str = "forward_kl",
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Divergence between independent per-label Bernoulli distributions: multi-label classification heads.

    student_logits, teacher_logits: (..., L), one logit per label; every leading dim is an example.
    mask: (...) bool over the examples, True = counts. Returns a float32 scalar.

    With p_s = sigmoid(student / T) and p_t = sigmoid(teacher / T) per label, the per-example loss is the mean over
    the L labels of
      forward_kl: T**2 * KL(Bern(p_t) || Bern(p_s)) = T**2 * (p_t log(p_t / p_s) + (1 - p_t) log((1 - p_t) / (1 - p_s)))
      reverse_kl: T**2 * KL(Bern(p_s) || Bern(p_t))
      jsd:        T**2 * (beta * KL(Bern(p_t) || Bern(m)) + (1 - beta) * KL(Bern(p_s) || Bern(m))),
                  m = beta * p_t + (1 - beta) * p_s; beta = 0 is forward_kl and beta = 1 reverse_kl
    A softmax over the labels would be blind to a student that adds the same constant to every logit; each label
    is its own yes/no question here. Logs come from logsigmoid (exact for large |logits|). Same reductions as
    `logit_distillation_loss`; teacher_logits never receive a gradient.
    """
    _check_options(kind, DIVERGENCE_KINDS, temperature, beta, reduction)
    kind = _jsd_endpoint(kind, beta)
    _check_logit_shapes(student_logits, teacher_logits)
    flat_mask = _flat_mask(mask, student_logits.shape[:-1], "the logits")
    labels = student_logits.shape[-1]
    student_rows = student_logits.float().reshape(-1, labels) / temperature  # (N, L)
    teacher_rows = teacher_logits.detach().float().reshape(-1, labels) / temperature
    if flat_mask is not None:
        student_rows, teacher_rows = student_rows[flat_mask], teacher_rows[flat_mask]
    # (2, N, L): log-probabilities of "yes" and "no" for each label
    log_p_student = torch.stack([F.logsigmoid(student_rows), F.logsigmoid(-student_rows)])
    log_p_teacher = torch.stack([F.logsigmoid(teacher_rows), F.logsigmoid(-teacher_rows)])

    def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:  # KL(p || q) per label, (N, L)
        return (log_p.exp() * (log_p - log_q)).sum(0)

    if kind == "forward_kl":
        per_label = kl(log_p_teacher, log_p_student)
    elif kind == "reverse_kl":
        per_label = kl(log_p_student, log_p_teacher)
    else:
        log_m = _log_mixture(log_p_teacher, log_p_student, beta)
        per_label = beta * kl(log_p_teacher, log_m) + (1.0 - beta) * kl(log_p_student, log_m)
    per_example = per_label.mean(-1) * temperature**2
    return _mean_or_sum(per_example.sum(), per_example.shape[0], reduction)
