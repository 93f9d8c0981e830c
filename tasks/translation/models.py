"""Translation models: teacher, tokenizer and student factory with the checks that must pass before training
(encoder-decoder models, one vocabulary, language codes of multilingual tokenizers), and generation as the
report times it."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging

from hf_distill.tasks.common.arguments import LoadingArguments
from hf_distill.tasks.common.generation_limits import min_positions, model_vocab_size, shared_vocab_size
from hf_distill.tasks.common.loading import freeze_input_embeddings, load_pretrained
from hf_distill.tasks.translation.args import DataArguments, Seq2SeqModelArguments
from hf_distill.tasks.translation.data import LanguagePair

logger = logging.get_logger(__name__)

# Tokenizers that need src_lang/tgt_lang set to language codes (en_XX, eng_Latn, ...), as in run_translation.py.
_MULTILINGUAL_TOKENIZERS = (
    "MBartTokenizer",
    "MBartTokenizerFast",
    "MBart50Tokenizer",
    "MBart50TokenizerFast",
    "NllbTokenizer",
    "NllbTokenizerFast",
    "M2M100Tokenizer",
)


def is_multilingual_tokenizer(tokenizer: Any) -> bool:
    return type(tokenizer).__name__ in _MULTILINGUAL_TOKENIZERS


def check_vocabularies(
    teacher_config: PretrainedConfig,
    student_config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase | None = None,
) -> None:
    """Word-level KD compares the decoders' logits token by token, so teacher and student must share a
    vocabulary. Embedding matrices padded past the tokenizer (to a multiple of 8 or 64) are fine."""
    fix = (
        "Build the student from the teacher (--student_num_layers / --student_num_decoder_layers), or use a "
        "student trained with the teacher's tokenizer."
    )
    if student_tokenizer is not None and student_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"The student's tokenizer ({type(student_tokenizer).__name__}, {len(student_tokenizer)} tokens) and the "
            f"teacher's ({type(tokenizer).__name__}, {len(tokenizer)} tokens) have different vocabularies, so their "
            f"logits are over different tokens and cannot be distilled word by word. {fix}"
        )
    teacher_vocab = teacher_config.get_text_config().vocab_size
    student_vocab = student_config.get_text_config().vocab_size
    if teacher_vocab != student_vocab and min(teacher_vocab, student_vocab) < len(tokenizer):
        raise ValueError(
            f"The teacher's vocabulary has {teacher_vocab} tokens and the student's {student_vocab}, and the smaller "
            f"does not cover the teacher's tokenizer ({len(tokenizer)} tokens): the models do not share a tokenizer, "
            f"which word-level KD needs. {fix}"
        )


def _load_student_tokenizer(path: str, loading_args: LoadingArguments) -> PreTrainedTokenizerBase | None:
    """The tokenizer stored with a pretrained student, or None when it has none."""
    if Path(path).is_dir() and not (Path(path) / "tokenizer_config.json").is_file():
        return None  # save_pretrained of any tokenizer writes tokenizer_config.json
    try:
        return load_pretrained(AutoTokenizer, path, role="student tokenizer", loading_args=loading_args)
    except (OSError, ValueError, TypeError):
        return None


def resolve_token_id(tokenizer: PreTrainedTokenizerBase, token: str, flag: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(
            f"{flag} {token!r} is not a token of the teacher's tokenizer ({type(tokenizer).__name__}); pass one of "
            "its language codes (mBART-50: de_DE, NLLB: deu_Latn)."
        )
    return int(token_id)


@dataclass
class TranslationModels:
    teacher: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    make_student: Callable[
        [], PreTrainedModel
    ]  # a fresh student each call (same initialisation under a seed)
    forced_bos_token_id: int | None = None
    # The fewest positions teacher and student hold (max_position_embeddings); None when neither has a limit (T5).
    max_positions: int | None = None
    # Ids the student and the tokenizer share: min(len(tokenizer), the student's vocab_size).
    vocab_size: int | None = None


def load_translation_models(
    model_args: Seq2SeqModelArguments, data_args: DataArguments, languages: LanguagePair
) -> TranslationModels:
    """Teacher, tokenizer and student factory, checked before anything trains.

    Errors: the teacher is not an encoder-decoder model; teacher and student vocabularies differ; an unknown
    --forced_bos_token; a model that cannot be found offline. Warns for T5 without --source_prefix.
    """
    teacher_path = model_args.teacher_model_name_or_path
    teacher_config = load_pretrained(AutoConfig, teacher_path, role="teacher", loading_args=model_args)
    if not getattr(teacher_config, "is_encoder_decoder", False):
        raise ValueError(
            f"The teacher {teacher_path!r} ({teacher_config.model_type}) is not an encoder-decoder model; this recipe "
            "distils translation models such as Marian (opus-mt), T5, BART/mBART or NLLB."
        )
    tokenizer = load_pretrained(
        AutoTokenizer, model_args.tokenizer_name or teacher_path, role="tokenizer", loading_args=model_args
    )
    if teacher_config.model_type == "t5" and data_args.source_prefix is None:
        logger.warning(
            "You're running a t5 model but didn't provide a source prefix, which is expected, e.g. with "
            "`--source_prefix 'translate English to German: '`"
        )
    if is_multilingual_tokenizer(tokenizer):
        tokenizer.src_lang, tokenizer.tgt_lang = languages.source_lang, languages.target_lang

    student_config = None
    if model_args.student_model_name_or_path is not None:
        student_path = model_args.student_model_name_or_path
        student_config = load_pretrained(AutoConfig, student_path, role="student", loading_args=model_args)
        if not getattr(student_config, "is_encoder_decoder", False):
            raise ValueError(
                f"The student {student_path!r} ({student_config.model_type}) is not an encoder-decoder model."
            )
        student_tokenizer = (
            None if model_args.tokenizer_name else _load_student_tokenizer(student_path, model_args)
        )
        check_vocabularies(teacher_config, student_config, tokenizer, student_tokenizer)

    teacher = load_pretrained(
        AutoModelForSeq2SeqLM, teacher_path, role="teacher", loading_args=model_args, config=teacher_config
    )
    forced_bos_token_id = None
    if data_args.forced_bos_token is not None:
        forced_bos_token_id = resolve_token_id(tokenizer, data_args.forced_bos_token, "--forced_bos_token")
    _configure_generation(teacher, tokenizer, languages, forced_bos_token_id)

    def make_student() -> PreTrainedModel:
        if student_config is not None:
            student = load_pretrained(
                AutoModelForSeq2SeqLM,
                model_args.student_model_name_or_path,
                role="student",
                loading_args=model_args,
                config=copy.deepcopy(student_config),
            )
        else:
            from hf_distill import create_student

            layers = model_args.student_layer_indices()
            decoder_layers = model_args.student_decoder_layer_indices()
            student = create_student(
                teacher,
                num_hidden_layers=model_args.student_num_layers,
                layers="uniform" if layers is None else layers,
                num_decoder_layers=model_args.student_num_decoder_layers,
                decoder_layers="uniform" if decoder_layers is None else decoder_layers,
            )
        _configure_generation(student, tokenizer, languages, forced_bos_token_id)
        if model_args.freeze_embeddings:
            logger.info(
                f"Froze {freeze_input_embeddings(student):,} input-embedding parameters of the student."
            )
        return student

    # A student built from the teacher keeps the teacher's vocabulary and position table.
    student_or_teacher = student_config if student_config is not None else teacher_config
    return TranslationModels(
        teacher,
        tokenizer,
        make_student,
        forced_bos_token_id,
        max_positions=min_positions(teacher_config, student_config),
        vocab_size=shared_vocab_size(tokenizer, model_vocab_size(student_or_teacher)),
    )


def _configure_generation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    languages: LanguagePair,
    forced_bos_token_id: int | None,
) -> None:
    """mBART starts decoding with the target language code; mBART-50/NLLB force it as the first token."""
    if getattr(model.config, "decoder_start_token_id", None) is None and is_multilingual_tokenizer(tokenizer):
        model.config.decoder_start_token_id = resolve_token_id(
            tokenizer, languages.target_lang, "--target_lang"
        )
    if getattr(model.config, "decoder_start_token_id", None) is None:
        raise ValueError(
            f"{type(model).__name__} has no decoder_start_token_id in its config.json; set it (the pad id for T5 "
            "and Marian, the bos or eos id for BART, the target language code for mBART)."
        )
    if forced_bos_token_id is not None:
        model.generation_config.forced_bos_token_id = forced_bos_token_id


class GenerationLatency(nn.Module):
    """A seq2seq model whose forward pass is `generate`, so that `report.measure_latency` times translation
    (what a user of the model waits for) rather than one teacher-forced forward pass. `count_parameters` and
    `size_on_disk_mb` see the wrapped model unchanged."""

    def __init__(self, model: PreTrainedModel, **generate_kwargs: Any):
        super().__init__()
        self.model = model
        self.generate_kwargs = {key: value for key, value in generate_kwargs.items() if value is not None}

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model.generate(**inputs, **self.generate_kwargs)

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
        self.model.save_pretrained(*args, **kwargs)
