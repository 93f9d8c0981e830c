"""Several tasks in one student, each taught by its own teacher (as TextBrewer's MultiTaskDistiller does).

`MultiTaskDistillationTrainer` trains a `MultiTaskModel` (one encoder, a head per task) on batches of one task each,
the task of each batch chosen by a stated rule (`hf_distill.multitask.sampling`: proportional, temperature-scaled,
round-robin). A batch of task t adds

    weight_t * [(1 - alpha_t) * CE_t + alpha_t * KD_t]       classification: KD_t = T_t**2 KL(teacher_t || student)
    weight_t * distance(student embedding, teacher_t's)     embedding: cosine (1 - cos) or mse

where alpha_t and T_t default to the arguments' `alpha` and `temperature` and the teacher's sentence embedding is its
last hidden states pooled (mean over real tokens, or first token). A classification batch without labels (or rows
labelled -100) trains on KD alone. Each micro-batch's loss is its mean; the Trainer divides by the accumulation
steps, so an optimizer step is the weighted sum of the single-task losses of its batches.

Teachers are guests: frozen, placed once, run under `no_grad`, never in the optimizer, the checkpoints or the saved
model. Classification teachers are matched with their head by class name (another order is reordered; other names
fail), and every teacher must read the student's input ids (same vocabulary size). Checkpoints and `save_model`
write the multi-task folder (`MultiTaskModel.save_pretrained`) with the tokenizer; `evaluate` reports each task:
`eval_<task>_accuracy` and `eval_<task>_loss` for classification, `eval_<task>_cosine` (mean cosine with the
teacher's embedding) and `eval_<task>_loss` for embeddings.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.utils import logging

from hf_distill.args import DistillationTrainingArguments
from hf_distill.losses import hidden_state_loss, logit_distillation_loss
from hf_distill.multitask.model import MultiTaskModel, pool
from hf_distill.multitask.sampling import MultiTaskDataset, TaskBatchSampler, _check_rule
from hf_distill.sources.base import logits_of
from hf_distill.training.checkpoints import resolve_resume
from hf_distill.training.task_loss import SEQUENCE, hard_label_loss, infer_task
from hf_distill.training.teacher import forward_inputs, label_permutation, prepare_teacher, unwrap_model

logger = logging.get_logger(__name__)

__all__ = ["DistillationTask", "MultiTaskDistillationTrainer"]

EMBEDDING_LOSSES = ("cosine", "mse")


@dataclass
class DistillationTask:
    """One task of a multi-task run: its `name` (the head's), its `teacher`, its tokenized data (input_ids,
    attention_mask [, token_type_ids] [, labels]) and its settings: `weight` of its loss, `alpha` and `temperature`
    (classification; None = the arguments'), `embedding_loss` and `teacher_pooling` (embedding tasks)."""

    name: str
    teacher: nn.Module
    train_dataset: Any = None
    eval_dataset: Any = None
    weight: float = 1.0
    alpha: float | None = None
    temperature: float | None = None
    embedding_loss: str = "cosine"
    teacher_pooling: str = "mean"

    def __post_init__(self):
        if not (isinstance(self.weight, (int, float)) and self.weight >= 0):
            raise ValueError(f"task {self.name!r}: weight must be a number >= 0, got {self.weight!r}.")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"task {self.name!r}: alpha must lie in [0, 1], got {self.alpha!r}.")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"task {self.name!r}: temperature must be > 0, got {self.temperature!r}.")
        if self.embedding_loss not in EMBEDDING_LOSSES:
            raise ValueError(f"task {self.name!r}: embedding_loss must be one of {EMBEDDING_LOSSES}.")
        if self.teacher_pooling not in ("mean", "cls"):
            raise ValueError(f"task {self.name!r}: teacher_pooling must be 'mean' or 'cls'.")


