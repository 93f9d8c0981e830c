"""Cached teacher outputs for offline distillation: the teacher's top-k log-probabilities per position, computed
once over the tokenized training set, so that training needs no teacher in memory.

A cache directory holds::

    manifest.json    what the cache was built from (see `build_manifest`); written last
    data/            a `datasets.Dataset` (save_to_disk), row i <-> row i of the tokenized training set:
        teacher_topk_logprobs  float32 (or float16 with logprobs_dtype="float16"), T_i * k values
        teacher_topk_indices   uint16 (int32 for vocabularies over 65,536 tokens), T_i * k values
        teacher_tail_logmass   float32, T_i values: the teacher's remaining mass tempered at the training
                               temperature T, log sum_{j not in top k} p_j**(1/T) (at T = 1 the log of the mass
                               outside the top k)

Each row is stored flat, row-major over (position, rank): reading one flat list back through `datasets` is
several times faster than a nested (T, k) list, and the cache is read at every training step. The recipe's
collator reshapes rows to (T, k). Position t holds the teacher's distribution over the token at t + 1, like the
teacher's `logits[:, t]`; the probabilities are at temperature 1 over the tokenizer's vocabulary (padded
embedding rows beyond it are cut off), ranked by probability.

The remaining mass is summed from the teacher's own log-probabilities when the cache is built (-inf when the top k
hold everything), so it is exact even where 1 - sum(exp(topk)) would cancel to nothing or the top k were stored in
float16. It is tempered at the temperature the cache is built for (manifest `tail_temperature`), because the loss
at temperature T needs sum_j p_j**(1/T) over the other tokens, which no function of their plain mass sum_j p_j
gives: with it, the teacher's k + 1 buckets at T are exactly softmax([topk / T, tail]), and a student equal to the
teacher gets zero loss (see `hf_distill.losses.sparse_distillation_loss`). A cache therefore serves training runs
at that one temperature; `check_tail_temperature` refuses any other, before training.

Format 4 (this one) also records what the cached target is (manifest `target`, `teachers`, `task`):
- "teacher": one teacher's log-probabilities at temperature 1, as above;
- "mixture": several teachers' weighted mixture of softened distributions (`hf_distill.sources.ensemble`), which is the
  softmax of no logits at temperature 1, so it is stored as the target's own log-probabilities at the training
  temperature (`target_temperature`, equal to `tail_temperature`) and used as the teacher's buckets directly; the
  manifest records the teachers (names, weight fingerprints), their normalised `teacher_weights` and the
  `teacher_weighting` (`hf_distill.caches.mixture`);
- sequence-level heads (`task` "sequence"): one position per row holding every class (k = the number of labels);
- `cross_tokenizer`: a teacher with its own tokenizer, rows of raw text, the top k stored at the aligned positions
  only (`hf_distill.caches.cross_tokenizer`).
Older formats still load: format 3 is format 4's single-teacher cache; format 2 stored the plain mass (its tail
temperature is 1), and format 1 had no tail column (the loss derives the mass from the top k, which is valid at
temperature 1 only); both are refused at any other temperature.

float32 keeps the log-probabilities exact; float16 takes a third less disk again (ids in uint16 and log-probabilities
in float16: 4 bytes per cached entry against 6) and rounds a log-probability of -10 by about 0.004.

Caches are built in a temporary directory beside the target and renamed into place only when complete
(`hf_distill.storage.atomic.atomic_directory`), and a directory without manifest.json is never loaded, so a killed build is
never used. The manifest records each teacher's `hf_distill.storage.fingerprint.model_fingerprint` (a hash of its weights'
bytes) for reference; loading checks the tokenizer, block size, top k, data and temperature, not the teacher.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from hf_distill.caches.format import (  # noqa: F401 - the format's names, importable from here as before
    _FORMAT_COLUMNS,
    CACHE_COLUMNS,
    DATA_DIR,
    FORMAT_VERSION,
    INDICES_COLUMN,
    LOGPROBS_COLUMN,
    LOGPROBS_DTYPES,
    MANIFEST_NAME,
    MAPPED_TAIL_COLUMN,
    STUDENT_POSITIONS_COLUMN,
    TAIL_COLUMN,
    TARGET_MIXTURE,
    TARGET_TEACHER,
    TASK_CAUSAL_LM,
    TASK_SEQUENCE,
    TEACHER_POSITIONS_COLUMN,
    TOPK_COLUMNS,
    UNMAPPED_TAIL_COLUMN,
    cached_tail_temperature,
    check_cache_temperature,
    check_tail_temperature,
    is_mixture,
    read_manifest,
    token_ids_checksum,
    unflatten_rows,
    write_manifest,
)
from hf_distill.caches.manifest import build_manifest, verify_manifest
from hf_distill.storage.atomic import atomic_directory

logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------------- building
def teacher_topk(
    logits: torch.Tensor, top_k: int, vocab_size: int | None = None, *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k log-probabilities at temperature 1 (float32) and their token ids (long) of logits (..., V), over the
    first `vocab_size` columns (all when None), both (..., k) and ranked by probability; and the other tokens'
    tempered mass (..., ), log sum_{j not in top k} p_j**(1/temperature), a logsumexp of log p_j / temperature over
    them (-inf when k covers the vocabulary; at temperature 1 the log of their probability mass)."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    values, indices = torch.topk(log_probs, top_k, dim=-1)
    tail_logmass = log_probs.scatter(-1, indices, -math.inf).div_(temperature).logsumexp(-1)
    return values, indices, tail_logmass


def index_dtype(vocab_size: int) -> Any:
    """How token ids are stored: uint16 (2 bytes) when every id fits, as for vocabularies up to 65,536 tokens,
    else int32. The readers widen them to int64."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def cache_features(
    logprobs_dtype: str,
    extra: Mapping[str, str] | None = None,
    *,
    tail: bool = True,
    vocab_size: int | None = None,
):
    """The cache's `datasets.Features`: the top-k columns (log-probabilities in `logprobs_dtype`, token ids in
    `index_dtype(vocab_size)`, int32 when it is not given; the remaining mass unless `tail` is False), plus `extra`
    name -> value type lists (e.g. the cross-tokenizer columns)."""
    from datasets import Features, List, Value

    ids = "int32" if vocab_size is None else np.dtype(index_dtype(vocab_size)).name
    columns = {LOGPROBS_COLUMN: List(Value(logprobs_dtype)), INDICES_COLUMN: List(Value(ids))}
    if tail:
        columns[TAIL_COLUMN] = List(Value("float32"))
    for name, value_type in (extra or {}).items():
        columns[name] = List(Value(value_type))
    return Features(columns)


