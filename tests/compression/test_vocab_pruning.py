"""Vocabulary pruning: tokenizers trained here on small text, tiny models from configs.

The reference for "the new tokenizer gives the remapped ids" is always the old tokenizer's ids mapped
through ``keep_ids`` in the test; model outputs are compared with the original model's outputs.
"""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch
from conftest import make_bert_tokenizer
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from hf_distill.compression.pruning.vocabulary import (
    check_vocabulary_keep,
    complete_keep_ids,
    prune_tokenizer,
    prune_vocabulary,
    tokens_used,
)

# Training text: everything the tokenizers learn. DATA_TEXTS, the "task data", avoids the letters q, z, x,
# 'ß' and '🎉' so that text with them exercises tokens that pruning removed.
TRAINING_TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a café in zürich serves crème brûlée and naïve jokes",
    "die straße ist groß und das wetter ist schön",
    "party time 🎉 with friends 😀 and music",
    "tokenization splits unbelievable words into pieces",
    "the movie was good but the plot was boring",
    "i love this film, really great music!",
    "terrible acting and a sad story; very long",
    "the cat and the dog played in the garden",
    "election results: the party won 42 seats",
    "prices in the market rose by 3.5 percent",
    "computer games and mobile phones sell well",
    "crème de la crème, déjà vu, à la carte",
    "happy people smile 😀 happy dogs bark",
    "extraordinary circumstances require quizzical experts",
    "unbelievable! the unbelievers believed unbelievably",
] * 3

DATA_TEXTS = [
    "the movie was good but the plot was boring",
    "a café in the garden serves crème brûlée",
    "unbelievable words split into pieces",
    "happy people smile 😀 and dogs bark",
    "i love this film, really great music!",
    "déjà vu à la carte",
    "election results: the party won 42 seats",
    "it costs 5 € only",  # '€' is in no training text: [UNK] / byte tokens in the original already
]

