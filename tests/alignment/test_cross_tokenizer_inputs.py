"""Inputs the cross-tokenizer pieces (and the teacher mixture they share losses with) refuse, with errors that name
the fix: weights that are not a distribution, vocabulary maps that are not one to one, rows without text, a text a
tokenizer reads as unknown tokens only, and caches paired by an older alignment rule."""

from __future__ import annotations

import pytest
import torch
from conftest import TEXTS_FOR_TESTS
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from hf_distill.alignment.collator import CrossTokenizerCollator, check_alignable
from hf_distill.alignment.positions import ALIGNMENT_VERSION
from hf_distill.caches.cross_tokenizer import (
    CachedCrossTokenizerCollator,
    build_cross_tokenizer_cache,
    tokenizer_fingerprint,
    verify_cross_tokenizer_manifest,
)
from hf_distill.losses import teacher_mixture_logprobs
from hf_distill.losses.cross_tokenizer_cached import cached_cross_tokenizer_distillation_loss
from hf_distill.tasks.lm.cross_tokenizer import train_tokenizer

TEXTS = ["Hello world, the café served crème brûlée to the team."] + TEXTS_FOR_TESTS


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer("byte_bpe", TEXTS * 10, 300)


@pytest.fixture(scope="module")
def wordpiece():
    return train_tokenizer("wordpiece", TEXTS * 10, 200)


# --------------------------------------------------------------------------------------------- the mixture
def _teachers(seed=0, shape=(4, 7)):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) * 2 for _ in range(3)]


@pytest.mark.parametrize(
    "weights,message",
    [
        ([1.0, 0.5, 0.5], r"sum to 1 .*got sums from 2 to 2.*Divide them by their sum"),
        ([0.2, 0.2, 0.2], r"sum to 1 .*got sums from 0\.6"),
        ([1.5, -0.25, -0.25], r"finite and >= 0"),
        ([float("nan"), 0.5, 0.5], r"finite and >= 0"),
        ([0.5, float("inf"), 0.5], r"finite and >= 0"),
        ([0.5, 0.5], r"shape \(2,\); expected \(3,\)"),
    ],
)
def test_mixture_weights_that_are_no_distribution_are_refused(weights, message):
    with pytest.raises(ValueError, match=message):
        teacher_mixture_logprobs(_teachers(), torch.tensor(weights))


def test_per_position_weights_are_checked_at_every_position_and_a_valid_mixture_sums_to_one():
    teachers = _teachers(1)
    weights = torch.tensor([[0.2, 0.5, 0.3, 1.0], [0.8, 0.5, 0.3, 0.0], [0.0, 0.0, 0.4, 0.0]])  # (K, batch)
    mixture = teacher_mixture_logprobs(teachers, weights, temperature=1.5)
    # invariant: a mixture of distributions with weights summing to 1 is a distribution (float64 reference)
    reference = sum(
        w[:, None].double() * torch.softmax(t.double() / 1.5, dim=-1) for w, t in zip(weights, teachers)
    )
    torch.testing.assert_close(mixture.double().exp(), reference, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mixture.exp().sum(-1), torch.ones(4), rtol=0, atol=1e-5)
    weights[2, 1] = 0.5  # position 1 now sums to 1.5
    with pytest.raises(ValueError, match=r"got sums from 1 to 1\.5"):
        teacher_mixture_logprobs(teachers, weights)
    with pytest.raises(ValueError, match=r"logits' leading dims \(4,\)"):
        teacher_mixture_logprobs(teachers, torch.full((3, 5), 1 / 3))
    # rounding of a normalisation (float32) stays within the tolerance
    teacher_mixture_logprobs(teachers, torch.tensor([0.1, 0.2, 0.7 + 5e-5]))


