"""Cross-tokenizer positions and vocabulary map on real tokenizers of every convention, trained here with the
`tokenizers` library: byte-level BPE (offsets trimmed and not), SentencePiece-style Unigram with a Metaspace
pre-tokenizer (with and without byte fallback), a legacy Llama-2 style BPE (normalizer Prepend("▁") +
Replace(" ", "▁"), byte fallback, no pre-tokenizer), a Gemma style BPE (Replace only) and WordPiece.

The references are independent of the code under test: what a position has read is the tokenizer's own decoding of
the ids up to it (lossless tokenizers), or for WordPiece, which drops whitespace, the text up to the end of its
last word's offsets; which tokens stand for the same text is the tokenizers' own `decode`."""

from __future__ import annotations

import itertools
import json

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from hf_distill.alignment.collator import ALIGNED_COLUMN, TEACHER_INPUT_IDS, CrossTokenizerCollator
from hf_distill.alignment.positions import prediction_pairs
from hf_distill.alignment.vocabulary import vocabulary_map
from hf_distill.tasks.lm.cross_tokenizer import train_tokenizer

MIXED = [
    "Café  nice: the  cat\n\nsat\ton 12 mats, 3.5 km 😀 日本語 é è.",
    "Hello world!\n  Indented line\twith\ttabs   and 2024 numbers 🎉🚀 naïve crème brûlée.",
    "東京 and Zürich: 100% of 7 cats\n\n\nwent  home 😀😀 at 9:30, didn't they?",
    "A\tb  c   d\n e\n\tf 1 22 333 4444 ü ß 中文 字 🙂 end.",
]
TRAINING = [
    "the cat sat on the mat and the dog sat on the log",
    "Hello world, the café served crème brûlée to the team in Zürich.",
    "numbers 1 2 3 12 100 2024 and 3.5 km, at 9:30 they went home",
    "tabs\tand\tnewlines\nand  double  spaces   here",
    "emoji 😀 🎉 🚀 🙂 naïve ü ß é è ê didn't",
    "日本語 東京 中文 字",
] * 20 + MIXED * 5
# characters the byte-fallback tokenizers keep no piece for (as Llama 2 has none for a newline): read as bytes
RARE = "😀🎉🚀🙂日本語東京中文字ß\n\t"
BYTE_PIECES = [f"<0x{byte:02X}>" for byte in range(256)]


def _fast(tokenizer: Tokenizer, **specials) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials)


def _with_bos(tokenizer: Tokenizer, bos: str) -> None:
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )


