"""TinyBERT-style data augmentation (Jiao et al., 2020): new training texts made by replacing words.

TinyBERT replaces each word with probability `replace_prob` by one of K candidates: for a single-piece word, the
top-K predictions of a masked LM with that word masked; for a multi-piece word, its nearest neighbours in GloVe.
Two sources of candidates are implemented, each behind the same small interface (`manifest_entries`, `augment`):

- `EmbeddingNeighbours` (the default, no extra model): a word that is one whole-word token of the tokenizer is
  replaced by one of its `neighbours` nearest whole-word tokens by cosine similarity of an input-embedding matrix
  (the teacher's), itself excluded. This is TinyBERT's route for multi-piece words with the teacher's embeddings
  standing in for GloVe; a text is tokenized without special tokens, cut to `max_tokens`, and decoded back.
- `MaskedLMPredictions` (`--augment_model_name_or_path`, a BERT-style masked LM with its own tokenizer): each
  single-piece word of the text is masked, one at a time ([CLS] ... [MASK] ... [SEP], one forward row per word),
  and its candidates are the MLM's `top_k` most likely whole-word tokens at that position, the word itself
  excluded. Multi-piece words (and words the MLM's tokenizer does not know) are kept as they are: TinyBERT's
  fallback for them is a GloVe table, which nothing here has offline. The text is cut to `max_tokens` of the MLM's
  tokens and the replacements are spliced in at the words' character offsets, so the untouched parts keep their
  case and punctuation.

Whole-word tokens are those of `candidate_tokens`: not special, not a WordPiece `##` continuation, alphabetic, two
characters or more (a WordPiece vocabulary, as BERT's, is what this is written for).

The texts are written once to `<directory>/augmented.jsonl` with `manifest.json` (the settings, a checksum of the
source texts, and the identity of the candidate source: the tokenizer's vocabulary and the embedding matrix, or the
masked LM's weights and vocabulary), both atomically, the manifest last: a later run with the same inputs reuses
the file, any change writes it again.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from transformers.utils import logging

from hf_distill.storage.atomic import atomic_open, atomic_write_text
from hf_distill.storage.fingerprint import model_fingerprint, texts_checksum, vocab_hash

logger = logging.get_logger(__name__)

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


def _replacements(
    slots: Sequence[Sequence[Any]], copies: int, replace_prob: float, rng: random.Random
) -> Iterator[dict[int, Any]]:
    """For each copy, slot index -> the candidate chosen for it: each slot (a word with its candidates) is replaced
    with probability `replace_prob` by one of its candidates, chosen uniformly."""
    for _ in range(copies):
        chosen = {}
        for index, candidates in enumerate(slots):
            if rng.random() < replace_prob:
                chosen[index] = rng.choice(candidates)
        yield chosen


class WordReplacer(Protocol):
    """Where the replacement candidates come from; `write_augmented` calls it."""

    method: str

    def manifest_entries(self) -> dict[str, Any]:
        """What identifies the candidates: compared with the manifest of an earlier run (settings included)."""
        ...

    def augment(
        self, texts: Sequence[str], *, copies: int, replace_prob: float, max_tokens: int, seed: int
    ) -> list[str]:
        """`copies` augmented versions of each text, in order (text 0's copies first)."""
        ...


class EmbeddingNeighbours:
    """Candidates: a token's nearest whole-word tokens in an input-embedding matrix (module docstring)."""

    method = "embedding_neighbours"

    def __init__(self, tokenizer: Any, embeddings: torch.Tensor, neighbours: int = 15):
        self.tokenizer, self.embeddings, self.neighbours = tokenizer, embeddings, neighbours

    def manifest_entries(self) -> dict[str, Any]:
        digest = hashlib.sha256(self.embeddings.detach().float().contiguous().cpu().numpy().tobytes())
        return {
            "settings": {"neighbours": self.neighbours},
            "tokenizer_vocab": vocab_hash(self.tokenizer),
            "embeddings": digest.hexdigest()[:16],
        }

    def augment(
        self, texts: Sequence[str], *, copies: int, replace_prob: float, max_tokens: int, seed: int
    ) -> list[str]:
        tokenizer = self.tokenizer
        candidates = candidate_tokens(tokenizer)
        continuation = {index for token, index in tokenizer.get_vocab().items() if token.startswith("##")}
        encoded = [tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens] for text in texts]
        used = [
            token_id
            for ids in encoded
            for token_id in ids
            if token_id < len(candidates) and candidates[token_id]
        ]
        table = nearest_neighbours(self.embeddings, used, candidates, self.neighbours) if used else {}
        rng = random.Random(seed)
        augmented = []
        for ids in encoded:
            positions = _replaceable(ids, candidates, continuation)
            slots = [table[ids[position]] for position in positions]
            for chosen in _replacements(slots, copies, replace_prob, rng):
                new_ids = list(ids)
                for slot, token_id in chosen.items():
                    new_ids[positions[slot]] = token_id
                augmented.append(tokenizer.decode(new_ids))
        return augmented


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
    """`copies` embedding-neighbour augmentations of each text, in order (text 0's copies first)."""
    return EmbeddingNeighbours(tokenizer, embeddings, neighbours).augment(
        texts, copies=copies, replace_prob=replace_prob, max_tokens=max_tokens, seed=seed
    )


