"""Distillation from a cached teacher known only through its top-k tokens (and optionally its tempered tail
mass): `sparse_distillation_loss`, and `sparse_distillation_and_cross_entropy`, which also returns the student's
cross-entropy from the same pass over the logits. `_BucketLogProbs` turns the student's (..., V) logits into
bucket log-probabilities with a closed-form gradient."""

from __future__ import annotations

import math

import torch

from hf_distill.losses._common import (
    DIVERGENCE_KINDS,
    _check_options,
    _flat_mask,
    _jsd_endpoint,
    _log_mixture,
    _mean_or_sum,
)

# Probabilities below this are "zero" inside logarithms (smallest normal float32), see sparse_distillation_loss.
_TINY = torch.finfo(torch.float32).tiny


class _BucketLogProbs(torch.autograd.Function):
    """(..., V) logits -> (N, k [+ 1]) log-probabilities at temperature T of k listed tokens [and of all the others],
    N the number of positions; with `targets` (N,) also each position's cross-entropy at temperature 1 (0 where
    the target is -100), from the same exponentials. Without the tail bucket (`has_tail` False) the k listed
    tokens are renormalised among themselves (all V tokens when k = V), and the other tokens get no KD gradient.

    One exp pass forward (its float32 (N, V) buffer is written straight from half-precision or strided logits) and
    a closed-form gradient backward, written over that buffer (at T = 2 into one new one). With s = logits / T,
    p = softmax(s) over the buckets, the bucket log-probabilities log p_b and their upstream gradient G_b,
      dL/ds_j = G_b(j) - p_j * sum_b G_b        for a listed token j,
      dL/ds_j = p_j * (G_tail / p_tail - sum_b G_b)   for a token in the tail (0 without a tail bucket);
    the cross-entropy adds g * (softmax(logits)_j - [j = target]) for its upstream gradient g. softmax(logits) is
    p ** T renormalised, so at T = 1 and T = 2 it costs no second exp pass (other temperatures take one more, and
    keep its buffer for the backward, as F.cross_entropy keeps its log-softmax). The tail mass is summed over the tail
    tokens themselves, not taken as 1 - sum(listed), so it stays exact when the listed tokens hold nearly all the
    mass. Backward through it once only. float64 logits are computed in float32.
    """

    @staticmethod
    def forward(ctx, logits, indices, inv_temperature, has_tail, targets):
        ctx.input_shape, ctx.input_dtype = logits.shape, logits.dtype
        flat = logits.reshape(-1, logits.shape[-1])  # a view unless the logits are a strided slice
        if flat.dtype == torch.float64:
            flat = flat.float()
        row_max = flat.amax(-1, keepdim=True).float()
        # exp((logits - max) / T): a new contiguous float32 (N, V) buffer written in one pass (type promotion
        # upcasts half-precision logits on the way, with no float32 copy of them)
        exps = torch.add(row_max * -inv_temperature, flat, alpha=inv_temperature).exp_()
        listed_scaled = (flat.gather(-1, indices).float() - row_max) * inv_temperature  # (N, k)
        nll = None
        saved_ce = ()
        if targets is not None:
            # exp(logits - max) is exps ** T: exps itself at T = 1, its square at T = 2 (summed in one read with
            # no exp); other temperatures need their own exp pass, whose buffer is kept for the backward.
            unscaled = None
            if inv_temperature == 1.0:
                full_total = exps.sum(-1, keepdim=True)
            elif inv_temperature == 0.5:
                full_total = torch.linalg.vector_norm(exps, 2, dim=-1, keepdim=True).square()
            else:
                unscaled = torch.add(-row_max, flat).exp_()
                full_total = unscaled.sum(-1, keepdim=True)
            valid = targets.ne(-100)
            safe_targets = torch.where(valid, targets, 0)[:, None]
            nll = (row_max + full_total.log() - flat.gather(-1, safe_targets).float()).squeeze(-1)
            nll = torch.where(valid, nll, 0.0)  # never 0 * inf where an ignored position has a -inf logit
            saved_ce = (unscaled, full_total, valid, safe_targets)
        tail = total = None
        if has_tail:
            listed = exps.gather(-1, indices)
            exps.scatter_(-1, indices, 0.0)
            tail = exps.sum(-1, keepdim=True)  # exact mass of the other tokens
            total = listed.sum(-1, keepdim=True) + tail
            log_total = total.log()
            log_p = torch.cat([listed_scaled - log_total, tail.clamp_min(_TINY).log() - log_total], dim=-1)
            listed_p = listed / total
        else:
            # Relative to the listed tokens' own maximum: finite even where the student puts nearly all its
            # mass on other tokens, whose exps would round the listed ones to 0.
            log_p = torch.log_softmax(listed_scaled, dim=-1)
            listed_p = log_p.exp()
        ctx.save_for_backward(exps, listed_scaled, listed_p, total, tail, indices, *saved_ce)
        ctx.inv_temperature, ctx.has_tail = inv_temperature, has_tail
        if nll is None:
            return log_p
        return log_p, nll

    @staticmethod
    def backward(ctx, grad_log_p, grad_nll=None):
        exps, listed_scaled, listed_p, total, tail, indices, *saved_ce = ctx.saved_tensors
        inv_temperature, k = ctx.inv_temperature, indices.shape[-1]
        grad_sum = grad_log_p.sum(-1, keepdim=True)  # (N, 1)
        # gradient w.r.t. the logits = inv_temperature * (gradient w.r.t. s); row_factor * exps is the KD
        # gradient of the unlisted tokens
        if ctx.has_tail:
            row_factor = (grad_log_p[:, k:] / tail.clamp_min(_TINY) - grad_sum / total) * inv_temperature
        else:
            row_factor = torch.zeros_like(grad_sum)
        listed_grad = (grad_log_p[:, :k] - listed_p * grad_sum) * inv_temperature
        # tail tokens first; the listed tokens are overwritten below
        if not saved_ce:
            grad = exps.mul_(row_factor)
        else:
            unscaled, full_total, valid, safe_targets = saved_ce
            ce_grad = grad_nll[:, None] * valid[:, None]  # (N, 1), 0 where there is no target
            ce_weight = ce_grad / full_total  # times exp(logits - max) gives the softmax term
            if inv_temperature == 1.0:
                grad = exps.mul_(row_factor + ce_weight)
            elif inv_temperature == 0.5:
                grad = torch.addcmul(row_factor, exps, ce_weight).mul_(exps)  # exps * (row_factor + w * exps)
            else:
                grad = unscaled.mul_(ce_weight).addcmul_(exps, row_factor)
            listed_grad = listed_grad + ce_weight * (listed_scaled / inv_temperature).exp()
        grad.scatter_(-1, indices, listed_grad)
        if saved_ce:
            grad.scatter_add_(-1, safe_targets, -ce_grad)
        return grad.to(ctx.input_dtype).view(ctx.input_shape), None, None, None, None


