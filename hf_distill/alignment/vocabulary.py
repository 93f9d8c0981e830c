"""Which vocabulary entries of two tokenizers mean the same text.

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
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch


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
