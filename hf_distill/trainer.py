"""`DistillationTrainer`: `transformers.Trainer` with a frozen teacher.

The trainer orchestrates; the pieces live elsewhere: losses in `losses.py`, the teacher's handling in
`teacher.py`, layer maps and projections in `matching.py`, the model card in `hub.py`.
"""

from __future__ import annotations

import os
import random
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Seq2SeqTrainer, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

from . import hub
from .args import DistillationTrainingArguments
from .checkpoints import is_complete_checkpoint, last_complete_checkpoint
from .data_checks import check_training_data
from .evaluation import dataset_length, first_rows, first_rows_prediction
from .logit_cache import (
    CACHE_COLUMNS,
    INDICES_COLUMN,
    LOGPROBS_COLUMN,
    TAIL_COLUMN,
    check_cache_temperature,
)
from .losses import (
    bernoulli_distillation_loss,
    fused_linear_distillation_loss,
    logit_distillation_loss,
    sparse_distillation_and_cross_entropy,
    sparse_distillation_loss,
)
from .matching import (
    HiddenProjections,
    attention_heads,
    attention_matching_loss,
    hidden_width,
    layer_counts,
    resolve_layer_map,
)
from .on_policy import gathered_for_generation
from .task_loss import (
    CAUSAL_LM,
    QUESTION_ANSWERING,
    SEQ2SEQ,
    SEQUENCE,
    SUPPORTED_HEADS,
    align_positions,
    hard_label_loss,
    infer_task,
    linear_cross_entropy_sum,
    span_loss,
)
from .teacher import (
    check_same_tokenizer,
    forward_inputs,
    full_output_layer,
    label_permutation,
    prepare_teacher,
    shared_vocab_size,
    unwrap_model,
)

logger = logging.get_logger(__name__)

PROJECTIONS_NAME = "distill_projections.safetensors"
# Batch entries that are targets, not model inputs: the trainer computes the task loss itself.
_LABEL_KEYS = ("labels", "start_positions", "end_positions")
LOSS_COMPONENTS = ("ce_loss", "kd_loss", "hidden_loss", "attention_loss")


