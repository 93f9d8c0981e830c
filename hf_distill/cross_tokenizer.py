"""Distillation between a teacher and a student that tokenize text differently: which positions of the two
tokenizations can be compared, which vocabulary entries mean the same string, and the collator that gives each
batch the teacher's own tokenization of the same text.

Positions. Each token of a fast tokenizer's encoding *covers* a span of characters of the text: its offsets, with
the whitespace no token's offsets cover given to the token that follows it (where byte-level BPE's `Ġ` and
SentencePiece's `▁` put a space: at the start of the next token). WordPiece drops whitespace, so its word-start
token stands for the whitespace before the word and the word: for WordPiece, "having read the text" means having
read up to the end of the last word, and a word-start token predicts the whitespace run and the word together. Two
corrections make offsets the characters a token really reads: whitespace a tokenizer cut from the end of its
offsets (byte-level BPE with `trim_offsets`: `ĊĠ` reported as the newline only) goes back to it, and a token of
whitespace only whose offsets hold no whitespace (the `▁` SentencePiece prepends to the text) reads no character.
A special token with an empty span (one the post-processor added: BOS, CLS, SEP) reads nothing; a special token
in the text (chat templates) or an unknown token reads its span but is never predicted.

Causal LMs predict token t + 1 at position t. The student's distribution at t is compared with the teacher's at u
when tokens t + 1 and u + 1 cover exactly the same characters [a, b), and each is a whole token (not special; no
neighbour shares one of its characters, as the byte pieces of a character split into bytes do). Then both
positions have read exactly the text [0, a), whitespace included, and both predict the text [a, b). A character
split into byte pieces is never predicted, but the position after its last piece is a context like any other.
Everything else learns from the student's own cross-entropy only.

Vocabulary. A token's text is what its tokenizer decodes it to after another token (`tokenizer.decode([a, id])`
minus the decoding of `a`), so a word-start piece keeps its space whatever the convention (`Ġthe`, `▁the` and a
WordPiece `the` all read " the"; `##s` reads "s"); a byte piece that is not a whole character (byte-level
`ĠÃ`, SentencePiece byte fallback `<0xC3>`) reads as its raw bytes, its convention checked by encoding and
decoding probes rather than read from the names of the tokenizer's components. Tokens whose texts are the same
bytes are mapped one to one (the lowest id wins on a side that has two); special tokens are never mapped.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

TEXT_COLUMN = "text"
TEACHER_INPUT_IDS = "teacher_input_ids"
TEACHER_ATTENTION_MASK = "teacher_attention_mask"
ALIGNED_COLUMN = "teacher_aligned_positions"  # (B, T_student): teacher position compared with each, -1 = none
CROSS_TOKENIZER_COLUMNS = (TEACHER_INPUT_IDS, TEACHER_ATTENTION_MASK, ALIGNED_COLUMN)
# Bump when the pairing rule changes: caches of paired positions built under another rule are refused.
ALIGNMENT_VERSION = 2

Offsets = Sequence[tuple[int, int]]
Span = tuple[int, int]


# --------------------------------------------------------------------------------------------- positions
def _trailing_whitespace(string: str) -> int:
    return len(string) - len(string.rstrip())


def _flag(flags: Sequence[bool] | None, index: int) -> bool:
    return flags is not None and bool(flags[index])


def token_spans(
    offsets: Offsets,
    *,
    text: str | None = None,
    special: Sequence[bool] | None = None,
    token_texts: Sequence[str | None] | None = None,
) -> list[Span | None]:
    """The characters [a, b) each token reads (see the module docstring), None for a token that reads none.

    offsets: (start, end) per token as fast tokenizers return them; special: True for special tokens;
    token_texts: each token's text (`token_texts`), which un-trims whitespace cut from the end of an offset and
    drops a prepended marker (both need `text`)."""
    spans: list[Span | None] = [None] * len(offsets)
    cursor = 0  # the end of the text read so far
    for i, (start, end) in enumerate(offsets):
        is_special = _flag(special, i)
        if is_special and start == end:
            continue  # added by the post-processor: reads no text
        piece = token_texts[i] if token_texts is not None and not is_special else None
        if piece and text is not None and piece.isspace() and not text[start:end].isspace() and end > start:
            continue  # a marker the tokenizer prepended to the text: it stands for no character of it
        start = min(start, cursor)  # the text no token's offsets cover before a token is read by it
        missing = _trailing_whitespace(piece) - _trailing_whitespace(text[start:end]) if piece and text else 0
        if missing > 0 and end > start and text[end : end + missing] == piece[-missing:]:
            # whitespace a trimming post-processor cut from this token's offsets, unless the next token covers it
            following = (
                s for k, (s, e) in enumerate(offsets[i + 1 :], i + 1) if e > s or not _flag(special, k)
            )
            if end + missing <= next(following, len(text)):
                end += missing
        if end > start:
            spans[i] = (start, end)
            cursor = max(cursor, end)
    return spans


def _whole(spans: list[Span | None]) -> tuple[list[bool], list[bool]]:
    """Per token: (starts clean, ends clean): no other token's span reaches into its first / last character."""
    starts, ends = [False] * len(spans), [False] * len(spans)
    reach = 0
    for i, span in enumerate(spans):
        if span is not None:
            starts[i], reach = span[0] >= reach, max(reach, span[1])
    following = None
    for i in range(len(spans) - 1, -1, -1):
        if spans[i] is not None:
            ends[i] = following is None or following >= spans[i][1]
            following = spans[i][0] if following is None else min(following, spans[i][0])
    return starts, ends


