"""Several teachers: the KD target is the weighted mixture of their temperature-softened distributions.

    q = sum_i w_i * softmax(teacher_i / T)        (log q = logsumexp_i(log w_i + log_softmax(teacher_i / T)))
    kd = T**2 * D(q, softmax(student / T))        (D: kd_loss, forward KL by default)

`w` comes from `teacher_weights` (normalised to sum to 1; equal weights by default). With
`teacher_weighting="confidence"` each example's weights are `w_i * p_i(gold label)` renormalised, so a teacher that
is wrong about an example counts less there (examples without a label keep `w`). Regression heads distil towards
the weighted mean of the teachers' outputs (MSE). Hidden-state and attention matching follow one teacher, the
*matching teacher* (the first by default), which the trainer runs as it runs a single teacher; `EnsembleLogitsKD`
runs the others itself, on the same inputs, under `no_grad`. Every teacher is paired with the student on its own
(`pairing.pair_models`: head, label order, vocabulary), so each passes the checks a single teacher passes.
The mixture can also be cached once (`hf_distill.caches.mixture`) and trained from with no teacher in memory.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hf_distill.args import DistillationTrainingArguments
from hf_distill.losses import logit_distillation_loss, logprob_distillation_loss, teacher_mixture_logprobs
from hf_distill.losses.mixture import confidence_weights, normalised_weights
from hf_distill.sources.base import StudentStep, head_loss_sum, logits_of
from hf_distill.training.pairing import Pairing, pair_models
from hf_distill.training.task_loss import QUESTION_ANSWERING, TaskKind
from hf_distill.training.teacher import forward_inputs, prepare_teacher, unwrap_model

Sum = tuple[torch.Tensor, torch.Tensor]


@dataclass
class TeacherSet:
    """Named teachers with normalised weights; `matching` indexes the one whose hidden states are matched."""

    names: list[str]
    models: list[nn.Module]
    weights: list[float]
    matching: int = 0

    @property
    def matching_model(self) -> nn.Module:
        return self.models[self.matching]


def teacher_set(
    teacher_model: Any, weights: Sequence[float] | None, matching_teacher: str | int | None = None
) -> TeacherSet | None:
    """The teachers given as `teacher_model`: one model (None is returned: the ordinary single-teacher path), a
    list of models, or a name -> model mapping; with their weights and the matching teacher, all checked."""
    if teacher_model is None:
        # no teacher in memory: the weights are checked against the teacher logits cache's (`kd_choice`)
        if matching_teacher not in (None, 0):
            raise ValueError(f"matching_teacher={matching_teacher!r} names a teacher, but none was given.")
        return None
    if isinstance(teacher_model, nn.Module):
        if weights is not None:
            normalised_weights(weights, 1)
        if matching_teacher not in (None, 0):
            raise ValueError(
                f"matching_teacher={matching_teacher!r} names one of several teachers, but one teacher was given."
            )
        return None
    if isinstance(teacher_model, Mapping):
        names, models = [str(name) for name in teacher_model], list(teacher_model.values())
    elif isinstance(teacher_model, (list, tuple)):
        names, models = [f"teacher_{index}" for index in range(len(teacher_model))], list(teacher_model)
    else:
        raise TypeError(
            f"teacher_model must be a model, a list of models or a name -> model dict, got "
            f"{type(teacher_model).__name__}."
        )
    if not models:
        raise ValueError("teacher_model is an empty list/dict: pass at least one teacher.")
    for name, model in zip(names, models):
        if not isinstance(model, nn.Module):
            raise TypeError(f"teacher {name!r} is a {type(model).__name__}, not a model (torch.nn.Module).")
    if matching_teacher is None:
        matching = 0
    elif isinstance(matching_teacher, int) and 0 <= matching_teacher < len(models):
        matching = matching_teacher
    elif isinstance(matching_teacher, str) and matching_teacher in names:
        matching = names.index(matching_teacher)
    else:
        raise ValueError(
            f"matching_teacher={matching_teacher!r} is not one of the teachers {names} (or an index below "
            f"{len(models)})."
        )
    return TeacherSet(names, models, normalised_weights(weights, len(models)), matching)


def check_ensemble_options(args: DistillationTrainingArguments, task: TaskKind, fused: bool) -> None:
    """What a mixture of teachers cannot do fails here, before training."""
    if args.teacher_logits_cache is not None:
        raise ValueError(
            "several teachers were passed as models together with teacher_logits_cache: train either from the live "
            "teachers (drop teacher_logits_cache) or from a cache of their mixture (scripts/cache_teacher_logits.py "
            "--teacher_model_name_or_path a b c --teacher_weights ...) with teacher_model=None."
        )
    if getattr(args, "cross_tokenizer", None) is not None:
        raise ValueError(
            "several teachers need one shared tokenizer (they all read the student's input ids); cross_tokenizer "
            "distils one teacher with its own tokenizer. Pass one teacher, or drop cross_tokenizer."
        )
    if fused:
        raise ValueError(
            "fused_kd_loss works from one teacher's hidden states and LM head; a mixture of teachers needs every "
            "teacher's logits. Drop fused_kd_loss (kd_chunk_size does not apply to mixtures either)."
        )
    if task.kind == QUESTION_ANSWERING or task.is_multi_label:
        raise ValueError(
            f"several teachers are supported for softmax heads and regression, not for "
            f"{'question answering' if task.kind == QUESTION_ANSWERING else 'multi-label classification'}; pass "
            "one teacher."
        )
    if args.kd_loss == "mse" and not task.is_regression:
        raise ValueError(
            "kd_loss='mse' compares raw logits, but a mixture of teachers is a distribution; use forward_kl, "
            "reverse_kl or jsd with several teachers."
        )
    if args.teacher_weighting == "confidence" and task.is_regression:
        raise ValueError(
            "teacher_weighting='confidence' weighs each teacher by its probability of the gold label, which a "
            "regression head does not have; use teacher_weighting='fixed'."
        )


class EnsembleLogitsKD:
    """KD towards the weighted mixture of several live teachers (see the module docstring)."""

    needs_teacher = True  # the trainer runs the matching teacher; this source runs the others

    def __init__(
        self,
        args: DistillationTrainingArguments,
        task: TaskKind,
        teachers: Sequence[nn.Module],
        pairings: Sequence[Pairing],
        weights: Sequence[float],
        matching: int,
    ):
        self.args, self.task = args, task
        self.teachers, self.pairings, self.matching = list(teachers), list(pairings), matching
        self.weights = torch.tensor(list(weights), dtype=torch.float32)

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    def teacher_logits(self, step: StudentStep) -> list[torch.Tensor]:
        """Each teacher's logits on the step's inputs, in the student's label order and shared vocabulary."""
        student_logits = step.positions
        keep = min(pairing.vocab_size or student_logits.shape[-1] for pairing in self.pairings)
        result = []
        for index, (teacher, pairing) in enumerate(zip(self.teachers, self.pairings)):
            if index == self.matching and step.teacher_outputs is not None:
                outputs = step.teacher_outputs
            else:
                with torch.no_grad():
                    outputs = teacher(**forward_inputs(teacher, step.model_inputs))
            logits = logits_of(outputs).detach()
            if pairing.label_order is not None:
                logits = logits[..., pairing.label_order.to(logits.device)]
            result.append(logits[..., :keep].to(student_logits.device))
        return result

    def example_weights(self, step: StudentStep, teacher_logits: list[torch.Tensor]) -> torch.Tensor:
        """(K,) fixed weights, or (K, ...) per position: w_i * p_i(gold) renormalised where a label exists."""
        weights = self.weights.to(teacher_logits[0].device)
        if self.args.teacher_weighting != "confidence" or step.labels is None:
            return weights
        return confidence_weights(weights, teacher_logits, step.labels)

    def kd_sum(self, step: StudentStep) -> Sum:
        args, student_logits = self.args, step.positions
        teacher_logits = self.teacher_logits(step)
        student_logits = student_logits[..., : teacher_logits[0].shape[-1]]
        weights = self.example_weights(step, teacher_logits)
        if self.task.is_regression:
            stacked = torch.stack([logits.float() for logits in teacher_logits])  # (K, ..., 1)
            mean = (weights.reshape(weights.shape + (1,) * (stacked.dim() - 1)) * stacked).sum(0)
            total = logit_distillation_loss(student_logits, mean, kind="mse", mask=step.mask, reduction="sum")
        else:
            mixture = teacher_mixture_logprobs(teacher_logits, weights, temperature=args.temperature)
            total = logprob_distillation_loss(
                student_logits,
                mixture,
                temperature=args.temperature,
                kind=args.kd_loss,
                beta=args.jsd_beta,
                mask=step.mask,
                reduction="sum",
            )
        count = step.mask.sum() if step.mask is not None else torch.tensor(student_logits.shape[:-1].numel())
        return total, count

    def task_sum(self, step: StudentStep, label_smoothing: float) -> Sum:
        return head_loss_sum(self.task, step, label_smoothing)


