"""Identities of what a cache was built from: a model's weights, a tokenizer's vocabulary, rows of token ids, texts.

Caches (the teacher logits cache, the sequence-level KD cache) record these in their manifest and compare them with
a later run's. Each is a sha256 hex digest (or a small dict of them) and depends only on content, never on paths.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer of `model`: its name, dtype, shape and bytes, in name order.

    Two models have the same fingerprint exactly when their state dicts are bit-identical, wherever they were
    loaded from: a teacher re-trained into the same directory gets a new one, a copy of it keeps it. Hashing runs
    at memory speed (a few seconds for a 600M-parameter model), small next to what a cache spends on the teacher.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def vocab_hash(tokenizer: Any) -> str:
    """sha256 of the tokenizer's token -> id map (added tokens included)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()


def tokenizer_description(tokenizer: Any) -> dict[str, Any]:
    """Where a tokenizer came from, its size, and `vocab_hash` (what decides whether two tokenizers agree)."""
    return {
        "name_or_path": getattr(tokenizer, "name_or_path", None),
        "vocab_size": len(tokenizer),
        "vocab_hash": vocab_hash(tokenizer),
    }


def _length_prefixed_sha256(items: Iterable[tuple[int, bytes]]) -> str:
    # The length before each item's bytes keeps item boundaries: ("ab", "c") and ("a", "bc") differ.
    digest = hashlib.sha256()
    for length, data in items:
        digest.update(np.int64(length).tobytes())
        digest.update(data)
    return digest.hexdigest()


def ids_checksum(rows: Iterable[Sequence[int]]) -> str:
    """sha256 over rows of token ids in order: each row's length, then its ids as int64."""
    arrays = (np.asarray(row, dtype=np.int64) for row in rows)
    return _length_prefixed_sha256((ids.size, ids.tobytes()) for ids in arrays)


def texts_checksum(texts: Iterable[str]) -> str:
    """sha256 over texts in order: each text's UTF-8 length, then its UTF-8 bytes."""
    encoded = (text.encode("utf-8") for text in texts)
    return _length_prefixed_sha256((len(data), data) for data in encoded)