def check_build_options(
    temperature: Any, logprobs_dtype: str, dataset: Any, column: str = "input_ids"
) -> None:
    """What every cache build refuses before running a teacher."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(
            f"temperature must be a finite number > 0 (the training run's --temperature), got {temperature!r}."
        )
    if logprobs_dtype not in LOGPROBS_DTYPES:
        raise ValueError(f"logprobs_dtype must be one of {LOGPROBS_DTYPES}, got {logprobs_dtype!r}.")
    if column not in dataset.column_names:
        raise ValueError(f"the dataset to cache needs an {column} column; found {dataset.column_names}.")
    if len(dataset) == 0:
        raise ValueError("the dataset to cache is empty.")


def cached_vocab_size(teacher: nn.Module, tokenizer: Any) -> int:
    """The vocabulary a cache ranks: the teacher's rows, cut to its tokenizer (padded embedding rows are no token)."""
    config = getattr(teacher, "config", None)
    teacher_vocab = getattr(config.get_text_config(), "vocab_size", None) if config is not None else None
    return min(v for v in (teacher_vocab, len(tokenizer)) if v is not None)


def padded_rows(rows: list[Any], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Right-padded (B, L) input_ids and attention_mask of rows of token ids, and the rows' lengths."""
    lengths = [len(row) for row in rows]
    input_ids = torch.full((len(rows), max(lengths)), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.as_tensor(np.asarray(row), dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask, lengths


def numpy_dtype(logprobs_dtype: str) -> Any:
    return np.float16 if logprobs_dtype == "float16" else np.float32


def write_cache(
    cache_dir: str | os.PathLike,
    features: Any,
    batches: Iterable[Mapping[str, list]],
    make_manifest: Callable[[], dict[str, Any]],
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the column batches (each a name -> list of rows mapping) as the cache's data, then the manifest
    `make_manifest()` returns (called once every batch is written), all in a temporary directory renamed to
    `cache_dir` only when complete. Returns the manifest."""
    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter

    with atomic_directory(cache_dir, overwrite=overwrite) as temporary:
        arrow_path = temporary / "building.arrow"
        writer = ArrowWriter(features=features, path=str(arrow_path))
        try:
            for batch in batches:
                writer.write_batch(dict(batch))
            writer.finalize()
        finally:
            writer.close()
        Dataset.from_file(str(arrow_path)).save_to_disk(str(temporary / DATA_DIR))
        arrow_path.unlink()
        manifest = make_manifest()
        write_manifest(temporary, manifest)
    return manifest


def build_logit_cache(
    teacher: nn.Module,
    dataset: Any,
    cache_dir: str | os.PathLike,
    *,
    tokenizer: Any,
    teacher_name: str,
    block_size: int | None,
    temperature: float,
    top_k: int = 64,
    batch_size: int = 8,
    logprobs_dtype: str = "float32",
    overwrite: bool = False,
    device: torch.device | str | None = None,
    extra_manifest: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run `teacher` over every row of the tokenized `dataset` (an `input_ids` column; rows of any length) and
    write its top-k log-probabilities per position into `cache_dir`, atomically. Returns the manifest.

    Rows are right-padded per batch of `batch_size`; causal attention makes a row's distributions independent of
    the padding after it. `block_size` is the run's --block_size: recorded, and checked by training runs.
    `temperature` is the KD temperature of the training runs the cache is for (their --temperature): the remaining
    mass is stored tempered at it (manifest `tail_temperature`) and runs at any other temperature are refused.
    (Several teachers: `hf_distill.caches.mixture.build_mixture_cache`.)
    """
    check_build_options(temperature, logprobs_dtype, dataset)
    vocab_size = cached_vocab_size(teacher, tokenizer)
    if not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be in [1, {vocab_size}] (the vocabulary size), got {top_k}.")
    device = torch.device(device if device is not None else next(teacher.parameters()).device)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = teacher.training
    teacher.eval().to(device)
    store = numpy_dtype(logprobs_dtype)
    counted = {"tokens": 0}

    def batches() -> Iterator[dict[str, list]]:
        view = dataset.select_columns(["input_ids"]).with_format(None)
        for start in range(0, len(view), batch_size):
            input_ids, attention_mask, lengths = padded_rows(
                view[start : start + batch_size]["input_ids"], pad_token_id
            )
            with torch.no_grad():
                logits = teacher(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)
                ).logits  # (B, T, V)
            logprobs, indices, tails = [], [], []
            for i, length in enumerate(lengths):
                values, ids, tail = teacher_topk(
                    logits[i, :length], top_k, vocab_size, temperature=temperature
                )  # (T_i, k), (T_i,)
                logprobs.append(values.cpu().numpy().astype(store).reshape(-1))
                indices.append(ids.cpu().numpy().astype(index_dtype(vocab_size)).reshape(-1))
                tails.append(tail.cpu().numpy().astype(np.float32))
            counted["tokens"] += sum(lengths)
            yield {LOGPROBS_COLUMN: logprobs, INDICES_COLUMN: indices, TAIL_COLUMN: tails}

    def manifest() -> dict[str, Any]:
        return build_manifest(
            teachers=[(teacher_name, teacher)],
            tokenizer=tokenizer,
            top_k=top_k,
            block_size=block_size,
            num_rows=len(dataset),
            num_tokens=counted["tokens"],
            data_checksum=token_ids_checksum(dataset),
            logprobs_dtype=logprobs_dtype,
            vocab_size=vocab_size,
            tail_temperature=temperature,
            extra=extra_manifest,
        )

    start_time = time.perf_counter()
    try:
        result = write_cache(
            cache_dir,
            cache_features(logprobs_dtype, vocab_size=vocab_size),
            batches(),
            manifest,
            overwrite=overwrite,
        )
    finally:
        teacher.train(was_training)
    elapsed = time.perf_counter() - start_time
    logger.info(
        f"Cached the teacher's top-{top_k} log-probabilities of {len(dataset)} rows ({result['num_tokens']} tokens) "
        f"in {cache_dir}, for training at temperature {temperature:g} ({elapsed:.1f}s, "
        f"{result['num_tokens'] / max(elapsed, 1e-9):.0f} tokens/s)."
    )
    return result


def load_logit_cache(
    cache_dir: str | os.PathLike,
    train_dataset: Any,
    *,
    tokenizer: Any,
    block_size: int | None,
    top_k: int | None = None,
    temperature: float | None = None,
    task: str = TASK_CAUSAL_LM,
) -> tuple[Any, dict[str, Any]]:
    """`train_dataset` with the cache's columns added (top-k log-probabilities and ids, and from format 2 the
    remaining mass), after checking the manifest against it; with `temperature` (the run's KD temperature), also
    that the remaining mass was tempered at it (`check_tail_temperature`). `task`: the run's, "causal_lm" (rows of
    positions) or "sequence" (a classifier: one position per row); a cache of the other is refused.

    Returns (dataset, manifest). The dataset is in numpy format (rows as arrays), which the recipe's collator
    takes and which is much faster to read than Python lists.
    """
    from datasets import concatenate_datasets, load_from_disk

    manifest = read_manifest(cache_dir)
    if manifest.get("cross_tokenizer"):
        raise ValueError(
            f"teacher logits cache {str(cache_dir)!r} is a cross-tokenizer cache (the teacher's top k at the "
            "positions aligned with its own tokenizer); train from it with --cross_tokenizer exact|uld|hybrid "
            "(hf_distill.caches.cross_tokenizer.load_cross_tokenizer_cache)."
        )
    cached_task = manifest.get("task", TASK_CAUSAL_LM)
    if cached_task != task:
        raise ValueError(
            f"teacher logits cache {str(cache_dir)!r} was built for {cached_task} models, this run trains {task} "
            "ones; build the cache with scripts/cache_teacher_logits.py --task "
            f"{'classification' if task == TASK_SEQUENCE else 'causal_lm'} and this run's data flags."
        )
    verify_manifest(
        manifest,
        tokenizer=tokenizer,
        block_size=block_size,
        data_checksum=token_ids_checksum(train_dataset),
        num_rows=len(train_dataset),
        top_k=top_k,
        cache_dir=cache_dir,
    )
    if temperature is not None:
        check_tail_temperature(manifest, temperature, cache_dir)
    cache = load_from_disk(str(Path(cache_dir) / DATA_DIR))
    columns = _FORMAT_COLUMNS[manifest["format_version"]]
    missing = [column for column in columns if column not in cache.column_names]
    if missing or len(cache) != len(train_dataset):
        raise ValueError(
            f"teacher logits cache {str(cache_dir)!r} is damaged: {len(cache)} rows with columns "
            f"{cache.column_names}, expected {len(train_dataset)} rows with {list(columns)}. Rebuild it."
        )
    clashing = [column for column in CACHE_COLUMNS if column in train_dataset.column_names]
    if clashing:
        train_dataset = train_dataset.remove_columns(clashing)
    positions = 1 if manifest.get("task") == TASK_SEQUENCE else len(train_dataset[0]["input_ids"])
    first_row = positions * manifest["top_k"]
    if len(cache[0][INDICES_COLUMN]) != first_row:
        raise ValueError(
            f"teacher logits cache {str(cache_dir)!r} row 0 holds {len(cache[0][INDICES_COLUMN])} values, expected "
            f"{first_row} (positions x top_k); rebuild it."
        )
    combined = concatenate_datasets([train_dataset, cache], axis=1)
    what = "the mixture of" if is_mixture(manifest) else "log-probabilities of"
    logger.info(
        f"Training from the teacher logits cache {cache_dir}: top-{manifest['top_k']} {what} "
        f"{manifest['teacher']!r}, {manifest['num_rows']} rows."
    )
    return combined.with_format("numpy"), manifest
