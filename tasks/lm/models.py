"""Causal-LM models: the tokenizer teacher and student share, loading the teacher, building or loading the student,
their vocabulary and position limits, and LoRA students (peft)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging

from hf_distill.tasks.common.arguments import LoadingArguments
from hf_distill.tasks.common.generation_limits import min_positions, model_vocab_size
from hf_distill.tasks.common.loading import build_student, load_pretrained
from hf_distill.tasks.lm.args import LMModelArguments, LoraArguments, TeacherArguments

logger = logging.get_logger(__name__)

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
)


def _local_dir(name_or_path: str) -> Path | None:
    path = Path(name_or_path).expanduser()
    return path if path.is_dir() else None


def _has_tokenizer(name_or_path: str) -> bool:
    """Whether a tokenizer can be expected at `name_or_path`: a local directory with tokenizer files, or a Hub name."""
    directory = _local_dir(name_or_path)
    if directory is None:
        return True
    return any((directory / name).is_file() for name in _TOKENIZER_FILES)


def _load_tokenizer(name_or_path: str, role: str, loading_args: LoadingArguments) -> PreTrainedTokenizerBase:
    tokenizer = load_pretrained(AutoTokenizer, name_or_path, role=role, loading_args=loading_args)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"the {role} {name_or_path!r} has neither a pad nor an eos token to pad batches with; add a pad "
                "token to it (tokenizer.add_special_tokens) and save it."
            )
        # GPT-2 style: padding is masked everywhere (attention 0, labels -100), so eos can stand in for it.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizers(
    model_args: LMModelArguments | TeacherArguments, *, cross_tokenizer: bool = False
) -> tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase | None]:
    """(the run's tokenizer, the teacher's tokenizer: the same object when both come from one place, None when the
    teacher directory holds none and none was named).

    The run's tokenizer is --tokenizer_name, else the student directory's, else the teacher's. The teacher's is
    --teacher_tokenizer_name, else the teacher directory's. Different vocabularies raise here, before training,
    unless `cross_tokenizer` (--cross_tokenizer) allows them.
    """
    from hf_distill.training.teacher import check_same_tokenizer

    teacher_path = model_args.teacher_model_name_or_path
    student_path = getattr(model_args, "student_model_name_or_path", None)
    teacher_source = model_args.teacher_tokenizer_name or (
        teacher_path if _has_tokenizer(teacher_path) else None
    )
    run_source = model_args.tokenizer_name or (
        student_path if student_path is not None and _has_tokenizer(student_path) else teacher_source
    )
    if run_source is None:
        raise ValueError(
            f"no tokenizer found: the teacher directory {teacher_path!r} holds none; pass --tokenizer_name (or "
            "--teacher_tokenizer_name) with the tokenizer teacher and student share."
        )
    tokenizer = _load_tokenizer(run_source, "tokenizer", model_args)
    teacher_tokenizer = tokenizer if teacher_source == run_source else None
    if teacher_source is not None and teacher_source != run_source:
        teacher_tokenizer = _load_tokenizer(teacher_source, "teacher tokenizer", model_args)
        if cross_tokenizer:
            return tokenizer, teacher_tokenizer
        try:
            check_same_tokenizer(tokenizer, teacher_tokenizer)
        except ValueError as error:
            raise ValueError(
                f"{error} (student tokenizer {run_source!r}: {len(tokenizer)} tokens; teacher tokenizer "
                f"{teacher_source!r}: {len(teacher_tokenizer)} tokens)"
            ) from None
    return tokenizer, teacher_tokenizer


def load_causal_lm(
    name_or_path: str, role: str, loading_args: LoadingArguments, **kwargs: Any
) -> PreTrainedModel:
    config = load_pretrained(AutoConfig, name_or_path, role=role, loading_args=loading_args)
    if config.is_encoder_decoder:
        raise ValueError(
            f"the {role} {name_or_path!r} is an encoder-decoder model ({config.model_type}); this recipe distils "
            "causal (decoder-only) language models."
        )
    return load_pretrained(
        AutoModelForCausalLM, name_or_path, role=role, loading_args=loading_args, config=config, **kwargs
    )


def load_teacher(model_args: LMModelArguments | TeacherArguments) -> PreTrainedModel:
    # dtype="auto" keeps the checkpoint's dtype (a bf16 teacher stays bf16); --teacher_dtype can cast it.
    return load_causal_lm(model_args.teacher_model_name_or_path, "teacher", model_args, dtype="auto")


def check_vocabulary(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, role: str) -> None:
    vocab = model.config.get_text_config().vocab_size
    if vocab < len(tokenizer):
        raise ValueError(
            f"the {role} has {vocab} vocabulary rows but the tokenizer has {len(tokenizer)} tokens: they do not "
            "belong together. Teacher and student must share one tokenizer."
        )


def student_vocab_size(model_args: LMModelArguments, teacher: PreTrainedModel) -> int:
    """The student's vocabulary rows, known before it is built: its config's, or the teacher's when the student
    is built from the teacher's layers."""
    if model_args.student_model_name_or_path is None:
        return model_vocab_size(teacher)
    config = load_pretrained(
        AutoConfig, model_args.student_model_name_or_path, role="student", loading_args=model_args
    )
    return model_vocab_size(config)


def make_student(
    model_args: LMModelArguments, teacher: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase
) -> PreTrainedModel:
    """The student: loaded from --student_model_name_or_path, or built from the teacher's layers."""
    if model_args.student_model_name_or_path is None and teacher is None:
        raise ValueError(
            "building the student from the teacher (--student_num_layers) needs the teacher loaded."
        )

    def load_student(path: str) -> PreTrainedModel:
        return load_causal_lm(path, "student", model_args)

    student = build_student(model_args, teacher, load_student)
    check_vocabulary(student, tokenizer, "student")
    return student


def apply_lora(student: PreTrainedModel, lora_args: LoraArguments, base_model_dir: str | None = None) -> Any:
    """The student wrapped in LoRA adapters (peft); only the adapters train.

    base_model_dir: where the student's own weights are saved (for a student built from the teacher, which exists
    nowhere else); the adapters then name it as their base model, so `PeftModel.from_pretrained` finds it.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    if base_model_dir is not None:
        student.name_or_path = base_model_dir
        student.config._name_or_path = base_model_dir

    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=lora_args.target_modules,
    )
    try:
        model = get_peft_model(student, config)
    except ValueError as error:
        raise ValueError(f"{error} (--lora_target_modules {lora_args.lora_target_modules!r})") from error
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(f"LoRA student: {trainable:,} trainable parameters of {total:,}.")
    return model


def merge_lora(model: Any) -> PreTrainedModel:
    """A plain model with the adapters merged into its weights; `model` itself is left as it is."""
    from hf_distill.training.teacher import unwrap_model

    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if not hasattr(model, "merge_and_unload"):
        raise ValueError(f"--merge_lora needs a peft model, got {type(unwrap_model(model)).__name__}.")
    return copy.deepcopy(model).merge_and_unload()


def position_limit(model_args: LMModelArguments | TeacherArguments) -> int | None:
    """The fewest positions the teacher's and the student's configs allow (max_position_embeddings, n_positions
    for GPT-2); None when neither declares a limit. Read from the configs alone, before any weights load."""
    teacher_path = model_args.teacher_model_name_or_path
    configs = [load_pretrained(AutoConfig, teacher_path, role="teacher", loading_args=model_args)]
    student_path = getattr(model_args, "student_model_name_or_path", None)
    if student_path is not None:
        configs.append(load_pretrained(AutoConfig, student_path, role="student", loading_args=model_args))
    return min_positions(*configs)
