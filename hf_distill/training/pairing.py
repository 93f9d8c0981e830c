"""How a teacher and a student pair up, checked once when the trainer is built: what the student's outputs mean,
which options its task can honour, whether the teacher has the same head, how their labels line up, how many
vocabulary logits they share, and which layers are matched. Every mismatch raises before any data is read, with
the value found and the fix."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from hf_distill.args import DistillationTrainingArguments, LayerMap
from hf_distill.training.matching import attention_heads, layer_counts, resolve_layer_map
from hf_distill.training.task_loss import CAUSAL_LM, QUESTION_ANSWERING, SEQUENCE, TaskKind, infer_task
from hf_distill.training.teacher import check_same_tokenizer, label_permutation, shared_vocab_size

logger = logging.get_logger(__name__)


@dataclass
class Pairing:
    """What the KD terms need to know about the pair.

    label_order: indices that reorder the teacher's class logits into the student's label order (None: same).
    vocab_size: the number of vocabulary logits both sides keep (None: all of them).
    layer_maps: (student, teacher) hidden-state index pairs per layer stack ('layers', 'encoder', 'decoder').
    """

    label_order: torch.Tensor | None = None
    vocab_size: int | None = None
    layer_maps: dict[str, LayerMap] = field(default_factory=dict)


def check_task_options(args: DistillationTrainingArguments, task: TaskKind, student: nn.Module) -> None:
    """Options that the student's task cannot honour fail here."""
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
            "teacher_logits_cache holds top-k softmax probabilities over one output vocabulary; it cannot stand in "
            f"for a {'question-answering' if task.kind == QUESTION_ANSWERING else 'multi-label'} teacher. Pass "
            "teacher_model= instead."
        )
    if args.label_smoothing_factor > 0 and (task.is_regression or task.is_multi_label):
        raise ValueError(
            f"label_smoothing_factor={args.label_smoothing_factor} smooths a softmax cross-entropy, but the "
            f"student's task is {task.problem_type}; set label_smoothing_factor=0."
        )


def check_fused(
    args: DistillationTrainingArguments, task: TaskKind, student: nn.Module, accelerator: Any
) -> bool:
    """Whether the fused KD loss runs; raises where it cannot be exact."""
    if not args.fused_kd_loss:
        return False
    name = type(student).__name__
    if task.kind != CAUSAL_LM:
        raise ValueError(
            f"fused_kd_loss computes logits from the last hidden state and the LM head, which only causal LMs have; "
            f"{name} is not one. Use kd_chunk_size to bound the KD loss's memory instead."
        )
    config = student.config.get_text_config()
    for attribute in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, attribute, None) not in (None, 1.0):
            raise ValueError(
                f"{name} transforms its logits after the LM head ({attribute}={getattr(config, attribute)}), which "
                "the fused loss does not reproduce; drop fused_kd_loss (kd_chunk_size bounds memory too)."
            )
    if args.teacher_logits_cache is not None:
        raise ValueError(
            "fused_kd_loss needs the teacher's hidden states; it cannot run from teacher_logits_cache."
        )
    # The student's LM head is used outside its forward pass, with a gradient. FSDP2 shards it as a DTensor whose
    # full_tensor() carries the gradient back; ZeRO-3 and FSDP (v1) hold only flat shards there.
    state = getattr(accelerator, "state", None)
    deepspeed_plugin = getattr(state, "deepspeed_plugin", None)
    fsdp_plugin = getattr(state, "fsdp_plugin", None)
    if (deepspeed_plugin is not None and deepspeed_plugin.zero_stage == 3) or (
        fsdp_plugin is not None and getattr(fsdp_plugin, "fsdp_version", 1) != 2
    ):
        raise ValueError(
            "fused_kd_loss reads the student's LM head outside its forward pass, where DeepSpeed ZeRO-3 and FSDP (v1) "
            "hold only a shard of it. Use kd_chunk_size instead (the same loss with bounded memory), or FSDP2 "
            "(fsdp_version: 2 in the Accelerate config)."
        )
    return True


