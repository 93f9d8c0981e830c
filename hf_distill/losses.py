"""Pure distillation losses: tensors in, a float32 scalar out.

Every function here is stateless. Inputs may be float16/bfloat16/float32; everything is upcast to float32 before
any arithmetic, and the teacher side is always treated as a constant (no gradient reaches it). Masks are explicit
bool tensors over the position dims, True = the position counts.

Reductions: `"mean"` averages over unmasked positions (0.0 with a zero gradient when there are none) and `"sum"`
adds them up, for callers that divide by the Trainer's `num_items_in_batch` themselves.

Memory: `logit_distillation_loss(..., chunk_size=N)` and `fused_linear_distillation_loss` run as custom autograd
Functions that visit N positions at a time and compute the gradient during the forward pass, so only one chunk of
(N, vocab) float32 intermediates exists at once; the fused variant also never forms the full logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "DIVERGENCE_KINDS",
    "LOGIT_KINDS",
    "attention_distillation_loss",
    "bernoulli_distillation_loss",
    "fused_linear_distillation_loss",
    "hidden_state_loss",
    "logit_distillation_loss",
    "sparse_distillation_and_cross_entropy",
    "sparse_distillation_loss",
]

DIVERGENCE_KINDS = ("forward_kl", "reverse_kl", "jsd")
LOGIT_KINDS = (*DIVERGENCE_KINDS, "mse")
_REDUCTIONS = ("mean", "sum")
_HIDDEN_KINDS = ("mse", "cosine")

# Budget for the float32 (rows, vocab) buffers that one chunk of the fused loss keeps alive (at most four).
_FUSED_CHUNK_BYTES = 64 * 2**20
_BUFFERS_PER_CHUNK = 4
# Probabilities below this are "zero" inside logarithms (smallest normal float32), see sparse_distillation_loss.
_TINY = torch.finfo(torch.float32).tiny


# ----------------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------------


def _check_options(
    kind: str, kinds: tuple[str, ...], temperature: float, beta: float, reduction: str
) -> None:
    if kind not in kinds:
        raise ValueError(f"unknown kind {kind!r}; valid kinds are {', '.join(repr(k) for k in kinds)}.")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")
    if kind == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1] for kind='jsd', got {beta!r}.")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid reductions are 'mean' and 'sum'.")


def _jsd_endpoint(kind: str, beta: float) -> str:
    """TRL's convention for the generalised JSD's end points: beta = 0 is forward KL(p_t || p_s) and beta = 1 is
    reverse KL(p_s || p_t). (The mixture divergence itself is identically 0 there, which trains nothing.)"""
    if kind == "jsd" and beta == 0.0:
        return "forward_kl"
    if kind == "jsd" and beta == 1.0:
        return "reverse_kl"
    return kind


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(
            f"chunk_size must be a positive int (positions per chunk) or None, got {chunk_size!r}."
        )


def _flat_mask(mask: torch.Tensor | None, positions: torch.Size, what: str) -> torch.Tensor | None:
    """(positions...) bool/0-1 mask -> (num_positions,) bool, or None when every position counts."""
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(positions):
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but {what} has position dims {tuple(positions)}: pass one bool per "
            "position (True = counts), e.g. attention_mask.bool() or labels != -100 aligned with the logits."
        )
    return (mask if mask.dtype == torch.bool else mask != 0).reshape(-1)


def _check_logit_shapes(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.dim() == 0:
        raise ValueError("student_logits must have at least one dim (..., vocab); got a scalar.")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"teacher has vocab {teacher_logits.shape[-1]}, student {student_logits.shape[-1]} (shapes "
            f"{tuple(teacher_logits.shape)} vs {tuple(student_logits.shape)}): slice the teacher's padded rows "
            "(teacher_logits[..., :student_vocab]) or use the same tokenizer for both models."
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits has shape {tuple(student_logits.shape)} but teacher_logits {tuple(teacher_logits.shape)}: "
            "the position dims must match; feed both models the same padded batch (same length and padding side)."
        )


def _mean_or_sum(total: torch.Tensor, count: int, reduction: str) -> torch.Tensor:
    return total / max(count, 1) if reduction == "mean" else total


# ----------------------------------------------------------------------------------------------------------------
# Divergences, plain autograd (the reference path, chunk_size=None)
# ----------------------------------------------------------------------------------------------------------------


def _log_mixture(log_p_teacher: torch.Tensor, log_p_student: torch.Tensor, beta: float) -> torch.Tensor:
    """log(beta * p_t + (1 - beta) * p_s) without taking log(0) at beta in {0, 1}."""
    if beta == 0.0:
        return log_p_student
    if beta == 1.0:
        return log_p_teacher
    return torch.logaddexp(log_p_teacher + math.log(beta), log_p_student + math.log1p(-beta))


def _divergence_rows(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, temperature: float, beta: float
) -> torch.Tensor:
    """(n, V) float32 student/teacher logits -> (n,) per-position loss; T**2 already applied to the KL kinds."""
    if kind == "mse":
        return (student_logits - teacher_logits).pow(2).mean(-1)
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    if kind == "forward_kl":
        per_row = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    elif kind == "reverse_kl":
        per_row = (log_p_student.exp() * (log_p_student - log_p_teacher)).sum(-1)
    else:
        log_m = _log_mixture(log_p_teacher, log_p_student, beta)
        kl_teacher = (log_p_teacher.exp() * (log_p_teacher - log_m)).sum(-1)
        kl_student = (log_p_student.exp() * (log_p_student - log_m)).sum(-1)
        per_row = beta * kl_teacher + (1.0 - beta) * kl_student
    return per_row * temperature**2


# ----------------------------------------------------------------------------------------------------------------
# Divergences with a hand-written gradient, one chunk of rows at a time
# ----------------------------------------------------------------------------------------------------------------


class _Workspace:
    """Float32 (rows, V) buffers allocated once per call and reused by every chunk, so that chunks add no
    allocator churn and at most `len(buffers)` chunk-sized intermediates ever exist."""

    def __init__(self, rows: int, vocab: int, device: torch.device):
        self.rows, self.vocab, self.device = rows, vocab, device
        self.buffers: dict[int, torch.Tensor] = {}

    def take(self, slot: int, n: int) -> torch.Tensor:
        if slot not in self.buffers:
            self.buffers[slot] = torch.empty((self.rows, self.vocab), dtype=torch.float32, device=self.device)
        return self.buffers[slot][:n]


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, V), (n, V) -> (n,) sum(a * b, -1) without an (n, V) product temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _log_softmax_rows(rows: torch.Tensor, temperature: float, out: torch.Tensor, scratch: torch.Tensor):
    """out <- float32 log_softmax(rows / T) over the last dim. `scratch` (float32, may be `rows`) gets clobbered."""
    if rows.dtype == torch.float32 and temperature == 1.0:
        return torch.log_softmax(rows, dim=-1, out=out)
    if scratch is not rows:
        scratch.copy_(
            rows
        )  # upcast before scaling: fp16 logits of 1e4 divided by T < 1 would overflow in fp16
    if temperature != 1.0:
        scratch.mul_(1.0 / temperature)
    return torch.log_softmax(scratch, dim=-1, out=out)


def _rows_loss_and_grad(
    student_rows: torch.Tensor,
    teacher_rows: torch.Tensor,
    *,
    kind: str,
    temperature: float,
    beta: float,
    want_grad: bool,
    out: torch.Tensor,
    scratch: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, float]:
    """Per-row loss (n,) with T**2 applied, and, if `want_grad`, the gradient direction written into `out`.

    Same values as `_divergence_rows`, evaluated in place in float32 buffers: `out` and `scratch` are (n, V)
    float32; scratch[0] may alias student_rows and scratch[1] teacher_rows (both get clobbered then). forward_kl,
    reverse_kl and mse use two scratch buffers, jsd three. Returns (loss_rows, factor): the gradient of loss_row
    w.r.t. the student row is factor * out, with z = s / T and p = softmax(z):
      forward_kl: T * (p_s - p_t)
      reverse_kl: T * p_s * (log p_s - log p_t - KL(p_s || p_t))
      jsd:        T * (1 - beta) * p_s * (log p_s - log m - KL(p_s || m))
      mse:        2 / V * (s - t)
    Callers fold `factor` into the (smaller, or anyway needed) scaling by grad_output, saving a pass per chunk.
    """
    vocab = student_rows.shape[-1]
    if kind == "mse":
        difference = out.copy_(student_rows).sub_(teacher_rows)  # (n, V) s - t in float32
        return _rowdot(difference, difference) / vocab, 2.0 / vocab

    t2 = temperature**2
    log_p_student = _log_softmax_rows(student_rows, temperature, out=out, scratch=scratch[0])
    log_p_teacher = _log_softmax_rows(teacher_rows, temperature, out=scratch[0], scratch=scratch[1])

    if kind == "forward_kl":
        p_teacher = torch.exp(log_p_teacher, out=scratch[1])
        log_ratio = log_p_teacher.sub_(log_p_student)  # log p_t - log p_s
        loss = _rowdot(p_teacher, log_ratio) * t2
        if want_grad:
            log_p_student.exp_().sub_(p_teacher)  # out: p_s - p_t
        return loss, temperature

    if kind == "reverse_kl":
        log_ratio = torch.sub(log_p_student, log_p_teacher, out=scratch[0])  # log p_s - log p_t
        p_student = torch.exp(log_p_student, out=scratch[1])
        kl = _rowdot(p_student, log_ratio)
        if want_grad:
            torch.sub(log_ratio, kl.unsqueeze(1), out=out).mul_(p_student)
        return kl * t2, temperature

    # jsd with 0 < beta < 1; m = beta * p_t + (1 - beta) * p_s in log space
    log_m = torch.add(log_p_student, math.log1p(-beta), out=scratch[1])
    torch.logaddexp(log_m, torch.add(log_p_teacher, math.log(beta), out=scratch[2]), out=log_m)
    p_teacher = torch.exp(log_p_teacher, out=scratch[2])
    kl_teacher = _rowdot(p_teacher, log_p_teacher.sub_(log_m))
    p_student = torch.exp(log_p_student, out=scratch[2])
    log_student_over_m = log_p_student.sub_(log_m)
    kl_student = _rowdot(p_student, log_student_over_m)
    if want_grad:
        log_student_over_m.sub_(kl_student.unsqueeze(1)).mul_(p_student)
    return (beta * kl_teacher + (1.0 - beta) * kl_student) * t2, temperature * (1.0 - beta)


def _scratch_slots(kind: str) -> int:
    return 3 if kind == "jsd" else 2


def _chunks(count: int, chunk_size: int):
    for start in range(0, count, chunk_size):
        yield start, min(start + chunk_size, count)


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


# ----------------------------------------------------------------------------------------------------------------
# Public losses
# ----------------------------------------------------------------------------------------------------------------


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
        if flat_mask is not None:
            student_rows, teacher_rows = student_rows[flat_mask], teacher_rows[flat_mask]
        per_position = _divergence_rows(student_rows, teacher_rows, kind, temperature, beta)
        return _mean_or_sum(per_position.sum(), per_position.shape[0], reduction)

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
) -> torch.Tensor:
    """KL(teacher row || student row) of attention probabilities, averaged over heads and unmasked queries.

    student_attentions, teacher_attentions: (batch, heads, q, k), rows summing to 1 (head counts must match).
    mask: (batch, q) bool padding mask, True = real token, or None. Returns a float32 scalar; 0.0 (zero gradient)
    when no query is unmasked.

    Per (batch, head, query) row: sum_k p_t * (log p_t - log p_s), with probabilities clamped to >= 1e-12 inside
    the logs so exact zeros (padded keys, causal masking) contribute 0. When q == k (self-attention) the key
    positions the mask marks as padding are also dropped from the sum explicitly. The mean runs over heads and
    unmasked (batch, query) positions. teacher_attentions is treated as a constant.
    """
    if student_attentions.dim() != 4 or student_attentions.shape != teacher_attentions.shape:
        raise ValueError(
            f"student_attentions has shape {tuple(student_attentions.shape)} and teacher_attentions "
            f"{tuple(teacher_attentions.shape)}: both must be (batch, heads, q, k) with the same sizes; map student "
            "layers to teacher layers with the same number of heads."
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """(`sparse_distillation_loss(...)`, the student's cross-entropy against `labels`), from one pass over the logits.

    The KD term, its buckets, `teacher_tail_logmass`/`tail_temperature` and the fallback without a tail are
    exactly those of `sparse_distillation_loss`.
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
    has_tail = k < vocab and (teacher_tail_logmass is not None or temperature == 1.0)
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
    # the tail already tempered (log sum_j p_j**(1/T)); renormalised over the buckets.
    log_q = teacher_logprobs.float() / temperature
    if has_tail:
        if tail_logmass is None:  # T = 1 here
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
