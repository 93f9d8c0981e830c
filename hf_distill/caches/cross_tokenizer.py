"""Teacher logits caches for a teacher with its own tokenizer (`cross_tokenizer`, hf_distill/cross_tokenizer.py).

The cache is built from the training rows of raw text, which both tokenizers read: each row is tokenized by the
student's and the teacher's tokenizer and aligned (`CrossTokenizerCollator`: the student positions paired with a
teacher position), the teacher runs on its own ids, and only the paired positions are stored, per row:

    teacher_aligned_student_positions  int32, P_i values: the student positions that have a teacher position
    teacher_aligned_teacher_positions  int32, P_i values: the teacher position paired with each (for reference)
    teacher_topk_logprobs              P_i * k values: the teacher's top k at temperature 1, ranked (as format 3)
    teacher_topk_indices               int32, P_i * k values: their ids in the teacher's vocabulary
    teacher_mapped_tail_logmass        float32, P_i values: log sum_j p_j**(1/T) over the teacher's tokens outside
                                       the top k that the vocabulary map pairs with a student token
    teacher_unmapped_tail_logmass      float32, P_i values: the same over those it does not

The remaining mass is split by the vocabulary map because the exact loss needs the teacher's mass on the mapped
tokens and the hybrid loss its mass on the others (`losses.cached_cross_tokenizer_distillation_loss`, which defines
how the top k stand in for the full distribution). The manifest's `cross_tokenizer` section records both
tokenizers by `tokenizer_fingerprint` (a hash of their whole definition: vocabulary, merges, normalizer,
pre-tokenizer, post-processor), so the alignment and the vocabulary map at training time are the ones the cache
was built with; a run with another teacher or student tokenizer is refused (`verify_cross_tokenizer_manifest`),
as is one on other rows of text (a checksum of them), another block size, or a cache whose positions were paired by
another alignment rule (`cross_tokenizer.ALIGNMENT_VERSION`: rule 1 paired positions that had not read the same
text). A row whose text is missing or not a string is refused, naming the row.

At training time the student's ids come from its own tokenizer again (`CachedCrossTokenizerCollator`), and the
cached rows are spread over its positions; the teacher is neither loaded nor tokenized for.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from hf_distill.alignment.collator import ALIGNED_COLUMN, TEXT_COLUMN, CrossTokenizerCollator, row_text
from hf_distill.alignment.positions import ALIGNMENT_VERSION
from hf_distill.alignment.vocabulary import vocabulary_map
from hf_distill.caches.format import (
    DATA_DIR,
    INDICES_COLUMN,
    LOGPROBS_COLUMN,
    MAPPED_TAIL_COLUMN,
    STUDENT_POSITIONS_COLUMN,
    TEACHER_POSITIONS_COLUMN,
    UNMAPPED_TAIL_COLUMN,
    check_tail_temperature,
    read_manifest,
)
from hf_distill.caches.manifest import build_manifest
from hf_distill.caches.topk import (
    cache_features,
    cached_vocab_size,
    check_build_options,
    index_dtype,
    numpy_dtype,
    write_cache,
)
from hf_distill.storage.fingerprint import texts_checksum, tokenizer_description

logger = logging.get_logger(__name__)

CROSS_CACHE_COLUMNS = (
    STUDENT_POSITIONS_COLUMN,
    TEACHER_POSITIONS_COLUMN,
    LOGPROBS_COLUMN,
    INDICES_COLUMN,
    MAPPED_TAIL_COLUMN,
    UNMAPPED_TAIL_COLUMN,
)
_EXTRA_FEATURES = {
    STUDENT_POSITIONS_COLUMN: "int32",
    TEACHER_POSITIONS_COLUMN: "int32",
    MAPPED_TAIL_COLUMN: "float32",
    UNMAPPED_TAIL_COLUMN: "float32",
}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of a fast tokenizer's definition (`backend_tokenizer.to_str()`: vocabulary, merges, normalizer,
    pre-tokenizer, post-processor, added tokens), keys sorted, without the truncation and padding settings that
    the last call left in it; with the special-token roles transformers adds. Equal for a saved and reloaded copy."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow tokenizer; a cross-tokenizer cache needs fast tokenizers (with "
            "character offsets)."
        )
    spec = json.loads(backend.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    roles = {name: str(value) for name, value in sorted(tokenizer.special_tokens_map.items())}
    text = json.dumps({"backend": spec, "special_tokens": roles}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _describe(tokenizer: Any) -> dict[str, Any]:
    return {**tokenizer_description(tokenizer), "fingerprint": tokenizer_fingerprint(tokenizer)}


def teacher_topk_split_tail(
    logits: torch.Tensor, top_k: int, vocab_size: int, mapped: torch.Tensor, *, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, V) teacher logits -> top-k log-probabilities at temperature 1 (P, k), their ids (P, k), and the other
    tokens' tempered mass log sum_j p_j**(1/T), (P,) over those with a student counterpart (`mapped`, (vocab,)
    bool) and (P,) over the rest (-inf where there are none). Over the first `vocab_size` columns."""
    log_probs = torch.log_softmax(logits[..., :vocab_size].float(), dim=-1)
    values, indices = torch.topk(log_probs, top_k, dim=-1)
    others = log_probs.scatter(-1, indices, -math.inf).div_(temperature)
    mapped_tail = others.masked_fill(~mapped, -math.inf).logsumexp(-1)
    unmapped_tail = others.masked_fill(mapped, -math.inf).logsumexp(-1)
    return values, indices, mapped_tail, unmapped_tail


