"""Cached teacher outputs for offline distillation: the teacher's top-k log-probabilities per position, computed
once over the tokenized training set, so that training needs no teacher in memory.

A cache directory holds::

    manifest.json    what the cache was built from (see `build_manifest`); written last
    data/            a `datasets.Dataset` (save_to_disk), row i <-> row i of the tokenized training set:
        teacher_topk_logprobs  float32 (or float16 with logprobs_dtype="float16"), T_i * k values
        teacher_topk_indices   int32, T_i * k values
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
at that one temperature; `check_tail_temperature` refuses any other, before training. Older formats still load:
format 2 stored the plain mass (its tail temperature is 1), and format 1 had no tail column (the loss derives the
mass from the top k, which is valid at temperature 1 only); both are refused at any other temperature.

float32 keeps the log-probabilities exact; float16 saves a quarter of the disk (indices stay int32) and rounds
a log-probability of -10 by about 0.004.

Caches are built in a temporary directory beside the target and renamed into place only when complete
(`hf_distill.atomic.atomic_directory`), and a directory without manifest.json is never loaded, so a killed build is
never used. The manifest records the teacher's `hf_distill.fingerprint.model_fingerprint` (a hash of its weights'
bytes) for reference; loading checks the tokenizer, block size, top k, data and temperature, not the teacher.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from .atomic import atomic_directory, atomic_write_text
from .fingerprint import ids_checksum, model_fingerprint, tokenizer_description, vocab_hash

logger = logging.get_logger(__name__)

MANIFEST_NAME = "manifest.json"
DATA_DIR = "data"
LOGPROBS_COLUMN = "teacher_topk_logprobs"
INDICES_COLUMN = "teacher_topk_indices"
TAIL_COLUMN = "teacher_tail_logmass"
CACHE_COLUMNS = (LOGPROBS_COLUMN, INDICES_COLUMN, TAIL_COLUMN)
LOGPROBS_DTYPES = ("float32", "float16")
FORMAT_VERSION = 3
# Columns each readable format version holds (format 1 had no remaining-mass column; format 3 tempers it).
_FORMAT_COLUMNS = {1: (LOGPROBS_COLUMN, INDICES_COLUMN), 2: CACHE_COLUMNS, 3: CACHE_COLUMNS}


# --------------------------------------------------------------------------------------------- data checksum
def token_ids_checksum(dataset: Any, column: str = "input_ids", batch_size: int = 1024) -> str:
    """sha256 over the rows of `column` (each row's length, then its ids as int64): identifies the tokenized data."""
    view = dataset.select_columns([column]).with_format(None)
    batches = (view[start : start + batch_size][column] for start in range(0, len(view), batch_size))
    return ids_checksum(row for rows in batches for row in rows)


# --------------------------------------------------------------------------------------------- manifests
def write_manifest(directory: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
    """`directory`/manifest.json, written atomically."""
    atomic_write_text(Path(directory) / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True))


def read_manifest(directory: str | os.PathLike, what: str = "teacher logits cache") -> dict[str, Any]:
    """The manifest of a complete cache; raises when the directory is missing or incomplete."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{what} {str(directory)!r} does not exist; build it first.")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(
            f"{what} {str(directory)!r} has no {MANIFEST_NAME}: it is incomplete (its build was interrupted) or "
            f"not a cache (found {sorted(p.name for p in directory.iterdir())}). Delete it and build it again."
        )
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


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


def _features(logprobs_dtype: str):
    from datasets import Features, List, Value

    return Features(
        {
            LOGPROBS_COLUMN: List(Value(logprobs_dtype)),
            INDICES_COLUMN: List(Value("int32")),
            TAIL_COLUMN: List(Value("float32")),
        }
    )


def _batches(dataset: Any, batch_size: int) -> Iterator[list[list[int]]]:
    view = dataset.select_columns(["input_ids"]).with_format(None)
    for start in range(0, len(view), batch_size):
        yield view[start : start + batch_size]["input_ids"]


def build_manifest(
    *,
    teacher_name: str,
    teacher: nn.Module,
    tokenizer: Any,
    top_k: int,
    block_size: int | None,
    num_rows: int,
    num_tokens: int,
    data_checksum: str,
    logprobs_dtype: str,
    vocab_size: int,
    tail_temperature: float,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    from . import __version__

    config = getattr(teacher, "config", None)
    return {
        "kind": "teacher_topk_logprobs",
        "format_version": FORMAT_VERSION,
        "hf_distill_version": __version__,
        "teacher": teacher_name,
        "teacher_model_type": getattr(config, "model_type", None),
        "teacher_fingerprint": model_fingerprint(teacher),
        "teacher_vocab_size": getattr(config.get_text_config(), "vocab_size", None)
        if config is not None
        else None,
        "tokenizer": tokenizer_description(tokenizer),
        "cached_vocab_size": vocab_size,
        "top_k": top_k,
        "block_size": block_size,
        "num_rows": num_rows,
        "num_tokens": num_tokens,
        "data_checksum": data_checksum,
        "logprobs_dtype": logprobs_dtype,
        "tail_temperature": float(tail_temperature),
        "layout": "flat row-major (position, rank); position t predicts token t + 1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **dict(extra or {}),
    }


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
    """
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(
            f"temperature must be a finite number > 0 (the training run's --temperature), got {temperature!r}."
        )
    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter

    if logprobs_dtype not in LOGPROBS_DTYPES:
        raise ValueError(f"logprobs_dtype must be one of {LOGPROBS_DTYPES}, got {logprobs_dtype!r}.")
    if "input_ids" not in dataset.column_names:
        raise ValueError(f"the dataset to cache needs an input_ids column; found {dataset.column_names}.")
    if len(dataset) == 0:
        raise ValueError("the dataset to cache is empty.")
    config = getattr(teacher, "config", None)
    teacher_vocab = getattr(config.get_text_config(), "vocab_size", None) if config is not None else None
    vocab_size = min(v for v in (teacher_vocab, len(tokenizer)) if v is not None)
    if not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be in [1, {vocab_size}] (the vocabulary size), got {top_k}.")
    if device is None:
        device = next(teacher.parameters()).device
    device = torch.device(device)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = teacher.training
    teacher.eval().to(device)
    numpy_dtype = np.float16 if logprobs_dtype == "float16" else np.float32

    data_checksum = token_ids_checksum(dataset)
    num_tokens = 0
    start_time = time.perf_counter()
    with atomic_directory(cache_dir, overwrite=overwrite) as temporary:
        arrow_path = temporary / "building.arrow"
        writer = ArrowWriter(features=_features(logprobs_dtype), path=str(arrow_path))
        try:
            for rows in _batches(dataset, batch_size):
                lengths = [len(row) for row in rows]
                input_ids = torch.full((len(rows), max(lengths)), pad_token_id, dtype=torch.long)
                attention_mask = torch.zeros_like(input_ids)
                for i, row in enumerate(rows):
                    input_ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
                    attention_mask[i, : len(row)] = 1
                with torch.no_grad():
                    logits = teacher(
                        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)
                    ).logits  # (B, T, V)
                logprobs, indices, tails = [], [], []
                for i, length in enumerate(lengths):
                    values, ids, tail = teacher_topk(
                        logits[i, :length], top_k, vocab_size, temperature=temperature
                    )  # (T_i, k), (T_i,)
                    logprobs.append(values.cpu().numpy().astype(numpy_dtype).reshape(-1))
                    indices.append(ids.cpu().numpy().astype(np.int32).reshape(-1))
                    tails.append(tail.cpu().numpy().astype(np.float32))
                writer.write_batch({LOGPROBS_COLUMN: logprobs, INDICES_COLUMN: indices, TAIL_COLUMN: tails})
                num_tokens += sum(lengths)
            writer.finalize()
        finally:
            writer.close()
            teacher.train(was_training)
        Dataset.from_file(str(arrow_path)).save_to_disk(str(temporary / DATA_DIR))
        arrow_path.unlink()
        manifest = build_manifest(
            teacher_name=teacher_name,
            teacher=teacher,
            tokenizer=tokenizer,
            top_k=top_k,
            block_size=block_size,
            num_rows=len(dataset),
            num_tokens=num_tokens,
            data_checksum=data_checksum,
            logprobs_dtype=logprobs_dtype,
            vocab_size=vocab_size,
            tail_temperature=temperature,
            extra=extra_manifest,
        )
        write_manifest(temporary, manifest)
    elapsed = time.perf_counter() - start_time
    logger.info(
        f"Cached the teacher's top-{top_k} log-probabilities of {len(dataset)} rows ({num_tokens} tokens) in "
        f"{cache_dir}, for training at temperature {temperature:g} ({elapsed:.1f}s, "
        f"{num_tokens / max(elapsed, 1e-9):.0f} tokens/s)."
    )
    return manifest


