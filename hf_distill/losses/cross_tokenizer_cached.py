"""The cross-tokenizer loss with the teacher known through a cache of its top k at the aligned positions
(`cached_cross_tokenizer_distillation_loss`): the live loss of `cross_tokenizer.py` with the teacher's tail
mass as one bucket per side (mapped and unmapped tokens). With k = the teacher's vocabulary it equals the live
loss, value and gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hf_distill.losses._common import (
    DIVERGENCE_KINDS,
    _check_chunk_size,
    _check_options,
    _jsd_endpoint,
    _log_mixture,
)
from hf_distill.losses.cross_tokenizer import (
    _TINY,
    CROSS_TOKENIZER_MODES,
    _check_index_tensor,
    _checked_map,
    _reduced_rows_loss,
    _unmapped,
)


# --------------------------------------------------------------------------------------------- a cached teacher
def _bucket_divergence(log_q: torch.Tensor, log_p: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """(n, B) bucket log-probabilities of teacher and student -> (n,) divergence. Buckets of probability 0 add 0
    (never 0 * inf, in value or gradient); inside log q the teacher's probabilities are floored at ~1e-38."""
    q, p = log_q.exp(), log_p.exp()
    log_q_floored = log_q.clamp_min(math.log(_TINY))

    def kl(probs: torch.Tensor, log_probs: torch.Tensor, log_other: torch.Tensor) -> torch.Tensor:
        safe = torch.where(probs > 0, log_probs - log_other, torch.zeros_like(log_probs))
        return (probs * safe).sum(-1)

    if kind == "forward_kl":
        return kl(q, log_q_floored, log_p)
    if kind == "reverse_kl":
        return kl(p, log_p, log_q_floored)
    log_m = _log_mixture(log_q_floored, log_p, beta)
    return beta * kl(q, log_q_floored, log_m) + (1.0 - beta) * kl(p, log_p, log_m)


def _sorted_distance_with_rest(
    student_probs: torch.Tensor, teacher_known: torch.Tensor, known: torch.Tensor, teacher_rest: torch.Tensor
) -> torch.Tensor:
    """(n,) sum_{i < r} |s_(i) - t_i| + |sum_{i >= r} s_(i) - teacher_rest|: ULD with the teacher known through its
    r largest probabilities. student_probs: (n, U) in any order (s_(i): sorted decreasingly, zero-padded);
    teacher_known: (n, k) sorted decreasingly, valid where `known` (n, k), a prefix of r entries per row;
    teacher_rest: (n,) the teacher's mass outside them."""
    k = teacher_known.shape[-1]
    width = max(student_probs.shape[-1], k)
    sorted_student = F.pad(
        student_probs.sort(dim=-1, descending=True).values, (0, width - student_probs.shape[-1])
    )
    teacher = F.pad(teacher_known.masked_fill(~known, 0.0), (0, width - k))
    known = F.pad(known, (0, width - k), value=False)
    head = torch.where(known, (sorted_student - teacher).abs(), torch.zeros_like(sorted_student)).sum(-1)
    student_rest = torch.where(known, torch.zeros_like(sorted_student), sorted_student).sum(-1)
    return head + (student_rest - teacher_rest).abs()