class MaskedLMPredictions:
    """Candidates: a masked LM's top-k predictions for each single-piece word, masked one at a time.

    model: an `AutoModelForMaskedLM` (eval mode is set here); tokenizer: its fast tokenizer (word ids and character
    offsets are needed), which may differ from the student's; batch_size: masked rows per forward pass.
    """

    method = "masked_lm"

    def __init__(self, model: Any, tokenizer: Any, top_k: int = 15, batch_size: int = 32):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"the masked LM's tokenizer {type(tokenizer).__name__} is not a fast tokenizer: word boundaries and "
                "character offsets are needed; save the model with its tokenizer.json."
            )
        if tokenizer.mask_token_id is None:
            raise ValueError(f"the masked LM's tokenizer {type(tokenizer).__name__} has no mask token.")
        self.model, self.tokenizer, self.top_k, self.batch_size = model.eval(), tokenizer, top_k, batch_size

    def manifest_entries(self) -> dict[str, Any]:
        return {
            "settings": {"top_k": self.top_k},
            "mlm_model": model_fingerprint(self.model),
            "mlm_tokenizer_vocab": vocab_hash(self.tokenizer),
        }

    def _words(self, text: str, max_tokens: int, candidates: torch.Tensor) -> tuple[str, list[int], list]:
        """(the text cut to max_tokens tokens, its token ids with the special tokens, [(token position, char start,
        char end)] of its single-piece whole words; a word cut by max_tokens is not one)."""
        encoding = self.tokenizer(text, return_offsets_mapping=True, verbose=False)
        ids, offsets, word_ids = encoding["input_ids"], encoding["offset_mapping"], encoding.word_ids()
        content = [position for position, word in enumerate(word_ids) if word is not None]
        if not content:
            return "", ids, []
        kept = content[:max_tokens]
        pieces: dict[int, list[int]] = {}
        for position in content:
            pieces.setdefault(word_ids[position], []).append(position)
        words = []
        for position in kept:
            token_id = ids[position]
            if len(pieces[word_ids[position]]) == 1 and token_id < len(candidates) and candidates[token_id]:
                words.append((position, *offsets[position]))
        # The special tokens around the content stay, as in a truncated encoding.
        ids = ids[: kept[-1] + 1] + ids[content[-1] + 1 :]
        return text[: offsets[kept[-1]][1]], ids, words

    @torch.no_grad()
    def _predictions(self, rows: list[tuple[list[int], int]], candidates: torch.Tensor) -> list[list[int]]:
        """For each (token ids, position), the top_k candidate ids the MLM predicts there with that token masked."""
        tokenizer, device = self.tokenizer, self.model.device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        results: list[list[int]] = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (ids, position) in enumerate(chunk):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                input_ids[row, position] = tokenizer.mask_token_id
                attention[row, : len(ids)] = 1
            logits = self.model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
            rows_index = torch.arange(len(chunk))
            positions = torch.tensor([position for _, position in chunk])
            scores = logits[rows_index.to(device), positions.to(device)].float().cpu()  # (B, V)
            allowed = torch.zeros(scores.shape[-1], dtype=torch.bool)
            size = min(len(candidates), scores.shape[-1])
            allowed[:size] = candidates[:size]
            scores = scores.masked_fill(~allowed, float("-inf"))
            scores[rows_index, torch.tensor([ids[position] for ids, position in chunk])] = float(
                "-inf"
            )  # not itself
            k = min(self.top_k, int(allowed.sum()) - 1)
            results.extend(scores.topk(k, dim=-1).indices.tolist())
        return results

    def augment(
        self, texts: Sequence[str], *, copies: int, replace_prob: float, max_tokens: int, seed: int
    ) -> list[str]:
        candidates = candidate_tokens(self.tokenizer)
        words = [self._words(text, max_tokens, candidates) for text in texts]
        rows = [(ids, position) for _, ids, spans in words for position, _, _ in spans]
        logger.info(f"Masked-LM augmentation: {len(rows)} masked words in {len(texts)} texts")
        predicted = iter(self._predictions(rows, candidates) if rows else [])
        rng = random.Random(seed)
        augmented = []
        for text, _, spans in words:
            slots = [
                [self.tokenizer.convert_tokens_to_string([token]).strip() for token in tokens]
                for tokens in (self.tokenizer.convert_ids_to_tokens(next(predicted)) for _ in spans)
            ]
            for chosen in _replacements(slots, copies, replace_prob, rng):
                pieces, end = [], 0
                for slot, word in sorted(chosen.items()):
                    _, start, stop = spans[slot]
                    pieces += [text[end:start], word]
                    end = stop
                augmented.append("".join(pieces) + text[end:])
        return augmented


