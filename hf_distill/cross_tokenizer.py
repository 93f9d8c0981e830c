"""Distillation between a teacher and a student that tokenize text differently: which positions of the two
tokenizations can be compared, which vocabulary entries mean the same string, and the collator that gives each
batch the teacher's own tokenization of the same text.

Positions. Both tokenizers encode the same text with character offsets. Each token gets a *key*: the character
offset where its span ends, moved back over trailing whitespace (byte-level BPE carries a space at the start of the
next token, SentencePiece a `▁`, WordPiece drops spaces: all three then agree on where a word ends). A special token
with an empty span (one the post-processor added: BOS, CLS, SEP) consumes no text and takes the previous key (0 at
the start). A token is *complete* when no later non-special token has its key (the last byte-level piece of a
character split into bytes); a position is the *context* for key k when it is the last position with key k.

Causal LMs predict token t + 1 at position t. The student's distribution at position t is compared with the
teacher's at position u when both have read the same text (t and u are the contexts for one key) and both predict
the same span of text (tokens t + 1 and u + 1 are complete, not special, and end at the same key). Everything else
learns from the student's own cross-entropy only.

Vocabulary. Token strings are normalised to bytes: byte-level BPE pieces decoded from the byte alphabet (`Ġ` is a
space), SentencePiece `▁` read as a space and `<0xNN>` byte pieces as that byte, WordPiece `##x` as `x` and any
other WordPiece token `x` as ` x` (a word start). Tokens whose normalised strings are equal are mapped one to one
(the lowest id wins on a side that has two); special tokens are never mapped.
"""

from __future__ import annotations

import json
import re
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

Offsets = Sequence[tuple[int, int]]


# --------------------------------------------------------------------------------------------- positions
def _keys(offsets: Offsets, special: Sequence[bool] | None, text: str | None) -> list[int]:
    keys, previous = [], 0
    for i, (start, end) in enumerate(offsets):
        if special is not None and special[i] and start == end:
            keys.append(previous)  # added by the post-processor: reads no text
            continue
        key = len(text[:end].rstrip()) if text is not None else end
        keys.append(key)
        previous = key
    return keys


def _contexts(keys: list[int]) -> dict[int, int]:
    """key -> the last position with that key."""
    return {key: position for position, key in enumerate(keys)}


def _complete(keys: list[int], special: Sequence[bool] | None) -> list[bool]:
    """Whether each token is a whole, non-special token: no later non-special token ends at its key."""
    complete, later = [False] * len(keys), set()
    for i in range(len(keys) - 1, -1, -1):
        if special is not None and special[i]:
            continue
        complete[i] = keys[i] not in later
        later.add(keys[i])
    return complete


def align_positions(
    student_offsets: Offsets,
    teacher_offsets: Offsets,
    *,
    text: str | None = None,
    student_special: Sequence[bool] | None = None,
    teacher_special: Sequence[bool] | None = None,
) -> list[tuple[int, int]]:
    """(student token, teacher token) index pairs whose spans end at the same character offset.

    offsets: (start, end) character spans per token, as fast tokenizers return them (`return_offsets_mapping`).
    text: the encoded text; when given, ends are moved back over trailing whitespace (see the module docstring).
    *_special: True for special tokens (never aligned; an empty-span one reads no text).
    Only complete tokens pair up (a character split into several byte pieces pairs through its last piece).
    """
    student_keys = _keys(student_offsets, student_special, text)
    teacher_keys = _keys(teacher_offsets, teacher_special, text)
    teacher_by_key = {
        key: u
        for u, (key, whole) in enumerate(zip(teacher_keys, _complete(teacher_keys, teacher_special)))
        if whole
    }
    student_complete = _complete(student_keys, student_special)
    return [
        (t, teacher_by_key[key])
        for t, key in enumerate(student_keys)
        if student_complete[t] and key in teacher_by_key
    ]


def prediction_pairs(
    student_offsets: Offsets,
    teacher_offsets: Offsets,
    *,
    text: str | None = None,
    student_special: Sequence[bool] | None = None,
    teacher_special: Sequence[bool] | None = None,
) -> list[tuple[int, int]]:
    """(student position t, teacher position u) whose next-token distributions are compared: both have read the
    same text and tokens t + 1 and u + 1 are the same span (see the module docstring). Arguments as in
    `align_positions`."""
    student_keys = _keys(student_offsets, student_special, text)
    teacher_keys = _keys(teacher_offsets, teacher_special, text)
    student_complete = _complete(student_keys, student_special)
    teacher_complete = _complete(teacher_keys, teacher_special)
    teacher_contexts = _contexts(teacher_keys)
    pairs = []
    for key, t in _contexts(student_keys).items():
        u = teacher_contexts.get(key)
        if u is None or t + 1 >= len(student_keys) or u + 1 >= len(teacher_keys):
            continue
        if student_complete[t + 1] and teacher_complete[u + 1] and student_keys[t + 1] == teacher_keys[u + 1]:
            pairs.append((t, u))
    return sorted(pairs)


# --------------------------------------------------------------------------------------------- vocabulary
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


