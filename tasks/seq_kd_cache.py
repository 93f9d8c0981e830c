"""Sequence-level knowledge distillation (Kim & Rush, 2016): the teacher's beam-search translations of the
training sources, generated once and cached on disk as a `datasets` dataset.

Cache layout (one directory, `--seq_kd_cache_dir`)::

    seq_kd_cache/
      manifest.json        what was translated and how; points at the data directory below
      data-<id>/           Dataset.save_to_disk output: columns "source" and "target" (teacher output)

Writes are atomic. The data is saved into a hidden `.tmp-<id>` directory, renamed to `data-<id>` once
complete, and only then is `manifest.json` replaced (itself through a temporary file and `os.replace`). At every
moment the manifest names either the previous complete data or the new complete data; a run killed midway
leaves an orphaned `.tmp-*` or `data-*` directory that no manifest points at, which is ignored and removed
by the next write.

A cache is used only when its manifest matches the run exactly (teacher and a fingerprint of its weights,
tokenizer, languages, prefix, source truncation, beam size, maximum length, forced BOS token, the vocabulary
generation was restricted to, number of examples and a checksum of the source texts). Policy:

- missing: built.
- partial (no manifest, an unreadable one, or data that does not match it): ignored, rebuilt.
- stale (the manifest describes another run): rebuilt with a warning naming what changed. Regenerating is
  always correct, whereas an error would force the user to delete files by hand for a routine change such as
  --max_train_samples. `--seq_kd_overwrite_cache` rebuilds even a matching cache.

Only one process writes (the recipe builds the cache under `main_process_first`); the others then read it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, load_from_disk
from transformers.utils import logging

from .generation_limits import vocabulary_constraint

logger = logging.get_logger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
SEQ_KD_MIXES = ("none", "concat")
# Manifest entries that describe the files rather than what they contain: never compared.
_BOOKKEEPING_KEYS = ("data", "created")
_TMP_PREFIX = ".tmp-"
_DATA_PREFIX = "data-"

MISSING, PARTIAL, STALE, VALID = "missing", "partial", "stale", "valid"


@dataclass
class SeqKDArguments:
    """Sequence-level knowledge distillation: train on the teacher's own translations."""

    seq_kd: bool = field(
        default=False,
        metadata={
            "help": "Translate the training sources once with the teacher's beam search, cache the translations "
            "and train the student on them (Kim & Rush, 2016)."
        },
    )
    seq_kd_num_beams: int = field(
        default=4, metadata={"help": "Beam size of the teacher's translations (--seq_kd)."}
    )
    seq_kd_max_length: int | None = field(
        default=None,
        metadata={
            "help": "Maximum length in tokens of the teacher's translations, decoder start token included. "
            "Default: --max_target_length. Lowered, with a warning, to the teacher's position limit "
            "(max_position_embeddings) when above it. The teacher only writes ids the student and tokenizer share."
        },
    )
    seq_kd_batch_size: int = field(
        default=32, metadata={"help": "Source sentences per teacher generate() call when building the cache."}
    )
    seq_kd_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where the teacher's translations are cached. Default: <output_dir>/seq_kd_cache."},
    )
    seq_kd_mix: str = field(
        default="none",
        metadata={
            "help": f"One of {SEQ_KD_MIXES}. none: train on the teacher's translations alone; concat: train on "
            "both the reference pairs and the teacher's pairs (twice the examples per epoch)."
        },
    )
    seq_kd_overwrite_cache: bool = field(
        default=False,
        metadata={
            "help": "Regenerate the cache even when its manifest matches this run (e.g. the teacher's weights "
            "changed in a way the fingerprint cannot see, or the generation code did)."
        },
    )

    def __post_init__(self):
        if self.seq_kd_num_beams < 1:
            raise ValueError(f"seq_kd_num_beams must be >= 1, got {self.seq_kd_num_beams}.")
        if self.seq_kd_max_length is not None and self.seq_kd_max_length < 2:
            raise ValueError(
                f"seq_kd_max_length must be >= 2 (decoder start token plus at least one token), got "
                f"{self.seq_kd_max_length}."
            )
        if self.seq_kd_batch_size < 1:
            raise ValueError(f"seq_kd_batch_size must be >= 1, got {self.seq_kd_batch_size}.")
        if self.seq_kd_mix not in SEQ_KD_MIXES:
            raise ValueError(f"seq_kd_mix must be one of {SEQ_KD_MIXES}, got {self.seq_kd_mix!r}.")


