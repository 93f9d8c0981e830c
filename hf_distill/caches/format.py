"""The teacher logits cache's format: its column names, format versions and targets, manifest.json, the data
checksum, and the checks of a cache's temperature against a run's. The format itself is described in
`hf_distill.caches.topk`, which builds and loads caches (and re-exports these names)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from hf_distill.storage.atomic import atomic_write_text
from hf_distill.storage.fingerprint import ids_checksum

logger = logging.get_logger(__name__)

MANIFEST_NAME = "manifest.json"
DATA_DIR = "data"
LOGPROBS_COLUMN = "teacher_topk_logprobs"
INDICES_COLUMN = "teacher_topk_indices"
TAIL_COLUMN = "teacher_tail_logmass"
TOPK_COLUMNS = (LOGPROBS_COLUMN, INDICES_COLUMN, TAIL_COLUMN)
# Cross-tokenizer caches (logit_cache_cross.py): the aligned positions, and the remaining mass split by whether the
# teacher's token has a student counterpart in the vocabulary map.
STUDENT_POSITIONS_COLUMN = "teacher_aligned_student_positions"
TEACHER_POSITIONS_COLUMN = "teacher_aligned_teacher_positions"
MAPPED_TAIL_COLUMN = "teacher_mapped_tail_logmass"
UNMAPPED_TAIL_COLUMN = "teacher_unmapped_tail_logmass"
# Every column a cache adds to the training data: kept through `remove_unused_columns`, never given to a model.
CACHE_COLUMNS = (
    *TOPK_COLUMNS,
    STUDENT_POSITIONS_COLUMN,
    TEACHER_POSITIONS_COLUMN,
    MAPPED_TAIL_COLUMN,
    UNMAPPED_TAIL_COLUMN,
)
LOGPROBS_DTYPES = ("float32", "float16")
FORMAT_VERSION = 4
# Columns each readable format version holds (format 1 had no remaining-mass column; format 3 tempers it; format 4
# adds targets, several teachers and sequence-level heads to format 3).
_FORMAT_COLUMNS = {1: (LOGPROBS_COLUMN, INDICES_COLUMN), 2: TOPK_COLUMNS, 3: TOPK_COLUMNS, 4: TOPK_COLUMNS}
TARGET_TEACHER = "teacher"  # one teacher's log-probabilities at temperature 1
TARGET_MIXTURE = "mixture"  # several teachers' mixture, log-probabilities at `target_temperature`
TASK_CAUSAL_LM, TASK_SEQUENCE = "causal_lm", "sequence"


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


# --------------------------------------------------------------------------------------------- temperatures
def is_mixture(manifest: Mapping[str, Any] | None) -> bool:
    """Whether a cache holds several teachers' mixture, stored as log-probabilities at its `target_temperature`."""
    return manifest is not None and manifest.get("target") == TARGET_MIXTURE


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
    A cache whose top k cover its whole vocabulary has an empty tail, valid at every temperature, unless it holds a
    mixture of teachers: that is a distribution at its own temperature only (see `is_mixture`)."""
    where = f"teacher logits cache {str(cache_dir)!r}" if cache_dir is not None else "teacher logits cache"
    if is_mixture(manifest):
        cached = cached_tail_temperature(manifest)
        if not math.isclose(cached, temperature, rel_tol=1e-9, abs_tol=0.0):
            raise ValueError(
                f"The {where} holds the mixture of {len(manifest.get('teachers') or [])} teachers' distributions "
                f"softened at temperature {cached:g} (its target_temperature), but this run distils at --temperature "
                f"{temperature:g}: a mixture of softened distributions at one temperature is not the mixture at "
                "another, at any top k. Rebuild the cache with scripts/cache_teacher_logits.py --temperature "
                f"{temperature:g} (and the same teachers, weights and data flags), or train with --temperature "
                f"{cached:g}."
            )
        return
    top_k, vocab = manifest.get("top_k"), manifest.get("cached_vocab_size")
    if isinstance(top_k, int) and isinstance(vocab, int) and top_k >= vocab:
        return
    cached = cached_tail_temperature(manifest)
    if math.isclose(cached, temperature, rel_tol=1e-9, abs_tol=0.0):
        return
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


def unflatten_rows(flat: Any, length: int, dtype: torch.dtype) -> torch.Tensor:
    """A cached row (T * k values) as a (T, k) tensor."""
    values = torch.as_tensor(np.asarray(flat))
    if values.numel() % max(length, 1):
        raise ValueError(f"a cached row of {values.numel()} values does not split into {length} positions.")
    return values.reshape(length, -1).to(dtype)