def _predicted_spans(
    offsets: Offsets,
    special: Sequence[bool] | None,
    text: str | None,
    token_texts: Sequence[str | None] | None,
) -> dict[Span, int]:
    """span -> the position t whose next token t + 1 is a whole, non-special token covering that span."""
    spans = token_spans(offsets, text=text, special=special, token_texts=token_texts)
    starts, ends = _whole(spans)
    return {
        spans[i]: i - 1
        for i in range(1, len(spans))
        if spans[i] is not None and starts[i] and ends[i] and not _flag(special, i)
    }


def align_positions(
    student_offsets: Offsets,
    teacher_offsets: Offsets,
    *,
    text: str | None = None,
    student_special: Sequence[bool] | None = None,
    teacher_special: Sequence[bool] | None = None,
    student_token_texts: Sequence[str | None] | None = None,
    teacher_token_texts: Sequence[str | None] | None = None,
) -> list[tuple[int, int]]:
    """(student token, teacher token) index pairs after which both have read exactly the same text: non-special
    tokens whose spans (`token_spans`) end at the same character, neither sharing its last character with the next
    token (a character split into byte pieces aligns through its last piece). Arguments as in `prediction_pairs`."""

    def ends(offsets, special, token_texts):
        spans = token_spans(offsets, text=text, special=special, token_texts=token_texts)
        return {
            span[1]: i
            for i, (span, whole) in enumerate(zip(spans, _whole(spans)[1]))
            if span is not None and whole and not _flag(special, i)
        }

    student = ends(student_offsets, student_special, student_token_texts)
    teacher = ends(teacher_offsets, teacher_special, teacher_token_texts)
    return sorted((t, teacher[end]) for end, t in student.items() if end in teacher)


