"""KD from a live teacher's outputs: its logits (`LogitsKD`, every head with a `logits` output), its start and end
logits (`SpanKD`, extractive question answering), or its last hidden states and LM head with the logits formed
chunk by chunk (`FusedLMHeadKD`, causal LMs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hf_distill.args import DistillationTrainingArguments
from hf_distill.losses import (
    bernoulli_distillation_loss,
    fused_linear_distillation_loss,
    logit_distillation_loss,
)
from hf_distill.sources.base import StudentStep, Sum, _count, head_loss_sum, logits_of
from hf_distill.training.pairing import Pairing
from hf_distill.training.task_loss import (
    TaskKind,
    linear_cross_entropy_sum,
    span_loss,
)
from hf_distill.training.teacher import full_output_layer


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
