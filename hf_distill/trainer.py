"""`DistillationTrainer`: `transformers.Trainer` with a frozen teacher.

The trainer orchestrates; the pieces live elsewhere: where the KD signal comes from in `sources/` (one object per
source, chosen once), the pure losses in `losses/`, what a step needs in `training/` (the teacher's handling, how
teacher and student pair up, task losses, layer maps and projections, accumulation), the model card in
`reporting/model_card.py`.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

import torch
from torch import nn
from transformers import Seq2SeqTrainer, Trainer
from transformers.utils import logging

from hf_distill.alignment.collator import CROSS_TOKENIZER_COLUMNS, TEXT_COLUMN
from hf_distill.args import SENTENCE_EMBEDDING, DistillationTrainingArguments, checked_trainer_arguments
from hf_distill.caches.format import CACHE_COLUMNS, check_cache_temperature
from hf_distill.reporting import model_card as hub
from hf_distill.sources.base import KDSource, StudentStep, logits_of
from hf_distill.sources.choice import choose_kd_source
from hf_distill.sources.embeddings import TEACHER_EMBEDDING_COLUMN
from hf_distill.sources.ensemble import teacher_set, teacher_tokenizer_of
from hf_distill.sources.logits import FusedLMHeadKD, LogitsKD, SpanKD
from hf_distill.training import on_policy
from hf_distill.training.accumulation import normalise_sum, window_token_counts
from hf_distill.training.batches import model_inputs
from hf_distill.training.checkpoints import resolve_resume
from hf_distill.training.cpu_memory import keep_freed_memory
from hf_distill.training.data_checks import check_training_data
from hf_distill.training.evaluation import counted_once
from hf_distill.training.logged_terms import LoggedTerms
from hf_distill.training.matching import (  # noqa: F401 - the checkpoint file name, importable from here as before
    PROJECTIONS_NAME,
    ZeroProjectionGradients,
    attention_matching_loss,
    build_projections,
    hidden_width,
    load_projections,
    matched_stacks,
    projection_runners,
    save_projections,
)
from hf_distill.training.pairing import Pairing, check_fused, check_task_options, pair_models
from hf_distill.training.task_loss import CAUSAL_LM, QUESTION_ANSWERING, SEQ2SEQ, align_positions, infer_task
from hf_distill.training.teacher import forward_inputs, prepare_teacher, unwrap_model

logger = logging.get_logger(__name__)

LOSS_COMPONENTS = ("ce_loss", "kd_loss", "hidden_loss", "attention_loss")
# Batch columns that are not model inputs: cached teacher logits, the teacher's own tokenization of the text, a
# sentence embedder's cached targets.
_READ_ELSEWHERE = frozenset((*CACHE_COLUMNS, *CROSS_TOKENIZER_COLUMNS, TEACHER_EMBEDDING_COLUMN))


class DistillationTrainer(Trainer):
    """A `Trainer` that distils a frozen `teacher_model` into `model` (the student).

    The loss is `(1 - alpha) * task + alpha * kd + hidden_weight * hidden + attention_weight * attention`
    (KD alone when a batch has no labels, and on on-policy steps). Everything else (optimizer, schedules,
    checkpoints, evaluation, Accelerate, `push_to_hub`) is the `Trainer`'s. The teacher is never trained,
    checkpointed or saved.

    Args:
        model: the student.
        teacher_model: the teacher; frozen and moved to the student's device here.
        args: `DistillationTrainingArguments`.
        teacher_processing_class: the teacher's tokenizer; needed when the two vocabulary matrices differ in size
            (it must then be the student's tokenizer on the shared ids). With several teachers: one for all, or a
            list / name -> tokenizer dict.
        teacher_model may also be several teachers, a list or a name -> model dict: the KD target is then the
            mixture of their softened distributions, weighted by `args.teacher_weights` (hf_distill/ensemble.py);
            hidden-state and attention matching follow `matching_teacher` (a name or an index; default the first).
        All other arguments are `Trainer`'s (`compute_loss_func` becomes the task loss).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        teacher_model: nn.Module | None = None,
        args: DistillationTrainingArguments | None = None,
        *trainer_args: Any,
        teacher_processing_class: Any = None,
        matching_teacher: str | int | None = None,
        **trainer_kwargs: Any,
    ):
        args = checked_trainer_arguments(teacher_model, args)
        teachers = teacher_set(teacher_model, args.teacher_weights, matching_teacher)
        teacher_tokenizers = teacher_processing_class
        if teachers is not None:
            # Several teachers: the matching one is run and paired as a single teacher is.
            teacher_model = teachers.matching_model
            teacher_processing_class = teacher_tokenizer_of(
                teacher_tokenizers, teachers.names[teachers.matching], teachers.matching, len(teachers.names)
            )
        if teacher_model is None and args.teacher_logits_cache is None:
            raise ValueError(
                "DistillationTrainer needs a teacher: pass teacher_model=<a trained model>, or set "
                "teacher_logits_cache to a cache written by scripts/cache_teacher_logits.py."
            )
        if args.teacher_logits_cache is not None:  # its remaining mass is valid at one temperature only
            check_cache_temperature(args.teacher_logits_cache, args.temperature)
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        # Every term is normalised in `compute_loss` (see `_normalise`), so the Trainer must count the label
        # items of the whole accumulated batch and must not divide again.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True

        student = unwrap_model(self.model)
        self._task = infer_task(student, args.task_type)
        # The Trainer counts next-token targets (labels[..., 1:]) only for classes its loss mapping knows by name;
        # a causal LM under another name (a subclass, remote code) would be divided by the unshifted count.
        self._loss_shifts_labels = self._task.kind == CAUSAL_LM
        check_task_options(args, self._task, student)
        if self.train_dataset is not None:
            check_training_data(self.train_dataset, self._task)
        fused = check_fused(args, self._task, student, self.accelerator)
        self._pairing = Pairing()
        self.hidden_projections = nn.ModuleDict()
        self.teacher_model = None
        self._teacher_tokenizer = teacher_processing_class
        if teacher_model is not None:
            teacher = unwrap_model(teacher_model)
            self._pairing = pair_models(
                args, self._task, student, teacher, self.processing_class, teacher_processing_class
            )
            if args.hidden_weight > 0:
                self.hidden_projections = build_projections(
                    self.layer_maps,
                    hidden_width(student.config),
                    hidden_width(teacher.config),
                    args.device,
                    sharded=self.is_deepspeed_enabled or self.is_fsdp_enabled,
                )
            self.teacher_model = prepare_teacher(
                teacher_model, self.accelerator, args.device, args.teacher_dtype
            )
        self.kd_source: KDSource = choose_kd_source(self, fused, teachers, teacher_tokenizers)
        # Evaluation runs the student alone and whole (full logits even when training fuses the LM head).
        self._evaluation_source = (
            SpanKD(args)
            if self._task.kind == QUESTION_ANSWERING
            else LogitsKD(args, self._task, self._pairing)
        )
        self._projection_runners = projection_runners(self.hidden_projections, args.device, args.world_size)
        if any(True for _ in self.hidden_projections.parameters()):
            self.add_callback(ZeroProjectionGradients(self.hidden_projections))
        self._on_policy_now = False
        self._terms = LoggedTerms()
        self._model_card_arguments: dict[str, Any] = {}
        self.distillation_report: dict | None = None

    @property
    def layer_maps(self) -> dict[str, list[tuple[int, int]]]:
        """The (student, teacher) hidden-state index pairs matched per layer stack."""
        return self._pairing.layer_maps

    def _set_signature_columns_if_needed(self) -> None:
        # Keep the cached-teacher columns through `remove_unused_columns`: the student does not take them.
        super()._set_signature_columns_if_needed()
        kept = (*CACHE_COLUMNS, TEXT_COLUMN) if self.args.cross_tokenizer is not None else CACHE_COLUMNS
        kept = (*kept, TEACHER_EMBEDDING_COLUMN)  # a sentence embedder's targets, computed once
        for column in kept:  # cross_tokenizer: CrossTokenizerCollator reads the raw text
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    # ---- the loss ----------------------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """(1 - alpha) * task + alpha * kd + hidden_weight * hidden + attention_weight * attention, each term
        normalised over the whole accumulated batch (`_normalise`) and logged on its own."""
        args = self.args
        # On on-policy steps the labels are the student's own samples: the loss is the divergence alone (GKD).
        has_labels = self._has_labels(inputs) and not self._on_policy_now
        kd_weight = args.alpha if has_labels else 1.0
        model_inputs = self._model_inputs(model, inputs)
        teacher_outputs = None
        if self.kd_source.needs_teacher and (
            kd_weight > 0 or args.hidden_weight > 0 or args.attention_weight > 0
        ):
            # The teacher goes first: run after the student, it allocates beside the student's saved
            # activations, which made its forward ~20% slower on CPU (benchmarks/bench_trainer_overhead.py).
            with torch.no_grad():
                teacher_outputs = self.teacher_model(
                    **forward_inputs(self.teacher_model, self._teacher_inputs(model_inputs, inputs)),
                    **self._output_flags(),
                )
        step = self._student_step(model, inputs, model_inputs)
        step.teacher_outputs = teacher_outputs
        terms: dict[str, tuple[float, torch.Tensor]] = {}
        if kd_weight > 0:
            terms["kd_loss"] = (kd_weight, self._kd_term(step, num_items_in_batch))
        if has_labels and args.alpha < 1.0:  # at alpha 1 the task term has no weight: not even computed
            terms["ce_loss"] = (1.0 - args.alpha, self._task_term(step, num_items_in_batch))
        for name, weight, what in (
            ("hidden_loss", args.hidden_weight, "hidden"),
            ("attention_loss", args.attention_weight, "attentions"),
        ):
            if weight > 0:
                terms[name] = (weight, self._feature_term(step, num_items_in_batch, what))
        loss = sum(weight * value for weight, value in terms.values())
        self._terms.add({name: value for name, (_, value) in terms.items()}, self.state.global_step)
        return (loss, step.outputs) if return_outputs else loss

    def _output_flags(self) -> dict[str, Any]:
        """What both forwards must return beyond the defaults; fixed by the configuration, so built once."""
        if getattr(self, "_flags", None) is None:
            self._flags = dict(self.kd_source.model_kwargs())
            if self.args.hidden_weight > 0:
                self._flags["output_hidden_states"] = True
            if self.args.attention_weight > 0:
                self._flags["output_attentions"] = True
        return self._flags

    def _student_step(
        self, model: nn.Module, inputs: dict[str, Any], model_inputs: dict[str, Any], training: bool = True
    ) -> StudentStep:
        """The student's forward on a batch, with its prediction positions, their targets and the mask."""
        flags = self._output_flags() if training else {}
        outputs = model(**model_inputs, **flags)
        positions = labels = mask = None
        # Spans and sentence embeddings are read from the outputs by their sources: no rows of logits to align.
        if self._task.kind not in (QUESTION_ANSWERING, SENTENCE_EMBEDDING):
            fused = isinstance(self.kd_source, FusedLMHeadKD) and training
            source = outputs.hidden_states[-1] if fused else logits_of(outputs)
            attention = (
                inputs.get("decoder_attention_mask", inputs.get("attention_mask")) if training else None
            )
            positions, labels, mask = align_positions(
                self._task.kind, source, inputs.get("labels"), attention
            )
        return StudentStep(model, inputs, model_inputs, outputs, positions, labels, mask)

    def _has_labels(self, inputs: dict[str, Any]) -> bool:
        if self._task.kind == SENTENCE_EMBEDDING:
            return False  # no hard-label loss (the source refuses labelled training data)
        if self._task.kind == QUESTION_ANSWERING:
            return inputs.get("start_positions") is not None and inputs.get("end_positions") is not None
        return inputs.get("labels") is not None

    def _task_term(self, step: StudentStep, num_items_in_batch: Any, training: bool = True) -> torch.Tensor:
        """The student's own (hard) loss: the user's `compute_loss_func` when one was passed (called as `Trainer`
        calls it, with the outputs, the labels and `num_items_in_batch`, and taken as already normalised), else
        the head's own loss with `label_smoothing_factor` on the cross-entropy heads."""
        if self.compute_loss_func is not None:
            loss = self.compute_loss_func(
                step.outputs, step.inputs.get("labels"), num_items_in_batch=num_items_in_batch
            )
            if training and num_items_in_batch is not None and self._averaged_across_devices:
                loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss does: DDP averages
            return loss
        source = self.kd_source if training else self._evaluation_source
        total, count = source.task_sum(step, self.args.label_smoothing_factor)
        if not training:
            return total / count.clamp(min=1)
        return self._normalise(total, count, num_items_in_batch, self._task.token_level)

    def _kd_term(self, step: StudentStep, num_items: Any) -> torch.Tensor:
        # Token-level sums over labelled positions follow the Trainer's count of label tokens in the window.
        total, count = self.kd_source.kd_sum(step)
        return self._normalise(
            total, count, num_items if step.mask is not None else None, self._task.token_level
        )

    def _teacher_inputs(self, model_inputs: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
        """What the teacher is called with: the student's inputs, unless the source builds the teacher's own
        (`teacher_inputs`, e.g. its tokenization of the same text)."""
        build = getattr(self.kd_source, "teacher_inputs", None)
        return build(model_inputs, inputs) if build is not None else model_inputs

    def _model_inputs(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        return model_inputs(inputs, self._task.kind, unwrap_model(model), _READ_ELSEWHERE)

    # ---- where the step is built: on-policy batches -----------------------------------------------------------

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """`Trainer.training_step`; on on-policy steps (GKD, `lmbda`) the batch is first replaced by completions the
        student samples for its prompts, as the step is built, so that `compute_loss` sees an ordinary batch."""
        if not self._on_policy_step():
            return super().training_step(model, inputs, num_items_in_batch)
        inputs = on_policy.on_policy_batch(
            model,
            self._prepare_inputs(inputs),
            self.processing_class,
            self.accelerator,
            max_new_tokens=self.args.on_policy_max_new_tokens,
            temperature=self.args.on_policy_temperature,
        )
        self._on_policy_now = True
        try:
            # The sampled completions have their own token count: each micro-batch is normalised on its own.
            return super().training_step(model, inputs, None)
        finally:
            self._on_policy_now = False

    def _on_policy_step(self) -> bool:
        """Whether this optimizer step trains on student samples; decided per step from the seed, so a resumed
        run makes the same choices."""
        if self.args.lmbda <= 0:
            return False
        return random.Random(self.args.seed * 1_000_003 + self.state.global_step).random() < self.args.lmbda

    # ---- evaluation ------------------------------------------------------------------------------------------

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any):
        """`Trainer.prediction_step`, whose loss is the student's own task loss (eval_loss, and perplexity for
        LMs): KD is a training objective only."""
        with self._loss_for_evaluation():
            return super().prediction_step(model, inputs, *args, **kwargs)

    @contextlib.contextmanager
    def _loss_for_evaluation(self):
        self.compute_loss = self._evaluation_loss  # an instance attribute shadows the method for the block
        try:
            yield
        finally:
            del self.compute_loss

    def _evaluation_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, **_: Any
    ):
        step = self._student_step(model, inputs, self._model_inputs(model, inputs), training=False)
        loss = torch.zeros((), dtype=torch.float32, device=self.args.device)
        if self._has_labels(inputs):
            loss = self._task_term(step, None, training=False)
        return (loss, step.outputs) if return_outputs else loss

    def evaluation_loop(self, dataloader: Any, description: str, *args: Any, **kwargs: Any):
        """`Trainer.evaluation_loop`, with each example of a sized dataset counted exactly once (see
        `evaluation.py`): metrics and returned predictions never include the repeats that pad the last batch."""
        with counted_once(self, dataloader) as finish:
            return finish(super().evaluation_loop(dataloader, description, *args, **kwargs))

    # ---- hidden states and attention maps --------------------------------------------------------------------

    def _feature_term(self, step: StudentStep, num_items: Any, what: str) -> torch.Tensor:
        """Hidden-state (`what="hidden"`) or attention-map (`"attentions"`) matching, averaged over the stacks
        (encoder and decoder of a seq2seq pair), each normalised over the accumulation window's positions."""
        args, terms = self.args, []
        seq2seq = self._task.kind == SEQ2SEQ
        for stack, student, teacher, mask in matched_stacks(
            seq2seq, self.layer_maps, step.outputs, step.teacher_outputs, step.inputs, what
        ):
            if what == "hidden":
                mean = self._projection_runners[stack](student, teacher, kind=args.hidden_loss, mask=mask)
            else:
                layers, heads = self.layer_maps[stack], args.attention_head_mapping
                mean = attention_matching_loss(student, teacher, layers, mask=mask, heads=heads)
            terms.append(self._normalise_positions(mean, mask, self._window_count(stack, num_items)))
        return torch.stack(terms).mean()

    # ---- normalisation over the accumulation window -------------------------------------------------------

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        """Also counts the real (unpadded) positions of the whole accumulation window, so that hidden-state and
        attention terms are normalised over the window like the token-level losses (`accumulation.py`)."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        across = self.args.average_tokens_across_devices and self.args.world_size > 1
        self._window_tokens = (
            window_token_counts(batch_samples, device, self.accelerator.gather if across else None)
            if self.layer_maps
            else {}
        )
        return batch_samples, num_items_in_batch

    def _window_count(self, stack: str, num_items_in_batch: Any) -> Any:
        window = getattr(self, "_window_tokens", {})
        if stack == "decoder":
            return window.get("decoder_attention_mask", num_items_in_batch)
        return window.get("attention_mask")

    def _normalise_positions(
        self, mean: torch.Tensor, mask: torch.Tensor | None, window_count: Any
    ) -> torch.Tensor:
        """A per-micro-batch mean over `mask` positions, rescaled to the accumulation window's convention."""
        if mask is None:
            return mean / self._accumulation_steps
        count = mask.sum()
        return self._normalise(mean * count, count, window_count, token_level=True)

    def _normalise(self, total: torch.Tensor, count: Any, num_items_in_batch: Any, token_level: bool):
        processes = self.accelerator.num_processes if self._averaged_across_devices else 1
        return normalise_sum(
            total,
            count,
            num_items_in_batch,
            token_level=token_level,
            processes=processes,
            accumulation_steps=self._accumulation_steps,
        )

    @property
    def _averaged_across_devices(self) -> bool:
        return self.args.average_tokens_across_devices and self.accelerator.num_processes > 1

    @property
    def _accumulation_steps(self) -> int:
        # Set by the training loop (the last window of an epoch can be shorter); absent before training starts.
        return getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)

    # ---- logging ---------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the loss components, averaged over the optimizer steps since the last log, to training logs."""
        self._terms.flush_into(logs, self.state.global_step, self.accelerator.reduce, LOSS_COMPONENTS)
        super().log(logs, start_time)

    @property
    def _logged_sums(self) -> dict[str, torch.Tensor]:
        return self._terms.sums

    # ---- learned projections: trained beside the student ----------------------------------------------------

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        parameters = list(self.hidden_projections.parameters())
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if parameters and id(parameters[0]) not in known:
            optimizer.add_param_group({"params": parameters, "weight_decay": 0.0})
        return optimizer

    def _clip_grad_norm(self, model: nn.Module):
        """Clip, and report as grad_norm, the norm over everything the optimizer updates: the student and the
        hidden-state projections, which train beside it."""
        if not any(p.requires_grad for p in self.hidden_projections.parameters()):
            return super()._clip_grad_norm(model)
        return self._norm_with_projections(model, self.args.max_grad_norm)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None):
        if grad_norm is None and any(p.requires_grad for p in self.hidden_projections.parameters()):
            grad_norm = self._norm_with_projections(model, float("inf"))
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def _norm_with_projections(self, model: nn.Module, max_norm: float):
        parameters = [
            *model.parameters(),
            *(p for p in self.hidden_projections.parameters() if p.requires_grad),
        ]
        return self.accelerator.clip_grad_norm_(parameters, max_norm)

    # ---- checkpoints and saving --------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """`Trainer.train`; `resume_from_checkpoint=True` picks the newest *complete* checkpoint, so a run killed
        while writing a checkpoint resumes from the one before."""
        resume_from_checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        if self.args.cpu_keep_freed_memory and self.args.device.type == "cpu":
            keep_freed_memory()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # Projections are written with the optimizer, before trainer_state.json (a complete checkpoint's marker).
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            save_projections(self.hidden_projections, output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_projections(self.hidden_projections, resume_from_checkpoint, self.args.device)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model` plus a model card (README.md) describing the distillation, with the arguments of
        earlier `create_model_card` calls."""
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.args.should_save:
            hub.write_model_card(self, output_dir or self.args.output_dir, **self._model_card_arguments)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """`Trainer.create_model_card` (same arguments: language, license, tags, model_name, finetuned_from, tasks,
        dataset_tags, dataset, dataset_args) for a card that also describes the distillation; the arguments are
        kept, so a later `save_model` writes them again."""
        given = hub.card_arguments(*args, **kwargs)
        self._model_card_arguments = {**self._model_card_arguments, **given}
        if self.is_world_process_zero():
            hub.write_model_card(self, self.args.output_dir, **self._model_card_arguments)


class Seq2SeqDistillationTrainer(DistillationTrainer, Seq2SeqTrainer):
    """`DistillationTrainer` for encoder-decoder models, with `Seq2SeqTrainer`'s generation in evaluate/predict
    (use `Seq2SeqDistillationTrainingArguments` for `predict_with_generate` and friends)."""
