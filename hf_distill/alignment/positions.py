"""Which positions of two tokenizations of one text can be compared.

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
"""

from __future__ import annotations

from collections.abc import Sequence

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
