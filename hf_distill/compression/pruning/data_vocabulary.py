"""Which vocabulary ids a task's data needs: `tokens_used`.

The data is tokenized exactly as training will tokenize it (special tokens added, truncated to ``max_length``), and
every word the model sees is kept whole. Truncation works on tokens, so it can cut a word: at max_length 64
"hailstorm" may end an example as ``hail`` with ``##storm`` cut off. Keeping only ``hail`` would change what the
model sees after pruning, because a tokenizer works on whole words (pre-tokenizer splits): WordPiece turns a word
with a missing piece into ``[UNK]``, and BPE merges or Unigram's Viterbi over the rest of a word can change its first
pieces. So the pieces of every word truncation cut are kept too (for text pairs, whose split between the two
segments depends on both full lengths, every token of a truncated pair is kept), and the pruned tokenizer gives the
same ids on every training example at that ``max_length``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import islice

from tokenizers import Encoding
from transformers import PreTrainedTokenizerFast

from hf_distill.compression.pruning.tokenizer_vocabulary import _TokenizerState, complete_keep_ids

__all__ = ["tokens_used"]


def _batches(
    texts: Iterable[str], text_pairs: Iterable[str] | None, size: int
) -> Iterator[tuple[list[str], list[str] | None]]:
    texts = iter(texts)
    pairs = None if text_pairs is None else iter(text_pairs)
    while batch := list(islice(texts, size)):
        if pairs is None:
            yield batch, None
        else:
            pair_batch = list(islice(pairs, len(batch)))
            if len(pair_batch) != len(batch):
                raise ValueError("text_pairs is shorter than texts; pass one pair per text")
            yield batch, pair_batch


def _wordpiece_failed_path(word: str, vocab: dict[str, int], prefix: str, max_chars: int) -> list[str]:
    """The pieces WordPiece's greedy longest-match takes on ``word`` before failing ([] if it succeeds)."""
    if len(word) > max_chars:
        return []
    path, start = [], 0
    while start < len(word):
        for end in range(len(word), start, -1):
            piece = word[start:end] if start == 0 else prefix + word[start:end]
            if piece in vocab:
                path.append(piece)
                start = end
                break
        else:
            return path
    return []


def tokens_used(
    tokenizer: PreTrainedTokenizerFast,
    texts: Iterable[str],
    *,
    min_count: int = 1,
    text_pairs: Iterable[str] | None = None,
    max_length: int | None = None,
    complete: bool = True,
    batch_size: int = 1000,
) -> list[int]:
    """The sorted ids that tokenizing ``texts`` (with special tokens) produces at least ``min_count`` times.

    Special tokens are always included. ``text_pairs``: second segments, one per text, tokenized as pairs.
    ``max_length``: truncate each example to this many tokens first, as the training data will be; the words
    truncation cuts are kept whole (see the module docstring), so the pruned tokenizer gives the same ids on these
    texts at this ``max_length``.
    ``complete``: also add the ids the tokenizer's algorithm needs to reproduce these tokenizations after
    pruning (see the module docstring); the result then passes ``check_vocabulary_keep``.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    view = _TokenizerState(tokenizer)
    counts: Counter[int] = Counter()
    unk_id = view.model_vocab.get(view.unk_token()) if view.kind == "WordPiece" else None
    texts_with_unk: list[str] = []
    for batch, pair_batch in _batches(texts, text_pairs, batch_size):
        encoded = _encode(tokenizer, batch, pair_batch, max_length)
        whole = None if max_length is None else _encode(tokenizer, batch, pair_batch, None)
        for index, seen in enumerate(encoded):
            ids = seen.ids if whole is None else _with_cut_words(seen, whole[index], pair_batch is not None)
            counts.update(ids)
            if unk_id is not None and unk_id in ids:
                texts_with_unk.append(batch[index])
                if pair_batch is not None:
                    texts_with_unk.append(pair_batch[index])
    keep = {index for index, count in counts.items() if count >= min_count}
    keep |= set(view.special_ids())
    if texts_with_unk:
        keep |= _wordpiece_failed_path_ids(view, texts_with_unk)
    return complete_keep_ids(tokenizer, keep) if complete else sorted(keep)


def _wordpiece_failed_path_ids(view: _TokenizerState, texts: list[str]) -> set[int]:
    normalizer, pre_tokenizer = view.backend.normalizer, view.backend.pre_tokenizer
    prefix = view.model.get("continuing_subword_prefix", "##")
    max_chars = view.model.get("max_input_chars_per_word", 100)
    words = set()
    for text in texts:
        normalized = normalizer.normalize_str(text) if normalizer is not None else text
        pieces = (
            pre_tokenizer.pre_tokenize_str(normalized) if pre_tokenizer is not None else [(normalized, None)]
        )
        words.update(word for word, _ in pieces)
    ids = set()
    for word in words:
        ids.update(
            view.model_vocab[p] for p in _wordpiece_failed_path(word, view.model_vocab, prefix, max_chars)
        )
    return ids


def _encode(
    tokenizer: PreTrainedTokenizerFast, batch: list[str], pair_batch: list[str] | None, max_length: int | None
) -> list[Encoding]:
    """The `tokenizers` encodings of a batch, with special tokens, truncated to `max_length` (None: not at all)."""
    return tokenizer(
        batch,
        pair_batch,
        add_special_tokens=True,
        truncation=max_length is not None,
        max_length=max_length,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,  # the untruncated pass may exceed model_max_length; only its words are read
    ).encodings


def _with_cut_words(seen: Encoding, whole: Encoding, is_pair: bool) -> list[int]:
    """The ids of `seen` (an example as truncated) plus the pieces, from `whole` (the same example untruncated), of
    every word truncation cut; every id of `whole` for a truncated pair."""
    if len(seen.ids) == len(whole.ids):
        return seen.ids
    if is_pair:
        return whole.ids
    words = {(sequence, word) for sequence, word in zip(seen.sequence_ids, seen.word_ids) if word is not None}
    pieces = Counter(
        index
        for index, sequence, word in zip(whole.ids, whole.sequence_ids, whole.word_ids)
        if (sequence, word) in words
    )
    kept = Counter(index for index, word in zip(seen.ids, seen.word_ids) if word is not None)
    return [*seen.ids, *(pieces - kept).elements()]
