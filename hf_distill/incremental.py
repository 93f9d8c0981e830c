"""Class-incremental learning with distillation: add classes to a trained classifier without forgetting the old ones.

`IncrementalTrainer` trains a grown classifier (`hf_distill.heads.grow_classifier`: the previous model with new rows
in its head) on data of the new classes, optionally with a small memory of old-class examples (`select_exemplars`,
as iCaRL keeps one), while the frozen previous model teaches it the old classes (Learning without Forgetting, Li &
Hoiem, 2016):

    loss = (1 - alpha) * CE(all classes, labelled rows) + alpha * LwF(old classes, every row)

with LwF the previous model's softened distribution over its classes against the student's on the same classes
(`hf_distill.losses.lwf_distillation_loss`, at `temperature`, times T**2). alpha = 0 is plain fine-tuning (the
previous model is then never run). A row labelled -100 counts for LwF only. With `weight_aligning=True` the new
classes' head rows are rescaled once training ends (`hf_distill.heads.align_new_class_weights`, Zhao et al., 2020),
so that the argmax over all classes leans less towards the classes just learnt. With `task_aware_loss=True` the
cross-entropy of each labelled row is taken over its own group of classes only (a new-class row over the new
classes, an old-class exemplar over the old ones): LwF's own setting, one head per task, where the new task's loss
never has to push the old classes down; such a model is meant for task-aware prediction (the argmax within a
group), and its argmax over all classes is not calibrated between the groups. The previous model is a guest, as a
teacher is: frozen, never in the optimizer, the checkpoints or the saved model. Old classes are matched with the
student's by name, so the student may order them differently.

The classification recipe runs it with `scripts/distill_glue.py --previous_model_name_or_path` (tasks/classification/
incremental.py).
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.utils import logging

from hf_distill.args import DistillationTrainingArguments
from hf_distill.heads import align_new_class_weights, label_names
from hf_distill.losses.incremental import lwf_distillation_loss
from hf_distill.sources.base import logits_of
from hf_distill.training.checkpoints import resolve_resume
from hf_distill.training.logged_terms import LoggedTerms
from hf_distill.training.task_loss import SEQUENCE, hard_label_loss, infer_task
from hf_distill.training.teacher import forward_inputs, prepare_teacher, unwrap_model

logger = logging.get_logger(__name__)

__all__ = ["IncrementalTrainer", "old_class_columns", "select_exemplars"]

LOSS_COMPONENTS = ("ce_loss", "lwf_loss")


def old_class_columns(previous_config: Any, student_config: Any) -> torch.Tensor:
    """For each class of the previous model, in its order, the student's column of the class of that name.

    Raises when a class of the previous model has no column of that name in the student (its labels cannot be
    matched by name), or when either model's labels have no names."""
    previous = label_names(previous_config, "previous model")
    student = label_names(student_config, "student")
    index = {name: position for position, name in enumerate(student)}
    missing = [name for name in previous if name not in index]
    if missing:
        raise ValueError(
            f"the previous model's classes {missing} are not among the student's labels {student}: its labels "
            f"{previous} cannot be matched by name. Grow the student from the previous model "
            "(hf_distill.heads.grow_classifier keeps every old class), or give the student those class names."
        )
    if len(student) <= len(previous):
        logger.warning(
            f"the student has no class beyond the previous model's {previous}: nothing is added, LwF only "
            "keeps the old predictions."
        )
    return torch.tensor([index[name] for name in previous], dtype=torch.long)


def select_exemplars(labels: Sequence[Hashable], per_class: int, *, seed: int) -> list[int]:
    """Indices of at most `per_class` rows of each label, drawn at random with `seed` and returned in row order:
    a small class-balanced memory of old-class examples (iCaRL keeps one; random draws are a strong choice for it,
    Chaudhry et al., 2019). Rows labelled None are never drawn."""
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be an integer >= 1 (exemplars kept per class), got {per_class!r}.")
    by_label: dict[Hashable, list[int]] = {}
    for row, label in enumerate(labels):
        if label is not None:
            by_label.setdefault(label, []).append(row)
    rng = random.Random(seed)
    chosen: list[int] = []
    for label in sorted(by_label, key=str):
        rows = by_label[label]
        chosen.extend(rows if len(rows) <= per_class else rng.sample(rows, per_class))
    return sorted(chosen)