SPECIALS_BERT = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _wordpiece() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=False)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(
        TRAINING_TEXTS, trainers.WordPieceTrainer(vocab_size=260, special_tokens=SPECIALS_BERT)
    )
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def _byte_level_bpe_roberta() -> PreTrainedTokenizerFast:
    """RoBERTa/GPT-2 style: byte-level BPE, specials inside the vocabulary, RobertaProcessing."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        TRAINING_TEXTS,
        trainers.BpeTrainer(
            vocab_size=420,
            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer.post_processor = processors.RobertaProcessing(
        ("</s>", tokenizer.token_to_id("</s>")), ("<s>", tokenizer.token_to_id("<s>"))
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )


def _byte_level_bpe_llama3() -> PreTrainedTokenizerFast:
    """Llama-3 style: byte-level BPE with ignore_merges, specials only as added tokens after the vocabulary."""
    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        TRAINING_TEXTS,
        trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|reserved_0|>"]
    tokenizer.add_special_tokens(specials)
    bos_id = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                special_tokens=[("<|begin_of_text|>", bos_id)],
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|pad|>",
        extra_special_tokens=["<|reserved_0|>"],
    )


_BYTE_TOKENS = [f"<0x{byte:02X}>" for byte in range(256)]


def _byte_fallback_bpe() -> PreTrainedTokenizerFast:
    """Llama-2 / SentencePiece style: Metaspace, BPE with byte_fallback and <unk>, bytes in the vocabulary."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.train_from_iterator(
        TRAINING_TEXTS,
        trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>", *_BYTE_TOKENS]),
    )
    # As in Llama-2, the byte tokens are ordinary vocabulary entries, not added tokens.
    state = json.loads(tokenizer.to_str())
    state["added_tokens"] = [a for a in state["added_tokens"] if a["content"] not in _BYTE_TOKENS]
    tokenizer = Tokenizer.from_str(json.dumps(state))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _unigram() -> PreTrainedTokenizerFast:
    """T5 / SentencePiece-unigram style: Metaspace, Unigram, eos appended."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(
        TRAINING_TEXTS,
        trainers.UnigramTrainer(
            vocab_size=220, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", shrinking_factor=0.9
        ),
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", tokenizer.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def _word_level() -> PreTrainedTokenizerFast:
    return make_bert_tokenizer()


BUILDERS = {
    "wordpiece": _wordpiece,
    "bpe_byte_level_roberta": _byte_level_bpe_roberta,
    "bpe_byte_level_llama3": _byte_level_bpe_llama3,
    "bpe_byte_fallback": _byte_fallback_bpe,
    "unigram": _unigram,
    "wordlevel": _word_level,
}


@pytest.fixture(scope="module")
def tokenizers_by_kind() -> dict[str, PreTrainedTokenizerFast]:
    return {kind: build() for kind, build in BUILDERS.items()}


def _data_for(kind: str, tokenizer: PreTrainedTokenizerFast) -> list[str]:
    if kind == "wordlevel":  # the WordLevel vocabulary only knows the conftest's words
        return ["the movie was good", "i love this film", "a very happy story", "bad movie"]
    special = tokenizer.sep_token or tokenizer.eos_token
    return [*DATA_TEXTS, f"good film {special} boring plot"]


def _remap(old_ids: list[int], keep: list[int]) -> list[int]:
    old_to_new = {old: new for new, old in enumerate(keep)}
    return [old_to_new[index] for index in old_ids]


# ----------------------------------------------------------------------------------------------------
# The tokenizer on the data
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_pruned_tokenizer_gives_remapped_ids_on_the_data(kind, tokenizers_by_kind):
    tokenizer = tokenizers_by_kind[kind]
    texts = _data_for(kind, tokenizer)
    keep = tokens_used(tokenizer, texts)
    assert len(keep) < len(tokenizer), "the data should not use the whole vocabulary"
    pruned = prune_tokenizer(tokenizer, keep)
    assert len(pruned) == len(keep)

    for text in texts:
        old_ids = tokenizer(text).input_ids
        new_ids = pruned(text).input_ids
        assert new_ids == _remap(old_ids, keep), text
        assert pruned.decode(new_ids) == tokenizer.decode(old_ids)
    # Pairs (token type ids included) and batches.
    old = tokenizer(texts[:3], texts[-3:])
    new = pruned(texts[:3], texts[-3:])
    assert new.input_ids == [_remap(ids, keep) for ids in old.input_ids]
    assert new.get("token_type_ids") == old.get("token_type_ids")
    # Special tokens point at their new ids.
    for attribute in (
        "cls_token",
        "sep_token",
        "pad_token",
        "unk_token",
        "mask_token",
        "bos_token",
        "eos_token",
    ):
        if getattr(tokenizer, attribute) is not None:
            assert getattr(pruned, attribute) == getattr(tokenizer, attribute)
            old_id = getattr(tokenizer, attribute + "_id")
            assert getattr(pruned, attribute + "_id") == keep.index(old_id)


def test_data_uses_multi_piece_words_accents_and_emoji(tokenizers_by_kind):
    """Guard that the data above exercises what it claims to, for the subword tokenizers."""
    words = " ".join(DATA_TEXTS).split()
    for kind in ("wordpiece", "bpe_byte_level_roberta", "bpe_byte_fallback", "unigram"):
        tokenizer = tokenizers_by_kind[kind]
        multi_piece = [w for w in words if len(tokenizer(w, add_special_tokens=False).input_ids) > 1]
        assert len(multi_piece) >= 3, kind
        tokens = tokenizer.convert_ids_to_tokens(tokenizer("crème brûlée déjà 😀").input_ids)
        assert tokenizer.unk_token not in tokens, (kind, tokens)


@pytest.mark.parametrize("kind", ["wordpiece", "bpe_byte_level_roberta", "bpe_byte_fallback", "unigram"])
@pytest.mark.parametrize("seed", range(4))
def test_tokenization_unchanged_on_random_data_subsets(kind, seed, tokenizers_by_kind):
    """The invariant behind pruning (greedy longest-match / merge order / Viterbi unchanged when only
    tokens the data does not produce are removed), checked on random "task datasets"."""
    tokenizer = tokenizers_by_kind[kind]
    rng = random.Random(seed)
    words = " ".join(TRAINING_TEXTS).split()
    texts = [" ".join(rng.sample(words, rng.randint(1, 8))) for _ in range(rng.randint(1, 6))]
    keep = tokens_used(tokenizer, texts)
    pruned = prune_tokenizer(tokenizer, keep)
    for text in texts:
        assert pruned(text).input_ids == _remap(tokenizer(text).input_ids, keep), text


# Training texts long enough to be truncated, full of multi-piece words, so that truncation cuts words.
LONG_TEXTS = [
    "unbelievable extraordinary circumstances require quizzical experts and tokenization",
    "the unbelievers believed unbelievably in extraordinary tokenization of words",
    "a café in zürich serves crème brûlée with extraordinary unbelievable jokes",
    "election results: the party won 42 seats in extraordinary circumstances",
    "computer games and mobile phones sell unbelievably well in the market",
]


@pytest.mark.parametrize("kind", ["wordpiece", "bpe_byte_level_roberta", "bpe_byte_fallback", "unigram"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_truncated_training_data_tokenizes_the_same_after_pruning(kind, side):
    """The invariant that matters for training: on every training text, truncated to the training max_length the
    same way, the pruned tokenizer's ids mapped back are the original tokenizer's ids, words cut at the boundary
    included. Keeping only the pieces inside the window would turn a cut word into [UNK] (WordPiece) or re-segment
    it (Unigram), and the model would see other inputs than it was pruned for."""
    tokenizer = BUILDERS[kind]()
    tokenizer.truncation_side = side
    cut_somewhere = False
    for max_length in range(3, 16):
        keep = tokens_used(tokenizer, LONG_TEXTS, max_length=max_length)
        pruned = prune_tokenizer(tokenizer, keep)
        pruned.truncation_side = side
        for text in LONG_TEXTS:
            old = tokenizer(text, truncation=True, max_length=max_length)
            new = pruned(text, truncation=True, max_length=max_length).input_ids
            assert new == _remap(old.input_ids, keep), (max_length, text)
            words = [word for word in old.word_ids() if word is not None]
            whole = tokenizer(text).word_ids()
            edge = words[-1] if side == "right" else words[0]
            cut_somewhere |= whole.count(edge) > words.count(edge)
    assert cut_somewhere, "the data should make truncation cut a multi-piece word"


@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
def test_truncated_text_pairs_tokenize_the_same_after_pruning(kind):
    tokenizer = BUILDERS[kind]()
    firsts, seconds = LONG_TEXTS, LONG_TEXTS[1:] + LONG_TEXTS[:1]
    for max_length in (6, 9, 13):
        keep = tokens_used(tokenizer, firsts, text_pairs=seconds, max_length=max_length)
        pruned = prune_tokenizer(tokenizer, keep)
        old = tokenizer(firsts, seconds, truncation=True, max_length=max_length).input_ids
        new = pruned(firsts, seconds, truncation=True, max_length=max_length).input_ids
        assert new == [_remap(ids, keep) for ids in old], max_length


def test_masked_lm_on_truncated_data_is_unchanged_by_pruning():
    """The reported symptom: a masked LM's logits on the truncated training data moved after vocabulary pruning.
    Reference: the original model's logits, restricted to the kept columns."""
    torch.manual_seed(0)
    tokenizer = BUILDERS["wordpiece"]()
    model = BertForMaskedLM(_bert_config(tokenizer)).eval()
    max_length = 7
    keep = tokens_used(tokenizer, LONG_TEXTS, max_length=max_length)
    pruned_model, pruned_tokenizer = prune_vocabulary(model, tokenizer, keep)
    old = tokenizer(LONG_TEXTS, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    new = pruned_tokenizer(
        LONG_TEXTS, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        expected = model(**old).logits[..., keep]
        actual = pruned_model.eval()(**new).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_wordpiece_keeps_greedy_path_of_unknown_words():
    """'abc' is [UNK] (greedy takes 'ab', then finds no '##c'). Dropping the unused 'ab' would let greedy
    take 'a' + '##bc' instead; tokens_used keeps 'ab' so the data's [UNK] stays [UNK]."""
    vocab = {
        t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "ab", "##bc", "d"])
    }
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )
    texts = ["abc a dbc"]
    assert tokenizer.convert_ids_to_tokens(tokenizer(texts[0]).input_ids) == ["[UNK]", "a", "d", "##bc"]
    keep = tokens_used(tokenizer, texts)
    assert vocab["ab"] in keep
    pruned = prune_tokenizer(tokenizer, keep)
    assert pruned(texts[0]).input_ids == _remap(tokenizer(texts[0]).input_ids, keep)
    # Without the greedy path the word would change, which is what the kept 'ab' prevents.
    without_path = prune_tokenizer(tokenizer, [i for i in keep if i != vocab["ab"]])
    tokens = without_path.convert_ids_to_tokens(without_path(texts[0], add_special_tokens=False).input_ids)
    assert tokens == ["a", "##bc", "a", "d", "##bc"]


