"""The collator that gives each batch the teacher's own tokenization of the same text, the columns it adds,
and the check that two tokenizers can be aligned at all (before training).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from hf_distill.alignment.positions import prediction_pairs, token_spans
from hf_distill.alignment.vocabulary import token_texts

TEXT_COLUMN = "text"


TEACHER_INPUT_IDS = "teacher_input_ids"


TEACHER_ATTENTION_MASK = "teacher_attention_mask"


ALIGNED_COLUMN = "teacher_aligned_positions"  # (B, T_student): teacher position compared with each, -1 = none


CROSS_TOKENIZER_COLUMNS = (TEACHER_INPUT_IDS, TEACHER_ATTENTION_MASK, ALIGNED_COLUMN)


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
                "(hf_distill.tasks.lm.cross_tokenizer.train_tokenizer trains one offline)."
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
