"""`fused_linear_distillation_loss`: the logit loss of two LM heads' outputs computed from hidden states and head
weights, one chunk of positions at a time, so the full (..., V) logits are never formed."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hf_distill.losses._common import (
    LOGIT_KINDS,
    _check_chunk_size,
    _check_options,
    _flat_mask,
    _jsd_endpoint,
)
from hf_distill.losses._inplace import _chunks, _rows_loss_and_grad, _Workspace

# Budget for the float32 (rows, vocab) buffers that one chunk of the fused loss keeps alive (at most four).
_FUSED_CHUNK_BYTES = 64 * 2**20
_BUFFERS_PER_CHUNK = 4


def _default_fused_chunk_size(vocab: int) -> int:
    """Positions per chunk so that the float32 (rows, vocab) buffers of one chunk stay near 64 MiB."""
    rows = _FUSED_CHUNK_BYTES // (_BUFFERS_PER_CHUNK * 4 * max(vocab, 1))
    return max(8, rows // 8 * 8)


def _project_rows(hidden_rows, weight, bias, out):
    """out (n, V) float32 <- hidden_rows (n, H) @ weight.T (+ bias), in the inputs' dtype like nn.Linear."""
    if hidden_rows.dtype == torch.float32 and weight.dtype == torch.float32:
        if bias is None:
            return torch.mm(hidden_rows, weight.t(), out=out)
        return torch.addmm(bias.float(), hidden_rows, weight.t(), out=out)
    return out.copy_(F.linear(hidden_rows, weight, bias))


class _FusedLinearDistillation(torch.autograd.Function):
    """Loss from hidden states and LM heads, forming (chunk, V) logits for one chunk of positions at a time.

    The gradients w.r.t. the student hidden states, head weight and bias are accumulated during the forward (float32
    accumulators) and scaled by grad_output in backward.
    """

    @staticmethod
    def forward(
        ctx,
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        rows,
        kind,
        temperature,
        beta,
        chunk_size,
        reduction,
        wants,
    ):
        want_hidden, want_weight, want_bias = wants
        want_grad = want_hidden or want_weight or want_bias
        vocab = student_weight.shape[0]
        student_flat = student_hidden.reshape(-1, student_hidden.shape[-1])  # (N, H_s)
        teacher_flat = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])  # (N, H_t)
        count = student_flat.shape[0] if rows is None else rows.numel()
        grad_scale = 1.0 / max(count, 1) if reduction == "mean" else 1.0
        device = student_hidden.device

        grad_hidden = (
            torch.zeros(student_flat.shape, dtype=torch.float32, device=device) if want_hidden else None
        )
        grad_weight = (
            torch.zeros(student_weight.shape, dtype=torch.float32, device=device) if want_weight else None
        )
        grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if want_bias else None

        # Slots: 0 = gradient direction, 1 = student logits, 2 = teacher logits, 3 = jsd's extra scratch.
        workspace = _Workspace(min(chunk_size, max(count, 1)), vocab, device)
        total = torch.zeros((), dtype=torch.float32, device=device)
        factor = 0.0
        for start, end in _chunks(count, chunk_size):
            if rows is None:
                index = None
                student_rows, teacher_rows = student_flat[start:end], teacher_flat[start:end]
            else:
                index = rows[start:end]
                student_rows, teacher_rows = (
                    student_flat.index_select(0, index),
                    teacher_flat.index_select(0, index),
                )
            n = end - start
            student_logits = _project_rows(student_rows, student_weight, student_bias, workspace.take(1, n))
            teacher_logits = _project_rows(teacher_rows, teacher_weight, teacher_bias, workspace.take(2, n))
            scratch = (student_logits, teacher_logits) + ((workspace.take(3, n),) if kind == "jsd" else ())
            loss_rows, factor = _rows_loss_and_grad(
                student_logits,
                teacher_logits,
                kind=kind,
                temperature=temperature,
                beta=beta,
                want_grad=want_grad,
                out=workspace.take(0, n),
                scratch=scratch,
            )
            total += loss_rows.sum()
            if want_grad:
                grad_logits = workspace.take(0, n)  # (n, V), unscaled: the factor is applied in backward
                if want_hidden:
                    # (n, V) @ (V, H_s), in the head's dtype like autograd through nn.Linear would do
                    grad_rows = torch.mm(grad_logits.to(student_weight.dtype), student_weight)
                    if index is None:
                        grad_hidden[start:end] = grad_rows
                    else:
                        grad_hidden.index_copy_(0, index, grad_rows.float())
                if want_weight:
                    grad_weight.addmm_(grad_logits.t(), student_rows.float())  # (V, n) @ (n, H_s)
                if want_bias:
                    grad_bias += grad_logits.sum(0)

        ctx.grads = (
            grad_hidden.view(student_hidden.shape) if grad_hidden is not None else None,
            grad_weight,
            grad_bias,
        )
        ctx.dtypes = (
            student_hidden.dtype,
            student_weight.dtype,
            student_bias.dtype if student_bias is not None else None,
        )
        ctx.grad_factor = factor * grad_scale
        return total * grad_scale

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError(
                "the fused distillation loss frees its gradients on the first backward; backward through it twice "
                "(retain_graph=True) is not supported."
            )
        scale = grad_output * ctx.grad_factor
        grads = [
            grad.mul_(scale).to(dtype) if grad is not None else None
            for grad, dtype in zip(ctx.grads, ctx.dtypes)
        ]
        ctx.grads = None
        return (*grads, None, None, None, None, None, None, None, None, None, None)


