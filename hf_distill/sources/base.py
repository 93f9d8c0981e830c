"""The interface every KD source implements, and the one micro-batch view they all read.

A source answers three questions, so the trainer's loss reads as its formula:
- `model_kwargs()`: what the student's (and the teacher's) forward must return beyond the defaults;
- `kd_sum(step)`: the KD divergence summed over the positions that count, and their number;
- `task_sum(step, label_smoothing)`: the head's own (hard) loss, summed, and its item count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from hf_distill.training.task_loss import (
    SUPPORTED_HEADS,
    TaskKind,
    hard_label_loss,
)

Sum = tuple[torch.Tensor, torch.Tensor]  # (summed loss, number of items)


@dataclass
class StudentStep:
    """One micro-batch as every loss term reads it.

    inputs: the collated batch; model_inputs: what both models are called with; outputs: the student's outputs.
    positions: (..., V) logits, or (..., H) last hidden states for the fused source, one row per prediction;
    labels: (...) the targets aligned with them (shifted for causal LMs); mask: (...) bool, the rows that count.
    teacher_outputs: set by the trainer before the terms run when the source needs a live teacher.
    shared_task_sum: the hard loss, when the KD pass computed it on the way (cached top-k).
    """

    model: nn.Module
    inputs: dict[str, Any]
    model_inputs: dict[str, Any]
    outputs: Any
    positions: torch.Tensor | None
    labels: torch.Tensor | None
    mask: torch.Tensor | None
    teacher_outputs: Any = None
    shared_task_sum: tuple[torch.Tensor, torch.Tensor] | None = None


class KDSource(Protocol):
    needs_teacher: bool

    def model_kwargs(self) -> dict[str, Any]: ...

    def kd_sum(self, step: StudentStep) -> Sum: ...

    def task_sum(self, step: StudentStep, label_smoothing: float) -> Sum: ...


def logits_of(outputs: Any) -> torch.Tensor:
    logits = getattr(outputs, "logits", None)
    if logits is None:
        raise ValueError(
            f"the model returned {type(outputs).__name__} without logits; DistillationTrainer distils these heads: "
            f"{SUPPORTED_HEADS}. Set task_type to the head your model has."
        )
    return logits


def head_loss_sum(task: TaskKind, step: StudentStep, label_smoothing: float) -> Sum:
    """The head's own loss from the step's logits and aligned labels (see `task_loss.hard_label_loss`)."""
    return hard_label_loss(
        task.kind, task.problem_type, step.positions, step.labels, label_smoothing=label_smoothing
    )


def _count(step: StudentStep, rows: torch.Tensor) -> torch.Tensor:
    return step.mask.sum() if step.mask is not None else torch.tensor(rows.shape[:-1].numel())
