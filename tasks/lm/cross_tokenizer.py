"""Causal-LM data for a teacher and a student with different tokenizers (`--cross_tokenizer`): rows of raw text,
each short enough for the student's `block_size`, tokenized by both sides in the collator
(`hf_distill.cross_tokenizer.CrossTokenizerCollator`); and small tokenizers trained offline with the `tokenizers`
library, for tests and benchmarks. `cross_tokenizer_rows` makes the rows for training runs and their caches."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

TOKENIZER_KINDS = ("byte_bpe", "unigram", "wordpiece")


def text_blocks(texts: Iterable[str], tokenizer: Any, block_size: int) -> list[str]:
    """Each text cut into consecutive pieces of at most `block_size` of the student's tokens (special tokens
    included), cut at token ends. A piece starts where the previous one ended, so the whitespace before its first
    word stays with it (each tokenizer then sees a word start as a word start). Documents are never joined."""
    specials = len(tokenizer("", add_special_tokens=True)["input_ids"])
    per_block = max(block_size - specials, 1)
    blocks = []
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            continue
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        start = 0
        for first in range(0, len(offsets), per_block):
            end = offsets[min(first + per_block, len(offsets)) - 1][1]
            if text[start:end].strip():
                blocks.append(text[start:end])
            start = end
    return blocks


def cross_tokenizer_rows(
    raw: Mapping[str, Any], text_column: str, data_args: Any, tokenizer: Any, block_size: int
) -> dict[str, Any]:
    """--cross_tokenizer data: each split as a `datasets.Dataset` of rows of raw text (a `text` column), each at
    most `block_size` of the student's tokens (`text_blocks`), cut to --max_train_samples / --max_eval_samples rows.
    The training run and the cache of its teacher (scripts/cache_teacher_logits.py --student_tokenizer_name) build
    their rows here, so that both hold the same rows."""
    from datasets import Dataset

    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples}
    rows = {}
    for split, dataset in raw.items():
        blocks = text_blocks(dataset[text_column], tokenizer, block_size)[: limits.get(split)]
        if not blocks:
            raise ValueError(f"The {split} data yields no text; give more data.")
        rows[split] = Dataset.from_dict({"text": blocks})
    return rows


def train_tokenizer(
    kind: str, texts: Sequence[str], vocab_size: int, *, lowercase: bool = False
) -> PreTrainedTokenizerFast:
    """A fast tokenizer trained on `texts`:
    - "byte_bpe": GPT-2 style byte-level BPE (`Ġ` marks a leading space), `<|endoftext|>` as bos/eos/pad;
    - "unigram": SentencePiece style Unigram (`▁` word starts) with `<s>` prepended, `</s>` eos, `<pad>`;
    - "wordpiece": BERT style WordPiece (`##` continuations, whitespace dropped), `[CLS]`/`[SEP]`/`[PAD]`.
    """
    if kind == "byte_bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        specials = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    elif kind == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=["<pad>", "<unk>", "<s>", "</s>"], unk_token="<unk>"
        )
        specials = dict(pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    elif kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
        )
        specials = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    else:
        raise ValueError(f"kind must be one of {TOKENIZER_KINDS}, got {kind!r}.")
    if lowercase:
        tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.train_from_iterator(texts, trainer)
    if kind == "unigram":
        bos = tokenizer.token_to_id("<s>")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
    elif kind == "wordpiece":
        cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
        )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials)