def _cached_rows_loss(
    student_logits: torch.Tensor,
    logprobs: torch.Tensor,
    indices: torch.Tensor,
    mapped_tail: torch.Tensor,
    unmapped_tail: torch.Tensor,
    *,
    mode: str,
    student_ids: torch.Tensor | None,
    teacher_to_map: torch.Tensor | None,
    student_unmapped: torch.Tensor | None,
    kind: str,
    temperature: float,
    beta: float,
    uld_weight: float,
) -> torch.Tensor:
    """Per-row loss of (n, V_s) float32 student logits against n cached teacher rows (see
    `cached_cross_tokenizer_distillation_loss`) -> (n,)."""
    scaled = logprobs.float() / temperature  # (n, k): log p_i**(1/T), unnormalised
    mapped_tail, unmapped_tail = mapped_tail.float()[:, None], unmapped_tail.float()[:, None]
    log_normaliser = torch.cat([scaled, mapped_tail, unmapped_tail], dim=-1).logsumexp(-1, keepdim=True)
    total = torch.zeros(student_logits.shape[0], device=student_logits.device)
    if mode != "uld":
        position = teacher_to_map[
            indices
        ]  # (n, k): index into the map, -1 where the token has no counterpart
        mapped = position.ge(0)
        log_q = torch.log_softmax(torch.cat([scaled.masked_fill(~mapped, -math.inf), mapped_tail], -1), -1)
        log_p_mapped = torch.log_softmax(student_logits.index_select(-1, student_ids) / temperature, dim=-1)
        listed = log_p_mapped.gather(-1, position.clamp(min=0)).masked_fill(~mapped, -math.inf)
        count = log_p_mapped.shape[-1]
        covered = torch.zeros(position.shape[0], count + 1, dtype=torch.bool, device=position.device)
        covered = covered.scatter(-1, torch.where(mapped, position, count), True)[:, :count]
        has_rest = (~covered).any(-1, keepdim=True)
        rest_inputs = torch.where(has_rest, log_p_mapped.masked_fill(covered, -math.inf), 0.0)
        rest = torch.where(has_rest, rest_inputs.logsumexp(-1, keepdim=True), -math.inf)
        log_p = torch.cat([listed, rest], dim=-1)
        total = total + _bucket_divergence(log_q, log_p, kind, beta) * temperature**2
        if mode == "exact":
            return total
    q_known = (scaled - log_normaliser).exp()  # (n, k), the teacher's probabilities at T, ranked
    p_student = F.softmax(student_logits / temperature, dim=-1)
    if mode == "uld":
        rest = (torch.logaddexp(mapped_tail, unmapped_tail) - log_normaliser).exp().squeeze(-1)
        known = torch.ones_like(q_known, dtype=torch.bool)
        return uld_weight * _sorted_distance_with_rest(p_student, q_known, known, rest)
    # hybrid: the unmapped tokens of each side; the teacher's unmapped top-k tokens are its largest unmapped ones
    ranks = torch.arange(q_known.shape[-1], device=q_known.device).expand_as(q_known)
    order = torch.where(mapped, ranks + q_known.shape[-1], ranks).argsort(dim=-1)
    known = (~mapped).gather(-1, order)
    rest = (unmapped_tail - log_normaliser).exp().squeeze(-1)
    distance = _sorted_distance_with_rest(
        p_student.index_select(-1, student_unmapped), q_known.gather(-1, order), known, rest
    )
    return total + uld_weight * distance


