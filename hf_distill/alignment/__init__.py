"""Cross-tokenizer alignment: a teacher and a student that tokenize text differently.

- positions.py   which positions of the two tokenizations can be compared (`prediction_pairs`, `align_positions`)
- vocabulary.py  which vocabulary entries mean the same text (`vocabulary_map`)
- collator.py    `CrossTokenizerCollator`: each batch with the teacher's own tokenization of the same text, and the
                 check that two tokenizers can be aligned at all

Imports torch and the tokenizers it is given, nothing else of hf_distill.
"""

from __future__ import annotations

from hf_distill.alignment.collator import (
    ALIGNED_COLUMN,
    CROSS_TOKENIZER_COLUMNS,
    TEACHER_ATTENTION_MASK,
    TEACHER_INPUT_IDS,
    TEXT_COLUMN,
    CrossTokenizerCollator,
    check_alignable,
    row_text,
)
from hf_distill.alignment.positions import (
    ALIGNMENT_VERSION,
    Offsets,
    Span,
    align_positions,
    prediction_pairs,
    token_spans,
)
from hf_distill.alignment.vocabulary import token_texts, vocabulary_map

__all__ = [
    "ALIGNED_COLUMN",
    "ALIGNMENT_VERSION",
    "CROSS_TOKENIZER_COLUMNS",
    "CrossTokenizerCollator",
    "Offsets",
    "Span",
    "TEACHER_ATTENTION_MASK",
    "TEACHER_INPUT_IDS",
    "TEXT_COLUMN",
    "align_positions",
    "check_alignable",
    "prediction_pairs",
    "row_text",
    "token_spans",
    "token_texts",
    "vocabulary_map",
]