# --------------------------------------------------------------------------------------------- loading
def verify_manifest(
    manifest: Mapping[str, Any],
    *,
    tokenizer: Any,
    block_size: int | None,
    data_checksum: str,
    num_rows: int,
    top_k: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> None:
    """Raise ValueError listing every way the cache differs from the run (tokenizer, block size, k, data)."""
    where = f"teacher logits cache {str(cache_dir)!r}" if cache_dir is not None else "teacher logits cache"
    problems = []
    if (
        manifest.get("kind") != "teacher_topk_logprobs"
        or manifest.get("format_version") not in _FORMAT_COLUMNS
    ):
        problems.append(
            f"it is not a cache of this format (kind {manifest.get('kind')!r}, format_version "
            f"{manifest.get('format_version')!r}; expected 'teacher_topk_logprobs' version "
            f"{' or '.join(str(version) for version in _FORMAT_COLUMNS)})"
        )
    cached_tokenizer = manifest.get("tokenizer", {})
    if cached_tokenizer.get("vocab_hash") != vocab_hash(tokenizer):
        problems.append(
            f"it was built with another tokenizer ({cached_tokenizer.get('name_or_path')!r}, "
            f"{cached_tokenizer.get('vocab_size')} tokens) than this run's ({getattr(tokenizer, 'name_or_path', None)!r}, "
            f"{len(tokenizer)} tokens)"
        )
    if manifest.get("block_size") != block_size:
        problems.append(
            f"it was built with block_size {manifest.get('block_size')}, this run uses {block_size}"
        )
    if top_k is not None and manifest.get("top_k") != top_k:
        problems.append(f"it holds the top {manifest.get('top_k')} tokens, this run asks for top_k {top_k}")
    if manifest.get("num_rows") != num_rows or manifest.get("data_checksum") != data_checksum:
        problems.append(
            f"it was built on other training data ({manifest.get('num_rows')} rows, input_ids checksum "
            f"{str(manifest.get('data_checksum'))[:12]}...; this run has {num_rows} rows, checksum {data_checksum[:12]}...)"
        )
    if problems:
        raise ValueError(
            f"The {where} does not match this run: "
            + "; ".join(problems)
            + ". Rebuild it with scripts/cache_teacher_logits.py and the same data, tokenizer and --block_size "
            "flags as this run (--max_train_samples and --validation_split_percentage included)."
        )


def cached_tail_temperature(manifest: Mapping[str, Any]) -> float:
    """The temperature a cache's remaining mass is tempered at: the manifest's `tail_temperature` from format 3;
    1.0 for formats 1 and 2 (the plain mass, derived from the top k or stored)."""
    if manifest.get("format_version") in (1, 2):
        return 1.0
    value = manifest.get("tail_temperature")
    if not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(
            f"the teacher logits cache's manifest has tail_temperature {value!r}, expected a number > 0; it is "
            "damaged. Rebuild it with scripts/cache_teacher_logits.py."
        )
    return float(value)


def check_tail_temperature(
    manifest: Mapping[str, Any], temperature: float, cache_dir: str | os.PathLike | None = None
) -> None:
    """Raise ValueError, naming both temperatures and the fix, when a run distilling at `temperature` would use a
    remaining mass tempered at another one, which biases the loss (see `hf_distill.losses.sparse_distillation_loss`).
    A cache whose top k cover its whole vocabulary has an empty tail, valid at every temperature."""
    top_k, vocab = manifest.get("top_k"), manifest.get("cached_vocab_size")
    if isinstance(top_k, int) and isinstance(vocab, int) and top_k >= vocab:
        return
    cached = cached_tail_temperature(manifest)
    if math.isclose(cached, temperature, rel_tol=1e-9, abs_tol=0.0):
        return
    where = f"teacher logits cache {str(cache_dir)!r}" if cache_dir is not None else "teacher logits cache"
    held = {
        1: "has no remaining-mass column (format 1); it is derived from the top k, which holds at temperature 1 only",
        2: "stores the teacher's remaining mass at temperature 1 (format 2)",
    }.get(
        manifest.get("format_version"),
        f"stores the teacher's remaining mass tempered at temperature {cached:g}",
    )
    raise ValueError(
        f"The {where} {held}, but this run distils at temperature {temperature:g}: the remaining mass at one "
        "temperature does not give it at another, so the top-k KD loss would be biased. Rebuild the cache with "
        f"scripts/cache_teacher_logits.py --temperature {temperature:g} (and the same data flags), or train with "
        f"--temperature {cached:g}."
    )


def check_cache_temperature(cache_dir: str | os.PathLike, temperature: float) -> None:
    """`check_tail_temperature` against the manifest in `cache_dir`, for callers that hold only the directory (the
    trainer). A directory that does not exist cannot be checked: a warning says so, and the cached columns in the
    data are then taken as tempered at `temperature`."""
    if not Path(cache_dir).exists():
        logger.warning(
            f"teacher logits cache {str(cache_dir)!r} does not exist, so the temperature of its remaining mass "
            f"cannot be checked; a {TAIL_COLUMN} column in the training data is taken as computed at temperature "
            f"{temperature:g}. Point teacher_logits_cache at the cache the data came from."
        )
        return
    check_tail_temperature(read_manifest(cache_dir), temperature, cache_dir)


def load_logit_cache(
    cache_dir: str | os.PathLike,
    train_dataset: Any,
    *,
    tokenizer: Any,
    block_size: int | None,
    top_k: int | None = None,
    temperature: float | None = None,
) -> tuple[Any, dict[str, Any]]:
    """`train_dataset` with the cache's columns added (top-k log-probabilities and ids, and from format 2 the
    remaining mass), after checking the manifest against it; with `temperature` (the run's KD temperature), also
    that the remaining mass was tempered at it (`check_tail_temperature`).

    Returns (dataset, manifest). The dataset is in numpy format (rows as arrays), which the recipe's collator
    takes and which is much faster to read than Python lists.
    """
    from datasets import concatenate_datasets, load_from_disk

    manifest = read_manifest(cache_dir)
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
    first_row = len(train_dataset[0]["input_ids"]) * manifest["top_k"]
    if len(cache[0][INDICES_COLUMN]) != first_row:
        raise ValueError(
            f"teacher logits cache {str(cache_dir)!r} row 0 holds {len(cache[0][INDICES_COLUMN])} values, expected "
            f"{first_row} (positions x top_k); rebuild it."
        )
    combined = concatenate_datasets([train_dataset, cache], axis=1)
    logger.info(
        f"Training from the teacher logits cache {cache_dir}: top-{manifest['top_k']} log-probabilities of "
        f"{manifest['teacher']!r}, {manifest['num_rows']} rows."
    )
    return combined.with_format("numpy"), manifest


def unflatten_rows(flat: Any, length: int, dtype: torch.dtype) -> torch.Tensor:
    """A cached row (T * k values) as a (T, k) tensor."""
    values = torch.as_tensor(np.asarray(flat))
    if values.numel() % max(length, 1):
        raise ValueError(f"a cached row of {values.numel()} values does not split into {length} positions.")
    return values.reshape(length, -1).to(dtype)
