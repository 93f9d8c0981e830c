"""Sequence-level KD for causal LMs (Kim & Rush, 2016): the training rows with their completions replaced by the
teacher's own, generated once and kept in the sequence-KD cache (tasks/seq_kd_cache.py, which states when a cache
is reused or regenerated)."""

from __future__ import annotations

import os
from typing import Any

from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging

from hf_distill.storage.fingerprint import ids_checksum, model_fingerprint, tokenizer_description
from hf_distill.tasks.common import seq_kd_cache
from hf_distill.tasks.common.generation_limits import check_token_ids, max_positions, vocabulary_constraint
from hf_distill.tasks.lm.data import CausalLMCollator, prompt_ids_of
from hf_distill.training.on_policy import IGNORE_INDEX, generate_completions, prompt_token_lists

logger = logging.get_logger(__name__)


def _prompts_checksum(dataset: Dataset) -> str:
    rows = dataset.select_columns(["input_ids", "labels"]).with_format(None)
    return ids_checksum(prompt_ids_of(row) for row in rows)


def sequence_kd_dataset(
    teacher: PreTrainedModel,
    train_dataset: Dataset,
    cache_dir: str | os.PathLike,
    *,
    tokenizer: PreTrainedTokenizerBase,
    teacher_name: str,
    block_size: int,
    num_beams: int = 1,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    vocab_size: int | None = None,
    overwrite: bool = False,
) -> Dataset:
    """The training rows with their completions replaced by the teacher's (greedy, or beam search), cut to
    `block_size`; labels -100 on the prompt as before.

    vocab_size: the ids the student and tokenizer share (`generation_limits.shared_vocab_size`; default
    len(tokenizer)). The teacher never writes an id at or past it (a teacher whose embedding is padded past the
    tokenizer could otherwise), and a cache holding one is refused, naming --seq_kd_overwrite_cache. A batch whose
    longest prompt plus `max_new_tokens` exceeds the teacher's position limit gets only as many new tokens as fit,
    with a warning.

    Generated once and kept in the sequence-KD cache `cache_dir` (`seq_kd_cache.load_or_build`: reused when its
    manifest matches this teacher, tokenizer, prompts and settings, regenerated with a warning otherwise, and always
    with `overwrite`).
    """
    if vocab_size is None:
        vocab_size = len(tokenizer)
    identity = seq_kd_cache.cache_identity(
        task="causal_lm",
        teacher_name=teacher_name,
        teacher_fingerprint=model_fingerprint(teacher),
        tokenizer=tokenizer_description(tokenizer),
        vocab_size=vocab_size,
        inputs_checksum=_prompts_checksum(train_dataset),
        num_inputs=len(train_dataset),
        settings={"num_beams": num_beams, "max_new_tokens": max_new_tokens, "block_size": block_size},
    )

    def generate() -> Dataset:
        return _teacher_completions(
            teacher, train_dataset, tokenizer, block_size, num_beams, max_new_tokens, batch_size, vocab_size
        )

    def check(dataset: Dataset) -> None:
        _check_cached_ids(dataset, vocab_size, cache_dir)

    return seq_kd_cache.load_or_build(cache_dir, identity, generate, overwrite=overwrite, check=check)


def _teacher_completions(
    teacher: PreTrainedModel,
    train_dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    num_beams: int,
    max_new_tokens: int,
    batch_size: int,
    vocab_size: int,
) -> Dataset:
    collator = CausalLMCollator(tokenizer.pad_token_id)
    device = next(teacher.parameters()).device
    # Ids the student cannot read are never chosen; lengths stay inside the teacher's position table.
    constraint = vocabulary_constraint(teacher, vocab_size)
    teacher_positions = max_positions(teacher.config)
    cut_for_positions = False
    rows: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    source = train_dataset.select_columns(["input_ids", "attention_mask", "labels"]).with_format(None)
    for start in range(0, len(source), batch_size):
        batch = collator([source[i] for i in range(start, min(start + batch_size, len(source)))])
        batch = {key: value.to(device) for key, value in batch.items()}
        batch_new_tokens = max_new_tokens
        if teacher_positions is not None:
            longest_prompt = max(prompt.numel() for prompt in prompt_token_lists(batch))
            # Prompts shorter than block_size <= the limit (tokenization drops the others): at least 1 new token.
            batch_new_tokens = max(1, min(max_new_tokens, teacher_positions - longest_prompt))
            if batch_new_tokens < max_new_tokens and not cut_for_positions:
                cut_for_positions = True
                logger.warning(
                    f"--seq_kd_max_new_tokens {max_new_tokens}: prompts of {longest_prompt} tokens plus that many "
                    f"new tokens exceed the teacher's {teacher_positions} positions (max_position_embeddings); "
                    f"the completions of such batches stop at the limit ({batch_new_tokens} new tokens here)."
                )
        generated = generate_completions(
            teacher,
            batch,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            max_new_tokens=batch_new_tokens,
            do_sample=False,
            num_beams=num_beams,
            **constraint,
        )
        for input_ids, mask, labels in zip(
            *(generated[key].cpu() for key in ("input_ids", "attention_mask", "labels"))
        ):
            length = min(int(mask.sum()), block_size)
            row_labels = labels[:length].tolist()
            if all(label == IGNORE_INDEX for label in row_labels):
                continue  # the prompt fills the block
            rows["input_ids"].append(input_ids[:length].tolist())
            rows["attention_mask"].append([1] * length)
            rows["labels"].append(row_labels)
    if not rows["input_ids"]:
        raise ValueError(f"the teacher's completions left no trainable row within --block_size {block_size}.")
    return Dataset.from_dict(rows)


def _check_cached_ids(dataset: Dataset, vocab_size: int, cache_dir: Any) -> None:
    """Refuse (ValueError) cached rows holding a token id the student cannot read."""
    import pyarrow.compute as pc

    bounds = pc.min_max(pc.list_flatten(dataset.data.column("input_ids"))).as_py()  # one pass, in Arrow
    if bounds["min"] is not None and (bounds["min"] < 0 or bounds["max"] >= vocab_size):
        check_token_ids(
            dataset.with_format(None)["input_ids"],
            vocab_size,
            what=f"the sequence-KD cache {cache_dir}",
            fix="It was written by a teacher whose generation was not restricted to that vocabulary; rebuild it "
            "with --seq_kd_overwrite_cache (or delete the directory).",
        )
