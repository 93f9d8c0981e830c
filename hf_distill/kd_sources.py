"""Where the KD term's teacher signal comes from, one small object per place, chosen once when the trainer is built.

Every source answers the same three questions, so the trainer's loss reads as its formula:
- `model_kwargs()`: what the student's (and the teacher's) forward must return beyond the defaults;
- `kd_sum(step)`: the KD divergence summed over the positions that count, and their number;
- `task_sum(step, label_smoothing)`: the head's own (hard) loss, summed, and its item count.

Sources:
- `LogitsKD`: a live teacher's logits, for every head with a `logits` output (classification, multi-label,
  regression, token classification, causal and seq2seq LMs);
- `SpanKD`: a live teacher's start and end logits (extractive question answering);
- `FusedLMHeadKD`: a live causal-LM teacher's last hidden states and LM head, logits formed chunk by chunk;
- `CachedTopKKD`: the teacher's (or several teachers' mixture's) cached top-k log-probabilities (no teacher in
  memory).
On-policy steps need no source of their own: they change the batch (`DistillationTrainer.training_step`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from .args import DistillationTrainingArguments
from .logit_cache import INDICES_COLUMN, LOGPROBS_COLUMN, TAIL_COLUMN
from .losses import (
    bernoulli_distillation_loss,
    fused_linear_distillation_loss,
    logit_distillation_loss,
    sparse_distillation_and_cross_entropy,
    sparse_distillation_loss,
)
from .pairing import Pairing
from .task_loss import SUPPORTED_HEADS, TaskKind, hard_label_loss, linear_cross_entropy_sum, span_loss
from .teacher import full_output_layer

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


class LogitsKD:
    """KD between the student's and a live teacher's logits: the teacher's class logits reordered into the
    student's label order, vocabularies cut to the shared size; per-label Bernoulli KL for multi-label heads, MSE
    for regression, else `kd_loss` over the softmax."""

    needs_teacher = True

    def __init__(self, args: DistillationTrainingArguments, task: TaskKind, pairing: Pairing):
        self.args, self.task, self.pairing = args, task, pairing

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    def kd_sum(self, step: StudentStep) -> Sum:
        args, pairing = self.args, self.pairing
        student_logits, teacher_logits = step.positions, logits_of(step.teacher_outputs)
        if pairing.label_order is not None:
            teacher_logits = teacher_logits[..., pairing.label_order.to(teacher_logits.device)]
        if pairing.vocab_size is not None:
            student_logits = student_logits[..., : pairing.vocab_size]
            teacher_logits = teacher_logits[..., : pairing.vocab_size]
        teacher_logits = teacher_logits.to(student_logits.device)
        options = dict(temperature=args.temperature, beta=args.jsd_beta, mask=step.mask, reduction="sum")
        if self.task.is_multi_label and args.kd_loss != "mse":
            # each label is its own yes/no question: a softmax over the labels cannot see per-label errors
            total = bernoulli_distillation_loss(student_logits, teacher_logits, kind=args.kd_loss, **options)
        else:
            kind = "mse" if self.task.is_regression else args.kd_loss  # mse: on the raw logits
            total = logit_distillation_loss(
                student_logits, teacher_logits, kind=kind, chunk_size=args.kd_chunk_size, **options
            )
        return total, _count(step, student_logits)

    def task_sum(self, step: StudentStep, label_smoothing: float) -> Sum:
        return head_loss_sum(self.task, step, label_smoothing)


class SpanKD:
    """Extractive QA: `kd_loss` between the start distributions plus that between the end distributions, halved
    (as the heads' span loss halves its two cross-entropies), per example."""

    needs_teacher = True

    def __init__(self, args: DistillationTrainingArguments):
        self.args = args

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    def kd_sum(self, step: StudentStep) -> Sum:
        args, total = self.args, 0.0
        for name in ("start_logits", "end_logits"):
            student_logits = getattr(
                step.outputs, name
            )  # (B, T): one distribution over positions per example
            total = total + logit_distillation_loss(
                student_logits,
                getattr(step.teacher_outputs, name).to(student_logits.device),
                temperature=args.temperature,
                kind=args.kd_loss,
                beta=args.jsd_beta,
                reduction="sum",
            )
        return total / 2, torch.tensor(step.outputs.start_logits.shape[0])

    def task_sum(self, step: StudentStep, label_smoothing: float) -> Sum:
        return span_loss(
            step.outputs.start_logits,
            step.outputs.end_logits,
            step.inputs["start_positions"],
            step.inputs["end_positions"],
            label_smoothing=label_smoothing,
        )


class FusedLMHeadKD:
    """Causal LMs: KD and cross-entropy from the last hidden states and the LM heads, logits formed chunk by chunk
    (the student returns only its last position's logits). The heads are read outside the forward pass, whole
    even where they are sharded (`teacher.full_output_layer`)."""

    needs_teacher = True

    def __init__(
        self, args: DistillationTrainingArguments, pairing: Pairing, teacher: nn.Module, accelerator: Any
    ):
        self.args, self.pairing, self.teacher, self.accelerator = args, pairing, teacher, accelerator

    def model_kwargs(self) -> dict[str, Any]:
        return {"output_hidden_states": True, "logits_to_keep": 1}

    def kd_sum(self, step: StudentStep) -> Sum:
        args, vocab = self.args, self.pairing.vocab_size
        student_hidden = step.positions
        teacher_hidden = step.teacher_outputs.hidden_states[-1].to(student_hidden.device)
        with (
            full_output_layer(step.model, self.accelerator, vocab) as (student_weight, student_bias),
            full_output_layer(self.teacher, self.accelerator, vocab) as (teacher_weight, teacher_bias),
        ):
            total = fused_linear_distillation_loss(
                student_hidden,
                student_weight,
                teacher_hidden,
                teacher_weight,
                temperature=args.temperature,
                kind=args.kd_loss,
                beta=args.jsd_beta,
                mask=step.mask,
                chunk_size=args.kd_chunk_size,
                student_bias=student_bias,
                teacher_bias=teacher_bias,
                reduction="sum",
            )
        return total, _count(step, student_hidden)

    def task_sum(self, step: StudentStep, label_smoothing: float) -> Sum:
        with full_output_layer(step.model, self.accelerator, self.pairing.vocab_size) as (weight, bias):
            return linear_cross_entropy_sum(
                step.positions, weight, step.labels, bias=bias, label_smoothing=label_smoothing
            )


class CachedTopKKD:
    """KD against the teacher's cached top-k log-probabilities (and its remaining mass, tempered at the cache's
    temperature, which the trainer checked equals `args.temperature`).

    Cached position t holds the teacher's distribution for token t + 1, like the logits at t. For token-level
    tasks with the built-in cross-entropy, one pass over the logits gives both the KD and the hard loss
    (`sparse_distillation_and_cross_entropy`); `task_sum` then returns what that pass computed.
    `target_at_temperature`: the cache holds several teachers' mixture as log-probabilities at the training
    temperature (`logit_cache.is_mixture`), used as the teacher's buckets as they are. Sequence-level heads read
    one cached row per example (every class).
    """

    needs_teacher = False

    def __init__(
        self,
        args: DistillationTrainingArguments,
        task: TaskKind,
        share_cross_entropy: bool,
        target_at_temperature: bool = False,
    ):
        self.args, self.task = args, task
        self.share_cross_entropy = share_cross_entropy and task.token_level
        self.target_at_temperature = target_at_temperature
        # Without a cache directory (columns built by hand) the tail means what the loss's default says: T = 1.
        self.tail_temperature = args.temperature if args.teacher_logits_cache is not None else 1.0

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    def kd_sum(self, step: StudentStep) -> Sum:
        args, inputs = self.args, step.inputs
        options = dict(
            temperature=args.temperature,
            kind=args.kd_loss,
            beta=args.jsd_beta,
            mask=step.mask,
            reduction="sum",
            teacher_tail_logmass=inputs.get(TAIL_COLUMN),
            tail_temperature=self.tail_temperature,
            teacher_at_temperature=self.target_at_temperature,
        )
        logprobs, indices = inputs[LOGPROBS_COLUMN], inputs[INDICES_COLUMN].long()
        logits = step.positions
        if self.share_cross_entropy and step.labels is not None:
            total, ce_sum = sparse_distillation_and_cross_entropy(
                logits, logprobs, indices, step.labels, **options
            )
            step.shared_task_sum = (ce_sum, step.labels.ne(-100).sum())
        else:
            total = sparse_distillation_loss(logits, logprobs, indices, **options)
        return total, _count(step, logits)

    def task_sum(self, step: StudentStep, label_smoothing: float) -> Sum:
        if step.shared_task_sum is not None and label_smoothing == 0:
            return step.shared_task_sum
        return head_loss_sum(self.task, step, label_smoothing)