class MultiTaskDistillationTrainer(Trainer):
    """A `Trainer` that distils several teachers, one per task, into one `MultiTaskModel` (module docstring).

    Args:
        model: the `MultiTaskModel`, with one head per task.
        tasks: one `DistillationTask` per head (any order).
        args: `DistillationTrainingArguments` (`temperature`, `alpha`, `kd_loss`, `jsd_beta` are the defaults of
            the classification tasks; feature matching, caches and on-policy steps must stay off).
        sampling: `proportional`, `temperature` or `round_robin`; sampling_temperature: T of the `temperature` rule.
        All other arguments are `Trainer`'s (`data_collator` pads a batch of one task, e.g. DataCollatorWithPadding).
    """

    def __init__(
        self,
        model: MultiTaskModel,
        tasks: Sequence[DistillationTask],
        args: DistillationTrainingArguments,
        *trainer_args: Any,
        sampling: str = "proportional",
        sampling_temperature: float = 2.0,
        **trainer_kwargs: Any,
    ):
        if not isinstance(model, MultiTaskModel):
            raise TypeError(
                f"model must be a MultiTaskModel (hf_distill.multitask), got {type(model).__name__}."
            )
        if not isinstance(args, DistillationTrainingArguments):
            raise TypeError(f"args must be DistillationTrainingArguments, got {type(args).__name__}.")
        _check_rule(sampling, sampling_temperature)
        if args.hidden_weight > 0 or args.attention_weight > 0 or args.teacher_logits_cache or args.lmbda > 0:
            raise ValueError(
                "MultiTaskDistillationTrainer distils each task's outputs: set hidden_weight=0, attention_weight=0, "
                "lmbda=0 and no teacher_logits_cache."
            )
        for key in ("train_dataset", "eval_dataset"):
            if trainer_kwargs.get(key) is not None:
                raise ValueError(
                    f"pass each task's data as DistillationTask.{key}, not {key}= of the trainer."
                )
        self.tasks = _order_tasks(model, tasks)
        self._label_orders = [_check_teacher(model, task) for task in self.tasks]
        self.sampling, self.sampling_temperature = sampling, sampling_temperature
        train = [task.train_dataset for task in self.tasks]
        train_dataset = None
        if any(dataset is not None for dataset in train):
            empty = [t.name for t, d in zip(self.tasks, train) if d is None or len(d) == 0]
            if empty:
                raise ValueError(f"tasks {empty} have no training rows; give every task a train_dataset.")
            train_dataset = MultiTaskDataset(train)
        super().__init__(model, args, *trainer_args, train_dataset=train_dataset, **trainer_kwargs)
        self.model_accepts_loss_kwargs = False  # per-micro-batch means; the Trainer divides by accumulation
        for task in self.tasks:
            task.teacher = prepare_teacher(task.teacher, self.accelerator, args.device, args.teacher_dtype)
        self._task_sums: dict[str, list[float]] = {}

    # ---- the batches ---------------------------------------------------------------------------------------------

    def get_train_dataloader(self) -> DataLoader:
        """Batches of one task each, mixed by the sampling rule (`TaskBatchSampler`)."""
        if self.train_dataset is None:
            raise ValueError("training needs each task's train_dataset.")
        sampler = TaskBatchSampler(
            self.train_dataset.sizes,
            self._train_batch_size,
            self.sampling,
            temperature=self.sampling_temperature,
            seed=self.args.seed,
        )
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    # ---- the loss ----------------------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        """weight_t times the task's loss (module docstring) for a batch of task t."""
        student = unwrap_model(model)
        index = student.task_index(student.task_of(inputs.get("task_id"), None))
        task, head = self.tasks[index], student.task_heads[self.tasks[index].name]
        labels = inputs.get("labels")
        model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        teacher_inputs = {key: value for key, value in model_inputs.items() if key != "task_id"}
        alpha = self.args.alpha if task.alpha is None else task.alpha
        has_labels = labels is not None and bool((labels != -100).any())
        needs_teacher = head.kind == "embedding" or alpha > 0 or not has_labels
        teacher_outputs = None
        if needs_teacher:
            with torch.no_grad():
                teacher_outputs = task.teacher(**forward_inputs(task.teacher, teacher_inputs))
        outputs = model(**model_inputs)
        if head.kind == "embedding":
            teacher_embedding = pool(
                teacher_outputs.last_hidden_state, inputs.get("attention_mask"), task.teacher_pooling
            )
            loss = hidden_state_loss(
                outputs.logits, teacher_embedding.to(outputs.logits.device), kind=task.embedding_loss
            )
        else:
            loss = self._classification_loss(
                index, outputs.logits, labels, teacher_outputs, alpha, has_labels
            )
        if model.training:
            sums = self._task_sums.setdefault(task.name, [0.0, 0])
            sums[0] += float(loss.detach())
            sums[1] += 1
        loss = task.weight * loss
        return (loss, outputs) if return_outputs else loss

    def _classification_loss(
        self,
        index: int,
        logits: torch.Tensor,
        labels: Any,
        teacher_outputs: Any,
        alpha: float,
        has_labels: bool,
    ) -> torch.Tensor:
        task, args = self.tasks[index], self.args
        kd_weight = alpha if has_labels else 1.0
        loss = torch.zeros((), dtype=torch.float32, device=logits.device)
        if has_labels and kd_weight < 1.0:
            total, count = hard_label_loss(SEQUENCE, "single_label_classification", logits, labels)
            loss = loss + (1.0 - kd_weight) * total / count.clamp(min=1)
        if kd_weight > 0:
            teacher_logits = logits_of(teacher_outputs)
            order = self._label_orders[index]
            if order is not None:
                teacher_logits = teacher_logits[..., order.to(teacher_logits.device)]
            kd = logit_distillation_loss(
                logits,
                teacher_logits.to(logits.device),
                temperature=args.temperature if task.temperature is None else task.temperature,
                kind=args.kd_loss,
                beta=args.jsd_beta,
            )
            loss = loss + kd_weight * kd
        return loss

    # ---- evaluation ----------------------------------------------------------------------------------------------

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Each task on its own data (`eval_dataset`: a task name -> dataset dict; default each task's
        `eval_dataset`): `<prefix>_<task>_accuracy` or `_cosine`, and `<prefix>_<task>_loss` (the task's loss
        without its weight: cross-entropy, or the embedding distance)."""
        datasets = eval_dataset or {t.name: t.eval_dataset for t in self.tasks if t.eval_dataset is not None}
        unknown = sorted(set(datasets) - {t.name for t in self.tasks})
        if unknown or not datasets:
            raise ValueError(
                f"evaluate takes a task name -> dataset dict over {[t.name for t in self.tasks]}; got "
                f"{sorted(datasets)}."
            )
        model = self.model
        model.eval()
        metrics: dict[str, float] = {}
        for name, dataset in datasets.items():
            metrics.update(self._evaluate_task(model, name, dataset, metric_key_prefix))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    @torch.no_grad()
    def _evaluate_task(self, model: nn.Module, name: str, dataset: Any, prefix: str) -> dict[str, float]:
        student = unwrap_model(model)
        index, head = student.task_index(name), student.task_heads[name]
        task = self.tasks[index]
        columns = MultiTaskDataset.COLUMNS
        rows = [{**{k: v for k, v in row.items() if k in columns}, "task_id": index} for row in dataset]
        loader = DataLoader(rows, batch_size=self.args.eval_batch_size, collate_fn=self.data_collator)
        total_loss = correct = cosine = count = 0.0
        for batch in loader:
            batch = self._prepare_inputs(batch)
            size = batch["input_ids"].shape[0]
            inputs = {key: value for key, value in batch.items() if key != "labels"}
            logits = model(**inputs).logits
            if head.kind == "embedding":
                teacher_inputs = {key: value for key, value in inputs.items() if key != "task_id"}
                hidden = task.teacher(**forward_inputs(task.teacher, teacher_inputs)).last_hidden_state
                target = pool(hidden, batch.get("attention_mask"), task.teacher_pooling).to(logits.device)
                total_loss += float(hidden_state_loss(logits, target, kind=task.embedding_loss)) * size
                cosine += float(
                    torch.nn.functional.cosine_similarity(logits.float(), target.float(), dim=-1).sum()
                )
                count += size
            elif batch.get("labels") is not None:
                labels = batch["labels"]
                summed, items = hard_label_loss(SEQUENCE, "single_label_classification", logits, labels)
                total_loss += float(summed)
                kept = labels != -100
                correct += float((logits.argmax(-1)[kept] == labels[kept]).sum())
                count += float(items)
        key = f"{prefix}_{name}"
        if not count:
            return {}
        metrics = {f"{key}_loss": total_loss / count, f"{key}_samples": count}
        metrics[f"{key}_cosine" if head.kind == "embedding" else f"{key}_accuracy"] = (
            cosine / count if head.kind == "embedding" else correct / count
        )
        return metrics

    # ---- logging, checkpoints and saving ---------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds each task's mean loss per batch since the last log (`<task>_loss`, unweighted) to training logs."""
        if "loss" in logs and self._task_sums:
            for name, (total, batches) in sorted(self._task_sums.items()):
                logs[f"{name}_loss"] = total / max(batches, 1)
            self._task_sums = {}
        super().log(logs, start_time)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """`Trainer.train`; `resume_from_checkpoint=True` picks the newest complete checkpoint."""
        resume_from_checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The multi-task folder (encoder/, heads.safetensors, multitask.json), the tokenizer and the arguments."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        unwrap_model(self.model).save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        unwrap_model(model if model is not None else self.model).load_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