def build_ensemble_source(
    teachers: TeacherSet,
    *,
    args: DistillationTrainingArguments,
    task: TaskKind,
    student: nn.Module,
    matching_pairing: Pairing,
    prepared_matching: nn.Module,
    tokenizer: Any,
    teacher_tokenizers: Any,
    accelerator: Any,
) -> EnsembleLogitsKD:
    """Pair every teacher with the student (the matching one was paired and prepared by the trainer), prepare the
    others as guests (frozen, on the student's device), and build the KD source.

    teacher_tokenizers: None, one tokenizer for every teacher, or one per teacher (a list, or a name -> tokenizer
    mapping), used where the vocabularies differ in size.
    """
    # Only the matching teacher's layers are matched: the others are paired on heads, labels and vocabulary.
    logits_only = copy.copy(args)
    logits_only.hidden_weight, logits_only.attention_weight = 0.0, 0.0
    pairings, prepared = [], []
    for index, (name, model) in enumerate(zip(teachers.names, teachers.models)):
        if index == teachers.matching:
            pairings.append(matching_pairing)
            prepared.append(prepared_matching)
            continue
        teacher_tokenizer = teacher_tokenizer_of(teacher_tokenizers, name, index, len(teachers.models))
        try:
            pairings.append(
                pair_models(logits_only, task, student, unwrap_model(model), tokenizer, teacher_tokenizer)
            )
        except ValueError as error:
            raise ValueError(f"teacher {name!r}: {error}") from error
        prepared.append(prepare_teacher(model, accelerator, args.device, args.teacher_dtype))
    return EnsembleLogitsKD(args, task, prepared, pairings, teachers.weights, teachers.matching)


def teacher_tokenizer_of(tokenizers: Any, name: str, index: int, count: int) -> Any:
    if isinstance(tokenizers, Mapping):
        return tokenizers.get(name)
    if isinstance(tokenizers, (list, tuple)):
        if len(tokenizers) != count:
            raise ValueError(
                f"teacher_processing_class lists {len(tokenizers)} tokenizers for {count} teachers; give one per "
                "teacher, or one for all."
            )
        return tokenizers[index]
    return tokenizers