# ----------------------------------------------------------------------------------------------------
# The tokenizer on text outside the data
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned_by_kind(tokenizers_by_kind):
    result = {}
    for kind, tokenizer in tokenizers_by_kind.items():
        keep = tokens_used(tokenizer, _data_for(kind, tokenizer))
        result[kind] = (keep, prune_tokenizer(tokenizer, keep))
    return result


def test_wordpiece_word_with_removed_pieces_becomes_unk(tokenizers_by_kind, pruned_by_kind):
    tokenizer = tokenizers_by_kind["wordpiece"]
    keep, pruned = pruned_by_kind["wordpiece"]
    known, unseen = "the movie was good", "quizzical"  # no 'q' or 'z' anywhere in the data
    assert tokenizer.unk_token_id not in tokenizer(unseen).input_ids
    old_known = tokenizer(known).input_ids
    expected = [*_remap(old_known[:-1], keep), pruned.unk_token_id, pruned.sep_token_id]
    assert pruned(f"{known} {unseen}").input_ids == expected


def test_wordlevel_unknown_word_becomes_unk(tokenizers_by_kind, pruned_by_kind):
    tokenizer = tokenizers_by_kind["wordlevel"]
    keep, pruned = pruned_by_kind["wordlevel"]
    old = tokenizer("the movie was terrible").input_ids
    assert tokenizer.unk_token_id not in old
    expected = [*_remap(old[:-2], keep), pruned.unk_token_id, *_remap(old[-1:], keep)]
    assert pruned("the movie was terrible").input_ids == expected


