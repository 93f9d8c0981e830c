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
from transformers import Seq2SeqTrainer, Trainer, TrainerCallback
from transformers.utils import logging

from . import hub
from .args import DistillationTrainingArguments
from .checkpoints import is_complete_checkpoint, last_complete_checkpoint
from .evaluation import dataset_length, first_rows, first_rows_prediction
from .logit_cache import CACHE_COLUMNS, INDICES_COLUMN, LOGPROBS_COLUMN, TAIL_COLUMN
from .losses import (
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
from .task_loss import (
    CAUSAL_LM,
    SEQ2SEQ,
    SEQUENCE,
    align_positions,
    hard_label_loss,
    infer_task,
    linear_cross_entropy_sum,
    resolve_kind,
)
from .teacher import (
    check_same_tokenizer,
    forward_inputs,
    label_permutation,
    prepare_teacher,
    shared_vocab_size,
    unwrap_model,
)

logger = logging.get_logger(__name__)

PROJECTIONS_NAME = "distill_projections.safetensors"
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
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        # Every term is normalised in `compute_loss` (see `_normalise`), so the Trainer must count the label
        # items of the whole accumulated batch and must not divide again.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True

        student = unwrap_model(self.model)
        self._task = infer_task(student)
        self._fused = self._check_fused(student)
        self._label_order = None
        self._vocab_size = None
        self._layer_maps: dict[str, list[tuple[int, int]]] = {}
        self.hidden_projections = nn.ModuleDict()
        self.teacher_model = None
        if teacher_model is not None:
            teacher = unwrap_model(teacher_model)
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
        return True

    def _set_signature_columns_if_needed(self) -> None:
        # Keep the cached-teacher columns through `remove_unused_columns`: the student does not take them.
        super()._set_signature_columns_if_needed()
        for column in CACHE_COLUMNS:
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def _check_label_spaces(self, student: nn.Module, teacher: nn.Module) -> torch.Tensor | None:
        if self._task.kind != SEQUENCE:
            return None
        return label_permutation(teacher.config, student.config)

    def _check_vocabularies(
        self, student: nn.Module, teacher: nn.Module, teacher_tokenizer: Any
    ) -> int | None:
        if self._task.kind == SEQUENCE or getattr(student, "config", None) is None:
            return None
        check_same_tokenizer(self.processing_class, teacher_tokenizer)
        student_vocab = getattr(student.config.get_text_config(), "vocab_size", None)
        teacher_vocab = getattr(teacher.config.get_text_config(), "vocab_size", None)
        if student_vocab is None or teacher_vocab is None:
            return None
        tokenizer = self.processing_class
        tokenizer_size = len(tokenizer) if tokenizer is not None and hasattr(tokenizer, "__len__") else None
        return shared_vocab_size(teacher_vocab, student_vocab, tokenizer_size)

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
        maps = {}
        for stack in student_counts:
            spec = args.decoder_layer_map if stack == "decoder" else args.layer_map
            maps[stack] = resolve_layer_map(spec, student_counts[stack], teacher_counts[stack])
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
            if self.is_deepspeed_enabled:
                raise ValueError(
                    f"the student's hidden width ({student_width}) differs from the teacher's ({teacher_width}), which "
                    "needs learned projections, and those are not supported under DeepSpeed yet; use a student of the "
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
        if self._on_policy_step():
            inputs = self._on_policy_batch(model, inputs)
            num_items_in_batch = None  # the sampled completions have their own token count

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
        kind = resolve_kind(self._task, outputs.logits)
        position_source = outputs.hidden_states[-1] if fused else outputs.logits
        positions, position_labels, mask = align_positions(
            kind, position_source, labels, inputs.get("decoder_attention_mask", inputs.get("attention_mask"))
        )
        token_level = kind != SEQUENCE
        uses_teacher = not cached and (
            args.alpha > 0 or labels is None or args.hidden_weight > 0 or args.attention_weight > 0
        )

        components: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        kd_weight = args.alpha if labels is not None else 1.0
        if cached:
            components.update(
                self._cached_terms(kind, positions, position_labels, cached, mask, num_items_in_batch)
            )
            weights["kd_loss"] = kd_weight
            if labels is not None:
                weights["ce_loss"] = 1.0 - args.alpha
        elif labels is not None:
            if fused:
                weight, bias = _output_layer(model, self._vocab_size)
                ce_sum, ce_count = linear_cross_entropy_sum(positions, weight, position_labels, bias=bias)
            else:
                ce_sum, ce_count = hard_label_loss(kind, self._task.problem_type, positions, position_labels)
            components["ce_loss"] = self._normalise(ce_sum, ce_count, num_items_in_batch, token_level)
            weights["ce_loss"] = 1.0 - args.alpha if uses_teacher else 1.0

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
                else:
                    components["kd_loss"] = self._kd_term(
                        kind, positions, teacher_outputs.logits, mask, num_items_in_batch
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

    def _evaluation_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool):
        """The student's own task loss (eval_loss, and perplexity for LMs); KD is a training objective only."""
        labels = inputs.get("labels")
        outputs = model(**self._model_inputs(model, inputs))
        loss = outputs.logits.new_zeros((), dtype=torch.float32)
        if labels is not None:
            kind = resolve_kind(self._task, outputs.logits)
            logits, position_labels, _ = align_positions(kind, outputs.logits, labels, None)
            total, count = hard_label_loss(kind, self._task.problem_type, logits, position_labels)
            loss = total / count.clamp(min=1)
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
        with torch.no_grad():
            batch = student_completions(
                student,
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
        the student's whole vocabulary (token-level tasks), one pass over the logits gives both terms.
        """
        options = {
            "temperature": self.args.temperature,
            "kind": self.args.kd_loss,
            "beta": self.args.jsd_beta,
            "mask": mask,
            "reduction": "sum",
            "teacher_tail_logmass": cached.get(TAIL_COLUMN),
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
        student_weight, student_bias = _output_layer(model, self._vocab_size)
        teacher_weight, teacher_bias = _output_layer(self.teacher_model, self._vocab_size)
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
            key: value for key, value in inputs.items() if key != "labels" and key not in CACHE_COLUMNS
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
        divergence = "mse" if self._task.is_regression else args.kd_loss
        kd_sum = logit_distillation_loss(
            student_logits,
            teacher_logits.to(student_logits.device),
            temperature=args.temperature,
            kind=divergence,
            beta=args.jsd_beta,
            mask=mask,
            chunk_size=args.kd_chunk_size,
            reduction="sum",
        )
        count = mask.sum() if mask is not None else torch.tensor(student_logits.shape[:-1].numel())
        return self._normalise(
            kd_sum, count, num_items_in_batch if mask is not None else None, kind != SEQUENCE
        )

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
        """`Trainer.save_model` plus a model card (README.md) describing the distillation."""
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.args.should_save:
            hub.write_model_card(self, output_dir or self.args.output_dir)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        if self.is_world_process_zero():
            hub.write_model_card(self, self.args.output_dir, *args, **kwargs)


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


def _output_layer(model: nn.Module, vocab_size: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LM-head weight (vocab, hidden) and bias, cut to the shared vocabulary."""
    head = unwrap_model(model).get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    if vocab_size is not None:
        weight = weight[:vocab_size]
        bias = bias[:vocab_size] if bias is not None else None
    return weight, bias