def load_masked_lm(name_or_path: str, loading_args: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a masked LM for `MaskedLMPredictions`; raises when the checkpoint has no trained
    masked-LM head (a sentence encoder such as all-MiniLM-L6-v2 loads as one with a random head)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from hf_distill.tasks.common.loading import load_pretrained

    role = "--augment_model_name_or_path"
    try:
        model, info = load_pretrained(
            AutoModelForMaskedLM, name_or_path, role=role, loading_args=loading_args, output_loading_info=True
        )
    except ValueError as error:  # a config class with no masked-LM model
        raise ValueError(
            f"{role} {name_or_path!r} is not a masked language model ({str(error).splitlines()[0]}); pass a "
            "BERT-style masked LM such as a bert-base-uncased folder."
        ) from error
    head = sorted(info.get("missing_keys", ()))
    if head:
        raise ValueError(
            f"{role} {name_or_path!r} has no trained masked-LM head (missing {head}): its predictions would be "
            "random. Pass a masked LM (e.g. a bert-base-uncased folder); sentence encoders such as the demo's "
            "all-MiniLM-L6-v2 have none (drop the flag to use embedding neighbours instead)."
        )
    tokenizer = load_pretrained(
        AutoTokenizer, name_or_path, role=f"{role} tokenizer", loading_args=loading_args
    )
    return model, tokenizer


def write_augmented(
    rows: Sequence[dict[str, str]],
    text_columns: Sequence[str],
    replacer: WordReplacer,
    directory: str | Path,
    *,
    copies: int,
    replace_prob: float,
    max_tokens: int,
    seed: int,
) -> Path:
    """<directory>/augmented.jsonl with `copies` augmented rows per row of `rows` (each text column augmented by
    `replacer`), written once; reused while its manifest matches these inputs, settings and replacer."""
    directory = Path(directory)
    texts = [row[column] or "" for row in rows for column in text_columns]
    identity = replacer.manifest_entries()
    settings = {
        "copies": copies,
        "replace_prob": replace_prob,
        "max_tokens": max_tokens,
        "seed": seed,
        "text_columns": list(text_columns),
        **identity.pop("settings", {}),
    }
    manifest = {
        "format": FORMAT_VERSION,
        "method": replacer.method,
        "settings": settings,
        "source_texts": texts_checksum(texts),
        "source_rows": len(rows),
        **identity,
        "file": DATA_FILE,
    }
    manifest_path, data_path = directory / MANIFEST, directory / DATA_FILE
    if manifest_path.is_file() and data_path.is_file():
        try:
            existing = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            existing = None
        if existing is not None and {key: existing.get(key) for key in manifest} == manifest:
            logger.info(f"Reusing the augmented texts in {data_path} (its manifest matches)")
            return data_path
    columns = {
        column: replacer.augment(
            [row[column] or "" for row in rows],
            copies=copies,
            replace_prob=replace_prob,
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
    """`write_augmented` with embedding-neighbour candidates from `embeddings` (the default method)."""
    return write_augmented(
        rows,
        text_columns,
        EmbeddingNeighbours(tokenizer, embeddings, neighbours),
        directory,
        copies=copies,
        replace_prob=replace_prob,
        max_tokens=max_tokens,
        seed=seed,
    )