class IncrementalTrainer(Trainer):
    """A `Trainer` that adds classes to a classifier with Learning without Forgetting (module docstring).

    Args:
        model: the student: a sequence classifier over the old and the new classes (usually
            `grow_classifier(previous_model, new_labels)`).
        previous_model: the classifier trained on the old classes; frozen and placed beside the student here.
        args: `DistillationTrainingArguments`; `alpha` (the LwF weight), `temperature` and `kd_loss` (forward_kl as
            in the paper, or mse on the old logits) are used; hidden/attention matching, caches and on-policy steps
            must stay off.
        weight_aligning: when training ends, scale the new classes' head rows to the old rows' mean norm
            (`align_new_class_weights`); the factor is kept in `weight_aligning_factor`.
        task_aware_loss: the cross-entropy of each row over its own group of classes (module docstring).
        All other arguments are `Trainer`'s; evaluation reports the student's cross-entropy as `eval_loss`.
    """

    def __init__(
        self,
        model: nn.Module,
        previous_model: nn.Module,
        args: DistillationTrainingArguments,
        *trainer_args: Any,
        weight_aligning: bool = False,
        task_aware_loss: bool = False,
        **trainer_kwargs: Any,
    ):
        if not isinstance(args, DistillationTrainingArguments):
            raise TypeError(
                f"args must be DistillationTrainingArguments (alpha, temperature, kd_loss), got {type(args).__name__}."
            )
        if previous_model is None:
            raise ValueError(
                "IncrementalTrainer needs previous_model: the classifier trained on the old classes."
            )
        _check_options(args)
        student = unwrap_model(model)
        task = infer_task(student, args.task_type)
        if task.kind != SEQUENCE or task.problem_type != "single_label_classification":
            raise ValueError(
                f"IncrementalTrainer adds classes to a single-label sequence classifier; the student is a "
                f"{task.kind} model ({task.problem_type})."
            )
        self.old_columns = old_class_columns(unwrap_model(previous_model).config, student.config)
        self.task_aware_loss = task_aware_loss
        self._old_mask = torch.zeros(student.config.num_labels, dtype=torch.bool)
        self._old_mask[self.old_columns] = True
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        # compute_loss returns per-micro-batch means; the Trainer divides them by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.previous_model = prepare_teacher(
            previous_model, self.accelerator, args.device, args.teacher_dtype
        )
        self._terms = LoggedTerms()
        self.weight_aligning = weight_aligning
        self.weight_aligning_factor: float | None = None

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        """(1 - alpha) * CE + alpha * LwF in training (module docstring); the cross-entropy alone in evaluation."""
        labels = inputs.get("labels")
        model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        outputs = model(**model_inputs)
        logits = logits_of(outputs)
        loss = torch.zeros((), dtype=torch.float32, device=logits.device)
        ce = None
        if labels is not None:
            scored = within_own_group(logits, labels, self._old_mask) if self.task_aware_loss else logits
            total, count = hard_label_loss(SEQUENCE, "single_label_classification", scored, labels)
            ce = total / count.clamp(min=1)
        if not model.training:
            loss = ce if ce is not None else loss
            return (loss, outputs) if return_outputs else loss

        alpha, terms = self.args.alpha, {}
        if ce is not None and alpha < 1.0:
            terms["ce_loss"] = ce
            loss = loss + (1.0 - alpha) * ce
        if alpha > 0:
            with torch.no_grad():
                previous_logits = logits_of(
                    self.previous_model(**forward_inputs(self.previous_model, model_inputs))
                )
            lwf = lwf_distillation_loss(
                logits,
                previous_logits,
                temperature=self.args.temperature,
                old_columns=self.old_columns.to(logits.device),
                kind=self.args.kd_loss,
            )
            terms["lwf_loss"] = lwf
            loss = loss + alpha * lwf
        self._terms.add(terms, self.state.global_step, scale=1.0 / self.args.gradient_accumulation_steps)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds `ce_loss` and `lwf_loss`, averaged over the optimizer steps since the last log, to training logs."""
        self._terms.flush_into(logs, self.state.global_step, self.accelerator.reduce, LOSS_COMPONENTS)
        super().log(logs, start_time)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """`Trainer.train`; `resume_from_checkpoint=True` picks the newest complete checkpoint. With
        `weight_aligning` the trained model's new-class rows are then aligned (after any best-model reload)."""
        resume_from_checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        if self.weight_aligning:
            self.weight_aligning_factor = align_new_class_weights(unwrap_model(self.model), self.old_columns)
            self.log({"weight_aligning_factor": self.weight_aligning_factor})
        return output


def within_own_group(logits: torch.Tensor, labels: torch.Tensor, old_mask: torch.Tensor) -> torch.Tensor:
    """`logits` (B, C) with every column outside each row's group of classes set to the dtype's lowest finite value
    (no gradient flows to them; finite, so a row with no column left stays finite in float16 too): the old classes
    for a row labelled with an old class, the new classes otherwise (unlabelled rows too). A softmax over the result
    is the softmax over the row's own group."""
    old_mask = old_mask.to(logits.device)
    row_is_old = old_mask[labels.clamp(min=0)] & labels.ne(-100)  # (B,)
    allowed = torch.where(row_is_old[:, None], old_mask[None, :], ~old_mask[None, :])  # (B, C)
    return torch.where(allowed, logits, logits.new_tensor(torch.finfo(logits.dtype).min))


def _check_options(args: DistillationTrainingArguments) -> None:
    if args.hidden_weight > 0 or args.attention_weight > 0 or args.teacher_logits_cache or args.lmbda > 0:
        raise ValueError(
            "IncrementalTrainer distils the previous model's predictions on the old classes only: set "
            "hidden_weight=0, attention_weight=0, lmbda=0 and no teacher_logits_cache."
        )
    if args.kd_loss not in ("forward_kl", "mse"):
        raise ValueError(
            f"kd_loss={args.kd_loss!r}: Learning without Forgetting uses forward_kl (the paper's softened "
            "cross-entropy, up to a constant) or mse (the old logits themselves)."
        )
    if args.teacher_weights is not None:
        raise ValueError(
            "teacher_weights weights several teachers; IncrementalTrainer has one previous model."
        )