def fused_linear_distillation_loss(
    student_hidden: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    *,
    temperature: float = 1.0,
    kind: str = "forward_kl",
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """`logit_distillation_loss` of the two LM heads' outputs, without ever forming the full (..., V) logits.

    student_hidden: (..., H_s); student_lm_head_weight: (V, H_s); student_bias: (V,) or None.
    teacher_hidden: (..., H_t); teacher_lm_head_weight: (V, H_t); teacher_bias: (V,) or None (nn.Linear layout).
    mask: (...) bool over the position dims, True = counts. Returns a float32 scalar.

    Same kinds, temperature**2 scaling and reductions as `logit_distillation_loss`, and the same value and gradients
    as forming the logits with F.linear and calling it. A custom autograd Function projects `chunk_size` unmasked
    positions at a time to float32 (chunk, V) logits and accumulates the gradients w.r.t. student_hidden,
    student_lm_head_weight and student_bias during the forward; the teacher tensors get no gradient.
    chunk_size=None picks about 64 MiB of float32 intermediates per chunk (128 positions at V = 32000).
    Backward through the result once only.
    """
    _check_options(kind, LOGIT_KINDS, temperature, beta, reduction)
    kind = _jsd_endpoint(kind, beta)
    _check_chunk_size(chunk_size)
    positions = student_hidden.shape[:-1]
    if student_hidden.dim() == 0 or teacher_hidden.shape[:-1] != positions:
        raise ValueError(
            f"student_hidden has shape {tuple(student_hidden.shape)} but teacher_hidden {tuple(teacher_hidden.shape)}: "
            "the position dims (all but the last) must match; feed both models the same padded batch."
        )
    for name, hidden, weight in (
        ("student", student_hidden, student_lm_head_weight),
        ("teacher", teacher_hidden, teacher_lm_head_weight),
    ):
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(
                f"{name}_lm_head_weight has shape {tuple(weight.shape)}, expected (vocab, {hidden.shape[-1]}) to match "
                f"{name}_hidden's width (nn.Linear layout: pass lm_head.weight, not its transpose)."
            )
    if student_lm_head_weight.shape[0] != teacher_lm_head_weight.shape[0]:
        raise ValueError(
            f"teacher has vocab {teacher_lm_head_weight.shape[0]}, student {student_lm_head_weight.shape[0]}: slice "
            "the teacher's padded rows (teacher_lm_head_weight[:student_vocab], and its bias) or use the same "
            "tokenizer for both models."
        )
    vocab = student_lm_head_weight.shape[0]
    for name, bias in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if bias is not None and tuple(bias.shape) != (vocab,):
            raise ValueError(
                f"{name} has shape {tuple(bias.shape)}, expected ({vocab},) (one per vocabulary entry)."
            )
    flat_mask = _flat_mask(mask, positions, "the hidden states")

    rows = None
    if flat_mask is not None and not bool(flat_mask.all()):
        rows = flat_mask.nonzero().view(-1)
    grad_on = torch.is_grad_enabled()
    wants = (
        grad_on and student_hidden.requires_grad,
        grad_on and student_lm_head_weight.requires_grad,
        grad_on and student_bias is not None and student_bias.requires_grad,
    )
    return _FusedLinearDistillation.apply(
        student_hidden,
        student_lm_head_weight,
        student_bias,
        teacher_hidden.detach(),
        teacher_lm_head_weight.detach(),
        teacher_bias.detach() if teacher_bias is not None else None,
        rows,
        kind,
        float(temperature),
        float(beta),
        chunk_size if chunk_size is not None else _default_fused_chunk_size(vocab),
        reduction,
        wants,
    )