def _order_tasks(model: MultiTaskModel, tasks: Sequence[DistillationTask]) -> list[DistillationTask]:
    """The tasks in the model's head order; every head needs exactly one task and every task a head."""
    by_name: dict[str, DistillationTask] = {}
    for task in tasks:
        if task.name in by_name:
            raise ValueError(f"task {task.name!r} is given twice; give each head one DistillationTask.")
        by_name[task.name] = task
    if set(by_name) != set(model.task_names):
        raise ValueError(
            f"the tasks {sorted(by_name)} do not match the model's heads {model.task_names}: give one "
            "DistillationTask per head, named as the head."
        )
    return [by_name[name] for name in model.task_names]


def _check_teacher(model: MultiTaskModel, task: DistillationTask) -> torch.Tensor | None:
    """Raise when `task.teacher` cannot teach its head; return the reordering of a classifier teacher's classes."""
    head, teacher = model.task_heads[task.name], unwrap_model(task.teacher)
    config = getattr(teacher, "config", None)
    if config is None:
        raise ValueError(f"task {task.name!r}: the teacher must be a transformers model (it has no config).")
    student_vocab = getattr(model.encoder.config, "vocab_size", None)
    if getattr(config, "vocab_size", student_vocab) != student_vocab:
        raise ValueError(
            f"task {task.name!r}: the teacher has {config.vocab_size} vocabulary entries and the student's encoder "
            f"{student_vocab}; every teacher reads the student's input ids, so it must share its tokenizer."
        )
    if head.kind == "embedding":
        width = getattr(config, "hidden_size", None)
        if width != head.num_outputs:
            raise ValueError(
                f"task {task.name!r}: the teacher's embeddings have width {width} and the head {head.num_outputs}; "
                f"build the head with TaskHead(..., num_outputs={width})."
            )
        return None
    try:
        teacher_task = infer_task(teacher, None)
    except ValueError:
        teacher_task = None
    if (
        teacher_task is None
        or teacher_task.kind != SEQUENCE
        or teacher_task.problem_type != "single_label_classification"
    ):
        raise ValueError(
            f"task {task.name!r} is a classification task; its teacher ({type(teacher).__name__}) must be a "
            "single-label sequence classifier."
        )
    try:
        return label_permutation(config, model.task_model(task.name).config)
    except ValueError as error:
        raise ValueError(f"task {task.name!r}: {error}") from error