def sparse_distillation_loss(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    *,
    temperature: float = 1.0,
    kind: str = "forward_kl",
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    teacher_tail_logmass: torch.Tensor | None = None,
    tail_temperature: float = 1.0,
    teacher_at_temperature: bool = False,
) -> torch.Tensor:
    """Distillation from a cached teacher known only through its top-k tokens, over k + 1 buckets.

    student_logits: (..., V). teacher_topk_logprobs: (..., k) teacher log-probabilities at temperature 1 of the
    distinct tokens teacher_topk_indices: (..., k) long. mask: (...) bool, True = counts. teacher_tail_logmass:
    (...) optional, the teacher's tempered remaining mass at each position, log sum_{j not in top k} p_j**(1/T')
    with p the teacher's probabilities at temperature 1 and T' = `tail_temperature` (at T' = 1 simply the log of
    the mass outside the top k), as the cache stores it (`logit_cache.teacher_topk`). It must have been computed
    at the loss's temperature: a tail with tail_temperature != temperature raises ValueError, since
    sum_j p_j**(1/T) cannot be recovered from sum_j p_j (nor from a tail at another temperature). Unused when
    k = V. Returns a float32 scalar.

    Buckets: the k listed tokens plus, when k < V, one "tail" bucket holding every other token.
      teacher: q = softmax([l_1 / T, ..., l_k / T, tail]) with l_i = teacher_topk_logprobs_i and tail =
               teacher_tail_logmass. This is exactly the teacher's full softmax(teacher_logits / T) summed into the
               buckets: p_i**(1/T) = exp(l_i / T) and the tail term sums p_j**(1/T) over the other tokens, all with
               the same normaliser.
      student: p_s = softmax(student_logits / T) over the full vocabulary; its bucket probabilities are p_s at the
               k indices, and the tail is the mass of all other tokens (summed over them, exact when small).
    So a student equal to the teacher gives 0 with a zero gradient at every temperature.
    Without teacher_tail_logmass:
      T = 1:   the tail is derived as log(max(1 - sum_i exp(l_i), 0)) (the sum in float64; it loses precision when
               the top k hold nearly all the mass or were stored in float16).
      T != 1:  the tail bucket is dropped on both sides and both distributions are renormalised over the k listed
               tokens: q = softmax(l / T) over them, the student's p_s restricted to them and renormalised. This
               ignores how much mass each side puts outside the top k (the student gets no gradient on the other
               tokens) and keeps only the shape of the distribution within them.
    teacher_at_temperature=True: teacher_topk_logprobs and teacher_tail_logmass are already the teacher's
    log-probabilities at the loss's temperature (log q_i, and log of q's mass outside the top k), as a cache of
    several teachers' mixture stores them (`logit_cache.is_mixture`): the teacher's buckets are
    softmax([l_1, ..., l_k, tail]) with no division by T (tail_temperature must still equal temperature; without
    a tail it is derived as log(1 - sum_i exp(l_i)) at any temperature).
    The divergence (forward_kl, reverse_kl or jsd as in `logit_distillation_loss`, times T**2) is taken between
    the two bucket distributions; with k = V it equals the full-vocabulary loss. Zero-probability buckets
    contribute 0, and inside log q the teacher's probabilities are floored at the smallest normal float32 (~1e-38)
    so a tail that rounds to zero gives a large finite reverse-KL term, never inf or NaN. kind="mse" is not
    defined here: the teacher's logits are unknown. Same masking and reductions as `logit_distillation_loss`.
    """
    kd, _ = _sparse_losses(
        student_logits,
        teacher_topk_logprobs,
        teacher_topk_indices,
        teacher_tail_logmass,
        tail_temperature,
        None,
        temperature,
        kind,
        beta,
        mask,
        reduction,
        teacher_at_temperature,
    )
    return kd


