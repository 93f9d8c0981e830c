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
cache of its top k at the paired positions (`hf_distill.caches.cross_tokenizer`) is distilled by
`cached_cross_tokenizer_distillation_loss`, the same three modes over buckets (see there).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from hf_distill.losses._common import (
    LOGIT_KINDS,
    _check_chunk_size,
    _check_options,
    _jsd_endpoint,
)
from hf_distill.losses.dense import _divergence_rows

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
