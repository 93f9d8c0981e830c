"""Everything the trainer needs to know about the teacher: freezing, placement, dtype, sharded inference,
which inputs it takes, and how its outputs line up with the student's (label order, vocabulary size)."""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under DDP/DeepSpeed/FSDP wrappers and PEFT."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model) and hasattr(model, "peft_config"):
        model = get_base_model()
    return model


def freeze(teacher: nn.Module, dtype: str = "auto") -> nn.Module:
    """Eval mode, no gradients, optional dtype cast. The teacher is never trained, so dropout stays off."""
    teacher.eval()
    teacher.requires_grad_(False)
    if dtype != "auto":
        teacher.to(_DTYPES[dtype])
    return teacher


def prepare_teacher(
    teacher: nn.Module, accelerator: Any, device: torch.device, dtype: str = "auto"
) -> nn.Module:
    """Freeze the teacher and make it ready for inference next to the student.

    - DeepSpeed: wrapped in an inference-only engine that uses the run's ZeRO stage when it is 3 (so its
      weights are partitioned like the student's) and no sharding otherwise; no optimizer is created.
    - FSDP: wrapped by Accelerate in evaluation mode, so its parameters are sharded and gathered per forward.
    - Otherwise (single device, DDP): moved to the student's device. It is never wrapped in DDP: it has no
      gradients to synchronise.
    A model loaded with a `device_map` keeps its placement.
    """
    teacher = freeze(teacher, dtype)
    distributed_type = str(getattr(accelerator, "distributed_type", ""))
    if "DEEPSPEED" in distributed_type:
        return _deepspeed_inference_engine(teacher, accelerator)
    if "FSDP" in distributed_type:
        return accelerator.prepare_model(teacher, evaluation_mode=True)
    if getattr(teacher, "hf_device_map", None) is None:
        teacher.to(device)
    return teacher


def _deepspeed_inference_engine(teacher: nn.Module, accelerator: Any) -> nn.Module:
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage", 0) != 3:
        # ZeRO-1/2 only shard optimizer state and gradients, which a frozen teacher does not have.
        config["zero_optimization"] = {"stage": 0}
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine


def forward_inputs(model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `inputs` that `model.forward` names (a BERT batch carries token_type_ids that a
    DistilBERT or Llama teacher does not take)."""
    named = _named_forward_inputs(type(unwrap_model(model)))
    return {key: value for key, value in inputs.items() if key in named}


@functools.cache
def _named_forward_inputs(model_class: type) -> frozenset[str]:
    # Called on every training step: the signature is read once per model class.
    parameters = inspect.signature(model_class.forward).parameters
    return frozenset(name for name, p in parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD)


def label_permutation(teacher_config: Any, student_config: Any) -> torch.Tensor | None:
    """Index tensor that reorders teacher class logits into the student's label order, or None if already aligned.

    Raises when the label spaces differ in size or names.
    """
    teacher_labels = _label_names(teacher_config)
    student_labels = _label_names(student_config)
    if len(teacher_labels) != len(student_labels):
        raise ValueError(
            f"teacher has {len(teacher_labels)} labels {teacher_labels}, the student has {len(student_labels)} "
            f"{student_labels}; pass a teacher fine-tuned on this task (scripts/train_teacher.py does it)."
        )
    if teacher_labels == student_labels:
        return None
    if set(teacher_labels) != set(student_labels):
        raise ValueError(
            f"teacher labels {teacher_labels} and student labels {student_labels} have different names; the "
            "teacher's logits cannot be matched to the student's classes. Use a teacher trained on the same "
            "label set, or give the student the teacher's id2label/label2id."
        )
    teacher_index = {name: i for i, name in enumerate(teacher_labels)}
    return torch.tensor([teacher_index[name] for name in student_labels], dtype=torch.long)


def _label_names(config: Any) -> list[str]:
    id2label = getattr(config, "id2label", None) or {}
    num_labels = getattr(config, "num_labels", len(id2label))
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(num_labels)]


def shared_vocab_size(teacher_vocab: int, student_vocab: int, tokenizer_size: int | None) -> int:
    """The number of logit columns KD compares for token-level tasks.

    Vocabulary matrices are often padded past the tokenizer (to a multiple of 64 or 128); the padded rows are
    never produced by the tokenizer, so both sides are cut to the smaller size as long as it still covers the
    tokenizer. Anything else means the models do not share a tokenizer, which logit KD needs.
    """
    if teacher_vocab == student_vocab:
        return student_vocab
    shared = min(teacher_vocab, student_vocab)
    if tokenizer_size is None:
        raise ValueError(
            f"teacher vocabulary ({teacher_vocab}) and student vocabulary ({student_vocab}) differ and no tokenizer "
            "was given to tell padding from a different tokenizer; pass processing_class=tokenizer."
        )
    if shared < tokenizer_size:
        raise ValueError(
            f"teacher vocabulary ({teacher_vocab}) and student vocabulary ({student_vocab}) differ and the smaller "
            f"does not cover the tokenizer's {tokenizer_size} tokens: the models use different tokenizers. Logit "
            "distillation needs a teacher and student that share one tokenizer."
        )
    logger.info(
        f"Comparing the first {shared} vocabulary logits (teacher {teacher_vocab}, student {student_vocab})."
    )
    return shared


def check_same_tokenizer(tokenizer: Any, teacher_tokenizer: Any) -> None:
    """Raise when the student's and the teacher's tokenizers map text to different ids."""
    if tokenizer is None or teacher_tokenizer is None or tokenizer is teacher_tokenizer:
        return
    if tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ValueError(
            "the teacher's tokenizer and the student's tokenizer have different vocabularies, so their logits are "
            "over different tokens. Logit distillation needs one shared tokenizer: use a student built from the "
            "teacher (create_student) or from the same model family."
        )