# --------------------------------------------------------------------------------------------- identity
def source_checksum(sources: Sequence[str]) -> str:
    """sha256 over the source texts in order; each text is length-prefixed so ("ab", "c") != ("a", "bc")."""
    digest = hashlib.sha256()
    for text in sources:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a model's parameters and buffers.

    Catches a teacher re-trained into the same directory, which its name alone would not. Hashing runs at
    memory speed (a few seconds for a 600M-parameter model), small next to translating a corpus.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_identity(
    *,
    teacher: str,
    teacher_fingerprint: str | None,
    tokenizer: str,
    source_lang: str,
    target_lang: str,
    source_prefix: str | None,
    max_source_length: int,
    num_beams: int,
    max_length: int,
    forced_bos_token: str | None,
    sources: Sequence[str],
    vocab_size: int | None = None,
) -> dict[str, Any]:
    """The manifest entries that must match for a cache to be reused.

    vocab_size: the ids the teacher's generation was restricted to (those student and tokenizer share). Caches
    written before that restriction have no such entry and are rebuilt.
    """
    return {
        "format_version": FORMAT_VERSION,
        "teacher": teacher,
        "teacher_fingerprint": teacher_fingerprint,
        "tokenizer": tokenizer,
        "source_lang": source_lang,
        "target_lang": target_lang,
        "source_prefix": source_prefix or "",
        "max_source_length": max_source_length,
        "num_beams": num_beams,
        "max_length": max_length,
        "forced_bos_token": forced_bos_token,
        "vocab_size": vocab_size,
        "num_examples": len(sources),
        "sources_sha256": source_checksum(sources),
    }


# --------------------------------------------------------------------------------------------- reading
@dataclass
class CacheState:
    status: str  # MISSING, PARTIAL, STALE or VALID
    detail: str = ""
    dataset: Dataset | None = None  # set when VALID


