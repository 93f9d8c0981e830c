"""The sequence-level KD cache (Kim & Rush, 2016), one for every recipe: the teacher's outputs on the training inputs
(its completions of LM prompts, its translations of sources), generated once and stored with a manifest that says
what they were generated from.

Layout (`--seq_kd_cache_dir`, default <output_dir>/seq_kd_cache)::

    seq_kd_cache/
      manifest.json    the identity (`cache_identity`), plus the rows and columns stored and when
      data/            Dataset.save_to_disk output: the recipe's columns

The directory is built in a temporary sibling and renamed into place only when complete
(`hf_distill.storage.atomic.atomic_directory`), so a run killed midway leaves the previous cache, or none, and a temporary
that the next build removes. A directory holding anything a cache does not hold is never replaced: the build
stops and names the files.

Policy, the same for every recipe (`load_or_build`):

- missing: generated.
- partial (no readable manifest, or data that is missing, unreadable or not what the manifest says): ignored and
  regenerated, with a warning.
- stale (the manifest describes another run: format or hf_distill version, teacher name or weights
  (`hf_distill.storage.fingerprint.model_fingerprint`), tokenizer, shared vocabulary, inputs, generation settings):
  regenerated with a warning naming what differs. Regenerating is always correct, whereas an error would make the
  user delete files by hand for a routine change such as --max_train_samples; point --seq_kd_cache_dir elsewhere to
  keep both. Caches written before this format (the translation recipe's data-<id> directories, the LM recipe's
  manifests without format_version) are stale, so they are regenerated once.
- matching: reused; `--seq_kd_overwrite_cache` regenerates it anyway. A recipe may also check what a cache holds
  (`check`), cached or new: the LM recipe refuses one holding token ids the student cannot read, naming
  --seq_kd_overwrite_cache.

Only one process writes (the recipes build the cache under `main_process_first`); the others then read it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, load_from_disk
from transformers.utils import logging

from hf_distill.caches.format import MANIFEST_NAME, read_manifest, write_manifest
from hf_distill.storage.atomic import atomic_directory

logger = logging.get_logger(__name__)

KIND = "seq_kd_completions"
FORMAT_VERSION = 2
DATA_DIR = "data"
# Manifest entries that describe the stored files rather than what they were generated from: never compared.
_BOOKKEEPING_KEYS = ("num_rows", "columns", "created")
# What a cache directory may hold and be replaced (data-*/.tmp-* are left by the translation recipe's old format).
_CACHE_ENTRIES = (MANIFEST_NAME, DATA_DIR)
_OLD_CACHE_PREFIXES = ("data-", ".tmp-")

MISSING, PARTIAL, STALE, VALID = "missing", "partial", "stale", "valid"


def cache_identity(
    *,
    task: str,
    teacher_name: str,
    teacher_fingerprint: str,
    tokenizer: Mapping[str, Any],
    vocab_size: int | None,
    inputs_checksum: str,
    num_inputs: int,
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """The manifest entries that must all match for a cache to be reused.

    tokenizer: `hf_distill.storage.fingerprint.tokenizer_description`; vocab_size: the ids the teacher's generation was
    restricted to (those student and tokenizer share); inputs_checksum: a checksum of the `num_inputs` inputs in
    order (prompt ids, source texts); settings: the recipe's generation settings (beams, lengths, ...), JSON values.
    """
    from hf_distill.version import __version__

    identity = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "hf_distill_version": __version__,
        "task": task,
        "teacher": teacher_name,
        "teacher_fingerprint": teacher_fingerprint,
        "tokenizer": dict(tokenizer),
        "vocab_size": vocab_size,
        "num_inputs": num_inputs,
        "inputs_checksum": inputs_checksum,
    }
    clashing = sorted(set(settings) & {*identity, *_BOOKKEEPING_KEYS})
    if clashing:
        raise ValueError(
            f"seq-KD cache settings {clashing} clash with the manifest's own entries; rename them."
        )
    return {**identity, **settings}


# --------------------------------------------------------------------------------------------- reading
@dataclass
class CacheState:
    status: str  # MISSING, PARTIAL, STALE or VALID
    detail: str = ""
    dataset: Dataset | None = None  # set when VALID


def _differences(found: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    if (found.get("kind"), found.get("format_version")) != (KIND, FORMAT_VERSION):
        return [
            f"format: cache has kind {found.get('kind')!r} version {found.get('format_version')!r}, this run "
            f"writes {KIND!r} version {FORMAT_VERSION}"
        ]
    keys = [key for key in expected if key not in _BOOKKEEPING_KEYS]
    keys += [key for key in found if key not in expected and key not in _BOOKKEEPING_KEYS]
    return [
        f"{key}: cache has {found.get(key)!r}, this run needs {expected.get(key)!r}"
        for key in keys
        if found.get(key) != expected.get(key)
    ]


def inspect_cache(cache_dir: str | os.PathLike, expected: Mapping[str, Any]) -> CacheState:
    """What `cache_dir` holds for a run whose identity (`cache_identity`) is `expected`; loads it if valid."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir() or not any(cache_dir.iterdir()):
        return CacheState(MISSING, f"{cache_dir} does not exist or is empty")
    try:
        manifest = read_manifest(cache_dir, what="sequence-KD cache")
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict):
        return CacheState(PARTIAL, f"{cache_dir} has no readable {MANIFEST_NAME}")
    differences = _differences(manifest, expected)
    if differences:
        return CacheState(STALE, "; ".join(differences))
    data_dir = cache_dir / DATA_DIR
    try:
        dataset = load_from_disk(str(data_dir))
    except (OSError, ValueError) as error:
        return CacheState(PARTIAL, f"{data_dir} cannot be loaded ({str(error).splitlines()[0]})")
    stored = (len(dataset), dataset.column_names) if isinstance(dataset, Dataset) else None
    if stored != (manifest.get("num_rows"), manifest.get("columns")):
        return CacheState(
            PARTIAL,
            f"{data_dir} holds {stored} (rows, columns), its manifest says "
            f"{(manifest.get('num_rows'), manifest.get('columns'))}",
        )
    return CacheState(VALID, dataset=dataset)


