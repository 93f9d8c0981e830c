"""Everything the trainer needs to know about the teacher: freezing, placement, dtype, sharded inference,
which inputs it takes, and how its outputs line up with the student's (label order, vocabulary size)."""

from __future__ import annotations

import contextlib
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

    plugin = accelerator.state.deepspeed_plugin
    micro_batch = plugin.deepspeed_config.get("train_micro_batch_size_per_gpu", 1)
    config = teacher_deepspeed_config(
        plugin.deepspeed_config,
        teacher,
        micro_batch_size=micro_batch if isinstance(micro_batch, int) else 1,
        world_size=accelerator.num_processes,
    )
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine


def _hidden_size(teacher: nn.Module) -> int | None:
    config = getattr(teacher, "config", None)
    if config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "d_model", "n_embd"):
        value = getattr(text_config, name, None)
        if isinstance(value, int):
            return value
    sizes = getattr(text_config, "hidden_sizes", None)
    return max(sizes) if sizes else None


def _drop_auto(section: dict) -> None:
    for key in [key for key, value in section.items() if value == "auto"]:
        logger.debug(f"teacher DeepSpeed config: {key}='auto' left to DeepSpeed's default")
        del section[key]
    for value in section.values():
        if isinstance(value, dict):
            _drop_auto(value)


def teacher_deepspeed_config(
    train_config: Mapping[str, Any], teacher: nn.Module, *, micro_batch_size: int, world_size: int
) -> dict[str, Any]:
    """The DeepSpeed config of the teacher's inference engine, derived from the run's and complete in itself.

    The teacher's engine is built when the trainer is, before the Trainer fills the run config's model-dependent
    "auto" values (at train()), and those would be the student's anyway. So: no optimizer or scheduler; ZeRO-3
    kept (the teacher's weights are partitioned like the student's) with its bucket sizes computed from the
    teacher's hidden size h as transformers does for a model (reduce_bucket_size h*h, stage3_prefetch_bucket_size
    0.9*h*h, stage3_param_persistence_threshold 10*h); any other ZeRO stage becomes 0 (stages 1-2 shard optimizer
    state and gradients, which a frozen teacher does not have); precision follows the teacher's dtype; batch sizes
    are one micro-batch per rank, no accumulation; any "auto" still left is dropped for DeepSpeed's default.
    """
    config = copy.deepcopy(dict(train_config))
    for key in ("optimizer", "scheduler", "gradient_clipping"):
        config.pop(key, None)
    zero = config.get("zero_optimization", {}) or {}
    if zero.get("stage", 0) != 3:
        config["zero_optimization"] = {"stage": 0}
    else:
        hidden = _hidden_size(teacher)
        if hidden is not None:
            sizes = {
                "reduce_bucket_size": hidden * hidden,
                "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
                "stage3_param_persistence_threshold": 10 * hidden,
            }
            for key, value in sizes.items():
                if zero.get(key) == "auto":
                    zero[key] = value
        for key in ("offload_optimizer",):
            zero.pop(key, None)
    dtype = next((p.dtype for p in teacher.parameters()), torch.float32)
    for section, wanted in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if section in config and isinstance(config[section], dict):
            config[section]["enabled"] = dtype == wanted
    config["train_micro_batch_size_per_gpu"] = max(int(micro_batch_size), 1)
    config["gradient_accumulation_steps"] = 1
    config["train_batch_size"] = config["train_micro_batch_size_per_gpu"] * max(int(world_size), 1)
    _drop_auto(config)
    return config


@contextlib.contextmanager
def full_output_layer(model: nn.Module, accelerator: Any, vocab_size: int | None = None):
    """(weight (V, H), bias (V,) or None) of the model's LM head, whole, for use outside its forward pass; cut to
    `vocab_size` rows when given.

    Outside the forward pass a sharded model holds only part of its weights: ZeRO-3 a placeholder (gathered here,
    read-only, for the block), FSDP (v1) a flat shard (the FSDP unit that owns the head is summoned, without
    write-back), FSDP2 a DTensor (`full_tensor()`, whose backward scatters the gradient back to the shards).
    """
    head = unwrap_model(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(unwrap_model(model)).__name__} has no output embeddings (LM head).")
    parameters = [p for p in (head.weight, getattr(head, "bias", None)) if p is not None]
    distributed_type = str(getattr(accelerator, "distributed_type", ""))
    with contextlib.ExitStack() as stack:
        plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
        if "DEEPSPEED" in distributed_type and plugin is not None and plugin.zero_stage == 3:
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(parameters, modifier_rank=None))
        elif "FSDP" in distributed_type:
            unit = _fsdp1_unit_of(model, head)
            if unit is not None:
                from torch.distributed.fsdp import FullyShardedDataParallel

                stack.enter_context(
                    FullyShardedDataParallel.summon_full_params(unit, writeback=False, recurse=False)
                )
        weight, bias = head.weight, getattr(head, "bias", None)
        weight, bias = _full_tensor(weight), _full_tensor(bias)
        if vocab_size is not None:
            weight = weight[:vocab_size]
            bias = bias[:vocab_size] if bias is not None else None
        yield weight, bias