def _read_manifest(cache_dir: Path) -> dict[str, Any] | None:
    try:
        with open(cache_dir / MANIFEST_NAME, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _differences(found: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
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
    manifest = _read_manifest(cache_dir)
    if manifest is None:
        return CacheState(
            PARTIAL, f"{cache_dir} has no readable {MANIFEST_NAME} (a run stopped while writing it?)"
        )
    data_name = manifest.get("data")
    data_dir = cache_dir / str(data_name)
    if not isinstance(data_name, str) or not data_name.startswith(_DATA_PREFIX) or not data_dir.is_dir():
        return CacheState(PARTIAL, f"{MANIFEST_NAME} points at {data_name!r}, which is not in {cache_dir}")
    differences = _differences(manifest, expected)
    if differences:
        return CacheState(STALE, "; ".join(differences))
    try:
        dataset = load_from_disk(str(data_dir))
    except (OSError, ValueError, FileNotFoundError) as error:
        return CacheState(PARTIAL, f"{data_dir} cannot be loaded ({str(error).splitlines()[0]})")
    if not isinstance(dataset, Dataset) or set(dataset.column_names) != {"source", "target"}:
        return CacheState(PARTIAL, f"{data_dir} does not hold the columns 'source' and 'target'")
    if len(dataset) != expected["num_examples"]:
        return CacheState(
            PARTIAL, f"{data_dir} has {len(dataset)} rows, its manifest {expected['num_examples']}"
        )
    return CacheState(VALID, dataset=dataset)


# --------------------------------------------------------------------------------------------- writing
def _fsync_dir(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows, where directories cannot be opened
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _write_manifest(cache_dir: Path, manifest: Mapping[str, Any]) -> None:
    handle = tempfile.NamedTemporaryFile(
        "w", dir=cache_dir, prefix=f"{_TMP_PREFIX}{MANIFEST_NAME}.", delete=False, encoding="utf-8"
    )
    try:
        with handle:
            json.dump(dict(manifest), handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, 0o644)  # NamedTemporaryFile creates 0600; the cache is meant to be shared
        os.replace(handle.name, cache_dir / MANIFEST_NAME)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    _fsync_dir(cache_dir)


def _remove_unreferenced(cache_dir: Path, keep: str | None) -> None:
    """Delete data and temporary entries that the manifest does not point at (left by older or killed runs)."""
    for entry in cache_dir.iterdir():
        if entry.name == keep or not entry.name.startswith((_TMP_PREFIX, _DATA_PREFIX)):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def write_cache(
    cache_dir: str | os.PathLike, sources: Sequence[str], targets: Sequence[str], identity: Mapping[str, Any]
) -> Dataset:
    """Store (source, target) pairs and their manifest atomically; returns the dataset as stored."""
    if len(sources) != len(targets) or len(sources) != identity["num_examples"]:
        raise ValueError(
            f"write_cache got {len(sources)} sources and {len(targets)} targets for a manifest of "
            f"{identity['num_examples']} examples; they must be equal."
        )
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = uuid.uuid4().hex[:12]
    temporary = cache_dir / f"{_TMP_PREFIX}{name}"
    data_dir = cache_dir / f"{_DATA_PREFIX}{name}"
    try:
        Dataset.from_dict({"source": list(sources), "target": list(targets)}).save_to_disk(str(temporary))
        os.replace(temporary, data_dir)
        _fsync_dir(cache_dir)
        _write_manifest(
            cache_dir, {**identity, "data": data_dir.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        )
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        # If only the manifest failed, the data is complete but nothing points at it: remove it too.
        manifest = _read_manifest(cache_dir) or {}
        if manifest.get("data") != data_dir.name:
            shutil.rmtree(data_dir, ignore_errors=True)
        raise
    _remove_unreferenced(cache_dir, keep=data_dir.name)
    return load_from_disk(str(data_dir))


def load_or_build(
    cache_dir: str | os.PathLike,
    identity: Mapping[str, Any],
    sources: Sequence[str],
    translate: Callable[[Sequence[str]], list[str]],
    overwrite: bool = False,
) -> Dataset:
    """The cached teacher translations of `sources`, generated with `translate` when the cache cannot be used.

    Returns a Dataset with columns "source" and "target", in the order of `sources`.
    """
    state = inspect_cache(cache_dir, identity)
    if state.status == VALID and not overwrite:
        logger.info(
            f"Sequence-level KD: using the {len(state.dataset)} cached teacher translations in {cache_dir}"
        )
        return state.dataset
    if state.status == VALID:
        logger.warning(
            f"Sequence-level KD: --seq_kd_overwrite_cache is set, regenerating the cache in {cache_dir}"
        )
    elif state.status == STALE:
        logger.warning(
            f"Sequence-level KD: the cache in {cache_dir} was built for another run ({state.detail}); regenerating "
            "it. Point --seq_kd_cache_dir elsewhere to keep both."
        )
    elif state.status == PARTIAL:
        logger.warning(f"Sequence-level KD: ignoring an incomplete cache ({state.detail}); regenerating it.")
    logger.info(f"Sequence-level KD: translating {len(sources)} training sources with the teacher")
    start = time.perf_counter()
    targets = translate(sources)
    if len(targets) != len(sources):
        raise RuntimeError(f"the teacher returned {len(targets)} translations for {len(sources)} sources.")
    logger.info(f"Sequence-level KD: translated {len(sources)} sources in {time.perf_counter() - start:.1f}s")
    return write_cache(cache_dir, sources, targets, identity)


# --------------------------------------------------------------------------------------------- generation
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