def pair_models(
    args: DistillationTrainingArguments,
    task: TaskKind,
    student: nn.Module,
    teacher: nn.Module,
    tokenizer: Any,
    teacher_tokenizer: Any,
) -> Pairing:
    """Check that `teacher` can teach `student` (both unwrapped) and return how their outputs line up."""
    _check_teacher_head(task, student, teacher)
    return Pairing(
        label_order=_label_order(task, student, teacher),
        # cross_tokenizer: the vocabularies are different by design and mapped by the KD source instead
        vocab_size=None
        if args.cross_tokenizer is not None
        else _shared_vocabulary(task, student, teacher, tokenizer, teacher_tokenizer),
        layer_maps=_layer_maps(args, student, teacher),
    )


def _check_teacher_head(task: TaskKind, student: nn.Module, teacher: nn.Module) -> None:
    """A teacher whose outputs mean something else than the student's (a classifier for an LM) fails here."""
    try:
        teacher_task = infer_task(teacher, None)
    except ValueError:
        return  # a custom teacher: trusted to have the student's head
    if teacher_task.kind != task.kind:
        raise ValueError(
            f"the teacher ({type(teacher).__name__}) is a {teacher_task.kind} model and the student "
            f"({type(student).__name__}) a {task.kind} model: their outputs cannot be compared. Use a teacher with "
            "the student's head (fine-tune it on the task first)."
        )


def _label_order(task: TaskKind, student: nn.Module, teacher: nn.Module) -> torch.Tensor | None:
    if task.kind != SEQUENCE or getattr(student, "config", None) is None:
        return None
    return label_permutation(teacher.config, student.config)


def _vocab_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    return getattr(config.get_text_config(), "vocab_size", None)


def _shared_vocabulary(
    task: TaskKind, student: nn.Module, teacher: nn.Module, tokenizer: Any, teacher_tokenizer: Any
) -> int | None:
    """The number of vocabulary logits KD compares for token-level tasks (None: all of them)."""
    if not task.token_level:
        return None
    student_vocab, teacher_vocab = _vocab_size(student), _vocab_size(teacher)
    if student_vocab is None or teacher_vocab is None:
        return None
    if student_vocab == teacher_vocab:
        check_same_tokenizer(tokenizer, teacher_tokenizer)
        return None
    return shared_vocab_size(teacher_vocab, student_vocab, tokenizer, teacher_tokenizer)


def _layer_maps(
    args: DistillationTrainingArguments, student: nn.Module, teacher: nn.Module
) -> dict[str, LayerMap]:
    """Layer maps per stack ('layers', or 'encoder' and 'decoder'), checked against the layer counts."""
    if args.hidden_weight == 0 and args.attention_weight == 0:
        return {}
    for role, model in (("student", student), ("teacher", teacher)):
        if getattr(model, "config", None) is None:
            raise ValueError(
                f"hidden/attention matching needs the {role} to be a transformers model that can return hidden "
                "states and attentions; set hidden_weight=0 and attention_weight=0 to distil logits only."
            )
    student_counts, teacher_counts = layer_counts(student.config), layer_counts(teacher.config)
    # create_student records which teacher layer initialised each student layer; a uniform map then pairs each
    # student layer with that teacher layer instead of re-spreading them (which could differ).
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
        _check_attention(student, teacher, args.attention_head_mapping)
    return maps


def _check_attention(student: nn.Module, teacher: nn.Module, head_mapping: str) -> None:
    student_heads = attention_heads(student.config)
    teacher_heads = attention_heads(teacher.config)
    if student_heads != teacher_heads and head_mapping == "per_head":
        raise ValueError(
            f"attention matching compares attention maps head by head (attention_head_mapping='per_head'), but "
            f"the student has {student_heads} heads and the teacher {teacher_heads}; compare head-averaged maps "
            "with --attention_head_mapping mean, use a student with the teacher's head count (create_student "
            "keeps it) or set attention_weight=0."
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
                    f"the {role} uses {implementation!r} attention, which does not return attention maps, and could "
                    f"not be switched to eager ({error}); load it with attn_implementation='eager'."
                ) from error
