"""TinyBERT-style data augmentation (Jiao et al., 2020) with embedding-neighbour word replacement.

TinyBERT replaces single-piece words with a masked LM's predictions and multi-piece words with their nearest
neighbours in GloVe. The demo's teacher (all-MiniLM-L6-v2, a sentence encoder) is not a masked LM, so here every
replaced word takes the route TinyBERT uses for the others, with the teacher's own input embeddings as the space:

- the candidates are the tokenizer's whole-word tokens (not special, not a `##` continuation, at least two
  letters); a word of the text is replaced only when it is one such token (multi-piece words stay as they are);
- each such word is replaced with probability `replace_prob` by one of its `neighbours` nearest candidates by cosine
  similarity of the input-embedding rows (itself excluded), chosen uniformly;
- a text is tokenized without special tokens, cut to `max_tokens` (the recipe's max_seq_length: what the models
  would see) and decoded back to text after replacement.

The texts are written once to `<directory>/augmented.jsonl` with `manifest.json` (the settings, a checksum of the
source texts, the tokenizer's vocabulary and the embedding matrix), both atomically, the manifest last: a later run
with the same inputs reuses the file, any change writes it again.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hf_distill.atomic import atomic_open, atomic_write_text
from hf_distill.fingerprint import texts_checksum, vocab_hash

MANIFEST = "manifest.json"
DATA_FILE = "augmented.jsonl"
FORMAT_VERSION = 1


def candidate_tokens(tokenizer: Any) -> torch.Tensor:
    """(V,) bool: the whole-word tokens (not special, not a '##' continuation, two letters or more)."""
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids)
    size = max(vocab.values()) + 1
    mask = torch.zeros(size, dtype=torch.bool)
    for token, index in vocab.items():
        if index not in special and not token.startswith("##") and len(token) >= 2 and token.isalpha():
            mask[index] = True
    return mask


def nearest_neighbours(
    embeddings: torch.Tensor, token_ids: Sequence[int], candidates: torch.Tensor, k: int, chunk: int = 2048
) -> dict[int, list[int]]:
    """token id -> its k nearest candidate ids by cosine similarity of the embedding rows (itself excluded)."""
    embeddings = F.normalize(embeddings.detach().float(), dim=-1)  # (V, H)
    candidate_ids = candidates[: embeddings.shape[0]].nonzero().squeeze(-1)  # (C,)
    candidate_rows = embeddings[candidate_ids]  # (C, H)
    k = min(k, len(candidate_ids) - 1)
    table: dict[int, list[int]] = {}
    ids = sorted(set(token_ids))
    for start in range(0, len(ids), chunk):
        block = torch.tensor(ids[start : start + chunk])
        similarity = embeddings[block] @ candidate_rows.T  # (chunk, C)
        similarity[block.unsqueeze(1) == candidate_ids.unsqueeze(0)] = float("-inf")  # never itself
        best = similarity.topk(k, dim=-1).indices
        for row, token_id in enumerate(block.tolist()):
            table[token_id] = candidate_ids[best[row]].tolist()
    return table


def _replaceable(ids: list[int], candidates: torch.Tensor, continuation: set[int]) -> list[int]:
    """Positions holding a whole word of one token: a candidate not followed by a '##' continuation."""
    positions = []
    for position, token_id in enumerate(ids):
        follows = ids[position + 1] if position + 1 < len(ids) else None
        if token_id < len(candidates) and candidates[token_id] and follows not in continuation:
            positions.append(position)
    return positions


def augment_texts(
    texts: Sequence[str],
    tokenizer: Any,
    embeddings: torch.Tensor,
    *,
    copies: int,
    replace_prob: float = 0.4,
    neighbours: int = 15,
    max_tokens: int = 128,
    seed: int = 0,
) -> list[str]:
    """`copies` augmented versions of each text, in order (text 0's copies first); see the module docstring."""
    candidates = candidate_tokens(tokenizer)
    continuation = {index for token, index in tokenizer.get_vocab().items() if token.startswith("##")}
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens] for text in texts]
    used = [
        token_id for ids in encoded for token_id in ids if token_id < len(candidates) and candidates[token_id]
    ]
    table = nearest_neighbours(embeddings, used, candidates, neighbours) if used else {}
    rng = random.Random(seed)
    augmented = []
    for ids in encoded:
        positions = _replaceable(ids, candidates, continuation)
        for _ in range(copies):
            new_ids = list(ids)
            for position in positions:
                if rng.random() < replace_prob:
                    new_ids[position] = rng.choice(table[ids[position]])
            augmented.append(tokenizer.decode(new_ids))
    return augmented


def _embedding_checksum(embeddings: torch.Tensor) -> str:
    return hashlib.sha256(embeddings.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def augmented_file(
    rows: Sequence[dict[str, str]],
    text_columns: Sequence[str],
    tokenizer: Any,
    embeddings: torch.Tensor,
    directory: str | Path,
    *,
    copies: int,
    replace_prob: float,
    neighbours: int,
    max_tokens: int,
    seed: int,
) -> Path:
    """<directory>/augmented.jsonl with `copies` augmented rows per row of `rows` (each text column augmented),
    written once; reused while its manifest matches these inputs and settings."""
    directory = Path(directory)
    texts = [row[column] or "" for row in rows for column in text_columns]
    manifest = {
        "format": FORMAT_VERSION,
        "method": "embedding_neighbours",
        "settings": {
            "copies": copies,
            "replace_prob": replace_prob,
            "neighbours": neighbours,
            "max_tokens": max_tokens,
            "seed": seed,
            "text_columns": list(text_columns),
        },
        "source_texts": texts_checksum(texts),
        "source_rows": len(rows),
        "tokenizer_vocab": vocab_hash(tokenizer),
        "embeddings": _embedding_checksum(embeddings),
        "file": DATA_FILE,
    }
    manifest_path, data_path = directory / MANIFEST, directory / DATA_FILE
    if manifest_path.is_file() and data_path.is_file():
        try:
            existing = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            existing = None
        if existing is not None and {key: existing.get(key) for key in manifest} == manifest:
            return data_path
    columns = {
        column: augment_texts(
            [row[column] or "" for row in rows],
            tokenizer,
            embeddings,
            copies=copies,
            replace_prob=replace_prob,
            neighbours=neighbours,
            max_tokens=max_tokens,
            seed=seed + offset,
        )
        for offset, column in enumerate(text_columns)
    }
    count = len(rows) * copies
    with atomic_open(data_path, "w") as handle:
        for index in range(count):
            handle.write(json.dumps({column: columns[column][index] for column in text_columns}) + "\n")
    atomic_write_text(manifest_path, json.dumps({**manifest, "rows": count}, indent=2))
    return data_path