def byte_level(trim_offsets: bool) -> PreTrainedTokenizerFast:
    if trim_offsets:  # GPT-2: the post-processor trims spaces from the offsets
        return train_tokenizer("byte_bpe", TRAINING, 420)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)  # Llama 3, Qwen
    trainer = trainers.BpeTrainer(
        vocab_size=380, special_tokens=["<|eot|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(TRAINING, trainer)
    return _fast(tokenizer, eos_token="<|eot|>", pad_token="<|eot|>")


def metaspace_unigram(byte_fallback: bool) -> PreTrainedTokenizerFast:
    if not byte_fallback:
        return train_tokenizer("unigram", TRAINING, 260)
    trained = Tokenizer(models.Unigram())
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trained.train_from_iterator(
        TRAINING,
        trainers.UnigramTrainer(vocab_size=240, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>"),
    )
    model = json.loads(trained.to_str())["model"]
    vocab = [(piece, score) for piece, score in model["vocab"] if not set(piece) & set(RARE)]
    vocab += [(piece, -30.0) for piece in BYTE_PIECES]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    _with_bos(tokenizer, "<s>")
    return _fast(tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def sentencepiece_bpe(prepend: bool) -> PreTrainedTokenizerFast:
    """Byte-fallback BPE with no Metaspace anywhere: legacy Llama-2 / Mistral (normalizer Prepend("▁") + Replace,
    no pre-tokenizer) or transformers 5's GemmaTokenizer (normalizer Replace only, a Split(" ") pre-tokenizer)."""
    steps = [normalizers.Prepend("▁")] if prepend else []
    trained = Tokenizer(models.BPE(unk_token="<unk>"))  # SentencePiece learns pieces within words
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first" if prepend else "never")
    trained.train_from_iterator(
        TRAINING, trainers.BpeTrainer(vocab_size=420, special_tokens=["<unk>", "<s>", "</s>"])
    )
    model = json.loads(trained.to_str())["model"]
    kept = [
        piece
        for piece, _ in sorted(model["vocab"].items(), key=lambda item: item[1])
        if not set(piece) & set(RARE)
    ]
    vocab = {piece: i for i, piece in enumerate(kept + BYTE_PIECES)}
    merges = [(a, b) for a, b in model["merges"] if a in vocab and b in vocab and a + b in vocab]
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    if not prepend:  # as transformers 5's GemmaTokenizer (a no-op once spaces are ▁)
        tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    strip = [decoders.Strip(" ", 1, 0)] if prepend else []
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    _with_bos(tokenizer, "<s>")
    return _fast(tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def wordpiece() -> PreTrainedTokenizerFast:
    return train_tokenizer("wordpiece", TRAINING, 320)


BUILDERS = {
    "byte_level_trimmed": lambda: byte_level(True),
    "byte_level": lambda: byte_level(False),
    "metaspace_unigram": lambda: metaspace_unigram(False),
    "metaspace_unigram_bytes": lambda: metaspace_unigram(True),
    "llama2_bpe_bytes": lambda: sentencepiece_bpe(True),
    "gemma_bpe_bytes": lambda: sentencepiece_bpe(False),
    "wordpiece": wordpiece,
}
LOSSLESS = set(BUILDERS) - {"wordpiece"}


@pytest.fixture(scope="module")
def tokenizers():
    return {name: build() for name, build in BUILDERS.items()}


def _encode_and_pair(student, teacher, text):
    """(student ids, teacher ids, pairs) as the collator gives them for one row of text."""
    batch = CrossTokenizerCollator(student, teacher)([{"text": text}])
    pairs = [(t, u) for t, u in enumerate(batch[ALIGNED_COLUMN][0].tolist()) if u >= 0]
    return batch["input_ids"][0].tolist(), batch[TEACHER_INPUT_IDS][0].tolist(), pairs


def _encode(tokenizer, text):
    encoding = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    special = set(tokenizer.all_special_ids)
    flags = [bool(m) or i in special for i, m in zip(encoding["input_ids"], encoding["special_tokens_mask"])]
    return encoding["input_ids"], encoding["offset_mapping"], flags


def _read(name, tokenizer, text, ids, offsets):
    """reference: for each position, the character prefix of `text` its tokens 0..t have read."""
    if name in LOSSLESS:  # the tokenizer's own decoding of the ids so far, whitespace and all
        decoded = [
            tokenizer.backend_tokenizer.decode(ids[: t + 1], skip_special_tokens=True)
            for t in range(len(ids))
        ]
        return [len(prefix) if text.startswith(prefix) else None for prefix in decoded]
    # WordPiece drops whitespace: a position has read up to the end of its last word (its offsets' end)
    return list(itertools.accumulate((end for _, end in offsets), max, initial=0))[1:]


@pytest.mark.parametrize("student_name,teacher_name", list(itertools.product(BUILDERS, BUILDERS)))
def test_every_pair_has_read_the_same_text_and_predicts_the_same_span(tokenizers, student_name, teacher_name):
    student, teacher = tokenizers[student_name], tokenizers[teacher_name]
    paired = predictable = 0
    for text in MIXED:
        s_ids, t_ids, pairs = _encode_and_pair(student, teacher, text)
        s_ids2, s_offsets, s_special = _encode(student, text)
        t_ids2, t_offsets, t_special = _encode(teacher, text)
        assert (s_ids2, t_ids2) == (s_ids, t_ids)
        for name, tokenizer, ids in ((student_name, student, s_ids), (teacher_name, teacher, t_ids)):
            if name in LOSSLESS:  # the reference needs a lossless decoding
                assert tokenizer.backend_tokenizer.decode(ids, skip_special_tokens=True) == text, name
        s_read = _read(student_name, student, text, s_ids, s_offsets)
        t_read = _read(teacher_name, teacher, text, t_ids, t_offsets)
        for t, u in pairs:
            where = (text, t, u)
            assert not s_special[t + 1] and not t_special[u + 1], where
            assert s_read[t] is not None and s_read[t] == t_read[u], (
                where
            )  # the same text read, whitespace and all
            assert s_read[t + 1] is not None and s_read[t + 1] == t_read[u + 1], (
                where
            )  # the same span predicted
            assert s_read[t + 1] > s_read[t], where
        paired += len(pairs)
        predictable += sum(not flag for flag in s_special[1:])
    # a fair share of the student's predictions still has a teacher counterpart: measured 0.10 to 0.57 between two
    # of these tiny tokenizers (byte pieces of emoji and CJK are never predicted), 0.53 to 1.0 with itself
    assert paired / predictable >= (0.5 if student_name == teacher_name else 0.08), paired / predictable


def test_the_bug_case_is_not_paired_and_equal_tokenizations_pair_everywhere(tokenizers):
    """The student (byte-level) at "Café" predicts " nice"; a Unigram teacher reading "Café" then a bare "▁" is at
    "Café " and predicts "nice": never paired (the old rule, which moved each token's end back over whitespace,
    paired them). A tokenizer with itself pairs every position before a whole token."""
    student, teacher = tokenizers["byte_level_trimmed"], tokenizers["metaspace_unigram"]
    text = "Café nice: the cat sat on the mat"
    s_ids, t_ids, pairs = _encode_and_pair(student, teacher, text)
    s_tokens, t_tokens = student.convert_ids_to_tokens(s_ids), teacher.convert_ids_to_tokens(t_ids)
    cafe = s_tokens.index("afÃ©")  # the student has read "Café"
    blank = t_tokens.index("é") + 1  # the teacher has read "Café "
    assert (s_tokens[cafe + 1], t_tokens[blank], t_tokens[blank + 1]) == ("Ġn", "▁", "n")
    assert pairs and (cafe, blank) not in pairs
    # every pair has read the same text and predicts the same text, by the tokenizers' own decoding
    for t, u in pairs:
        assert student.decode(s_ids[: t + 1]) == teacher.decode(t_ids[: u + 1], skip_special_tokens=True)
        assert student.decode(s_ids[: t + 2]) == teacher.decode(t_ids[: u + 2], skip_special_tokens=True)
    for name, tokenizer in tokenizers.items():
        for text in MIXED:
            ids, offsets, special = _encode(tokenizer, text)
            pairs = _encode_and_pair(tokenizer, tokenizer, text)[2]
            assert all(t == u for t, u in pairs)
            if name in ("metaspace_unigram", "wordpiece"):  # no byte pieces: every token is whole
                tokens = tokenizer.convert_ids_to_tokens(ids)
                marker = tokens[1] == "▁"  # prepended to the text: it stands for no character of it
                assert len(pairs) == sum(not flag for flag in special[1:]) - marker, name


def test_trimmed_trailing_whitespace_goes_back_to_its_token():
    """Byte-level `ĊĠ` (a newline and the space after it) is reported by a trimming post-processor as the newline
    only; the space is still that token's, so the next word is predicted without it."""
    text = "a\n  b"  # byte-level pieces a, ĊĠ, Ġb
    trimmed = [(0, 1), (1, 2), (4, 5)]
    exact = [(0, 1), (1, 2), (2, 5)]  # what a SentencePiece teacher reading "a", "\n", "▁▁b" would report
    assert prediction_pairs(trimmed, exact, text=text) == [(0, 0), (1, 1)]  # offsets alone: wrongly paired
    texts = ["a", "\n ", " b"]
    # with the tokens' texts: the student predicts "\n " then " b", the teacher "\n" then "  b"
    assert prediction_pairs(trimmed, exact, text=text, student_token_texts=texts) == []
    untrimmed = [(0, 1), (1, 3), (3, 5)]
    assert prediction_pairs(trimmed, untrimmed, text=text, student_token_texts=texts) == [(0, 0), (1, 1)]


# --------------------------------------------------------------------------------------------- vocabulary
def _decoded_texts(tokenizer):
    """reference: each non-special token's text as the tokenizer decodes it after "a" (a word start keeps its
    space); None where that is not valid text (a byte that is no whole character)."""
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"]
    prefix = tokenizer.decode(anchor, clean_up_tokenization_spaces=False)
    special = set(tokenizer.all_special_ids)
    texts = {}
    for token_id in tokenizer.get_vocab().values():
        if token_id in special:
            continue
        decoded = tokenizer.decode(anchor + [token_id], clean_up_tokenization_spaces=False)
        if decoded.startswith(prefix) and "\ufffd" not in decoded:
            texts[token_id] = decoded[len(prefix) :]
    return texts


@pytest.mark.parametrize(
    "student_name,teacher_name",
    list(
        itertools.combinations(
            ["byte_level_trimmed", "metaspace_unigram", "llama2_bpe_bytes", "gemma_bpe_bytes", "wordpiece"], 2
        )
    ),
)
def test_vocabulary_map_pairs_exactly_the_tokens_that_decode_to_the_same_text(
    tokenizers, student_name, teacher_name
):
    student, teacher = tokenizers[student_name], tokenizers[teacher_name]
    s_ids, t_ids = vocabulary_map(student, teacher)
    mapped = dict(zip(s_ids.tolist(), t_ids.tolist()))
    assert len(set(mapped.values())) == len(mapped)  # one to one
    s_texts, t_texts = _decoded_texts(student), _decoded_texts(teacher)

    def lowest(texts):
        first = {}
        for token_id in sorted(texts):
            first.setdefault(texts[token_id], token_id)
        return first

    s_first, t_first = lowest(s_texts), lowest(t_texts)
    expected = {s_first[text]: t_first[text] for text in s_first if text in t_first}
    decodable = {s: t for s, t in mapped.items() if s in s_texts and t in t_texts}
    assert decodable == expected
    assert len(expected) > 50
    # the other mapped tokens are bytes of no whole character on both sides (byte-level `ĠÃ`, `<0xC3>`)
    assert all(
        s not in s_texts and t not in t_texts for s, t in mapped.items() if (s, t) not in decodable.items()
    )


def test_word_starts_and_byte_pieces_of_sentencepiece_without_metaspace_are_mapped(tokenizers):
    bpe = tokenizers["byte_level_trimmed"]
    for name in ("llama2_bpe_bytes", "gemma_bpe_bytes"):
        sentencepiece = tokenizers[name]
        pairs = set(
            zip(
                *(
                    tok.convert_ids_to_tokens(ids.tolist())
                    for tok, ids in zip((sentencepiece, bpe), vocabulary_map(sentencepiece, bpe))
                )
            )
        )
        assert ("▁the", "Ġthe") in pairs and ("<0x0A>", "Ċ") in pairs, name
        assert ("▁", "Ġ") in pairs and ("<0x20>", "Ġ") not in pairs  # both read " ": the lower id is mapped
        # the bytes of a character split into bytes map onto the byte-level pieces of the same bytes
        by_piece = dict(pairs)
        for character in "😀日\t":
            mapped = [by_piece.get(f"<0x{byte:02X}>") for byte in character.encode()]
            assert None not in mapped and bpe.convert_tokens_to_string(mapped) == character, (name, character)
