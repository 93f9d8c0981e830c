"""The chunked logit loss: a custom autograd Function over (..., V) logits that visits `chunk_size` positions at a
time and computes the gradient during the forward. `logit_distillation_loss(..., chunk_size=N)` (in `dense.py`)
checks the arguments and calls it."""

from __future__ import annotations

import torch

from hf_distill.losses._inplace import _chunks, _rows_loss_and_grad, _scratch_slots, _Workspace


class _ChunkedLogitDistillation(torch.autograd.Function):
    """Loss over (..., V) logits, `chunk_size` consecutive positions at a time, masked inside each chunk.

    The gradient w.r.t. the student logits is written chunk by chunk during the forward into one buffer of the
    input's shape and dtype (the gradient itself: unavoidable), and scaled by grad_output in place in backward.
    Masked positions are computed with their chunk and zeroed (loss and gradient) rather than gathered out first:
    gathering copies rows, so a mask would cost memory that no mask does not. Chunks with nothing unmasked are
    skipped.
    """

    @staticmethod
    def forward(
        ctx, student_logits, teacher_logits, mask, kind, temperature, beta, chunk_size, reduction, want_grad
    ):
        vocab = student_logits.shape[-1]
        student_flat = student_logits.reshape(-1, vocab)  # (N, V), a view when the layout allows
        teacher_flat = teacher_logits.reshape(-1, vocab)
        positions = student_flat.shape[0]
        count = positions if mask is None else int(mask.sum())
        grad_scale = 1.0 / max(count, 1) if reduction == "mean" else 1.0

        grad = grad_flat = None
        if want_grad:
            make = torch.empty if mask is None else torch.zeros  # skipped chunks keep a zero gradient
            grad = make(student_logits.shape, dtype=student_logits.dtype, device=student_logits.device)
            grad_flat = grad.view(-1, vocab)
        # Write the float32 gradient straight into its final place when no cast is needed.
        direct = grad is not None and grad.dtype == torch.float32
        workspace = _Workspace(min(chunk_size, max(positions, 1)), vocab, student_logits.device)
        scratch_slots = range(1, 1 + _scratch_slots(kind))

        total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
        factor = 0.0
        for start, end in _chunks(positions, chunk_size):
            n = end - start
            keep = None if mask is None else mask[start:end]  # (n,) bool
            if keep is not None and not bool(keep.any()):
                continue
            student_rows, teacher_rows = student_flat[start:end], teacher_flat[start:end]
            out = grad_flat[start:end] if direct else workspace.take(0, n)
            loss_rows, factor = _rows_loss_and_grad(
                student_rows,
                teacher_rows,
                kind=kind,
                temperature=temperature,
                beta=beta,
                want_grad=want_grad,
                out=out,
                scratch=tuple(workspace.take(slot, n) for slot in scratch_slots),
            )
            if keep is not None:
                # where, not a product: a masked row may hold -inf logits, and NaN * 0 is NaN
                loss_rows = torch.where(keep, loss_rows, torch.zeros_like(loss_rows))
                if want_grad:
                    out.masked_fill_(~keep.unsqueeze(1), 0.0)
            total += loss_rows.sum()
            if want_grad and not direct:
                grad_flat[start:end] = out
            del student_rows, teacher_rows, loss_rows, out

        ctx.grad = grad
        ctx.grad_factor = factor * grad_scale
        return total * grad_scale

    @staticmethod
    def backward(ctx, grad_output):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(
                "the chunked distillation loss keeps a single gradient buffer and frees it on the first backward; "
                "backward through it twice (retain_graph=True) is not supported: use chunk_size=None."
            )
        ctx.grad = None
        grad.mul_(grad_output * ctx.grad_factor)  # in place: no second (N, V) buffer
        return grad, None, None, None, None, None, None, None, None
