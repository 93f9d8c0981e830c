"""Losses between a student and a teacher whose vocabularies differ: an exact divergence over the tokens both
vocabularies share (mapped one to one, each side renormalised over its mapped subset), and Universal Logit
Distillation (Boizard et al., 2024), a Wasserstein-1 distance between the two sorted probability vectors, which
needs no mapping at all.

ULD's gradient does not vanish near its optimum: it is an L1 distance, so each sorted rank whose two probabilities
differ by any nonzero amount, however small, contributes a gradient of +-1 (through the softmax). Only sorted
vectors that are exactly equal, bit for bit, have a zero gradient (torch's subgradient of |x| at 0); two equal
distributions computed from different vocabularies or orders differ by float rounding and do not.

The rows are paired beforehand (`hf_distill.cross_tokenizer` aligns the two tokenizations): row `student_rows[i]`
of the student's logits is compared with row `teacher_rows[i]` of the teacher's. A teacher known only through a
cache of its top k at the paired positions (`hf_distill.logit_cache_cross`) is distilled by
`cached_cross_tokenizer_distillation_loss`, the same three modes over buckets (see there).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ._common import (
    DIVERGENCE_KINDS,
    LOGIT_KINDS,
    _check_chunk_size,
    _check_options,
    _jsd_endpoint,
    _log_mixture,
)
from .dense import _divergence_rows

# Probabilities below this are "zero" inside logarithms (smallest normal float32), as in the sparse loss.
_TINY = torch.finfo(torch.float32).tiny

CROSS_TOKENIZER_MODES = ("exact", "uld", "hybrid")


def _uld_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    student_keep: torch.Tensor | None = None,
    teacher_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """(n, V_s), (n, V_t) float32 logits -> (n,) sum_i |sorted p_s_i - sorted p_t_i|.

    p = softmax(logits / T) over each whole vocabulary, then restricted to the `*_keep` token ids when given
    (not renormalised: the mass outside them counts), sorted in decreasing order, the shorter vector padded with
    zeros to the longer one's length.
    """
    p_student = F.softmax(student_logits / temperature, dim=-1)
    p_teacher = F.softmax(teacher_logits / temperature, dim=-1)
    if student_keep is not None:
        p_student = p_student.index_select(-1, student_keep)
    if teacher_keep is not None:
        p_teacher = p_teacher.index_select(-1, teacher_keep)
    width = max(p_student.shape[-1], p_teacher.shape[-1])
    sorted_student = F.pad(p_student.sort(dim=-1, descending=True).values, (0, width - p_student.shape[-1]))
    sorted_teacher = F.pad(p_teacher.sort(dim=-1, descending=True).values, (0, width - p_teacher.shape[-1]))
    return (sorted_student - sorted_teacher).abs().sum(-1)


def _rows_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    mode: str,
    student_ids: torch.Tensor | None,
    teacher_ids: torch.Tensor | None,
    student_unmapped: torch.Tensor | None,
    teacher_unmapped: torch.Tensor | None,
    kind: str,
    temperature: float,
    beta: float,
    uld_weight: float,
) -> torch.Tensor:
    """Per-row loss of paired (n, V_s) / (n, V_t) float32 logits -> (n,)."""
    if mode == "uld":
        return uld_weight * _uld_rows(student_logits, teacher_logits, temperature)
    exact = _divergence_rows(
        student_logits.index_select(-1, student_ids),
        teacher_logits.index_select(-1, teacher_ids),
        kind,
        temperature,
        beta,
    )
    if mode == "exact":
        return exact
    if student_unmapped.numel() == 0 and teacher_unmapped.numel() == 0:
        return exact
    rest = _uld_rows(student_logits, teacher_logits, temperature, student_unmapped, teacher_unmapped)
    return exact + uld_weight * rest


def _check_index_tensor(name: str, ids: torch.Tensor, size: int, what: str) -> None:
    """Raise unless `ids` is a 1-D integer tensor of values in [0, size)."""
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(
            f"{name} must be a 1-D integer tensor, got dtype {ids.dtype} and shape {tuple(ids.shape)}."
        )
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
        raise ValueError(
            f"{name} holds {int(ids.min())} to {int(ids.max())}, outside [0, {size}) ({what}): "
            + (
                "it was built for other tokenizers, or holds negative ids; build it with "
                "hf_distill.cross_tokenizer.vocabulary_map(student_tokenizer, teacher_tokenizer)."
                if name.endswith("_ids")
                else "pass row indices into the flattened logits (batch index * sequence length + position)."
            )
        )


def _checked_map(
    mode: str,
    student_ids: torch.Tensor | None,
    teacher_ids: torch.Tensor | None,
    student_vocab: int,
    teacher_vocab: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The vocabulary map on `device`, after checking it is one to one and fits the two vocabularies."""
    if student_ids is None or teacher_ids is None or student_ids.shape != teacher_ids.shape:
        raise ValueError(
            f"mode={mode!r} needs the vocabulary map: student_ids and teacher_ids of one length "
            "(hf_distill.cross_tokenizer.vocabulary_map), or use mode='uld'."
        )
    if student_ids.numel() == 0:
        raise ValueError(
            "the vocabulary map is empty: no token string is shared by the two tokenizers; use mode='uld'."
        )
    for name, ids, vocab in (
        ("student_ids", student_ids, student_vocab),
        ("teacher_ids", teacher_ids, teacher_vocab),
    ):
        _check_index_tensor(
            name, ids, vocab, f"the map names ids past the vocabularies: {vocab} logits there"
        )
        values, counts = ids.unique(return_counts=True)
        if int(counts.max()) > 1:
            repeated = values[counts > 1][:5].tolist()
            raise ValueError(
                f"the vocabulary map is not one to one: {name} lists token(s) {repeated} more than once, so a "
                "token's probability would be counted twice. Map each token at most once (vocabulary_map does: the "
                "lowest id wins where several tokens read the same text)."
            )
    return student_ids.to(device), teacher_ids.to(device)