def prediction_pairs(
    student_offsets: Offsets,
    teacher_offsets: Offsets,
    *,
    text: str | None = None,
    student_special: Sequence[bool] | None = None,
    teacher_special: Sequence[bool] | None = None,
    student_token_texts: Sequence[str | None] | None = None,
    teacher_token_texts: Sequence[str | None] | None = None,
) -> list[tuple[int, int]]:
    """(student position t, teacher position u), sorted, whose next-token distributions are compared: tokens t + 1
    and u + 1 are whole, non-special tokens covering the same characters [a, b), so that both positions have read
    exactly text[:a] and predict text[a:b] (see the module docstring).

    *_offsets: (start, end) character spans per token, as fast tokenizers return them (`return_offsets_mapping`).
    text: the encoded text. *_special: True for special tokens (an empty-span one reads no text; none is predicted).
    *_token_texts: each token's text (`token_texts(tokenizer, ids)`); without them, offsets are taken as they are,
    which is exact for tokenizers that do not trim whitespace from their offsets (`CrossTokenizerCollator` passes
    them)."""
    student = _predicted_spans(student_offsets, student_special, text, student_token_texts)
    teacher = _predicted_spans(teacher_offsets, teacher_special, text, teacher_token_texts)
    return sorted((t, teacher[span]) for span, t in student.items() if span in teacher)


# --------------------------------------------------------------------------------------------- tokens' text
@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet: each byte is shown as a printable character (GPT-2's convention: printable
    Latin-1 bytes as themselves, the others shifted past 255), mapped back to the byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    characters, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            characters[chr(byte)] = byte
        else:
            characters[chr(256 + shifted)] = byte
            shifted += 1
    return characters


def _alphabet_bytes(piece: str) -> bytes | None:
    alphabet = _byte_alphabet()
    return bytes(alphabet[c] for c in piece) if all(c in alphabet for c in piece) else None


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_PROBE = "a b\n\tc é😀 12"
_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _is_byte_level(tokenizer: Any) -> bool:
    """Probe: the pieces of a text with spaces, a newline, a tab, an accent and an emoji spell its UTF-8 bytes in the
    byte-level alphabet (a space the tokenizer prepends aside)."""
    ids = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    spelled = [_alphabet_bytes(piece) for piece in tokenizer.convert_ids_to_tokens(ids)]
    return None not in spelled and b"".join(spelled).removeprefix(b" ") == _PROBE.encode()


def _token_bytes(tokenizer: Any) -> dict[int, bytes | None]:
    """id -> the bytes the token stands for (see the module docstring), None for special tokens and tokens without
    a text; built once per tokenizer (and again when its vocabulary grows)."""
    cached = _TABLES.get(tokenizer)
    if cached is not None and cached[0] == len(tokenizer):
        return cached[1]
    backend = tokenizer.backend_tokenizer
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"]
    prefix = backend.decode(anchor, skip_special_tokens=False)
    ids = sorted(tokenizer.get_vocab().values())
    decoded = backend.decode_batch([anchor + [i] for i in ids], skip_special_tokens=False)
    special, added = set(tokenizer.all_special_ids), tokenizer.get_added_vocab()
    pieces = tokenizer.convert_ids_to_tokens(ids)
    texts = {i: out[len(prefix) :] if out.startswith(prefix) else None for i, out in zip(ids, decoded)}
    # byte pieces that are no whole character decode to U+FFFD; the probes say how to read them
    byte_level = _is_byte_level(tokenizer)
    byte_fallback = any(
        (m := _BYTE_PIECE.fullmatch(piece))
        and int(m.group(1), 16) < 0x80
        and texts[i] == chr(int(m.group(1), 16))
        for i, piece in zip(ids, pieces)
    )
    table: dict[int, bytes | None] = {}
    for i, piece in zip(ids, pieces):
        text, byte = texts[i], _BYTE_PIECE.fullmatch(piece)
        if i in special:
            table[i] = None
        elif piece in added:  # an added token matches its literal text, whatever the model's convention
            table[i] = piece.encode()
        elif text is not None and "\ufffd" not in text:
            table[i] = text.encode() or None
        elif byte_level:
            table[i] = _alphabet_bytes(piece)
        else:
            table[i] = bytes([int(byte.group(1), 16)]) if byte and byte_fallback else None
    _TABLES[tokenizer] = (len(tokenizer), table)
    return table


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str | None]:
    """Each token's text (its bytes decoded, U+FFFD for an incomplete character), None for special tokens."""
    table = _token_bytes(tokenizer)
    return [None if table.get(i) is None else table[i].decode("utf-8", "replace") for i in ids]