def test_unigram_characters_without_kept_pieces_become_unk(tokenizers_by_kind, pruned_by_kind):
    tokenizer = tokenizers_by_kind["unigram"]
    keep, pruned = pruned_by_kind["unigram"]
    known = "the movie was good"
    # Characters the data never uses and that were not kept for another reason (the lowest-scoring piece).
    unseen = "".join(c for c in "zqxß" if c not in pruned.get_vocab())
    assert len(unseen) >= 2 and tokenizer.unk_token_id not in tokenizer(unseen).input_ids
    new_ids = pruned(f"{known} {unseen}").input_ids
    old_known = _remap(tokenizer(known).input_ids[:-1], keep)
    assert new_ids[: len(old_known)] == old_known
    # "▁" + unseen: these characters have no kept piece, so they fuse into one unknown token, after the kept "▁"
    # if the data kept it on its own (else "▁" is swallowed by the fused unknown).
    tail = new_ids[len(old_known) :]
    metaspace = pruned.convert_tokens_to_ids("▁")
    expected_tail = [pruned.unk_token_id, pruned.eos_token_id]
    assert tail in (expected_tail, [metaspace, *expected_tail])


@pytest.mark.parametrize("kind", ["bpe_byte_level_roberta", "bpe_byte_level_llama3"])
def test_byte_level_bpe_splits_removed_tokens_into_smaller_kept_pieces(
    kind, tokenizers_by_kind, pruned_by_kind
):
    tokenizer = tokenizers_by_kind[kind]
    keep, pruned = pruned_by_kind[kind]
    text = "the quick fox 🎉 jumps over the lazy straße"
    old_tokens = tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False).input_ids)
    new_ids = pruned(text, add_special_tokens=False).input_ids
    new_tokens = pruned.convert_ids_to_tokens(new_ids)
    assert len(new_tokens) > len(old_tokens), "removed tokens should be split into smaller pieces"
    assert "".join(new_tokens) == "".join(old_tokens)  # the same bytes, nothing lost or unknown
    assert pruned.decode(new_ids) == tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids)


