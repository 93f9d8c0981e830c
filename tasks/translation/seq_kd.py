"""Sequence-level KD for translation (Kim & Rush, 2016): the teacher's beam-search translations of the training
sources, generated once and kept in the sequence-KD cache (tasks/seq_kd_cache.py, which states when a cache is
reused or regenerated), then trained on alone or after the reference pairs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from datasets import Dataset
from transformers.utils import logging

from hf_distill.storage.fingerprint import model_fingerprint, texts_checksum, tokenizer_description
from hf_distill.tasks.common import seq_kd_cache
from hf_distill.tasks.common.generation_limits import bound_length, max_positions, vocabulary_constraint
from hf_distill.tasks.translation.args import DataArguments, Seq2SeqModelArguments, SeqKDArguments
from hf_distill.tasks.translation.data import TRANSLATION_COLUMN, LanguagePair, project_pairs, seq_kd_pairs
from hf_distill.tasks.translation.models import TranslationModels

logger = logging.get_logger(__name__)


def build_seq_kd_train_dataset(
    train: Dataset,
    models: TranslationModels,
    model_args: Seq2SeqModelArguments,
    data_args: DataArguments,
    seq_kd_args: SeqKDArguments,
    languages: LanguagePair,
    cache_dir: str,
    device: torch.device | str | None = None,
) -> Dataset:
    """The raw training set of sequence-level KD: the teacher's beam-search translations of the training
    sources (from the cache, generated if needed), alone (seq_kd_mix=none) or after the reference pairs
    (seq_kd_mix=concat)."""
    pairs = project_pairs(train, languages)
    sources = [pair[languages.source_key] for pair in pairs[TRANSLATION_COLUMN]]
    # The teacher writes at most as many tokens as its position table holds (lowered with a warning).
    max_length = bound_length(
        seq_kd_args.seq_kd_max_length or data_args.max_target_length,
        max_positions(models.teacher.config),
        "--seq_kd_max_length",
        "the teacher",
    )
    identity = seq_kd_cache.cache_identity(
        task="translation",
        teacher_name=model_args.teacher_model_name_or_path,
        teacher_fingerprint=model_fingerprint(models.teacher),
        tokenizer=tokenizer_description(models.tokenizer),
        vocab_size=models.vocab_size,
        inputs_checksum=texts_checksum(sources),
        num_inputs=len(sources),
        settings={
            "source_lang": languages.source_lang,
            "target_lang": languages.target_lang,
            "source_prefix": data_args.source_prefix or "",
            "max_source_length": data_args.max_source_length,
            "num_beams": seq_kd_args.seq_kd_num_beams,
            "max_length": max_length,
            "forced_bos_token": data_args.forced_bos_token,
        },
    )

    def generate() -> Dataset:
        teacher = models.teacher
        original_device = next(teacher.parameters()).device
        teacher.to(device or original_device)
        try:
            targets = translate_with_teacher(
                teacher,
                models.tokenizer,
                sources,
                source_prefix=data_args.source_prefix,
                max_source_length=data_args.max_source_length,
                num_beams=seq_kd_args.seq_kd_num_beams,
                max_length=max_length,
                batch_size=seq_kd_args.seq_kd_batch_size,
                forced_bos_token_id=models.forced_bos_token_id,
                vocab_size=models.vocab_size,
            )
        finally:
            teacher.to(original_device)
        if len(targets) != len(sources):
            raise RuntimeError(
                f"the teacher returned {len(targets)} translations for {len(sources)} sources."
            )
        return Dataset.from_dict({"source": sources, "target": targets})

    cached = seq_kd_cache.load_or_build(
        cache_dir, identity, generate, overwrite=seq_kd_args.seq_kd_overwrite_cache
    )
    distilled = seq_kd_pairs(cached, languages)
    if seq_kd_args.seq_kd_mix == "none":
        return distilled
    from datasets import concatenate_datasets

    return concatenate_datasets([pairs, distilled])


def translate_with_teacher(
    teacher: Any,
    tokenizer: Any,
    sources: Sequence[str],
    *,
    source_prefix: str | None = None,
    max_source_length: int,
    num_beams: int,
    max_length: int,
    batch_size: int = 32,
    forced_bos_token_id: int | None = None,
    device: torch.device | str | None = None,
    vocab_size: int | None = None,
) -> list[str]:
    """Beam-search translations of `sources` by `teacher`, decoded without special tokens, in input order.

    Sources are processed longest first, so that batches hold sentences of similar length (less padding)
    and an out-of-memory error shows up in the first batch rather than hours in. With `vocab_size` (the ids
    student and tokenizer share), a teacher whose vocabulary is padded past it never generates the padded ids,
    which the tokenizer cannot decode and the student cannot read.
    """
    device = torch.device(device) if device is not None else next(teacher.parameters()).device
    prefix = source_prefix or ""
    order = sorted(range(len(sources)), key=lambda index: len(sources[index]), reverse=True)
    translations: list[str | None] = [None] * len(sources)
    generate_kwargs: dict[str, Any] = {"num_beams": num_beams, "max_length": max_length, "do_sample": False}
    generate_kwargs.update(vocabulary_constraint(teacher, vocab_size))
    if forced_bos_token_id is not None:
        generate_kwargs["forced_bos_token_id"] = forced_bos_token_id
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.inference_mode():
            for batch_number, start in enumerate(range(0, len(order), batch_size)):
                indices = order[start : start + batch_size]
                encoded = tokenizer(
                    [prefix + sources[index] for index in indices],
                    max_length=max_source_length,
                    truncation=True,
                    padding=True,
                    return_tensors="pt",
                )
                generated = teacher.generate(
                    input_ids=encoded["input_ids"].to(device),
                    attention_mask=encoded["attention_mask"].to(device),
                    **generate_kwargs,
                )
                texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
                for index, text in zip(indices, texts):
                    translations[index] = text.strip()
                if batch_number % 50 == 0:
                    logger.info(
                        f"Sequence-level KD: {min(start + batch_size, len(order))}/{len(order)} translated"
                    )
    finally:
        teacher.train(was_training)
    return translations  # type: ignore[return-value]