def vocabulary_map(student_tokenizer: Any, teacher_tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(student_ids, teacher_ids), (M,) long each, sorted by student id: the tokens that stand for the same bytes
    (see the module docstring), one to one, the lowest id winning on a side with several, special tokens
    excluded."""

    def by_bytes(tokenizer: Any) -> dict[bytes, int]:
        found: dict[bytes, int] = {}
        for token_id, key in sorted(_token_bytes(tokenizer).items()):
            if key is not None:
                found.setdefault(key, token_id)
        return found

    student, teacher = by_bytes(student_tokenizer), by_bytes(teacher_tokenizer)
    pairs = sorted((student_id, teacher[key]) for key, student_id in student.items() if key in teacher)
    student_ids = torch.tensor([s for s, _ in pairs], dtype=torch.long)
    teacher_ids = torch.tensor([t for _, t in pairs], dtype=torch.long)
    return student_ids, teacher_ids


# --------------------------------------------------------------------------------------------- checks
def check_alignable(student_tokenizer: Any, teacher_tokenizer: Any, sample_text: str | None = None) -> None:
    """Raise before training when the two tokenizations cannot be aligned: a tokenizer without character offsets
    (a slow, Python tokenizer), or no position pair on `sample_text`."""
    for role, tokenizer in (("student", student_tokenizer), ("teacher", teacher_tokenizer)):
        if tokenizer is None:
            raise ValueError(
                f"cross-tokenizer distillation needs the {role}'s tokenizer: pass "
                + ("processing_class" if role == "student" else "teacher_processing_class")
                + " (the LM recipe loads the teacher's from its folder or --teacher_tokenizer_name)."
            )
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"the {role}'s tokenizer ({type(tokenizer).__name__}) is a slow tokenizer without character offsets, "
                "which cross-tokenizer alignment needs; load it with AutoTokenizer.from_pretrained(..., "
                "use_fast=True) or convert it to a tokenizers-library (fast) tokenizer."
            )
    if not sample_text or _encode_and_pair(student_tokenizer, teacher_tokenizer, sample_text)[2]:
        return
    for role, tokenizer in (("student", student_tokenizer), ("teacher", teacher_tokenizer)):
        encoding = tokenizer(sample_text, add_special_tokens=False, return_offsets_mapping=True)
        reading = [i for i, (s, e) in zip(encoding["input_ids"], encoding["offset_mapping"]) if e > s]
        unknown = tokenizer.unk_token_id
        if reading and unknown is not None and all(i == unknown for i in reading):
            raise ValueError(
                f"the {role}'s tokenizer reads {sample_text[:60]!r} as its unknown token {tokenizer.unk_token!r} "
                f"only ({len(reading)} of them), so no position predicts a token the other model can be compared "
                f"on. Its vocabulary has no pieces for this text: use a {role} tokenizer trained on text like this "
                "(hf_distill.tasks.lm_cross_tokenizer.train_tokenizer trains one offline)."
            )
    raise ValueError(
        f"the student's and the teacher's tokenizations of {sample_text[:60]!r} share no position where both have "
        "read the same text and predict the same span, so cross-tokenizer KD has nothing to compare. Check that "
        "both tokenizers return character offsets into the raw text (no normaliser that rewrites it beyond "
        "recognition)."
    )


def _encode(
    tokenizer: Any, text: str, max_length: int | None
) -> tuple[list[int], list[tuple[int, int]], list[bool], list[str | None]]:
    encoding = tokenizer(
        text,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        truncation=max_length is not None,
        max_length=max_length,
    )
    ids = list(encoding["input_ids"])
    special_ids = set(tokenizer.all_special_ids)
    special = [bool(m) or i in special_ids for i, m in zip(ids, encoding["special_tokens_mask"])]
    return ids, [tuple(o) for o in encoding["offset_mapping"]], special, token_texts(tokenizer, ids)


def _encode_and_pair(
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    text: str,
    max_length: int | None = None,
    teacher_max_length: int | None = None,
) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    student_ids, student_offsets, student_special, student_texts = _encode(
        student_tokenizer, text, max_length
    )
    # The teacher reads exactly the text the (possibly truncated) student read.
    spans = token_spans(student_offsets, text=text, special=student_special, token_texts=student_texts)
    text = text[: max((end for _, end in filter(None, spans)), default=0)]
    teacher_ids, teacher_offsets, teacher_special, teacher_texts = _encode(
        teacher_tokenizer, text, teacher_max_length
    )
    pairs = prediction_pairs(
        student_offsets,
        teacher_offsets,
        text=text,
        student_special=student_special,
        teacher_special=teacher_special,
        student_token_texts=student_texts,
        teacher_token_texts=teacher_texts,
    )
    return student_ids, teacher_ids, pairs


# --------------------------------------------------------------------------------------------- batches
def row_text(feature: Mapping[str, Any], column: str, row: int, where: str = "the batch") -> str:
    """The raw text of one row, refused when missing or not a string (never trained on as "None")."""
    value = feature.get(column) if isinstance(feature, Mapping) else None
    if not isinstance(value, str):
        found = (
            "no such column"
            if not isinstance(feature, Mapping) or column not in feature
            else repr(value)[:60]
        )
        raise ValueError(
            f"row {row} of {where} has no text in column {column!r} ({found}): cross-tokenizer rows need the raw "
            "string both tokenizers read. Drop rows without text (dataset.filter(lambda row: "
            f"isinstance(row[{column!r}], str))) or name the column that holds it (text_column)."
        )
    return value


@dataclass
class CrossTokenizerCollator:
    """Tokenizes each row's text with both tokenizers and pads them into one batch.

    Rows need a `text` column (the raw string, nothing pre-tokenized; a missing or non-string value is refused). The
    batch has the student's `input_ids`, `attention_mask` and `labels` (its own tokens, -100 on padding: the
    student's CE covers all of them), the teacher's `teacher_input_ids` and `teacher_attention_mask` for the same
    text (cut where the student's `max_length` cut it), and `teacher_aligned_positions` (B, T_student): for each
    student position t the teacher position whose next-token distribution is compared with it
    (`prediction_pairs`), -1 where none is. Right padding on both sides.
    """

    tokenizer: Any
    teacher_tokenizer: Any
    max_length: int | None = None
    teacher_max_length: int | None = None
    text_column: str = TEXT_COLUMN

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [
            _encode_and_pair(
                self.tokenizer,
                self.teacher_tokenizer,
                row_text(f, self.text_column, i),
                self.max_length,
                self.teacher_max_length,
            )
            for i, f in enumerate(features)
        ]
        student_length = max(max(len(s) for s, _, _ in rows), 1)
        teacher_length = max(max(len(t) for _, t, _ in rows), 1)
        batch_size = len(rows)
        input_ids = torch.full((batch_size, student_length), _pad_id(self.tokenizer), dtype=torch.long)
        attention_mask = torch.zeros((batch_size, student_length), dtype=torch.long)
        teacher_ids = torch.full(
            (batch_size, teacher_length), _pad_id(self.teacher_tokenizer), dtype=torch.long
        )
        teacher_mask = torch.zeros((batch_size, teacher_length), dtype=torch.long)
        aligned = torch.full((batch_size, student_length), -1, dtype=torch.long)
        for i, (student, teacher, pairs) in enumerate(rows):
            input_ids[i, : len(student)] = torch.tensor(student, dtype=torch.long)
            attention_mask[i, : len(student)] = 1
            teacher_ids[i, : len(teacher)] = torch.tensor(teacher, dtype=torch.long)
            teacher_mask[i, : len(teacher)] = 1
            for t, u in pairs:
                aligned[i, t] = u
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            TEACHER_INPUT_IDS: teacher_ids,
            TEACHER_ATTENTION_MASK: teacher_mask,
            ALIGNED_COLUMN: aligned,
        }


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
