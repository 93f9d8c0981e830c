"""Shared fixtures: tiny tokenizers built offline with the `tokenizers` library, and an offline environment."""

from __future__ import annotations

import os
import tempfile

# Nothing in the test suite may reach the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Keep datasets' caches of test files out of the user's cache.
os.environ.setdefault(
    "HF_DATASETS_CACHE", os.path.join(tempfile.gettempdir(), f"hf_distill_tests_{os.getpid()}")
)

import pytest  # noqa: E402
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

WORDS = (
    "the a an is was are were be good bad great terrible movie film plot actor acting story music "
    "happy sad fun boring long short love hate it this that and or not very really quite i you we "
    "they he she cat dog house car tree red blue green big small one two three four five hello world "
    "sport business politics tech entertainment game team win lose market price vote election phone "
    "computer song star der die das ein eine ist und nicht katze hund haus auto baum rot blau gruen gross "
    "klein eins zwei drei hallo welt gut schlecht"
).split()

TEXTS_FOR_TESTS = [
    "the movie was good",
    "the plot was boring and very long",
    "i love this film",
    "terrible acting and a sad story",
    "really great music",
    "it was not fun",
    "the cat and the dog",
    "a very happy story",
    "bad movie",
    "great actor great film",
    "i hate long films",
    "the story was quite short",
    "we love the music and the story",
    "they hate this boring film",
    "she was happy",
    "he was sad and the film was long",
]


def _word_level(specials: list[str], unk: str) -> Tokenizer:
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def make_bert_tokenizer() -> PreTrainedTokenizerFast:
    """A BERT-style tokenizer: [CLS] a [SEP] b [SEP], with token type ids."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = _word_level(specials, "[UNK]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def make_lm_tokenizer() -> PreTrainedTokenizerFast:
    """A causal-LM tokenizer with bos/eos/pad, adding bos at the start of each text."""
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    tokenizer = _word_level(specials, "<unk>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=128,
    )


def make_seq2seq_tokenizer() -> PreTrainedTokenizerFast:
    """A Marian/T5-style tokenizer: pad=0, eos appended to every text, shared source/target vocabulary."""
    specials = ["<pad>", "</s>", "<unk>"]
    tokenizer = _word_level(specials, "<unk>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="</s>",
        model_max_length=64,
    )


@pytest.fixture
def bert_tokenizer() -> PreTrainedTokenizerFast:
    return make_bert_tokenizer()


@pytest.fixture
def lm_tokenizer() -> PreTrainedTokenizerFast:
    return make_lm_tokenizer()


@pytest.fixture
def seq2seq_tokenizer() -> PreTrainedTokenizerFast:
    return make_seq2seq_tokenizer()