# --------------------------------------------------------------------------------------------- rows of text
@pytest.mark.parametrize("row", [{"text": None}, {"other": "the cat"}, {"text": 3}, {"text": ["the", "cat"]}])
def test_collators_refuse_a_row_without_text_naming_the_row_and_column(bpe, wordpiece, row):
    for collator in (CrossTokenizerCollator(wordpiece, bpe), CachedCrossTokenizerCollator(wordpiece)):
        with pytest.raises(ValueError, match=r"row 1 of the batch has no text in column 'text'"):
            collator([{"text": "the cat"}, row])


def test_the_cache_builder_refuses_a_row_without_text_before_running_the_teacher(tmp_path, bpe, wordpiece):
    class Teacher(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            raise AssertionError("the teacher must not run on a dataset with a row without text")

    teacher = Teacher(
        LlamaConfig(
            vocab_size=len(bpe),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    )
    data = Dataset.from_dict({"text": ["the cat", None, "the dog"]})
    with pytest.raises(ValueError, match=r"row 1 of the dataset has no text in column 'text' \(None\)"):
        build_cross_tokenizer_cache(
            teacher, data, tmp_path / "cache", tokenizer=wordpiece, teacher_tokenizer=bpe, teacher_name="t",
            block_size=16, temperature=1.0, top_k=4,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------- tokenizers
def test_a_text_read_as_unknown_tokens_only_says_so(bpe, wordpiece):
    # trained on English, the WordPiece student has no piece for Cyrillic: every word is [UNK]
    assert set(wordpiece("Привет мир", add_special_tokens=False)["input_ids"]) == {wordpiece.unk_token_id}
    with pytest.raises(
        ValueError,
        match=r"student's tokenizer reads 'Привет мир' as its unknown token '\[UNK\]' only .*trained on",
    ):
        check_alignable(wordpiece, bpe, sample_text="Привет мир")
    check_alignable(wordpiece, bpe, sample_text="the cat and the dog")


def test_a_cache_paired_by_another_alignment_rule_is_refused(bpe, wordpiece):
    cross = {
        "teacher_tokenizer": {"fingerprint": tokenizer_fingerprint(bpe)},
        "student_tokenizer": {"fingerprint": tokenizer_fingerprint(wordpiece)},
    }
    manifest = {"kind": "teacher_topk_logprobs", "cross_tokenizer": cross}
    with pytest.raises(
        ValueError, match=r"alignment rule 1, this version of hf_distill by rule 2.*Rebuild it"
    ):
        verify_cross_tokenizer_manifest(manifest, tokenizer=wordpiece, teacher_tokenizer=bpe)
    cross["alignment_version"] = ALIGNMENT_VERSION
    verify_cross_tokenizer_manifest(manifest, tokenizer=wordpiece, teacher_tokenizer=bpe)


# --------------------------------------------------------------------------------------------- the cached loss
def test_the_cached_loss_refuses_ids_and_rows_outside_its_tensors():
    student = torch.randn(4, 5)
    rows = torch.tensor([0, 3])
    logprobs = torch.log_softmax(torch.randn(2, 3), -1)
    indices = torch.tensor([[0, 1, 2], [3, 4, 9]])
    tails = torch.full((2,), -30.0)
    options = dict(teacher_vocab_size=9, student_ids=torch.tensor([0, 1]), teacher_ids=torch.tensor([0, 1]))
    with pytest.raises(
        ValueError, match=r"teacher_topk_indices hold 0 to 9, outside the teacher's vocabulary"
    ):
        cached_cross_tokenizer_distillation_loss(student, rows, logprobs, indices, tails, tails, **options)
    with pytest.raises(ValueError, match=r"student_rows holds -1 to 0, outside \[0, 4\)"):
        cached_cross_tokenizer_distillation_loss(
            student, torch.tensor([-1, 0]), logprobs, indices.clamp(max=8), tails, tails, **options
        )
    with pytest.raises(ValueError, match=r"not one to one: student_ids lists token\(s\) \[1\]"):
        cached_cross_tokenizer_distillation_loss(
            student, rows, logprobs, indices.clamp(max=8), tails, tails, teacher_vocab_size=9,
            student_ids=torch.tensor([1, 1]), teacher_ids=torch.tensor([0, 1]),
        )  # fmt: skip