def test_byte_fallback_bpe_encodes_removed_characters_as_bytes(tokenizers_by_kind, pruned_by_kind):
    tokenizer = tokenizers_by_kind["bpe_byte_fallback"]
    keep, pruned = pruned_by_kind["bpe_byte_fallback"]
    assert "ß" in tokenizer.get_vocab(), "the original knows 'ß' as a character"
    new_tokens = pruned.convert_ids_to_tokens(pruned("good ß", add_special_tokens=False).input_ids)
    assert new_tokens[-3:] == ["▁", "<0xC3>", "<0x9F>"]  # UTF-8 of 'ß'
    assert pruned.decode(pruned("good ß").input_ids, skip_special_tokens=True) == "good ß"


# ----------------------------------------------------------------------------------------------------
# Choosing and checking keep_ids
# ----------------------------------------------------------------------------------------------------


def test_tokens_used_counts_like_an_independent_count(tokenizers_by_kind):
    tokenizer = tokenizers_by_kind["wordpiece"]
    texts = DATA_TEXTS * 2 + ["extraordinary quizzical experts"]
    counts = Counter(i for text in texts for i in tokenizer(text).input_ids)
    specials = {tokenizer.convert_tokens_to_ids(t) for t in SPECIALS_BERT}

    used = tokens_used(tokenizer, texts)
    assert used == sorted(set(counts) | specials)
    assert used == sorted(set(used))

    used_twice = tokens_used(tokenizer, texts, min_count=2)
    assert used_twice == sorted({i for i, c in counts.items() if c >= 2} | specials)
    once_only = {i for i, c in counts.items() if c == 1} - specials
    assert once_only and not once_only & set(used_twice)

    # Truncated: the window's ids plus the rest of every word the window cuts (a word loses no piece).
    for max_length in (4, 5, 7):
        window = set().union(*(_window_words_reference(tokenizer, text, max_length) for text in texts))
        assert tokens_used(tokenizer, texts, max_length=max_length) == sorted(window | specials)

    pairs = ["crème brûlée"] * len(texts)
    pair_counts = Counter(i for a, b in zip(texts, pairs) for i in tokenizer(a, b).input_ids)
    assert tokens_used(tokenizer, texts, text_pairs=pairs) == sorted(set(pair_counts) | specials)

    with pytest.raises(ValueError, match="min_count"):
        tokens_used(tokenizer, texts, min_count=0)


def _window_words_reference(tokenizer, text: str, max_length: int) -> set[int]:
    """The ids of the words that truncation to `max_length` reaches, each word tokenized alone (WordPiece tokenizes
    every pre-tokenized word on its own), so a word cut by the truncation counts whole; plus the special tokens."""
    backend = tokenizer.backend_tokenizer
    words = [
        word for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))
    ]
    room = max_length - tokenizer.num_special_tokens_to_add()
    ids, position = set(tokenizer.all_special_ids), 0
    for word in words:
        if position >= room:
            break
        pieces = tokenizer(word, add_special_tokens=False).input_ids
        ids.update(pieces)
        position += len(pieces)
    return ids