# --------------------------------------------------------------------------------------------- writing
def _check_replaceable(cache_dir: Path) -> None:
    """Refuse to replace a directory that holds more than a cache: the user's files would go with it."""
    if not cache_dir.is_dir():
        return
    foreign = sorted(
        entry.name
        for entry in cache_dir.iterdir()
        if entry.name not in _CACHE_ENTRIES and not entry.name.startswith(_OLD_CACHE_PREFIXES)
    )
    if foreign:
        raise ValueError(
            f"--seq_kd_cache_dir {str(cache_dir)!r} holds {foreign}, which are not part of a sequence-KD cache, "
            "and writing the cache replaces the whole directory; point --seq_kd_cache_dir at a directory of its own."
        )


def write_cache(cache_dir: str | os.PathLike, dataset: Dataset, identity: Mapping[str, Any]) -> Dataset:
    """Store `dataset` and its manifest atomically, replacing what `cache_dir` held; returns the dataset as stored."""
    cache_dir = Path(cache_dir)
    _check_replaceable(cache_dir)
    with atomic_directory(cache_dir, overwrite=True) as temporary:
        dataset.save_to_disk(str(temporary / DATA_DIR))
        write_manifest(
            temporary,
            {
                **identity,
                "num_rows": len(dataset),
                "columns": list(dataset.column_names),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )
    return load_from_disk(str(cache_dir / DATA_DIR))


def load_or_build(
    cache_dir: str | os.PathLike,
    identity: Mapping[str, Any],
    generate: Callable[[], Dataset],
    *,
    overwrite: bool = False,
    check: Callable[[Dataset], None] | None = None,
) -> Dataset:
    """The cached teacher outputs of a run whose identity is `identity`, from `generate()` (then stored) when the cache
    cannot be used (see the module docstring for when); `check(dataset)` raises if what is stored cannot be used."""
    state = inspect_cache(cache_dir, identity)
    if state.status == VALID and not overwrite:
        logger.info(
            f"Sequence-level KD: using the {len(state.dataset)} cached teacher outputs in {cache_dir}"
        )
        dataset = state.dataset
    else:
        if state.status == VALID:
            logger.warning(
                f"Sequence-level KD: --seq_kd_overwrite_cache is set, regenerating the cache in {cache_dir}"
            )
        elif state.status == STALE:
            logger.warning(
                f"Sequence-level KD: the cache in {cache_dir} was built for another run ({state.detail}); "
                "regenerating it. Point --seq_kd_cache_dir elsewhere to keep both."
            )
        elif state.status == PARTIAL:
            logger.warning(
                f"Sequence-level KD: ignoring an incomplete cache ({state.detail}); regenerating it."
            )
        _check_replaceable(Path(cache_dir))  # before the teacher spends time generating
        logger.info(
            f"Sequence-level KD: generating the teacher's outputs for {identity['num_inputs']} inputs"
        )
        start = time.perf_counter()
        generated = generate()
        logger.info(
            f"Sequence-level KD: generated {len(generated)} rows in {time.perf_counter() - start:.1f}s"
        )
        dataset = write_cache(cache_dir, generated, identity)
    if check is not None:
        check(dataset)
    return dataset