def cached_cross_tokenizer_distillation_loss(
    student_logits: torch.Tensor,
    student_rows: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    teacher_mapped_tail_logmass: torch.Tensor,
    teacher_unmapped_tail_logmass: torch.Tensor,
    *,
    teacher_vocab_size: int,
    student_ids: torch.Tensor | None = None,
    teacher_ids: torch.Tensor | None = None,
    mode: str = "hybrid",
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    uld_weight: float = 1.0,
    chunk_size: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """`cross_tokenizer_distillation_loss` against a teacher known through a cache of its top k per paired position.

    student_logits: (..., V_s), flattened into rows; student_rows: (P,) long, the paired rows.
    teacher_topk_logprobs: (P, k) the teacher's log-probabilities at temperature 1 of its k most likely tokens,
        ranked; teacher_topk_indices: (P, k) their ids (< teacher_vocab_size);
    teacher_mapped_tail_logmass, teacher_unmapped_tail_logmass: (P,) log sum_j p_j**(1/T) over the teacher's
        other tokens (outside the top k) that have / have no student counterpart in the map, tempered at this
        loss's `temperature` (`logit_cache_cross.teacher_topk_split_tail`); -inf where there are none.
    student_ids, teacher_ids: the vocabulary map (needed by exact and hybrid). Returns a float32 scalar, reduced
    over the P pairs as `cross_tokenizer_distillation_loss`; kinds forward_kl, reverse_kl, jsd (the teacher's
    logits, which mse needs, are not cached).

    The teacher's distribution at T is softmax over [l / T, mapped tail, unmapped tail], exact in every bucket.
    Per pair:
      exact:  `kind` (times T**2) between the two distributions over the mapped tokens, renormalised on each side,
              taken over buckets: each mapped token among the teacher's top k on its own, and all other mapped
              tokens as one bucket (the teacher's mapped tail; the student's mass on the other mapped tokens). This
              is the live exact loss with the mapped tokens outside the top k merged, so it is never larger (the
              divergence of a coarsening), equal when the top k hold every mapped token, and zero with a zero
              gradient when the student equals the teacher on the mapped tokens.
      uld:    uld_weight * (sum_{i<k} |s_(i) - t_(i)| + |sum_{i>=k} s_(i) - t_rest|): the live ULD over the first k
              ranks, where the teacher's sorted probabilities are known (its top k), and the remaining ranks as one
              bucket, the student's sorted mass beyond rank k against the teacher's tail mass. By the triangle
              inequality this is a lower bound of the live ULD, equal to it when the top k cover the teacher's
              vocabulary (no teacher tail: the live loss compares the student's remaining ranks with zeros).
      hybrid: exact + uld_weight * the same bucketed distance over the unmapped tokens of each side (probabilities
              from the full softmax, not renormalised): the teacher's unmapped tokens in its top k are its largest
              unmapped ones, so they are its first ranks; the rest is its unmapped tail.
    With k = the teacher's vocabulary (both tails -inf) every mode equals the live loss on the teacher's logits.
    """
    if mode not in CROSS_TOKENIZER_MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes are {CROSS_TOKENIZER_MODES}.")
    _check_options(kind, DIVERGENCE_KINDS, temperature, beta, reduction)
    kind = _jsd_endpoint(kind, beta)
    _check_chunk_size(chunk_size)
    if uld_weight < 0:
        raise ValueError(f"uld_weight must be >= 0, got {uld_weight}.")
    pairs = student_rows.numel()
    count = student_logits.numel() // max(student_logits.shape[-1], 1)
    _check_index_tensor("student_rows", student_rows, count, f"the logits flatten into {count} rows")
    k = teacher_topk_indices.shape[-1] if teacher_topk_indices.dim() == 2 else 0
    for name, tensor, shape in (
        ("teacher_topk_logprobs", teacher_topk_logprobs, (pairs, k)),
        ("teacher_topk_indices", teacher_topk_indices, (pairs, k)),
        ("teacher_mapped_tail_logmass", teacher_mapped_tail_logmass, (pairs,)),
        ("teacher_unmapped_tail_logmass", teacher_unmapped_tail_logmass, (pairs,)),
    ):
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected {shape}: one cached row of k = {k} tokens per "
                f"paired student row ({pairs} in student_rows)."
            )
    device, student_vocab = student_logits.device, student_logits.shape[-1]
    if k and (int(teacher_topk_indices.min()) < 0 or int(teacher_topk_indices.max()) >= teacher_vocab_size):
        raise ValueError(
            f"teacher_topk_indices hold {int(teacher_topk_indices.min())} to {int(teacher_topk_indices.max())}, "
            f"outside the teacher's vocabulary [0, {teacher_vocab_size}): pass the cache's own teacher_vocab_size "
            "(its manifest's cached_vocab_size) and the rows it was built for."
        )
    teacher_to_map = student_unmapped = None
    if mode != "uld":
        student_ids, teacher_ids = _checked_map(
            mode, student_ids, teacher_ids, student_vocab, teacher_vocab_size, device
        )
        teacher_to_map = torch.full((teacher_vocab_size,), -1, dtype=torch.long, device=device)
        teacher_to_map[teacher_ids] = torch.arange(teacher_ids.numel(), device=device)
        if mode == "hybrid":
            student_unmapped = _unmapped(student_ids, student_vocab)
    cached = [
        tensor.detach().to(device)
        for tensor in (
            teacher_topk_logprobs,
            teacher_topk_indices.long(),
            teacher_mapped_tail_logmass,
            teacher_unmapped_tail_logmass,
        )
    ]
    options = dict(
        mode=mode, student_ids=student_ids, teacher_to_map=teacher_to_map, student_unmapped=student_unmapped,
        kind=kind, temperature=float(temperature), beta=float(beta), uld_weight=float(uld_weight),
    )  # fmt: skip

    def row_loss(student_chunk: torch.Tensor, start: int, end: int) -> torch.Tensor:
        return _cached_rows_loss(student_chunk, *(tensor[start:end] for tensor in cached), **options)

    scale = 1.0 / max(pairs, 1) if reduction == "mean" else 1.0
    return _reduced_rows_loss(student_logits, student_rows.to(device), row_loss, chunk_size, scale)