def test_tokens_used_adds_bpe_ancestors_and_byte_alphabet(tokenizers_by_kind):
    tokenizer = tokenizers_by_kind["bpe_byte_level_roberta"]
    raw = tokens_used(tokenizer, DATA_TEXTS, complete=False)
    complete = tokens_used(tokenizer, DATA_TEXTS)
    assert complete == complete_keep_ids(tokenizer, raw)
    vocab = tokenizer.get_vocab()
    alphabet = {vocab[symbol] for symbol in pre_tokenizers.ByteLevel.alphabet()}
    assert alphabet <= set(complete)
    ancestors = set(complete) - set(raw) - alphabet
    assert ancestors, "the data should have tokens built from merges of tokens it does not produce"


def _drop(keep: list[int], index: int) -> list[int]:
    return [i for i in keep if i != index]


def test_check_vocabulary_keep_refuses_missing_algorithm_requirements(tokenizers_by_kind):
    roberta = tokenizers_by_kind["bpe_byte_level_roberta"]
    raw = tokens_used(roberta, DATA_TEXTS, complete=False)
    complete = tokens_used(roberta, DATA_TEXTS)
    alphabet = {roberta.get_vocab()[symbol] for symbol in pre_tokenizers.ByteLevel.alphabet()}
    ancestor = min(set(complete) - set(raw) - alphabet)
    with pytest.raises(ValueError, match="BPE merge ancestor"):
        check_vocabulary_keep(roberta, _drop(complete, ancestor))
    unused_byte = min(alphabet - set(raw) - {i for i in complete if i not in alphabet})
    with pytest.raises(ValueError, match="byte-level alphabet"):
        check_vocabulary_keep(roberta, _drop(complete, unused_byte))

    fallback = tokenizers_by_kind["bpe_byte_fallback"]
    complete = tokens_used(fallback, DATA_TEXTS)
    with pytest.raises(ValueError, match="byte-fallback token '<0x41>'"):
        check_vocabulary_keep(fallback, _drop(complete, fallback.convert_tokens_to_ids("<0x41>")))

    unigram = tokenizers_by_kind["unigram"]
    pieces = json.loads(unigram.backend_tokenizer.to_str())["model"]["vocab"]
    lowest = min(range(len(pieces)), key=lambda i: pieces[i][1])
    complete = tokens_used(unigram, DATA_TEXTS)
    assert lowest in complete
    with pytest.raises(ValueError, match="lowest-scoring Unigram piece"):
        check_vocabulary_keep(unigram, _drop(complete, lowest))


def test_unsupported_tokenizer_model_is_refused(monkeypatch):
    import hf_distill.compression.pruning.tokenizer_vocabulary as tokenizer_vocabulary

    monkeypatch.setattr(tokenizer_vocabulary, "SUPPORTED_TOKENIZER_MODELS", ("WordPiece", "BPE", "Unigram"))
    with pytest.raises(ValueError, match="model is 'WordLevel'"):
        tokens_used(make_bert_tokenizer(), ["the movie"])


@pytest.mark.parametrize("dropped", ["[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"])
def test_check_vocabulary_keep_refuses_to_drop_special_tokens(dropped, tokenizers_by_kind):
    tokenizer = tokenizers_by_kind["wordpiece"]
    keep = tokens_used(tokenizer, DATA_TEXTS)
    check_vocabulary_keep(tokenizer, keep)
    without = [i for i in keep if i != tokenizer.convert_tokens_to_ids(dropped)]
    with pytest.raises(ValueError, match=rf"drops special tokens: .*'\{dropped[:-1]}\]'"):
        check_vocabulary_keep(tokenizer, without)


