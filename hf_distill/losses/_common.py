"""What every loss shares: the valid kinds, argument checks with helpful errors, mask flattening, the reduction and
the log of the JSD mixture. Pure helpers over tensors; nothing here computes a loss on its own."""

from __future__ import annotations

import math

import torch

DIVERGENCE_KINDS = ("forward_kl", "reverse_kl", "jsd")
LOGIT_KINDS = (*DIVERGENCE_KINDS, "mse")
_REDUCTIONS = ("mean", "sum")


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


def _log_mixture(log_p_teacher: torch.Tensor, log_p_student: torch.Tensor, beta: float) -> torch.Tensor:
    """log(beta * p_t + (1 - beta) * p_s) without taking log(0) at beta in {0, 1}."""
    if beta == 0.0:
        return log_p_student
    if beta == 1.0:
        return log_p_teacher
    return torch.logaddexp(log_p_teacher + math.log(beta), log_p_student + math.log1p(-beta))
