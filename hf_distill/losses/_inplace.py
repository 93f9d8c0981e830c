"""Divergences evaluated in place, with a hand-written gradient: the per-chunk kernel of the chunked logit loss
(`chunked.py`) and the fused linear loss (`fused.py`).

A chunk of (n, V) rows goes through `_rows_loss_and_grad`, which writes log-probabilities, probabilities and the
gradient direction into float32 buffers taken from a `_Workspace` that every chunk of a call reuses, so at most a
few chunk-sized intermediates ever exist.
"""

from __future__ import annotations

import math

import torch


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

    Same values as `dense._divergence_rows`, evaluated in place in float32 buffers: `out` and `scratch` are (n, V)
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