# --------------------------------------------------------------------------------------------- building
def build_cross_tokenizer_cache(
    teacher: nn.Module,
    dataset: Any,
    cache_dir: str | os.PathLike,
    *,
    tokenizer: Any,
    teacher_tokenizer: Any,
    teacher_name: str,
    block_size: int,
    temperature: float,
    top_k: int = 64,
    teacher_max_length: int | None = None,
    batch_size: int = 8,
    logprobs_dtype: str = "float32",
    overwrite: bool = False,
    device: torch.device | str | None = None,
    extra_manifest: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Cache `teacher`'s top k at the positions of each row of raw text (`dataset`'s `text` column, the rows a
    --cross_tokenizer run trains on) that pair with a position of the student's tokenization (`tokenizer`, cut at
    `block_size` tokens; the teacher's at `teacher_max_length`), atomically. Returns the manifest."""
    check_build_options(temperature, logprobs_dtype, dataset, column=TEXT_COLUMN)
    vocab_size = cached_vocab_size(teacher, teacher_tokenizer)
    if not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be in [1, {vocab_size}] (the teacher's vocabulary size), got {top_k}.")
    collator = CrossTokenizerCollator(
        tokenizer, teacher_tokenizer, max_length=block_size, teacher_max_length=teacher_max_length
    )
    _, teacher_ids = vocabulary_map(tokenizer, teacher_tokenizer)
    mapped = torch.zeros(vocab_size, dtype=torch.bool)
    mapped[teacher_ids[teacher_ids < vocab_size]] = True
    device = torch.device(device if device is not None else next(teacher.parameters()).device)
    mapped = mapped.to(device)
    was_training = teacher.training
    teacher.eval().to(device)
    store = numpy_dtype(logprobs_dtype)
    texts = [
        row_text({TEXT_COLUMN: text}, TEXT_COLUMN, i, "the dataset")
        for i, text in enumerate(dataset.with_format(None)[TEXT_COLUMN])
    ]
    counted = {"pairs": 0}

    def batches() -> Iterator[dict[str, list]]:
        for start in range(0, len(texts), batch_size):
            batch = collator([{TEXT_COLUMN: text} for text in texts[start : start + batch_size]])
            with torch.no_grad():
                logits = teacher(
                    input_ids=batch["teacher_input_ids"].to(device),
                    attention_mask=batch["teacher_attention_mask"].to(device),
                ).logits  # (B, T_t, V_t)
            columns: dict[str, list] = {name: [] for name in CROSS_CACHE_COLUMNS}
            for i, aligned in enumerate(batch[ALIGNED_COLUMN]):
                student_positions = aligned.ge(0).nonzero().squeeze(-1)  # (P_i,)
                teacher_positions = aligned[student_positions]
                values, ids, mapped_tail, unmapped_tail = teacher_topk_split_tail(
                    logits[i, teacher_positions.to(device)],
                    top_k,
                    vocab_size,
                    mapped,
                    temperature=temperature,
                )
                columns[STUDENT_POSITIONS_COLUMN].append(student_positions.numpy().astype(np.int32))
                columns[TEACHER_POSITIONS_COLUMN].append(teacher_positions.numpy().astype(np.int32))
                columns[LOGPROBS_COLUMN].append(values.cpu().numpy().astype(store).reshape(-1))
                columns[INDICES_COLUMN].append(ids.cpu().numpy().astype(index_dtype(vocab_size)).reshape(-1))
                columns[MAPPED_TAIL_COLUMN].append(mapped_tail.cpu().numpy().astype(np.float32))
                columns[UNMAPPED_TAIL_COLUMN].append(unmapped_tail.cpu().numpy().astype(np.float32))
                counted["pairs"] += student_positions.numel()
            yield columns

    def manifest() -> dict[str, Any]:
        cross = {
            "alignment_version": ALIGNMENT_VERSION,
            "student_tokenizer": _describe(tokenizer),
            "teacher_tokenizer": _describe(teacher_tokenizer),
            "vocabulary_map_size": int(teacher_ids.numel()),
            "teacher_max_length": teacher_max_length,
        }
        return build_manifest(
            teachers=[(teacher_name, teacher)],
            tokenizer=tokenizer,
            top_k=top_k,
            block_size=block_size,
            num_rows=len(texts),
            num_tokens=counted["pairs"],
            data_checksum=texts_checksum(texts),
            logprobs_dtype=logprobs_dtype,
            vocab_size=vocab_size,
            tail_temperature=temperature,
            extra={
                **dict(extra_manifest or {}),
                "cross_tokenizer": cross,
                "layout": "rows of text; per row the aligned student positions, and flat (pair, rank) values",
            },
        )

    start_time = time.perf_counter()
    features = cache_features(
        logprobs_dtype, _EXTRA_FEATURES, tail=False, vocab_size=vocab_size
    )  # the tail is split in two
    try:
        result = write_cache(cache_dir, features, batches(), manifest, overwrite=overwrite)
    finally:
        teacher.train(was_training)
    logger.info(
        f"Cached the teacher's top-{top_k} log-probabilities at {result['num_tokens']} aligned positions of "
        f"{len(texts)} rows of text in {cache_dir}, for --cross_tokenizer training at temperature {temperature:g} "
        f"({time.perf_counter() - start_time:.1f}s)."
    )
    return result


# --------------------------------------------------------------------------------------------- loading
def verify_cross_tokenizer_manifest(
    manifest: Mapping[str, Any],
    *,
    tokenizer: Any,
    teacher_tokenizer: Any,
    block_size: int | None = None,
    texts: list[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> None:
    """Raise ValueError listing every way a cross-tokenizer cache differs from the run: not a cross-tokenizer
    cache, another teacher tokenizer, another student tokenizer, (when given) another block size or other rows."""
    where = f"teacher logits cache {str(cache_dir)!r}" if cache_dir is not None else "teacher logits cache"
    cross = manifest.get("cross_tokenizer")
    if manifest.get("kind") != "teacher_topk_logprobs" or not cross:
        raise ValueError(
            f"The {where} holds the teacher's distributions over the student's own tokens (built without "
            "--student_tokenizer_name), not at the positions of a teacher with another tokenizer. Rebuild it with "
            "scripts/cache_teacher_logits.py --student_tokenizer_name <the student's tokenizer> for --cross_tokenizer "
            "runs, or train without --cross_tokenizer."
        )
    problems = []
    if cross.get("alignment_version") != ALIGNMENT_VERSION:
        problems.append(
            f"it pairs positions by alignment rule {cross.get('alignment_version', 1)}, this version of hf_distill by "
            f"rule {ALIGNMENT_VERSION} (rule 1 paired positions that had not read the same text)"
        )
    cached_teacher = cross.get("teacher_tokenizer", {})
    if cached_teacher.get("fingerprint") != tokenizer_fingerprint(teacher_tokenizer):
        name = getattr(teacher_tokenizer, "name_or_path", None)
        problems.append(
            f"it was built with another teacher tokenizer ({cached_teacher.get('name_or_path')!r}, "
            f"{cached_teacher.get('vocab_size')} tokens) than this run's ({name!r}, "
            f"{len(teacher_tokenizer)} tokens): pass the tokenizer the cache was built with as "
            "--teacher_tokenizer_name (by default the one in --teacher_model_name_or_path is used)"
        )
    cached_student = cross.get("student_tokenizer", {})
    if cached_student.get("fingerprint") != tokenizer_fingerprint(tokenizer):
        name = getattr(tokenizer, "name_or_path", None)
        problems.append(
            f"it was built for another student tokenizer ({cached_student.get('name_or_path')!r}, "
            f"{cached_student.get('vocab_size')} tokens) than this run's ({name!r}, "
            f"{len(tokenizer)} tokens, from --tokenizer_name or --student_model_name_or_path): rebuild it with "
            "--student_tokenizer_name set to this run's student tokenizer"
        )
    if block_size is not None and manifest.get("block_size") != block_size:
        problems.append(
            f"it was built with block_size {manifest.get('block_size')}, this run uses {block_size}"
        )
    if texts is not None and (
        manifest.get("num_rows") != len(texts) or manifest.get("data_checksum") != texts_checksum(texts)
    ):
        problems.append(
            f"it was built on other rows of text ({manifest.get('num_rows')} rows; this run has {len(texts)})"
        )
    if problems:
        raise ValueError(
            f"The {where} does not match this --cross_tokenizer run: "
            + "; ".join(problems)
            + ". Rebuild it with scripts/cache_teacher_logits.py --student_tokenizer_name ... and the same data, "
            "--teacher_tokenizer_name and --block_size flags as this run."
        )


def load_cross_tokenizer_cache(
    cache_dir: str | os.PathLike,
    train_dataset: Any,
    *,
    tokenizer: Any,
    teacher_tokenizer: Any,
    block_size: int | None,
    temperature: float | None = None,
) -> tuple[Any, dict[str, Any]]:
    """`train_dataset` (rows of raw text, a `text` column) with the cache's columns added, after checking the
    manifest against the run (`verify_cross_tokenizer_manifest`; with `temperature`, also the tails'
    temperature). Returns (dataset in numpy format, manifest); batch it with `CachedCrossTokenizerCollator`."""
    from datasets import concatenate_datasets, load_from_disk

    manifest = read_manifest(cache_dir)
    texts = [
        row_text({TEXT_COLUMN: text}, TEXT_COLUMN, i, "the training dataset")
        for i, text in enumerate(train_dataset.with_format(None)[TEXT_COLUMN])
    ]
    verify_cross_tokenizer_manifest(
        manifest,
        tokenizer=tokenizer,
        teacher_tokenizer=teacher_tokenizer,
        block_size=block_size,
        texts=texts,
        cache_dir=cache_dir,
    )
    if temperature is not None:
        check_tail_temperature(manifest, temperature, cache_dir)
    cache = load_from_disk(str(Path(cache_dir) / DATA_DIR))
    missing = [column for column in CROSS_CACHE_COLUMNS if column not in cache.column_names]
    if missing or len(cache) != len(train_dataset):
        raise ValueError(
            f"teacher logits cache {str(cache_dir)!r} is damaged: {len(cache)} rows with columns "
            f"{cache.column_names}, expected {len(train_dataset)} rows with {list(CROSS_CACHE_COLUMNS)}. Rebuild it."
        )
    clashing = [column for column in CROSS_CACHE_COLUMNS if column in train_dataset.column_names]
    if clashing:
        train_dataset = train_dataset.remove_columns(clashing)
    combined = concatenate_datasets([train_dataset, cache], axis=1)
    logger.info(
        f"Training from the cross-tokenizer teacher logits cache {cache_dir}: top-{manifest['top_k']} "
        f"log-probabilities of {manifest['teacher']!r} at {manifest['num_tokens']} aligned positions of "
        f"{manifest['num_rows']} rows."
    )
    return combined.with_format("numpy"), manifest


@dataclass
class CachedCrossTokenizerCollator:
    """The student's side of `CrossTokenizerCollator` (its tokenization of each row's `text`, cut at `max_length`:
    `input_ids`, `attention_mask`, `labels` with -100 on padding), plus, for rows with cached columns, the cache
    spread over the student's positions: `teacher_aligned_positions` (B, T_s), the paired teacher position or -1,
    `teacher_topk_logprobs` (B, T_s, k) float32, `teacher_topk_indices` (B, T_s, k) long and the two tails
    (B, T_s) float32 (zeros where nothing is paired). Right padding."""

    tokenizer: Any
    max_length: int | None = None
    text_column: str = TEXT_COLUMN

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [
            self.tokenizer(
                row_text(feature, self.text_column, i),
                truncation=self.max_length is not None,
                max_length=self.max_length,
            )["input_ids"]
            for i, feature in enumerate(features)
        ]
        length = max(max(len(row) for row in rows), 1)
        pad = next(
            (int(c) for c in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id) if c is not None), 0
        )
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask == 0, -100),
        }
        if STUDENT_POSITIONS_COLUMN in features[0]:
            batch.update(self._cached(features, [len(row) for row in rows], length))
        return batch

    @staticmethod
    def _cached(
        features: list[Mapping[str, Any]], lengths: list[int], length: int
    ) -> dict[str, torch.Tensor]:
        positions = [np.asarray(feature[STUDENT_POSITIONS_COLUMN], dtype=np.int64) for feature in features]
        sizes = [np.asarray(feature[INDICES_COLUMN]).size for feature in features]
        k = next((size // p.size for size, p in zip(sizes, positions) if p.size), 1)
        batch_size = len(features)
        aligned = np.full((batch_size, length), -1, dtype=np.int64)
        logprobs = np.zeros((batch_size, length, k), dtype=np.float32)
        indices = np.zeros((batch_size, length, k), dtype=np.int64)
        mapped_tail = np.zeros((batch_size, length), dtype=np.float32)
        unmapped_tail = np.zeros((batch_size, length), dtype=np.float32)
        for i, (feature, where) in enumerate(zip(features, positions)):
            if where.size and int(where.max()) >= lengths[i]:
                raise ValueError(
                    f"a cached row pairs student position {int(where.max())}, but the student's tokenization of its "
                    f"text has {lengths[i]} tokens: the cache was built with another student tokenizer or "
                    "--block_size. Rebuild it."
                )
            aligned[i, where] = np.asarray(feature[TEACHER_POSITIONS_COLUMN])
            logprobs[i, where] = np.asarray(feature[LOGPROBS_COLUMN]).reshape(where.size, k)
            indices[i, where] = np.asarray(feature[INDICES_COLUMN]).reshape(where.size, k)
            mapped_tail[i, where] = np.asarray(feature[MAPPED_TAIL_COLUMN])
            unmapped_tail[i, where] = np.asarray(feature[UNMAPPED_TAIL_COLUMN])
        return {
            ALIGNED_COLUMN: torch.from_numpy(aligned),
            LOGPROBS_COLUMN: torch.from_numpy(logprobs),
            INDICES_COLUMN: torch.from_numpy(indices),
            MAPPED_TAIL_COLUMN: torch.from_numpy(mapped_tail),
            UNMAPPED_TAIL_COLUMN: torch.from_numpy(unmapped_tail),
        }
