"""What a teacher-logits cache records about how it was built (`build_manifest`: teachers, tokenizer, data, k,
temperature) and the check that a training run matches it (`verify_manifest`), shared by every cache kind.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

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
from hf_distill.storage.fingerprint import model_fingerprint, tokenizer_description, vocab_hash


def teacher_entry(name: str, teacher: nn.Module) -> dict[str, Any]:
    """How the manifest names one teacher: its name or path, model type and weights' fingerprint."""
    config = getattr(teacher, "config", None)
    return {
        "name": name,
        "model_type": getattr(config, "model_type", None),
        "fingerprint": model_fingerprint(teacher),
    }


def build_manifest(
    *,
    teachers: Sequence[tuple[str, nn.Module]],
    tokenizer: Any,
    top_k: int,
    block_size: int | None,
    num_rows: int,
    num_tokens: int,
    data_checksum: str,
    logprobs_dtype: str,
    vocab_size: int,
    tail_temperature: float,
    target: str = TARGET_TEACHER,
    teacher_weights: Sequence[float] | None = None,
    teacher_weighting: str = "fixed",
    task: str = TASK_CAUSAL_LM,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of a cache of `target` ("teacher": one teacher at temperature 1; "mixture": several teachers'
    mixture at `tail_temperature`) over `teachers` (name, model) pairs, with normalised `teacher_weights`."""
    from hf_distill.version import __version__

    entries = [teacher_entry(name, model) for name, model in teachers]
    first_config = getattr(teachers[0][1], "config", None)
    return {
        "kind": "teacher_topk_logprobs",
        "format_version": FORMAT_VERSION,
        "hf_distill_version": __version__,
        "target": target,
        "target_temperature": float(tail_temperature) if target == TARGET_MIXTURE else None,
        "task": task,
        "teacher": " + ".join(entry["name"] for entry in entries),
        "teachers": entries,
        "teacher_weights": [float(w) for w in (teacher_weights or [1.0 / len(entries)] * len(entries))],
        "teacher_weighting": teacher_weighting,
        "teacher_model_type": entries[0]["model_type"],
        "teacher_fingerprint": entries[0]["fingerprint"],
        "teacher_vocab_size": getattr(first_config.get_text_config(), "vocab_size", None)
        if first_config is not None
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
        "cross_tokenizer": None,
        "layout": "flat row-major (position, rank); position t predicts token t + 1"
        if task == TASK_CAUSAL_LM
        else "one position per row: every class, ranked",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **dict(extra or {}),
    }


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
    cross = manifest.get("cross_tokenizer")
    if cross:
        problems.append(
            "it is a cross-tokenizer cache (the teacher's top k at the positions aligned with the student's own "
            f"tokenizer {cross.get('student_tokenizer', {}).get('name_or_path')!r}); train from it with "
            "--cross_tokenizer exact|uld|hybrid"
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