def _components(node: Any) -> list[dict]:
    """Every typed component of a tokenizer.json section, Sequences flattened."""
    if not isinstance(node, dict):
        return []
    found = [node]
    for key in ("pretokenizers", "decoders", "normalizers", "processors"):
        for child in node.get(key) or []:
            found.extend(_components(child))
    return found


def token_convention(tokenizer: Any) -> tuple[str, str]:
    """(convention, marker) of a fast tokenizer's pieces: ("byte_level", ""), ("metaspace", "▁"),
    ("wordpiece", "##") or ("plain", "")."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    parts = _components(spec.get("pre_tokenizer")) + _components(spec.get("decoder"))
    types = {part.get("type") for part in parts}
    if "ByteLevel" in types:
        return "byte_level", ""
    if "Metaspace" in types:
        replacement = next(p.get("replacement", "▁") for p in parts if p.get("type") == "Metaspace")
        return "metaspace", replacement
    model = spec.get("model") or {}
    if model.get("type") == "WordPiece":
        return "wordpiece", model.get("continuing_subword_prefix") or "##"
    return "plain", ""


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def normalised_token(token: str, convention: str, marker: str) -> bytes | None:
    """The bytes a vocabulary entry stands for, with a leading space for a word start; None when it has none."""
    if convention == "byte_level":
        alphabet = _byte_alphabet()
        if any(character not in alphabet for character in token):
            return None
        return bytes(alphabet[character] for character in token)
    if convention == "metaspace":
        byte = _BYTE_PIECE.fullmatch(token)
        return bytes([int(byte.group(1), 16)]) if byte else token.replace(marker, " ").encode()
    if convention == "wordpiece":
        return token[len(marker) :].encode() if token.startswith(marker) else (" " + token).encode()
    return token.encode()


def _normalised_vocabulary(tokenizer: Any) -> dict[bytes, int]:
    convention, marker = token_convention(tokenizer)
    special = set(tokenizer.all_special_ids)
    added = tokenizer.get_added_vocab()
    by_string: dict[bytes, int] = {}
    for token, token_id in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        if token_id in special:
            continue
        # added tokens match their literal text, whatever the model's convention
        key = token.encode() if token in added else normalised_token(token, convention, marker)
        if key is not None and key not in by_string:
            by_string[key] = token_id
    return by_string


def vocabulary_map(student_tokenizer: Any, teacher_tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(student_ids, teacher_ids), (M,) long each, sorted by student id: the tokens whose normalised strings are
    equal (see the module docstring), one to one, special tokens excluded."""
    student, teacher = _normalised_vocabulary(student_tokenizer), _normalised_vocabulary(teacher_tokenizer)
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
    if sample_text:
        pairs = _encode_and_pair(student_tokenizer, teacher_tokenizer, sample_text)[2]
        if not pairs:
            raise ValueError(
                f"the student's and the teacher's tokenizations of {sample_text[:60]!r} share no position where both "
                "have read the same text and predict the same span, so cross-tokenizer KD has nothing to compare. "
                "Check that both tokenizers return character offsets into the raw text (no normaliser that "
                "rewrites it beyond recognition)."
            )


def _special_flags(tokenizer: Any, ids: Sequence[int], special_mask: Sequence[int]) -> list[bool]:
    special_ids = set(tokenizer.all_special_ids)
    return [bool(m) or i in special_ids for i, m in zip(ids, special_mask)]


def _encode(
    tokenizer: Any, text: str, max_length: int | None
) -> tuple[list[int], list[tuple[int, int]], list[bool]]:
    encoding = tokenizer(
        text,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        truncation=max_length is not None,
        max_length=max_length,
    )
    ids = list(encoding["input_ids"])
    return (
        ids,
        [tuple(o) for o in encoding["offset_mapping"]],
        _special_flags(tokenizer, ids, encoding["special_tokens_mask"]),
    )


def _encode_and_pair(
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    text: str,
    max_length: int | None = None,
    teacher_max_length: int | None = None,
) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    student_ids, student_offsets, student_special = _encode(student_tokenizer, text, max_length)
    # The teacher reads exactly the text the (possibly truncated) student read.
    covered = max((end for (_, end), s in zip(student_offsets, student_special) if not s), default=0)
    text = text[:covered]
    teacher_ids, teacher_offsets, teacher_special = _encode(teacher_tokenizer, text, teacher_max_length)
    pairs = prediction_pairs(
        student_offsets,
        teacher_offsets,
        text=text,
        student_special=student_special,
        teacher_special=teacher_special,
    )
    return student_ids, teacher_ids, pairs


# --------------------------------------------------------------------------------------------- batches
@dataclass
class CrossTokenizerCollator:
    """Tokenizes each row's text with both tokenizers and pads them into one batch.

    Rows need a `text` column (the raw string, nothing pre-tokenized). The batch has the student's `input_ids`,
    `attention_mask` and `labels` (its own tokens, -100 on padding: the student's CE covers all of them), the
    teacher's `teacher_input_ids` and `teacher_attention_mask` for the same text (cut where the student's
    `max_length` cut it), and `teacher_aligned_positions` (B, T_student): for each student position t the teacher
    position whose next-token distribution is compared with it (`prediction_pairs`), -1 where none is.
    Right padding on both sides.
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
                str(f[self.text_column]),
                self.max_length,
                self.teacher_max_length,
            )
            for f in features
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