class DistillationTrainer(Trainer):
    """A `Trainer` that distils a frozen `teacher_model` into `model` (the student).

    The loss is `(1 - alpha) * ce + alpha * kd + hidden_weight * hidden + attention_weight * attention`
    (KD alone when a batch has no labels). Everything else (optimizer, schedules, checkpoints, evaluation,
    Accelerate, `push_to_hub`) is the `Trainer`'s. The teacher is never trained, checkpointed or saved.

    Args:
        model: the student.
        teacher_model: the teacher; frozen and moved to the student's device here.
        args: `DistillationTrainingArguments`.
        teacher_processing_class: the teacher's tokenizer when it was loaded separately; it must have the
            student's vocabulary for logit distillation.
        All other arguments are `Trainer`'s.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        teacher_model: nn.Module | None = None,
        args: DistillationTrainingArguments | None = None,
        *trainer_args: Any,
        teacher_processing_class: Any = None,
        **trainer_kwargs: Any,
    ):
        if isinstance(teacher_model, TrainingArguments):
            raise TypeError(
                "DistillationTrainer's second argument is the teacher, but it got training arguments: "
                "DistillationTrainer(student, training_args) reads training_args as the teacher. Pass the models "
                "by keyword: DistillationTrainer(model=student, teacher_model=teacher, args=training_args, ...)."
            )
        if args is None:
            args = DistillationTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, DistillationTrainingArguments):
            raise TypeError(
                f"args must be DistillationTrainingArguments, got {type(args).__name__}; build it with the same "
                "fields plus the distillation ones (temperature, alpha, kd_loss, ...)."
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
        self._check_task_options(student)
        if self.train_dataset is not None:
            check_training_data(self.train_dataset, self._task)
        self._fused = self._check_fused(student)
        self._on_policy_now = False
        self._label_order = None
        self._vocab_size = None
        self._layer_maps: dict[str, list[tuple[int, int]]] = {}
        self.hidden_projections = nn.ModuleDict()
        self.teacher_model = None
        if teacher_model is not None:
            teacher = unwrap_model(teacher_model)
            self._check_teacher_head(teacher)
            self._label_order = self._check_label_spaces(student, teacher)
            self._vocab_size = self._check_vocabularies(student, teacher, teacher_processing_class)
            self._layer_maps = self._check_matching(student, teacher)
            self.hidden_projections = self._build_projections(student, teacher)
            self.teacher_model = prepare_teacher(
                teacher_model, self.accelerator, self.args.device, args.teacher_dtype
            )
        self._projection_runners = self._wrap_projections_for_ddp()
        if any(True for _ in self.hidden_projections.parameters()):
            self.add_callback(_ZeroProjectionGradients(self.hidden_projections))
        self._logged_sums: dict[str, torch.Tensor] = {}
        self.distillation_report: dict | None = None

    # ---- construction-time checks ------------------------------------------------------------------------

    def _check_task_options(self, student: nn.Module) -> None:
        """Options that the student's task cannot honour fail here, before any data is read."""
        args, task = self.args, self._task
        if args.lmbda > 0:
            can_generate = getattr(student, "can_generate", None)
            if task.kind != CAUSAL_LM or not (callable(can_generate) and can_generate()):
                raise ValueError(
                    f"lmbda={args.lmbda} asks for on-policy steps, which sample completions with the student's "
                    f"generate(), but {type(student).__name__} is not a causal LM that can generate (task "
                    f"{task.kind!r}); set lmbda=0."
                )
        if args.teacher_logits_cache is not None and (task.kind == QUESTION_ANSWERING or task.is_multi_label):
            raise ValueError(
                "teacher_logits_cache holds top-k softmax probabilities over one output vocabulary; it cannot stand "
                f"in for a {'question-answering' if task.kind == QUESTION_ANSWERING else 'multi-label'} teacher. "
                "Pass teacher_model= instead."
            )
        if args.label_smoothing_factor > 0 and (task.is_regression or task.is_multi_label):
            raise ValueError(
                f"label_smoothing_factor={args.label_smoothing_factor} smooths a softmax cross-entropy, but the "
                f"student's task is {task.problem_type}; set label_smoothing_factor=0."
            )

    def _check_teacher_head(self, teacher: nn.Module) -> None:
        """A teacher whose outputs mean something else than the student's (a classifier for an LM) fails here."""
        try:
            teacher_task = infer_task(teacher, None)
        except ValueError:
            return  # a custom teacher: trusted to have the student's head
        if teacher_task.kind != self._task.kind:
            raise ValueError(
                f"the teacher ({type(teacher).__name__}) is a {teacher_task.kind} model and the student "
                f"({type(unwrap_model(self.model)).__name__}) a {self._task.kind} model: their outputs cannot be "
                "compared. Use a teacher with the student's head (fine-tune it on the task first)."
            )

    def _check_fused(self, student: nn.Module) -> bool:
        if not self.args.fused_kd_loss:
            return False
        if self._task.kind != CAUSAL_LM:
            raise ValueError(
                f"fused_kd_loss computes logits from the last hidden state and the LM head, which only causal LMs "
                f"have; {type(student).__name__} is not one. Use kd_chunk_size to bound the KD loss's memory instead."
            )
        config = student.config.get_text_config()
        for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
            if getattr(config, name, None) not in (None, 1.0):
                raise ValueError(
                    f"{type(student).__name__} transforms its logits after the LM head ({name}={getattr(config, name)}), "
                    "which the fused loss does not reproduce; drop fused_kd_loss (kd_chunk_size bounds memory too)."
                )
        if self.args.teacher_logits_cache is not None:
            raise ValueError(
                "fused_kd_loss needs the teacher's hidden states; it cannot run from teacher_logits_cache."
            )
        # The student's LM head is used outside its forward pass, with a gradient. FSDP2 shards it as a DTensor
        # whose full_tensor() carries the gradient back; ZeRO-3 and FSDP (v1) hold only flat shards there.
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        fsdp_plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if (self.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3) or (
            self.is_fsdp_enabled and getattr(fsdp_plugin, "fsdp_version", 1) != 2
        ):
            raise ValueError(
                "fused_kd_loss reads the student's LM head outside its forward pass, where DeepSpeed ZeRO-3 and FSDP "
                "(v1) hold only a shard of it. Use kd_chunk_size instead (the same loss with bounded memory), or "
                "FSDP2 (fsdp_version: 2 in the Accelerate config)."
            )
        return True

    def _set_signature_columns_if_needed(self) -> None:
        # Keep the cached-teacher columns through `remove_unused_columns`: the student does not take them.
        super()._set_signature_columns_if_needed()
        for column in CACHE_COLUMNS:
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def _check_label_spaces(self, student: nn.Module, teacher: nn.Module) -> torch.Tensor | None:
        if self._task.kind != SEQUENCE or getattr(student, "config", None) is None:
            return None
        return label_permutation(teacher.config, student.config)

    def _check_vocabularies(
        self, student: nn.Module, teacher: nn.Module, teacher_tokenizer: Any
    ) -> int | None:
        """The number of vocabulary logits KD compares for token-level tasks (None: all of them)."""
        if not self._task.token_level or getattr(student, "config", None) is None:
            return None
        student_vocab = getattr(student.config.get_text_config(), "vocab_size", None)
        teacher_vocab = getattr(getattr(teacher, "config", None), "get_text_config", lambda: None)()
        teacher_vocab = getattr(teacher_vocab, "vocab_size", None)
        if student_vocab is None or teacher_vocab is None:
            return None
        if student_vocab == teacher_vocab:
            check_same_tokenizer(self.processing_class, teacher_tokenizer)
            return None
        return shared_vocab_size(teacher_vocab, student_vocab, self.processing_class, teacher_tokenizer)

    def _check_matching(self, student: nn.Module, teacher: nn.Module) -> dict[str, list[tuple[int, int]]]:
        """Layer maps per stack ('layers', or 'encoder' and 'decoder'), checked against the layer counts."""
        args = self.args
        if args.hidden_weight == 0 and args.attention_weight == 0:
            return {}
        for role, model in (("student", student), ("teacher", teacher)):
            if getattr(model, "config", None) is None:
                raise ValueError(
                    f"hidden/attention matching needs the {role} to be a transformers model that can return hidden "
                    "states and attentions; set hidden_weight=0 and attention_weight=0 to distil logits only."
                )
        student_counts, teacher_counts = layer_counts(student.config), layer_counts(teacher.config)
        # create_student records which teacher layer initialised each student layer; a uniform map then pairs
        # each student layer with that teacher layer instead of re-spreading them (which could differ).
        built_from = getattr(student, "distilled_from_layers", None) or {}
        maps = {}
        for stack in student_counts:
            spec = args.decoder_layer_map if stack == "decoder" else args.layer_map
            maps[stack] = resolve_layer_map(
                spec,
                student_counts[stack],
                teacher_counts[stack],
                built_from=built_from.get("decoder_layers" if stack == "decoder" else "layers"),
            )
        if args.attention_weight > 0:
            self._check_attention(student, teacher)
        return maps

    def _check_attention(self, student: nn.Module, teacher: nn.Module) -> None:
        student_heads = attention_heads(student.config)
        teacher_heads = attention_heads(teacher.config)
        if student_heads != teacher_heads:
            raise ValueError(
                f"attention matching compares attention maps head by head, but the student has {student_heads} heads "
                f"and the teacher {teacher_heads}; use a student with the teacher's head count (create_student keeps "
                "it) or set attention_weight=0."
            )
        for role, model in (("student", student), ("teacher", teacher)):
            implementation = getattr(model.config, "_attn_implementation", "eager")
            if implementation != "eager":
                logger.warning(
                    f"attention matching needs attention probabilities: switching the {role} to eager attention."
                )
                try:
                    model.set_attn_implementation("eager")
                except Exception as error:  # noqa: BLE001 - any failure means the model cannot output attentions
                    raise ValueError(
                        f"the {role} uses {implementation!r} attention, which does not return attention maps, and "
                        f"could not be switched to eager ({error}); load it with attn_implementation='eager'."
                    ) from error

    def _build_projections(self, student: nn.Module, teacher: nn.Module) -> nn.ModuleDict:
        projections = nn.ModuleDict()
        if self.args.hidden_weight == 0:
            return projections
        student_width = hidden_width(student.config)
        teacher_width = hidden_width(teacher.config)
        for stack, layer_map in self._layer_maps.items():
            projections[stack] = HiddenProjections(layer_map, student_width, teacher_width)
        projections.to(self.args.device)
        if any(True for _ in projections.parameters()):
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                raise ValueError(
                    f"the student's hidden width ({student_width}) differs from the teacher's ({teacher_width}), which "
                    "needs learned projections, and those are not supported under DeepSpeed or FSDP yet (their gradients "
                    "would escape the sharded clipping); use a student of the "
                    "teacher's width (create_student) or set hidden_weight=0."
                )
            logger.info(
                f"Learning projections from width {student_width} to {teacher_width} for hidden matching."
            )
        return projections

    def _wrap_projections_for_ddp(self) -> dict[str, nn.Module]:
        """Projections train outside the student, so under DDP they need their own gradient all-reduce."""
        runners: dict[str, nn.Module] = dict(self.hidden_projections.items())
        if (
            self.args.world_size > 1
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        ):
            for stack, module in self.hidden_projections.items():
                if any(True for _ in module.parameters()):
                    device_ids = [self.args.device.index] if self.args.device.type == "cuda" else None
                    runners[stack] = nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
        return runners

    # ---- training ----------------------------------------------------------------------------------------------

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
        projections = [p for p in self.hidden_projections.parameters() if p.requires_grad]
        if not projections:
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_([*model.parameters(), *projections], self.args.max_grad_norm)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None):
        projections = [p for p in self.hidden_projections.parameters() if p.requires_grad]
        if grad_norm is None and projections:
            grad_norm = self.accelerator.clip_grad_norm_([*model.parameters(), *projections], float("inf"))
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """`Trainer.train`; `resume_from_checkpoint=True` picks the newest *complete* checkpoint, so a run killed
        while writing a checkpoint resumes from the one before."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"resume_from_checkpoint=True but {self.args.output_dir} has no complete checkpoint; start "
                    "without resume_from_checkpoint or point it at a checkpoint folder."
                )
        elif isinstance(resume_from_checkpoint, str) and not is_complete_checkpoint(resume_from_checkpoint):
            latest = last_complete_checkpoint(os.path.dirname(os.path.abspath(resume_from_checkpoint)))
            raise ValueError(
                f"{resume_from_checkpoint} is not a complete checkpoint (no readable trainer_state.json: the run "
                f"was probably stopped while saving it). The newest complete one is {latest}."
            )
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """`Trainer.training_step`; on on-policy steps (GKD, `lmbda`) the batch is first replaced by completions the
        student samples for its prompts, as the step is built, so that `compute_loss` sees an ordinary batch."""
        if not self._on_policy_step():
            return super().training_step(model, inputs, num_items_in_batch)
        inputs = self._on_policy_batch(model, self._prepare_inputs(inputs))
        self._on_policy_now = True
        try:
            # The sampled completions have their own token count: each micro-batch is normalised on its own.
            return super().training_step(model, inputs, None)
        finally:
            self._on_policy_now = False

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        args = self.args
        if not model.training:
            return self._evaluation_loss(model, inputs, return_outputs)
        # On on-policy steps the labels are the student's own samples: the loss is the divergence alone (GKD).
        has_labels = self._has_labels(inputs) and not self._on_policy_now
        labels = inputs.get("labels")
        cached = {key: inputs[key] for key in CACHE_COLUMNS if key in inputs}
        student_inputs = self._model_inputs(model, inputs)
        fused = self._fused
        extra = {}
        if args.hidden_weight > 0 or fused:
            extra["output_hidden_states"] = True
        if args.attention_weight > 0:
            extra["output_attentions"] = True
        if fused:
            extra["logits_to_keep"] = 1  # logits are formed chunk by chunk inside the loss instead

        outputs = model(**student_inputs, **extra)
        kind = self._task.kind
        positions, position_labels, mask = None, None, None
        if kind != QUESTION_ANSWERING:
            position_source = outputs.hidden_states[-1] if fused else self._logits(outputs)
            positions, position_labels, mask = align_positions(
                kind,
                position_source,
                labels,
                inputs.get("decoder_attention_mask", inputs.get("attention_mask")),
            )
        kd_weight = args.alpha if has_labels else 1.0
        uses_teacher = not cached and (kd_weight > 0 or args.hidden_weight > 0 or args.attention_weight > 0)
        # The built-in cross-entropy shares the cached KD's pass over the logits; any other task loss is separate.
        own_task_loss = self.compute_loss_func is None and args.label_smoothing_factor == 0

        components: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        if cached:
            cache_labels = position_labels if has_labels and own_task_loss else None
            components.update(
                self._cached_terms(kind, positions, cache_labels, cached, mask, num_items_in_batch)
            )
            weights["kd_loss"] = kd_weight
        if has_labels and "ce_loss" not in components:
            components["ce_loss"] = self._task_term(
                model, outputs, inputs, positions, position_labels, num_items_in_batch
            )
        if has_labels:
            weights["ce_loss"] = 1.0 - args.alpha

        if uses_teacher:
            with torch.no_grad():
                teacher_outputs = self.teacher_model(
                    **forward_inputs(self.teacher_model, student_inputs), **extra
                )
            if kd_weight > 0:
                if fused:
                    kd_sum = self._fused_kd_sum(model, positions, teacher_outputs, mask)
                    count = mask.sum() if mask is not None else positions.shape[:-1].numel()
                    components["kd_loss"] = self._normalise(kd_sum, count, num_items_in_batch, True)
                elif kind == QUESTION_ANSWERING:
                    components["kd_loss"] = self._span_kd_term(outputs, teacher_outputs)
                else:
                    components["kd_loss"] = self._kd_term(
                        kind, positions, self._logits(teacher_outputs), mask, num_items_in_batch
                    )
                weights["kd_loss"] = kd_weight
            if args.hidden_weight > 0:
                components["hidden_loss"] = self._hidden_term(
                    outputs, teacher_outputs, inputs, num_items_in_batch
                )
                weights["hidden_loss"] = args.hidden_weight
            if args.attention_weight > 0:
                components["attention_loss"] = self._attention_term(
                    outputs, teacher_outputs, inputs, num_items_in_batch
                )
                weights["attention_loss"] = args.attention_weight

        loss = sum(weights[name] * value for name, value in components.items())
        self._accumulate_for_logging(components)
        return (loss, outputs) if return_outputs else loss

    def _has_labels(self, inputs: dict[str, Any]) -> bool:
        if self._task.kind == QUESTION_ANSWERING:
            return inputs.get("start_positions") is not None and inputs.get("end_positions") is not None
        return inputs.get("labels") is not None

    def _logits(self, outputs: Any) -> torch.Tensor:
        logits = getattr(outputs, "logits", None)
        if logits is None:
            raise ValueError(
                f"the model returned {type(outputs).__name__} without logits; DistillationTrainer distils these "
                f"heads: {SUPPORTED_HEADS}. Set task_type to the head your model has."
            )
        return logits

    def _task_term(
        self,
        model: nn.Module,
        outputs: Any,
        inputs: dict[str, Any],
        positions: torch.Tensor | None,
        position_labels: torch.Tensor | None,
        num_items_in_batch: torch.Tensor | int | None,
        training: bool = True,
    ) -> torch.Tensor:
        """The student's own (hard) loss: the user's `compute_loss_func` when one was passed (called as `Trainer`
        calls it, with the model outputs and the labels, and taken as already normalised), else the head's own
        loss, with `label_smoothing_factor` on the cross-entropy heads. Normalised like every other term."""
        args = self.args
        if self.compute_loss_func is not None:
            loss = self.compute_loss_func(
                outputs, inputs.get("labels"), num_items_in_batch=num_items_in_batch
            )
            if (
                training
                and num_items_in_batch is not None
                and args.average_tokens_across_devices
                and self.accelerator.num_processes > 1
            ):
                loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss does: DDP averages
            return loss
        smoothing = args.label_smoothing_factor
        if self._task.kind == QUESTION_ANSWERING:
            total, count = span_loss(
                outputs.start_logits,
                outputs.end_logits,
                inputs["start_positions"],
                inputs["end_positions"],
                label_smoothing=smoothing,
            )
        elif self._fused and training:
            with full_output_layer(model, self.accelerator, self._vocab_size) as (weight, bias):
                total, count = linear_cross_entropy_sum(
                    positions, weight, position_labels, bias=bias, label_smoothing=smoothing
                )
        else:
            total, count = hard_label_loss(
                self._task.kind,
                self._task.problem_type,
                positions,
                position_labels,
                label_smoothing=smoothing,
            )
        if not training:
            return total / count.clamp(min=1)
        return self._normalise(total, count, num_items_in_batch, self._task.token_level)

    def _evaluation_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool):
        """The student's own task loss (eval_loss, and perplexity for LMs); KD is a training objective only."""
        outputs = model(**self._model_inputs(model, inputs))
        loss = torch.zeros((), dtype=torch.float32, device=self.args.device)
        if self._has_labels(inputs):
            positions, position_labels = None, None
            if self._task.kind != QUESTION_ANSWERING:
                positions, position_labels, _ = align_positions(
                    self._task.kind, self._logits(outputs), inputs.get("labels"), None
                )
            loss = self._task_term(model, outputs, inputs, positions, position_labels, None, training=False)
        return (loss, outputs) if return_outputs else loss

    # ---- variants of the KD term ---------------------------------------------------------------------------

    def _on_policy_step(self) -> bool:
        """Whether this optimizer step trains on student samples; decided per step from the seed, so a resumed
        run makes the same choices."""
        if self.args.lmbda <= 0:
            return False
        return random.Random(self.args.seed * 1_000_003 + self.state.global_step).random() < self.args.lmbda

    def _on_policy_batch(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        from .on_policy import student_completions

        tokenizer = self.processing_class
        student = unwrap_model(model)
        config = student.generation_config if getattr(student, "generation_config", None) else student.config
        pad_token_id = getattr(tokenizer, "pad_token_id", None) or config.pad_token_id or 0
        eos_token_id = getattr(tokenizer, "eos_token_id", None) or config.eos_token_id
        with torch.no_grad(), gathered_for_generation(model, self.accelerator) as generator:
            batch = student_completions(
                generator,
                inputs,
                pad_token_id=pad_token_id,
                eos_token_id=eos_token_id,
                max_new_tokens=self.args.on_policy_max_new_tokens,
                temperature=self.args.on_policy_temperature,
            )
        model.train()  # generate() may leave the model in eval mode
        return batch

    def _cached_terms(
        self,
        kind: str,
        student_logits: torch.Tensor,
        labels: torch.Tensor | None,
        cached: dict[str, torch.Tensor],
        mask: torch.Tensor | None,
        num_items_in_batch: Any,
    ) -> dict[str, torch.Tensor]:
        """The KD term against a cached teacher, and the CE term when there are labels, normalised.

        Cached position t holds the teacher's distribution for token t + 1, like the logits at t. With labels over
        the student's whole vocabulary (token-level tasks), one pass over the logits gives both terms. The cached
        remaining mass is tempered at the cache's temperature, which __init__ checked equals args.temperature;
        without a cache directory its meaning is the loss's default (the plain mass, temperature 1).
        """
        options = {
            "temperature": self.args.temperature,
            "kind": self.args.kd_loss,
            "beta": self.args.jsd_beta,
            "mask": mask,
            "reduction": "sum",
            "teacher_tail_logmass": cached.get(TAIL_COLUMN),
            "tail_temperature": self.args.temperature if self.args.teacher_logits_cache is not None else 1.0,
        }
        logprobs, indices = cached[LOGPROBS_COLUMN], cached[INDICES_COLUMN].long()
        sliced = self._vocab_size is not None and self._vocab_size != student_logits.shape[-1]
        token_level = kind != SEQUENCE
        terms = {}
        if labels is not None and token_level and not sliced:
            kd_sum, ce_sum = sparse_distillation_and_cross_entropy(
                student_logits, logprobs, indices, labels, **options
            )
            ce_count = labels.ne(-100).sum()
        else:
            kd_logits = student_logits[..., : self._vocab_size] if sliced else student_logits
            kd_sum = sparse_distillation_loss(kd_logits, logprobs, indices, **options)
            if labels is not None:
                ce_sum, ce_count = hard_label_loss(kind, self._task.problem_type, student_logits, labels)
        if labels is not None:
            terms["ce_loss"] = self._normalise(ce_sum, ce_count, num_items_in_batch, token_level)
        count = mask.sum() if mask is not None else student_logits.shape[:-1].numel()
        terms["kd_loss"] = self._normalise(
            kd_sum, count, num_items_in_batch if mask is not None else None, token_level
        )
        return terms

    def _fused_kd_sum(
        self, model: nn.Module, student_hidden: torch.Tensor, teacher_outputs: Any, mask: torch.Tensor | None
    ) -> torch.Tensor:
        teacher_hidden = teacher_outputs.hidden_states[-1]
        # The LM heads are read outside their models' forward passes: whole, even where they are sharded.
        with (
            full_output_layer(model, self.accelerator, self._vocab_size) as (student_weight, student_bias),
            full_output_layer(self.teacher_model, self.accelerator, self._vocab_size) as (
                teacher_weight,
                teacher_bias,
            ),
        ):
            return fused_linear_distillation_loss(
                student_hidden,
                student_weight,
                teacher_hidden.to(student_hidden.device),
                teacher_weight,
                temperature=self.args.temperature,
                kind=self.args.kd_loss,
                beta=self.args.jsd_beta,
                mask=mask,
                chunk_size=self.args.kd_chunk_size,
                student_bias=student_bias,
                teacher_bias=teacher_bias,
                reduction="sum",
            )

    def _model_inputs(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """The batch without labels (the trainer computes the task loss itself). Encoder-decoder models get
        `decoder_input_ids` built from the labels once, so teacher and student decode the same prefix."""
        model_inputs = {
            key: value for key, value in inputs.items() if key not in _LABEL_KEYS and key not in CACHE_COLUMNS
        }
        labels = inputs.get("labels")
        if self._task.kind == SEQ2SEQ and labels is not None and "decoder_input_ids" not in inputs:
            student = unwrap_model(model)
            if hasattr(student, "prepare_decoder_input_ids_from_labels"):
                model_inputs["decoder_input_ids"] = student.prepare_decoder_input_ids_from_labels(
                    labels=labels
                )
            else:
                model_inputs["labels"] = labels
        return model_inputs

    def _kd_term(
        self,
        kind: str,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        mask: torch.Tensor | None,
        num_items_in_batch: torch.Tensor | int | None,
    ) -> torch.Tensor:
        args = self.args
        if self._label_order is not None:
            teacher_logits = teacher_logits[..., self._label_order.to(teacher_logits.device)]
        if self._vocab_size is not None:
            student_logits = student_logits[..., : self._vocab_size]
            teacher_logits = teacher_logits[..., : self._vocab_size]
        teacher_logits = teacher_logits.to(student_logits.device)
        if self._task.is_multi_label and args.kd_loss != "mse":
            # each label is its own yes/no question: a softmax over the labels cannot see per-label errors
            kd_sum = bernoulli_distillation_loss(
                student_logits,
                teacher_logits,
                temperature=args.temperature,
                kind=args.kd_loss,
                beta=args.jsd_beta,
                mask=mask,
                reduction="sum",
            )
        else:
            kd_sum = logit_distillation_loss(
                student_logits,
                teacher_logits,
                temperature=args.temperature,
                kind="mse" if self._task.is_regression else args.kd_loss,  # mse: on the raw logits
                beta=args.jsd_beta,
                mask=mask,
                chunk_size=args.kd_chunk_size,
                reduction="sum",
            )
        count = mask.sum() if mask is not None else torch.tensor(student_logits.shape[:-1].numel())
        return self._normalise(
            kd_sum, count, num_items_in_batch if mask is not None else None, kind != SEQUENCE
        )

    def _span_kd_term(self, outputs: Any, teacher_outputs: Any) -> torch.Tensor:
        """Extractive QA: the divergence between the start distributions plus that between the end distributions,
        halved (as the heads' own span loss halves its two cross-entropies), averaged over examples."""
        args = self.args
        total = 0.0
        for name in ("start_logits", "end_logits"):
            student_logits = getattr(outputs, name)  # (B, T): one distribution over positions per example
            total = total + logit_distillation_loss(
                student_logits,
                getattr(teacher_outputs, name).to(student_logits.device),
                temperature=args.temperature,
                kind=args.kd_loss,
                beta=args.jsd_beta,
                reduction="sum",
            )
        examples = torch.tensor(outputs.start_logits.shape[0])
        return self._normalise(total / 2, examples, None, token_level=False)

    def _hidden_term(
        self, outputs: Any, teacher_outputs: Any, inputs: dict[str, Any], num_items: Any
    ) -> torch.Tensor:
        terms = []
        for stack, student_states, teacher_states, mask in self._stacks(
            outputs, teacher_outputs, inputs, "hidden"
        ):
            mean = self._projection_runners[stack](
                student_states, teacher_states, kind=self.args.hidden_loss, mask=mask
            )
            terms.append(self._normalise_positions(mean, mask, self._window_count(stack, num_items)))
        return torch.stack(terms).mean()

    def _attention_term(
        self, outputs: Any, teacher_outputs: Any, inputs: dict[str, Any], num_items: Any
    ) -> torch.Tensor:
        terms = []
        for stack, student_maps, teacher_maps, mask in self._stacks(
            outputs, teacher_outputs, inputs, "attentions"
        ):
            mean = attention_matching_loss(student_maps, teacher_maps, self._layer_maps[stack], mask=mask)
            terms.append(self._normalise_positions(mean, mask, self._window_count(stack, num_items)))
        return torch.stack(terms).mean()

    def _stacks(self, outputs: Any, teacher_outputs: Any, inputs: dict[str, Any], what: str):
        """(stack, student tensors, teacher tensors, position mask) for each matched layer stack."""
        field = "hidden_states" if what == "hidden" else "attentions"
        for stack in self._layer_maps:
            if self._task.kind == SEQ2SEQ:
                name = f"{stack}_{field}"
                if stack == "encoder":
                    mask = inputs.get("attention_mask")
                else:
                    labels = inputs.get("labels")
                    mask = inputs.get(
                        "decoder_attention_mask", labels.ne(-100) if labels is not None else None
                    )
            else:
                name, mask = field, inputs.get("attention_mask")
            student_states, teacher_states = (
                getattr(outputs, name, None),
                getattr(teacher_outputs, name, None),
            )
            if student_states is None or teacher_states is None:
                raise ValueError(
                    f"{'hidden-state' if what == 'hidden' else 'attention'} matching is on, but the "
                    f"{'student' if student_states is None else 'teacher'} returned no {name}; use a model that "
                    f"supports output_{field}=True or set {'hidden' if what == 'hidden' else 'attention'}_weight=0."
                )
            yield stack, student_states, teacher_states, mask.bool() if mask is not None else None

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        """Also counts the real (unpadded) positions of the whole accumulation window, so that hidden-state and
        attention terms are normalised over the window like the token-level losses."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._window_tokens = {}
        if self._layer_maps:
            for key in ("attention_mask", "decoder_attention_mask"):
                if batch_samples and all(key in batch for batch in batch_samples):
                    count = sum(batch[key].sum() for batch in batch_samples).to(device)
                    if self.args.average_tokens_across_devices and self.args.world_size > 1:
                        count = self.accelerator.gather(count).sum()
                    self._window_tokens[key] = count
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

    def _normalise(
        self,
        total: torch.Tensor,
        count: torch.Tensor,
        num_items_in_batch: torch.Tensor | int | None,
        token_level: bool,
    ) -> torch.Tensor:
        """Scale a summed loss for one micro-batch so that the micro-batches of an optimizer step add up to the
        mean over the step.

        Token-level sums follow the Trainer's convention: divided by `num_items_in_batch`, the label tokens of
        the whole accumulated (and, with `average_tokens_across_devices`, global) batch, then multiplied by the
        number of processes because DDP averages gradients. Example-level losses are per micro-batch means
        divided by the accumulation steps.
        """
        if token_level and num_items_in_batch is not None:
            loss = total / torch.as_tensor(num_items_in_batch, device=total.device).clamp(min=1)
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes
            return loss
        count = torch.as_tensor(count, device=total.device).clamp(min=1)
        return total / count / self._accumulation_steps

    @property
    def _accumulation_steps(self) -> int:
        # Set by the training loop (the last window of an epoch can be shorter); absent before training starts.
        return getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)

    # ---- logging ---------------------------------------------------------------------------------------------

    def _accumulate_for_logging(self, components: dict[str, torch.Tensor]) -> None:
        if not self._logged_sums:
            self._window_start_step = self.state.global_step
        for name, value in components.items():
            value = value.detach().float()
            self._logged_sums[name] = self._logged_sums.get(name, 0.0) + value

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the loss components, averaged over the optimizer steps since the last log, to training logs."""
        if "loss" in logs and self._logged_sums:
            steps = max(self.state.global_step - self._window_start_step, 1)
            for name in LOSS_COMPONENTS:
                if name in self._logged_sums:
                    total = self.accelerator.reduce(self._logged_sums[name].reshape(1), reduction="mean")
                    logs[name] = round(total.item() / steps, 4)
            self._logged_sums = {}
        super().log(logs, start_time)

    # ---- evaluation ----------------------------------------------------------------------------------------

    def evaluation_loop(self, dataloader: Any, description: str, *args: Any, **kwargs: Any):
        """`Trainer.evaluation_loop`, with each example of a sized dataset counted exactly once (see
        `evaluation.py`): metrics and returned predictions never include the repeats that pad the last batch."""
        count = dataset_length(dataloader)
        compute_metrics = self.compute_metrics
        if count is not None and compute_metrics is not None and not self.args.batch_eval_metrics:
            self.compute_metrics = lambda prediction: compute_metrics(
                first_rows_prediction(prediction, count)
            )
        try:
            output = super().evaluation_loop(dataloader, description, *args, **kwargs)
        finally:
            self.compute_metrics = compute_metrics
        if count is None:
            return output
        return output._replace(
            predictions=first_rows(output.predictions, count), label_ids=first_rows(output.label_ids, count)
        )

    # ---- saving ----------------------------------------------------------------------------------------------

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # Projections are training state like the optimizer's: written with it, before trainer_state.json (the
        # marker of a complete checkpoint), and never into the student's weights.
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save and any(True for _ in self.hidden_projections.parameters()):
            state = {
                key: value.detach().cpu().contiguous()
                for key, value in self.hidden_projections.state_dict().items()
            }
            save_file(state, os.path.join(output_dir, PROJECTIONS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if not any(True for _ in self.hidden_projections.parameters()):
            return
        path = os.path.join(resume_from_checkpoint, PROJECTIONS_NAME)
        if not os.path.isfile(path):
            raise ValueError(
                f"{resume_from_checkpoint} has no {PROJECTIONS_NAME}: it was written by a run without learned hidden "
                "projections. Resume with the same hidden_weight/layer_map as that run, or start a new run."
            )
        self.hidden_projections.load_state_dict(load_file(path, device=str(self.args.device)))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model` plus a model card (README.md) describing the distillation, with the arguments of
        earlier `create_model_card` calls."""
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.args.should_save:
            card_arguments = getattr(self, "_model_card_arguments", {})
            hub.write_model_card(self, output_dir or self.args.output_dir, **card_arguments)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """`Trainer.create_model_card` (same arguments: language, license, tags, model_name, finetuned_from, tasks,
        dataset_tags, dataset, dataset_args) for a card that also describes the distillation; the arguments are
        kept, so a later `save_model` writes them again."""
        given = hub.card_arguments(*args, **kwargs)
        self._model_card_arguments = {**getattr(self, "_model_card_arguments", {}), **given}
        if self.is_world_process_zero():
            hub.write_model_card(self, self.args.output_dir, **self._model_card_arguments)


class _ZeroProjectionGradients(TrainerCallback):
    """The Trainer zeroes only the student's gradients after an optimizer step; the projections are trained
    beside it and need the same, or their gradients would add up across steps."""

    def __init__(self, projections: nn.Module):
        self.projections = projections

    def on_train_begin(self, args, state, control, **kwargs):
        self.projections.zero_grad(set_to_none=True)

    def on_step_end(self, args, state, control, **kwargs):
        self.projections.zero_grad(set_to_none=True)


class Seq2SeqDistillationTrainer(DistillationTrainer, Seq2SeqTrainer):
    """`DistillationTrainer` for encoder-decoder models, with `Seq2SeqTrainer`'s generation in evaluate/predict
    (use `Seq2SeqDistillationTrainingArguments` for `predict_with_generate` and friends)."""