def _full_tensor(tensor: torch.Tensor | None) -> torch.Tensor | None:
    full_tensor = getattr(tensor, "full_tensor", None)  # a DTensor (FSDP2, tensor parallelism)
    return full_tensor() if callable(full_tensor) else tensor


def _fsdp1_unit_of(model: nn.Module, head: nn.Module) -> nn.Module | None:
    """The innermost FSDP (v1) module whose own parameters include `head`'s, or None."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    owner = None
    for unit in FullyShardedDataParallel.fsdp_modules(model):
        if any(module is head for module in unit.modules()):
            owner = unit  # fsdp_modules lists outer units first, so the last match is the innermost
    return owner


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


def shared_vocab_size(teacher_vocab: int, student_vocab: int, tokenizer: Any, teacher_tokenizer: Any) -> int:
    """The number of logit columns KD compares when the two vocabulary matrices differ in size.

    Embedding matrices are often padded past the tokenizer (to a multiple of 64 or 128), and the padded rows are
    never produced by the tokenizer, so both sides can be cut to the smaller size, but only when that is what the
    difference is. It could as well be another tokenizer (a 50,257-row GPT-2 teacher for a student with its own
    105-token vocabulary), whose first rows mean other tokens. So both tokenizers are required here, and must be
    one tokenizer on the shared ids: the same token -> id map, every id below the smaller size.
    """
    shared = min(teacher_vocab, student_vocab)
    sizes = f"the teacher's vocabulary matrix has {teacher_vocab} rows and the student's {student_vocab}"
    if tokenizer is None or teacher_tokenizer is None:
        missing = (
            "processing_class=<the student's tokenizer>"
            if tokenizer is None
            else (
                "teacher_processing_class=<the teacher's tokenizer> (the recipes load the one saved with the teacher)"
            )
        )
        raise ValueError(
            f"{sizes}. That is fine when one of them is only padded past a shared tokenizer, and wrong when the "
            f"teacher uses another tokenizer; to tell which, pass {missing}."
        )
    for role, candidate in (("student's", tokenizer), ("teacher's", teacher_tokenizer)):
        if len(candidate) > shared:
            raise ValueError(
                f"{sizes}, but the {role} tokenizer has {len(candidate)} tokens: ids {shared} and above exist on one "
                "side only, so the models do not share a vocabulary. Logit distillation needs one tokenizer: use a "
                "student built from the teacher (create_student), or resize the smaller embedding to the tokenizer; "
                "for causal LMs with different tokenizers, set cross_tokenizer (--cross_tokenizer exact|uld|hybrid)."
            )
    if tokenizer is not teacher_tokenizer and tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        mismatched = set(tokenizer.get_vocab().items()) ^ set(teacher_tokenizer.get_vocab().items())
        different = sorted(mismatched)[:3]
        raise ValueError(
            f"{sizes}, and the teacher's and the student's tokenizers map tokens to different ids (e.g. {different}): "
            "their logits are over different tokens. Logit distillation needs one shared tokenizer, or, for causal "
            "LMs, cross_tokenizer='exact'|'uld'|'hybrid' (--cross_tokenizer) to align the two tokenizations."
        )
    logger.info(
        f"Comparing the first {shared} vocabulary logits (teacher {teacher_vocab}, student {student_vocab}); "
        "the rows past them are padding that the tokenizer never produces."
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
            "teacher (create_student) or from the same model family; for causal LMs, cross_tokenizer="
            "'exact'|'uld'|'hybrid' (--cross_tokenizer) aligns the two tokenizations instead."
        )