def sparse_distillation_and_cross_entropy(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    kind: str = "forward_kl",
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    teacher_tail_logmass: torch.Tensor | None = None,
    tail_temperature: float = 1.0,
    teacher_at_temperature: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(`sparse_distillation_loss(...)`, the student's cross-entropy against `labels`), from one pass over the logits.

    The KD term, its buckets, `teacher_tail_logmass`/`tail_temperature`/`teacher_at_temperature` and the fallback
    without a tail are exactly those of `sparse_distillation_loss`.
    labels: (...) long, the student's target token per position, -100 = no target. The cross-entropy is at
    temperature 1 over the full vocabulary, as `F.cross_entropy(..., ignore_index=-100)`: the mean over positions
    with a target, or their sum (0.0 with a zero gradient when no position has one, where F.cross_entropy gives
    NaN). Both values and their gradients equal computing the two separately; sharing the
    softmax pass makes the pair cost about what the cross-entropy alone costs (at temperature 1 or 2; other
    temperatures add one exp pass over the logits). This is what training from a teacher logits cache runs.
    """
    if tuple(labels.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but student_logits has position dims "
            f"{tuple(student_logits.shape[:-1])}: pass one target id per position (-100 for none), aligned with "
            "the logits (for a causal LM, the labels shifted left by one)."
        )
    if labels.is_floating_point():
        raise ValueError(f"labels must be integer token ids, got {labels.dtype}.")
    return _sparse_losses(
        student_logits,
        teacher_topk_logprobs,
        teacher_topk_indices,
        teacher_tail_logmass,
        tail_temperature,
        labels,
        temperature,
        kind,
        beta,
        mask,
        reduction,
        teacher_at_temperature,
    )


def _check_tail_temperature(tail_temperature: float, temperature: float) -> None:
    """A stored tail is usable only at the temperature it was tempered at (see sparse_distillation_loss)."""
    if not (
        isinstance(tail_temperature, (int, float))
        and math.isfinite(tail_temperature)
        and tail_temperature > 0
    ):
        raise ValueError(f"tail_temperature must be a finite number > 0, got {tail_temperature!r}.")
    if not math.isclose(tail_temperature, temperature, rel_tol=1e-9, abs_tol=0.0):
        raise ValueError(
            f"teacher_tail_logmass was computed at temperature {tail_temperature:g} (tail_temperature) but the "
            f"loss runs at temperature {temperature:g}; the tempered tail sum_j p_j**(1/T) at one temperature does "
            f"not give it at another, so this tail would bias the loss. Pass a tail computed at {temperature:g} "
            f"(logit_cache.teacher_topk(..., temperature={temperature:g}); a cache built by "
            f"scripts/cache_teacher_logits.py --temperature {temperature:g}) with tail_temperature={temperature:g}, "
            "or pass no tail to renormalise over the top k."
        )


def _sparse_losses(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    teacher_tail_logmass: torch.Tensor | None,
    tail_temperature: float,
    labels: torch.Tensor | None,
    temperature: float,
    kind: str,
    beta: float,
    mask: torch.Tensor | None,
    reduction: str,
    teacher_at_temperature: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    _check_options(kind, DIVERGENCE_KINDS, temperature, beta, reduction)
    kind = _jsd_endpoint(kind, beta)
    if student_logits.dim() == 0:
        raise ValueError("student_logits must have at least one dim (..., vocab); got a scalar.")
    positions, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    if (
        teacher_topk_logprobs.shape != teacher_topk_indices.shape
        or teacher_topk_logprobs.shape[:-1] != positions
    ):
        raise ValueError(
            f"teacher_topk_logprobs {tuple(teacher_topk_logprobs.shape)} and teacher_topk_indices "
            f"{tuple(teacher_topk_indices.shape)} must both be (..., k) with the student's position dims "
            f"{tuple(positions)}; cache the teacher on the same padded batch as the student."
        )
    k = teacher_topk_logprobs.shape[-1]
    if k == 0 or k > vocab:
        raise ValueError(
            f"k = {k} cached teacher tokens for a student vocab of {vocab}: need 1 <= k <= vocab."
        )
    if teacher_topk_indices.is_floating_point() or teacher_topk_indices.dtype == torch.bool:
        raise ValueError(
            f"teacher_topk_indices must be an integer (long) tensor, got {teacher_topk_indices.dtype}."
        )
    if teacher_tail_logmass is not None and tuple(teacher_tail_logmass.shape) != tuple(positions):
        raise ValueError(
            f"teacher_tail_logmass has shape {tuple(teacher_tail_logmass.shape)}, expected one value per position "
            f"{tuple(positions)} (the log of the teacher's mass outside its top k)."
        )
    if k < vocab and teacher_tail_logmass is not None:
        _check_tail_temperature(tail_temperature, temperature)
    # The tail bucket: the given tempered tail, or at T = 1 one derived from the top k; without a tail at T != 1,
    # no tail bucket on either side (see sparse_distillation_loss). With k = V there are no other tokens.
    has_tail = k < vocab and (
        teacher_tail_logmass is not None or temperature == 1.0 or teacher_at_temperature
    )
    flat_mask = _flat_mask(mask, positions, "student_logits")

    teacher_logprobs = teacher_topk_logprobs.detach().reshape(-1, k)  # (N, k)
    tail_logmass = None if teacher_tail_logmass is None else teacher_tail_logmass.detach().reshape(-1, 1)
    indices = teacher_topk_indices.detach().reshape(-1, k).long()
    if flat_mask is not None:
        # Masked rows are computed like the others and weighted by zero below, which is cheaper than gathering
        # the unmasked rows of a (N, V) tensor and scattering their gradient back. Their cached values may be
        # padding, so they get a harmless stand-in: k distinct tokens of equal probability.
        keep = flat_mask[:, None]
        indices = torch.where(keep, indices, torch.arange(k, device=indices.device))
        teacher_logprobs = torch.where(
            keep, teacher_logprobs, torch.full_like(teacher_logprobs, -math.log(k))
        )
        if tail_logmass is not None:
            tail_logmass = torch.where(keep, tail_logmass, torch.full_like(tail_logmass, -math.inf))

    # Student bucket log-probabilities at temperature T: (N, k) listed tokens, then the tail [, and the per-position
    # cross-entropy]. The logits go in with their own shape and strides (often a slice), read once inside.
    targets = None if labels is None else labels.detach().reshape(-1).long()
    outputs = _BucketLogProbs.apply(student_logits, indices, 1.0 / temperature, has_tail, targets)
    log_p_student, nll = outputs if targets is not None else (outputs, None)  # (N, k [+ 1]), (N,)
    ce = None
    if nll is not None:
        # counted only for the mean: int() waits for the device
        ce = _mean_or_sum(nll.sum(), int(targets.ne(-100).sum()) if reduction == "mean" else 0, reduction)

    # Teacher bucket log-masses at temperature T, unnormalised: log p_i**(1/T) = l_i / T for the listed tokens, and
    # the tail already tempered (log sum_j p_j**(1/T)); renormalised over the buckets. A target stored at T (a
    # mixture of teachers) is used as it is.
    log_q = teacher_logprobs.float() / (1.0 if teacher_at_temperature else temperature)
    if has_tail:
        if tail_logmass is None:  # T = 1, or log-probabilities already at T
            tail_mass = (1.0 - teacher_logprobs.double().exp().sum(-1, keepdim=True)).clamp_min(0.0)
            tail_logmass = tail_mass.log()
        log_q = torch.cat([log_q, tail_logmass.float()], dim=-1)
    log_q = torch.log_softmax(log_q, dim=-1)
    q = log_q.exp()
    log_q_floored = log_q.clamp_min(math.log(_TINY))
    p_student = log_p_student.exp()

    def kl(probs: torch.Tensor, log_probs: torch.Tensor, log_other: torch.Tensor) -> torch.Tensor:
        # sum over buckets of probs * (log_probs - log_other), 0 where probs == 0 (never 0 * inf)
        safe = torch.where(probs > 0, log_probs - log_other, torch.zeros_like(log_probs))
        return (probs * safe).sum(-1)

    if kind == "forward_kl":
        per_position = kl(q, log_q_floored, log_p_student)
    elif kind == "reverse_kl":
        per_position = kl(p_student, log_p_student, log_q_floored)
    else:
        log_m = _log_mixture(log_q_floored, log_p_student, beta)
        per_position = beta * kl(q, log_q_floored, log_m) + (1.0 - beta) * kl(p_student, log_p_student, log_m)
    per_position = per_position * temperature**2
    if flat_mask is not None:
        per_position = torch.where(flat_mask, per_position, torch.zeros_like(per_position))
        count = int(flat_mask.sum()) if reduction == "mean" else 0
        return _mean_or_sum(per_position.sum(), count, reduction), ce
    return _mean_or_sum(per_position.sum(), per_position.shape[0], reduction), ce