def _unmapped(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    keep = torch.ones(vocab, dtype=torch.bool, device=ids.device)
    keep[ids] = False
    return keep.nonzero().squeeze(-1)


def cross_tokenizer_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_rows: torch.Tensor,
    teacher_rows: torch.Tensor,
    *,
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
    """KD between paired positions of two models with different vocabularies.

    student_logits: (..., V_s); teacher_logits: (..., V_t), any leading dims (flattened into rows).
    student_rows, teacher_rows: (P,) long, the paired row indices into the flattened logits (row i of one is
        compared with row i of the other).
    student_ids, teacher_ids: (M,) long, the vocabulary map: student token student_ids[j] is teacher token
        teacher_ids[j] (one to one; needed for "exact" and "hybrid").
    Returns a float32 scalar: the per-pair losses averaged over the P pairs ("mean"; 0.0 with a zero gradient when
    P = 0) or summed ("sum").

    Per pair, with p = softmax(logits / T):
      exact:  `kind` (forward_kl, reverse_kl, jsd with `beta`, times T**2; or mse on the logits) between the two
              distributions restricted to the mapped tokens and renormalised on each side, i.e. softmax over
              student_logits[student_ids] and teacher_logits[teacher_ids];
      uld:    uld_weight * sum_i |sorted(p_s)_i - sorted(p_t)_i| over the whole vocabularies, sorted decreasingly,
              the shorter padded with zeros (Universal Logit Distillation, Boizard et al., 2024; not scaled by T**2);
      hybrid: exact + uld_weight * the same sorted distance between the probabilities of the *unmapped* tokens
              (taken from the full softmax, not renormalised, so the mass each side puts outside the map counts).

    chunk_size=None uses plain autograd over the gathered (P, V) rows. chunk_size=N visits N pairs at a time inside
    a custom autograd Function that computes the gradient during the forward: at most one chunk of float32
    (N, V_s + V_t) intermediates exists, plus one gradient buffer of the student logits' shape and dtype (the
    gradient itself). Backward through it once only. teacher_logits never receive a gradient.
    """
    if mode not in CROSS_TOKENIZER_MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes are {CROSS_TOKENIZER_MODES}.")
    _check_options(kind, LOGIT_KINDS, temperature, beta, reduction)
    kind = _jsd_endpoint(kind, beta)
    _check_chunk_size(chunk_size)
    if uld_weight < 0:
        raise ValueError(f"uld_weight must be >= 0, got {uld_weight}.")
    if student_rows.shape != teacher_rows.shape or student_rows.dim() != 1:
        raise ValueError(
            f"student_rows and teacher_rows must be (P,) index tensors of one length, got shapes "
            f"{tuple(student_rows.shape)} and {tuple(teacher_rows.shape)}."
        )
    student_vocab, teacher_vocab = student_logits.shape[-1], teacher_logits.shape[-1]
    for name, rows, logits in (
        ("student_rows", student_rows, student_logits),
        ("teacher_rows", teacher_rows, teacher_logits),
    ):
        count = logits.numel() // max(logits.shape[-1], 1)
        _check_index_tensor(name, rows, count, f"the logits flatten into {count} rows")
    device = student_logits.device
    student_unmapped = teacher_unmapped = None
    if mode != "uld":
        student_ids, teacher_ids = _checked_map(
            mode, student_ids, teacher_ids, student_vocab, teacher_vocab, device
        )
        if mode == "hybrid":
            student_unmapped = _unmapped(student_ids, student_vocab)
            teacher_unmapped = _unmapped(teacher_ids, teacher_vocab)
    options = dict(
        mode=mode,
        student_ids=student_ids,
        teacher_ids=teacher_ids,
        student_unmapped=student_unmapped,
        teacher_unmapped=teacher_unmapped,
        kind=kind,
        temperature=float(temperature),
        beta=float(beta),
        uld_weight=float(uld_weight),
    )
    teacher_flat = teacher_logits.detach().reshape(-1, teacher_vocab).to(device)
    student_rows, teacher_rows = student_rows.to(device), teacher_rows.to(device)
    pairs = student_rows.numel()
    scale = 1.0 / max(pairs, 1) if reduction == "mean" else 1.0

    def row_loss(student_chunk: torch.Tensor, start: int, end: int) -> torch.Tensor:
        teacher_chunk = teacher_flat.index_select(0, teacher_rows[start:end]).float()
        return _rows_loss(student_chunk, teacher_chunk, **options)

    return _reduced_rows_loss(student_logits, student_rows, row_loss, chunk_size, scale)


def _reduced_rows_loss(
    student_logits: torch.Tensor,
    student_rows: torch.Tensor,
    row_loss: Callable[[torch.Tensor, int, int], torch.Tensor],
    chunk_size: int | None,
    scale: float,
) -> torch.Tensor:
    """scale * sum of `row_loss(student rows [start, end) as float32 (n, V_s), start, end)` (n,) over the paired
    rows: in one piece with plain autograd, or `chunk_size` pairs at a time (`_ChunkedCrossTokenizerLoss`)."""
    if chunk_size is None:
        student_flat = student_logits.reshape(-1, student_logits.shape[-1])  # a view when the layout allows
        return (
            row_loss(student_flat.index_select(0, student_rows).float(), 0, student_rows.numel()).sum()
            * scale
        )
    want_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return _ChunkedCrossTokenizerLoss.apply(
        student_logits, student_rows, row_loss, chunk_size, scale, want_grad
    )


class _ChunkedCrossTokenizerLoss(torch.autograd.Function):
    """The loss over `chunk_size` pairs at a time; each chunk's gradient is computed in the forward (autograd on
    the chunk's own rows) and added into one buffer of the student logits' shape, then scaled in backward."""

    @staticmethod
    def forward(ctx, student_logits, student_rows, row_loss, chunk_size, scale, want_grad):
        vocab = student_logits.shape[-1]
        student_flat = student_logits.detach().reshape(-1, vocab)
        grad = torch.zeros_like(student_flat) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
        for start in range(0, student_rows.numel(), chunk_size):
            rows = student_rows[start : start + chunk_size]
            student_chunk = student_flat.index_select(0, rows).float().requires_grad_(want_grad)  # (n, V_s)
            with torch.enable_grad():
                chunk_sum = row_loss(student_chunk, start, start + rows.numel()).sum()
            if want_grad:
                (chunk_grad,) = torch.autograd.grad(chunk_sum, student_chunk)
                grad.index_add_(0, rows, chunk_grad.to(grad.dtype))
            total += chunk_sum.detach()
            del student_chunk, chunk_sum
        ctx.grad = None if grad is None else grad.view(student_logits.shape)
        ctx.scale = scale
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(
                "the chunked cross-tokenizer loss frees its gradient buffer on the first backward; backward through "
                "it twice (retain_graph=True) is not supported: use chunk_size=None."
            )
        ctx.grad = None
        grad.mul_(grad_output * ctx.scale)
        return grad, None, None, None, None, None


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