def test_check_vocabulary_keep_refuses_bad_ids(tokenizers_by_kind):
    tokenizer = tokenizers_by_kind["wordpiece"]
    keep = tokens_used(tokenizer, DATA_TEXTS)
    with pytest.raises(ValueError, match="out of range"):
        check_vocabulary_keep(tokenizer, [*keep, len(tokenizer)])
    with pytest.raises(ValueError, match="out of range"):
        check_vocabulary_keep(tokenizer, [*keep, -1])
    with pytest.raises(ValueError, match="repeats"):
        check_vocabulary_keep(tokenizer, [*keep, keep[-1]])
    with pytest.raises(ValueError, match="empty"):
        check_vocabulary_keep(tokenizer, [])

    llama3 = tokenizers_by_kind["bpe_byte_level_llama3"]
    keep = tokens_used(llama3, DATA_TEXTS)
    bos = llama3.bos_token_id
    with pytest.raises(ValueError, match="added token '<\\|begin_of_text\\|>'"):
        check_vocabulary_keep(llama3, [bos, *[i for i in keep if i != bos]])


def test_slow_tokenizer_is_refused():
    class NotFast:
        pass

    with pytest.raises(ValueError, match="fast tokenizer"):
        tokens_used(NotFast(), ["text"])


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------


def _bert_config(tokenizer, **kwargs) -> BertConfig:
    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )


def _llama_config(tokenizer, tie: bool) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie,
    )


def _randomize_biases(model) -> None:
    # LM-head biases start at zero; make them distinct so slicing them is tested.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if (
                name.endswith("bias")
                and parameter.dim() == 1
                and parameter.shape[0] == model.config.vocab_size
            ):
                parameter.normal_()


def test_sequence_classifier_outputs_unchanged(tokenizers_by_kind, tmp_path):
    torch.manual_seed(0)
    tokenizer = tokenizers_by_kind["wordpiece"]
    model = BertForSequenceClassification(_bert_config(tokenizer, num_labels=3)).eval()
    keep = tokens_used(tokenizer, DATA_TEXTS)
    pruned_model, pruned_tokenizer = prune_vocabulary(model, tokenizer, keep)

    old = tokenizer(DATA_TEXTS[:4], DATA_TEXTS[-4:], padding=True, return_tensors="pt")
    new = pruned_tokenizer(DATA_TEXTS[:4], DATA_TEXTS[-4:], padding=True, return_tensors="pt")
    assert new.input_ids.tolist() == [_remap(ids, keep) for ids in old.input_ids.tolist()]
    with torch.no_grad():
        expected = model(**old).logits
        actual = pruned_model.eval()(**new).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)

    assert pruned_model.config.vocab_size == len(keep)
    assert pruned_model.get_input_embeddings().weight.shape == (len(keep), 32)
    assert pruned_model.config.pad_token_id == pruned_tokenizer.pad_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer), "the input model is untouched"
    saved = model.num_parameters() - pruned_model.num_parameters()
    assert saved == (len(tokenizer) - len(keep)) * 32

    # Round trip through disk with the standard loaders only.
    pruned_model.save_pretrained(tmp_path / "model")
    pruned_tokenizer.save_pretrained(tmp_path / "model")
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    loaded_model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    reloaded = loaded_tokenizer(DATA_TEXTS[:4], DATA_TEXTS[-4:], padding=True, return_tensors="pt")
    assert reloaded.input_ids.tolist() == new.input_ids.tolist()
    assert (
        loaded_tokenizer.cls_token_id == pruned_tokenizer.cls_token_id == keep.index(tokenizer.cls_token_id)
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded_model(**reloaded).logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("tie", [True, False])
def test_masked_lm_logits_equal_original_columns(tie, tokenizers_by_kind, tmp_path):
    torch.manual_seed(0)
    tokenizer = tokenizers_by_kind["wordpiece"]
    model = BertForMaskedLM(_bert_config(tokenizer, tie_word_embeddings=tie)).eval()
    _randomize_biases(model)
    keep = tokens_used(tokenizer, DATA_TEXTS)
    pruned_model, pruned_tokenizer = prune_vocabulary(model, tokenizer, keep)
    pruned_model.eval()

    head = pruned_model.cls.predictions
    assert head.decoder.weight.shape == (len(keep), 32)
    assert head.decoder.bias.shape == head.bias.shape == (len(keep),)
    assert (head.decoder.weight is pruned_model.bert.embeddings.word_embeddings.weight) == tie

    old = tokenizer(DATA_TEXTS, padding=True, return_tensors="pt")
    new = pruned_tokenizer(DATA_TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**old).logits[..., keep]
        actual = pruned_model(**new).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)

    pruned_model.save_pretrained(tmp_path)
    pruned_tokenizer.save_pretrained(tmp_path)
    loaded_model = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    reloaded = loaded_tokenizer(DATA_TEXTS, padding=True, return_tensors="pt")
    assert reloaded.input_ids.tolist() == new.input_ids.tolist()
    assert loaded_tokenizer.mask_token_id == keep.index(tokenizer.mask_token_id)
    with torch.no_grad():
        torch.testing.assert_close(loaded_model(**reloaded).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("kind", ["bpe_byte_level_llama3", "bpe_byte_fallback"])
def test_causal_lm_logits_equal_original_columns(kind, tie, tokenizers_by_kind, tmp_path):
    torch.manual_seed(0)
    tokenizer = BUILDERS[kind]()
    if tokenizer.pad_token is None:  # Llama-2 style has no pad token; pad with eos as usual
        tokenizer.pad_token = tokenizer.eos_token
    model = LlamaForCausalLM(_llama_config(tokenizer, tie)).eval()
    texts = _data_for(kind, tokenizer)
    keep = tokens_used(tokenizer, texts)
    pruned_model, pruned_tokenizer = prune_vocabulary(model, tokenizer, keep)
    pruned_model.eval()

    assert (pruned_model.lm_head.weight is pruned_model.model.embed_tokens.weight) == tie
    assert pruned_model.lm_head.weight.shape == (len(keep), 32)
    for attribute in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(pruned_model.config, attribute) == keep.index(getattr(tokenizer, attribute))
        assert getattr(pruned_model.config, attribute) == getattr(pruned_tokenizer, attribute)
    assert pruned_model.generation_config.eos_token_id == pruned_tokenizer.eos_token_id

    old = tokenizer(texts, padding=True, return_tensors="pt")
    new = pruned_tokenizer(texts, padding=True, return_tensors="pt")
    assert new.input_ids.tolist() == [_remap(ids, keep) for ids in old.input_ids.tolist()]
    with torch.no_grad():
        expected = model(**old).logits[..., keep]
        actual = pruned_model(**new).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)

    pruned_model.save_pretrained(tmp_path)
    pruned_tokenizer.save_pretrained(tmp_path)
    loaded_model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    reloaded = loaded_tokenizer(texts, padding=True, return_tensors="pt")
    assert reloaded.input_ids.tolist() == new.input_ids.tolist()
    assert loaded_tokenizer.bos_token_id == pruned_tokenizer.bos_token_id
    assert loaded_model.config.vocab_size == len(keep)
    with torch.no_grad():
        torch.testing.assert_close(loaded_model(**reloaded).logits, expected, rtol=0, atol=1e-5)


def test_config_id_outside_keep_is_refused(tokenizers_by_kind):
    tokenizer = tokenizers_by_kind["wordpiece"]
    keep = tokens_used(tokenizer, DATA_TEXTS)
    dropped = next(i for i in range(len(tokenizer)) if i not in keep)
    model = BertForSequenceClassification(_bert_config(tokenizer, num_labels=2))
    model.config.eos_token_id = dropped
    with pytest.raises(ValueError, match="config.eos_token_id"):
        prune_vocabulary(model, tokenizer, keep)
