"""Cross-tokenizer distillation: alignment of two tokenizations, the vocabulary map, the losses against float64
references written here, the trainer with two genuinely different tokenizers trained offline, and a cache of the
teacher at the aligned positions against the live teacher (scripts/cache_teacher_logits.py -> distill_lm.py)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import TEXTS_FOR_TESTS
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from hf_distill import DistillationTrainer, DistillationTrainingArguments
from hf_distill.alignment.collator import (
    ALIGNED_COLUMN,
    TEACHER_INPUT_IDS,
    CrossTokenizerCollator,
    check_alignable,
)
from hf_distill.alignment.positions import align_positions, prediction_pairs
from hf_distill.alignment.vocabulary import token_texts, vocabulary_map
from hf_distill.caches.cross_tokenizer import (
    CachedCrossTokenizerCollator,
    build_cross_tokenizer_cache,
    load_cross_tokenizer_cache,
    teacher_topk_split_tail,
    tokenizer_fingerprint,
    verify_cross_tokenizer_manifest,
)
from hf_distill.losses import cross_tokenizer_distillation_loss
from hf_distill.losses.cross_tokenizer_cached import cached_cross_tokenizer_distillation_loss
from hf_distill.sources.cross_tokenizer import CachedCrossTokenizerKD
from hf_distill.tasks.lm.cross_tokenizer import text_blocks, train_tokenizer

CORPUS = [
    "Hello world, the unbelievable café served crème brûlée 😀 to the team.",
    "The market price rose; voters were unbelievably happy with the election.",
    "Naïve tokens: emojis 🎉🚀 and accents é è ê, plus  double  spaces.",
] + TEXTS_FOR_TESTS
TRAINING_TEXT = CORPUS * 20


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer("byte_bpe", TRAINING_TEXT, 400)


@pytest.fixture(scope="module")
def unigram():
    return train_tokenizer("unigram", TRAINING_TEXT, 200)


@pytest.fixture(scope="module")
def wordpiece():
    return train_tokenizer("wordpiece", TRAINING_TEXT, 300)


# --------------------------------------------------------------------------------------------- hand-made alignment
def test_multi_piece_word_aligns_on_shared_ends_and_the_shift_pairs_contexts():
    # "unbelievable": student un|believ|able, teacher unbeliev|able
    student, teacher = [(0, 2), (2, 8), (8, 12)], [(0, 8), (8, 12)]
    assert align_positions(student, teacher, text="unbelievable") == [(1, 0), (2, 1)]
    # student position 1 (read "unbeliev") and teacher position 0 (read "unbeliev") both predict "able"
    assert prediction_pairs(student, teacher, text="unbelievable") == [(1, 0)]
    # a BOS added by the student's post-processor shifts its positions by one
    with_bos = [(0, 0), *student]
    assert prediction_pairs(with_bos, teacher, text="unbelievable", student_special=[1, 0, 0, 0]) == [(2, 0)]
    # both with BOS: BOS reads no text on either side, so it predicts the same first word only if it is one piece
    assert (
        prediction_pairs(
            [(0, 0), (0, 12)],
            [(0, 0), (0, 8), (8, 12)],
            text="unbelievable",
            student_special=[1, 0],
            teacher_special=[1, 0, 0],
        )
        == []
    )
    assert prediction_pairs(
        [(0, 0), (0, 5), (5, 11)],
        [(0, 0), (0, 5), (6, 11)],
        text="hello world",
        student_special=[1, 0, 0],
        teacher_special=[1, 0, 0],
    ) == [(0, 0), (1, 1)]


def test_whitespace_is_part_of_what_a_position_has_read():
    """A position pairs only with one that has read the same characters, whitespace included, and whose next
    token covers the same characters."""
    text = "Hello  world"
    byte_level = [(0, 5), (6, 6), (7, 12)]  # Hello, Ġ, Ġworld: a trimming post-processor cut their spaces
    wordpiece = [(0, 5), (7, 12)]  # whitespace dropped: "world" stands for the spaces before it and the word
    assert align_positions(byte_level, wordpiece, text=text) == [(0, 0), (2, 1)]
    # byte-level after "Hello" predicts " " and after "Hello " predicts " world"; WordPiece after "Hello" predicts
    # "  world": no pair (the old rule paired "Hello " with "Hello", whose next tokens differ)
    assert prediction_pairs(byte_level, wordpiece, text=text) == []
    one_space = [(0, 5), (6, 11)]  # "Hello world": byte-level Ġworld and WordPiece world both cover " world"
    assert prediction_pairs(one_space, one_space, text="Hello world") == [(0, 0)]
    # SentencePiece reads "Café" then a bare "▁" then "nice"; byte-level reads "Café" then "Ġnice"
    text = "Café nice"
    sentencepiece = [(0, 0), (0, 4), (4, 5), (5, 9)]
    byte_level = [(0, 4), (5, 9)]  # Ġnice trimmed
    assert prediction_pairs(byte_level, sentencepiece, text=text, teacher_special=[1, 0, 0, 0]) == []
    assert align_positions(byte_level, sentencepiece, text=text, teacher_special=[1, 0, 0, 0]) == [
        (0, 1),
        (1, 3),
    ]


def test_a_character_split_into_bytes_aligns_through_its_last_byte():
    text = "a😀b"
    byte_level = [(0, 1), (1, 2), (1, 2), (1, 2), (2, 3)]  # the emoji is three byte pieces with one span
    characters = [(0, 1), (1, 2), (2, 3)]
    assert align_positions(byte_level, characters, text=text) == [(0, 0), (3, 1), (4, 2)]
    # "a" -> first emoji byte is not a whole token: no pair; after the emoji both predict "b"
    assert prediction_pairs(byte_level, characters, text=text) == [(3, 1)]


def test_special_tokens_are_contexts_but_never_predicted_nor_aligned():
    text = "a<eos>b"
    student = [(0, 1), (1, 6), (6, 7)]  # <eos> is one special token
    teacher = [(0, 1), (1, 2), (2, 5), (5, 6), (6, 7)]  # the other tokenizer reads it as characters
    special = [0, 1, 0]
    assert align_positions(student, teacher, text=text, student_special=special) == [(0, 0), (2, 4)]
    assert prediction_pairs(student, teacher, text=text, student_special=special) == [(1, 3)]


def test_real_tokenizers_pair_positions_that_read_the_same_text_and_predict_the_same_span(
    bpe, unigram, wordpiece
):
    """The byte-level and Unigram tokenizers here decode this text losslessly, so what a position has read is the
    decoding of its ids so far (independent of offsets); WordPiece reads up to the end of its last word. Property
    tests over every kind of tokenizer: tests/test_cross_tokenizer_alignment.py."""
    text = "hello world, the unbelievable café 😀 team  rose."

    def read(tokenizer, ids, offsets):
        if tokenizer is wordpiece:
            return [max((end for _, end in offsets[: t + 1]), default=0) for t in range(len(ids))]
        assert tokenizer.backend_tokenizer.decode(ids, skip_special_tokens=True) == text  # lossless here
        decoded = [
            tokenizer.backend_tokenizer.decode(ids[: t + 1], skip_special_tokens=True)
            for t in range(len(ids))
        ]
        return [len(prefix) if text.startswith(prefix) else None for prefix in decoded]

    for student, teacher in ((unigram, bpe), (wordpiece, bpe), (bpe, wordpiece), (bpe, unigram)):
        s = student(text, return_offsets_mapping=True, return_special_tokens_mask=True)
        t = teacher(text, return_offsets_mapping=True, return_special_tokens_mask=True)
        s_texts, t_texts = token_texts(student, s["input_ids"]), token_texts(teacher, t["input_ids"])
        pairs = prediction_pairs(
            s["offset_mapping"],
            t["offset_mapping"],
            text=text,
            student_special=s["special_tokens_mask"],
            teacher_special=t["special_tokens_mask"],
            student_token_texts=s_texts,
            teacher_token_texts=t_texts,
        )
        assert len(pairs) >= 3  # where both predict the same span (few: these vocabularies are tiny)
        s_read = read(student, s["input_ids"], s["offset_mapping"])
        t_read = read(teacher, t["input_ids"], t["offset_mapping"])
        for t_pos, u_pos in pairs:
            assert s_read[t_pos] is not None and s_read[t_pos] == t_read[u_pos]
            assert s_read[t_pos + 1] is not None and s_read[t_pos + 1] == t_read[u_pos + 1]


# --------------------------------------------------------------------------------------------- vocabulary
def test_vocabulary_map_matches_conventions_one_to_one(bpe, unigram, wordpiece):
    def pairs_of(student, teacher):
        s_ids, t_ids = vocabulary_map(student, teacher)
        assert len(set(s_ids.tolist())) == len(s_ids) and len(set(t_ids.tolist())) == len(t_ids)
        return set(
            zip(student.convert_ids_to_tokens(s_ids.tolist()), teacher.convert_ids_to_tokens(t_ids.tolist()))
        )

    unigram_bpe = pairs_of(unigram, bpe)
    assert ("▁the", "Ġthe") in unigram_bpe and ("e", "e") in unigram_bpe
    wordpiece_bpe = pairs_of(wordpiece, bpe)
    assert ("the", "Ġthe") in wordpiece_bpe  # a WordPiece word start is a word after a space
    # an ASCII remainder: a byte-level vocabulary shows a non-ASCII character as its bytes' alphabet letters, so
    # "##é" has no counterpart spelled "é" there (that letter is the single byte 0xE9)
    continuation = next(
        tok
        for tok in sorted(wordpiece.get_vocab())
        if tok.startswith("##") and tok[2:].isascii() and tok[2:] in bpe.get_vocab()
    )
    assert (continuation, continuation[2:]) in wordpiece_bpe
    accented = [(s, t) for s, t in wordpiece_bpe if "é" in s]  # byte-level pieces of é decode to é
    assert accented and all(t.encode("latin-1", "ignore") != t.encode() for _, t in accented)
    specials = set(bpe.all_special_tokens) | set(unigram.all_special_tokens)
    assert not any(s in specials or t in specials for s, t in unigram_bpe)


# --------------------------------------------------------------------------------------------- losses
def _forward_kl64(student, teacher, temperature):
    log_q = torch.log_softmax(student.double() / temperature, -1)
    log_p = torch.log_softmax(teacher.double() / temperature, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2


def _uld64(student, teacher, temperature, student_keep=None, teacher_keep=None):
    p = torch.softmax(student.double() / temperature, -1)
    q = torch.softmax(teacher.double() / temperature, -1)
    if student_keep is not None:
        p, q = p[:, student_keep], q[:, teacher_keep]
    width = max(p.shape[1], q.shape[1])
    p = torch.nn.functional.pad(p.sort(-1, descending=True).values, (0, width - p.shape[1]))
    q = torch.nn.functional.pad(q.sort(-1, descending=True).values, (0, width - q.shape[1]))
    return (p - q).abs().sum(-1)


def _setup(seed=0, pairs=7):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 6, 11, generator=generator) * 2  # (B, T_s, V_s)
    teacher = torch.randn(2, 8, 17, generator=generator) * 2  # (B, T_t, V_t)
    student_rows = torch.randperm(12, generator=generator)[:pairs]
    teacher_rows = torch.randperm(16, generator=generator)[:pairs]
    student_ids = torch.tensor([0, 3, 4, 7, 10])
    teacher_ids = torch.tensor([5, 1, 16, 2, 9])
    return student, teacher, student_rows, teacher_rows, student_ids, teacher_ids


@pytest.mark.parametrize("mode", ["exact", "uld", "hybrid"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_losses_match_float64_references_in_value_and_gradient(mode, chunk_size):
    student, teacher, s_rows, t_rows, s_ids, t_ids = _setup()
    temperature, weight = 2.0, 0.7
    student_leaf = student.clone().requires_grad_(True)
    loss = cross_tokenizer_distillation_loss(
        student_leaf, teacher, s_rows, t_rows, student_ids=s_ids, teacher_ids=t_ids, mode=mode,
        temperature=temperature, uld_weight=weight, chunk_size=chunk_size,
    )  # fmt: skip
    loss.backward()

    reference_leaf = student.double().clone().requires_grad_(True)
    s = reference_leaf.reshape(-1, 11)[s_rows]
    t = teacher.double().reshape(-1, 17)[t_rows]
    exact = _forward_kl64(s[:, s_ids], t[:, t_ids], temperature)
    rest_s = [i for i in range(11) if i not in s_ids.tolist()]
    rest_t = [i for i in range(17) if i not in t_ids.tolist()]
    per_pair = {
        "exact": exact,
        "uld": weight * _uld64(s, t, temperature),
        "hybrid": exact + weight * _uld64(s, t, temperature, rest_s, rest_t),
    }[mode]
    reference = per_pair.mean()
    reference.backward()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(student_leaf.grad.double(), reference_leaf.grad, rtol=1e-4, atol=1e-6)


def test_a_student_equal_to_the_teacher_on_the_mapped_subset_gets_zero_exact_loss():
    student, teacher, s_rows, t_rows, s_ids, t_ids = _setup()
    student = student.reshape(-1, 11).clone()
    flat_teacher = teacher.reshape(-1, 17)
    # the mapped logits equal the teacher's up to a per-row constant; the unmapped ones are anything
    student[s_rows[:, None], s_ids[None, :]] = flat_teacher[t_rows[:, None], t_ids[None, :]] + 3.0
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        for chunk_size in (None, 2):
            leaf = student.clone().requires_grad_(True)
            loss = cross_tokenizer_distillation_loss(
                leaf, flat_teacher, s_rows, t_rows, student_ids=s_ids, teacher_ids=t_ids, mode="exact", kind=kind,
                temperature=1.5, chunk_size=chunk_size,
            )  # fmt: skip
            loss.backward()
            assert abs(loss.item()) < 1e-6
            assert leaf.grad.abs().max().item() < 1e-6


def test_uld_is_zero_for_equal_sorted_distributions_of_different_vocabulary_sizes():
    """ULD is an L1 distance: its gradient is +-1 through the softmax for any nonzero difference, however small, so
    it vanishes only where the sorted probabilities are exactly equal. Equal distributions over vocabularies of
    different sizes and orders differ by float rounding (which depends on the CPU): there only the loss is ~0."""
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(5, 6, generator=generator)
    permutation = torch.randperm(6, generator=generator)
    # the teacher's 9 tokens: the student's probabilities in another order, and three with probability 0
    teacher = torch.cat([student[:, permutation], torch.full((5, 3), -1e4)], dim=-1)
    rows = torch.arange(5)
    loss = cross_tokenizer_distillation_loss(student, teacher, rows, rows, mode="uld", temperature=1.0)
    assert abs(loss.item()) < 1e-6
    # inputs made exactly equal: the same logits on both sides give bitwise equal sorted probabilities
    leaf = student.clone().requires_grad_(True)
    loss = cross_tokenizer_distillation_loss(leaf, student.clone(), rows, rows, mode="uld", temperature=1.0)
    loss.backward()
    assert loss.item() == 0.0 and leaf.grad.abs().max().item() == 0.0
    shifted = teacher.clone()
    shifted[:, 0] += 1.0
    assert cross_tokenizer_distillation_loss(student, shifted, rows, rows, mode="uld").item() > 1e-3


def test_no_pairs_give_zero_and_bad_maps_raise():
    student, teacher, _, _, s_ids, t_ids = _setup()
    leaf = student.clone().requires_grad_(True)
    empty = torch.zeros(0, dtype=torch.long)
    loss = cross_tokenizer_distillation_loss(
        leaf, teacher, empty, empty, student_ids=s_ids, teacher_ids=t_ids
    )
    loss.backward()
    assert loss.item() == 0.0 and leaf.grad.abs().sum().item() == 0.0
    with pytest.raises(ValueError, match="vocabulary map"):
        cross_tokenizer_distillation_loss(student, teacher, empty, empty, mode="hybrid")
    with pytest.raises(ValueError, match="past the vocabularies"):
        cross_tokenizer_distillation_loss(
            student, teacher, empty, empty, student_ids=torch.tensor([11]), teacher_ids=torch.tensor([0])
        )
    with pytest.raises(ValueError, match=r"student_ids holds -1 to 3.*vocabulary_map"):
        cross_tokenizer_distillation_loss(
            student,
            teacher,
            empty,
            empty,
            student_ids=torch.tensor([-1, 3]),
            teacher_ids=torch.tensor([0, 1]),
        )
    with pytest.raises(
        ValueError, match=r"not one to one: teacher_ids lists token\(s\) \[2\] more than once"
    ):
        cross_tokenizer_distillation_loss(
            student, teacher, empty, empty, student_ids=torch.tensor([0, 1]), teacher_ids=torch.tensor([2, 2])
        )
    with pytest.raises(ValueError, match=r"student_ids must be a 1-D integer tensor"):
        cross_tokenizer_distillation_loss(
            student, teacher, empty, empty, student_ids=torch.tensor([0.0]), teacher_ids=torch.tensor([0])
        )
    with pytest.raises(ValueError, match=r"teacher_rows holds 16 to 16, outside \[0, 16\)"):
        cross_tokenizer_distillation_loss(
            student, teacher, torch.tensor([0]), torch.tensor([16]), student_ids=s_ids, teacher_ids=t_ids
        )


# --------------------------------------------------------------------------------------------- collator and trainer
def test_collator_gives_the_teacher_the_text_the_student_read(bpe, unigram):
    collator = CrossTokenizerCollator(unigram, bpe, max_length=12)
    batch = collator([{"text": CORPUS[0]}, {"text": "the cat"}])
    assert batch["input_ids"].shape[1] == 12 and batch["labels"][1].eq(-100).sum() > 0
    student_text = unigram.decode(batch["input_ids"][0], skip_special_tokens=True)
    teacher_text = bpe.decode(batch[TEACHER_INPUT_IDS][0][batch["teacher_attention_mask"][0].bool()])
    assert teacher_text.replace(" ", "") == student_text.replace(" ", "")  # truncated at the same character
    aligned = batch[ALIGNED_COLUMN]
    assert aligned.shape == batch["input_ids"].shape
    assert aligned.max() < batch["teacher_attention_mask"].sum(1).max() and (aligned >= 0).sum() >= 2


def test_unalignable_tokenizers_fail_with_a_message(bpe, unigram):
    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="slow tokenizer"):
        check_alignable(unigram, Slow())
    with pytest.raises(ValueError, match="teacher_processing_class"):
        check_alignable(unigram, None)


def _llama(vocab, seed, layers=1):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _args(tmp_path, **values):
    base = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3,
        report_to=[], save_strategy="no", logging_steps=1, seed=0, use_cpu=True, temperature=2.0, alpha=0.5,
    )  # fmt: skip
    base.update(values)
    return DistillationTrainingArguments(**base)


def test_trainer_distils_across_tokenizers_and_refuses_without_cross_tokenizer(tmp_path, bpe, unigram):
    teacher, student = _llama(len(bpe), 0, layers=2), _llama(len(unigram), 1)
    data = Dataset.from_dict({"text": text_blocks(CORPUS, unigram, 16)})
    collator = CrossTokenizerCollator(unigram, bpe, max_length=16)
    with pytest.raises(ValueError, match="cross_tokenizer"):
        DistillationTrainer(
            model=student, teacher_model=teacher, args=_args(tmp_path), train_dataset=data,
            processing_class=unigram, teacher_processing_class=bpe, data_collator=collator,
        )  # fmt: skip
    for mode in ("exact", "uld", "hybrid"):
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=_args(tmp_path, cross_tokenizer=mode, kd_chunk_size=8),
            train_dataset=data, eval_dataset=data, processing_class=unigram, teacher_processing_class=bpe,
            data_collator=collator,
        )  # fmt: skip
        trainer.train()
        logged = [entry for entry in trainer.state.log_history if "kd_loss" in entry]
        assert logged and all(entry["kd_loss"] > 0 for entry in logged)
        assert torch.isfinite(torch.tensor(trainer.evaluate()["eval_loss"]))
    assert all(p.grad is None for p in teacher.parameters())


def test_trainer_kd_term_is_the_loss_at_the_collated_pairs(tmp_path, bpe, unigram):
    """alpha = 1: the training loss is the KD sum over the collator's pairs over the label tokens, computed here
    from the two models' own forwards."""
    teacher, student = _llama(len(bpe), 0), _llama(len(unigram), 1)
    rows = [{"text": text} for text in CORPUS[:4]]
    collator = CrossTokenizerCollator(unigram, bpe, max_length=20)
    args = _args(tmp_path, cross_tokenizer="hybrid", alpha=1.0, uld_weight=0.5)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows),
        processing_class=unigram, teacher_processing_class=bpe, data_collator=collator,
    )  # fmt: skip
    batch = collator(rows)
    loss = trainer.compute_loss(student, batch, num_items_in_batch=batch["labels"][:, 1:].ne(-100).sum())
    with torch.no_grad():
        s_logits = student(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits.double()
        t_logits = teacher(
            input_ids=batch[TEACHER_INPUT_IDS], attention_mask=batch["teacher_attention_mask"]
        ).logits
    s_ids, t_ids = vocabulary_map(unigram, bpe)
    rest_s = [i for i in range(s_logits.shape[-1]) if i not in set(s_ids.tolist())]
    rest_t = [i for i in range(t_logits.shape[-1]) if i not in set(t_ids.tolist())]
    total = 0.0
    for b in range(len(rows)):
        for t_pos, u_pos in enumerate(batch[ALIGNED_COLUMN][b].tolist()):
            if u_pos < 0 or batch["labels"][b, t_pos + 1] == -100:
                continue
            s, t = s_logits[b, t_pos : t_pos + 1], t_logits[b, u_pos : u_pos + 1].double()
            exact = _forward_kl64(s[:, s_ids], t[:, t_ids], 2.0)
            total += (exact + 0.5 * _uld64(s, t, 2.0, rest_s, rest_t)).item()
    label_tokens = batch["labels"][:, 1:].ne(-100).sum().item()
    assert loss.item() == pytest.approx(total / label_tokens, rel=1e-4)


@pytest.mark.parametrize("option", [{"fused_kd_loss": True}, {"hidden_weight": 1.0}, {"lmbda": 0.5}])
def test_options_cross_tokenizer_cannot_honour_are_refused(tmp_path, option):
    from hf_distill.sources.cross_tokenizer import check_cross_tokenizer_options
    from hf_distill.training.task_loss import infer_task

    args = _args(tmp_path, cross_tokenizer="hybrid", **option)
    with pytest.raises(
        ValueError, match=f"cross_tokenizer='hybrid' cannot be combined with {next(iter(option))}"
    ):
        check_cross_tokenizer_options(args, infer_task(_llama(16, 0), None))


def test_distill_lm_takes_a_cache_with_cross_tokenizer_but_not_seq_kd(tmp_path):
    from hf_distill.tasks import lm

    args = _args(tmp_path, cross_tokenizer="exact", teacher_logits_cache=str(tmp_path))
    data = lm.DataArguments(train_file=str(tmp_path / "train.txt"))
    _distill_lm().check_flags(data, lm.SequenceKDArguments(), args)
    with pytest.raises(ValueError, match="--cross_tokenizer exact cannot be combined with --seq_kd"):
        _distill_lm().check_flags(
            data, lm.SequenceKDArguments(seq_kd=True), _args(tmp_path, cross_tokenizer="exact")
        )


# --------------------------------------------------------------------------------------------- the LM recipe
def _distill_lm():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "distill_lm.py"
    spec = importlib.util.spec_from_file_location("_script_distill_lm_cross", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_distill_lm_recipe_distils_across_tokenizers(tmp_path, bpe, unigram):
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    _llama(len(bpe), 0).save_pretrained(teacher_dir)
    bpe.save_pretrained(teacher_dir)
    _llama(len(unigram), 1).save_pretrained(student_dir)
    unigram.save_pretrained(student_dir)
    train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
    train.write_text("\n".join(CORPUS * 3) + "\n")
    valid.write_text("\n".join(CORPUS[:4]) + "\n")
    out = tmp_path / "out"
    argv = [
        "--teacher_model_name_or_path", str(teacher_dir), "--student_model_name_or_path", str(student_dir),
        "--train_file", str(train), "--validation_file", str(valid), "--block_size", "24", "--do_train",
        "--do_eval", "--cross_tokenizer", "hybrid", "--output_dir", str(out), "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--save_strategy", "no",
        "--logging_steps", "1", "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true",
    ]  # fmt: skip
    distill_lm = _distill_lm()
    results = distill_lm.main(argv)
    assert torch.isfinite(torch.tensor(results["eval"]["perplexity"]))
    log_history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any(entry.get("kd_loss", 0) > 0 for entry in log_history)
    with pytest.raises(ValueError, match="cross_tokenizer"):  # without the flag: refused before training
        distill_lm.main([arg for arg in argv if arg not in ("--cross_tokenizer", "hybrid")])


# --------------------------------------------------------------------------------------------- a cached teacher
def _cached_rows(teacher_rows, k, teacher_ids, temperature):
    """What a cross-tokenizer cache stores for (P, V_t) teacher logits: the top k and the two tempered tails."""
    mapped = torch.zeros(teacher_rows.shape[-1], dtype=torch.bool)
    mapped[teacher_ids] = True
    return teacher_topk_split_tail(teacher_rows, k, teacher_rows.shape[-1], mapped, temperature=temperature)


@pytest.mark.parametrize("mode", ["exact", "uld", "hybrid"])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_cached_losses_with_every_teacher_token_equal_the_live_losses(mode, kind, chunk_size):
    """k = the teacher's vocabulary: the cached loss is the live loss (itself checked against float64 above), in
    value and gradient."""
    student, teacher, s_rows, t_rows, s_ids, t_ids = _setup()
    temperature, options = 2.0, dict(mode=mode, kind=kind, temperature=2.0, uld_weight=0.7, beta=0.3)
    live_leaf = student.clone().requires_grad_(True)
    live = cross_tokenizer_distillation_loss(
        live_leaf, teacher, s_rows, t_rows, student_ids=s_ids, teacher_ids=t_ids, **options
    )
    live.backward()
    cached_leaf = student.clone().requires_grad_(True)
    cached = cached_cross_tokenizer_distillation_loss(
        cached_leaf, s_rows, *_cached_rows(teacher.reshape(-1, 17)[t_rows], 17, t_ids, temperature),
        teacher_vocab_size=17, student_ids=s_ids, teacher_ids=t_ids, chunk_size=chunk_size, **options,
    )  # fmt: skip
    cached.backward()
    assert cached.item() == pytest.approx(live.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(cached_leaf.grad, live_leaf.grad, rtol=1e-4, atol=1e-6)


def _bucketed_reference(student, teacher, s_ids, t_ids, k, temperature, weight):
    """float64, written out from the full teacher logits: per pair (exact, uld, unmapped ULD) with the teacher's
    tokens outside its top k merged into one bucket on each side, as cached_cross_tokenizer_distillation_loss
    defines them."""
    p_s = torch.softmax(student.double() / temperature, -1)
    q_t = torch.softmax(teacher.double() / temperature, -1)
    top = torch.topk(teacher, k, dim=-1).indices
    s_list, t_list = s_ids.tolist(), t_ids.tolist()
    rows = []
    for row in range(student.shape[0]):
        in_top = set(top[row].tolist())
        # exact: the mapped tokens, renormalised on each side; buckets: mapped top-k tokens, the other mapped ones
        q_m = q_t[row, t_list] / q_t[row, t_list].sum()
        p_m = p_s[row, s_list] / p_s[row, s_list].sum()
        listed = [j for j, t in enumerate(t_list) if t in in_top]
        rest = [j for j, t in enumerate(t_list) if t not in in_top]
        q_b = torch.cat([q_m[listed], q_m[rest].sum().reshape(1)])
        p_b = torch.cat([p_m[listed], p_m[rest].sum().reshape(1)])
        keep = q_b > 0
        exact = (q_b[keep] * (q_b[keep] / p_b[keep]).log()).sum() * temperature**2

        def sorted_distance(p, known, q_rest):  # first len(known) ranks one by one, the rest as one bucket
            s = torch.sort(p, descending=True).values
            s = torch.cat([s, torch.zeros(max(len(known) - len(s), 0), dtype=s.dtype)])
            head = sum(abs(s[i] - known[i]) for i in range(len(known)))
            return head + abs(s[len(known) :].sum() - q_rest)

        ranked = sorted(in_top, key=lambda t: -q_t[row, t].item())
        uld = sorted_distance(
            p_s[row], [q_t[row, t] for t in ranked], q_t[row].sum() - q_t[row, ranked].sum()
        )
        unmapped_t = [t for t in range(teacher.shape[-1]) if t not in t_list]
        unmapped_s = [s for s in range(student.shape[-1]) if s not in s_list]
        known = [q_t[row, t] for t in ranked if t in unmapped_t]
        rest_mass = q_t[row, unmapped_t].sum() - sum(known) if known else q_t[row, unmapped_t].sum()
        unmapped = sorted_distance(p_s[row, unmapped_s], known, rest_mass)
        rows.append((exact.item(), weight * uld.item(), exact.item() + weight * unmapped.item()))
    return torch.tensor(rows, dtype=torch.float64)


def test_cached_losses_with_a_short_top_k_are_the_bucketed_losses_and_never_exceed_the_live_ones():
    """k < V_t: the mapped tokens outside the top k form one bucket (exact), and the teacher's ranks past k one
    bucket against the student's (ULD): float64 references of those definitions, and the live losses as upper
    bounds (a coarsened divergence, and the triangle inequality)."""
    student, teacher, s_rows, t_rows, s_ids, t_ids = _setup(seed=3)
    flat_student, flat_teacher = student.reshape(-1, 11)[s_rows], teacher.reshape(-1, 17)[t_rows]
    reference = _bucketed_reference(flat_student, flat_teacher, s_ids, t_ids, 4, 2.0, 0.7)
    rows = torch.arange(len(s_rows))
    for column, mode in enumerate(("exact", "uld", "hybrid")):
        options = dict(mode=mode, temperature=2.0, uld_weight=0.7, reduction="sum")
        cached = cached_cross_tokenizer_distillation_loss(
            flat_student, rows, *_cached_rows(flat_teacher, 4, t_ids, 2.0), teacher_vocab_size=17,
            student_ids=s_ids, teacher_ids=t_ids, **options,
        )  # fmt: skip
        assert cached.item() == pytest.approx(reference[:, column].sum().item(), rel=1e-5)
        live = cross_tokenizer_distillation_loss(
            flat_student, flat_teacher, rows, rows, student_ids=s_ids, teacher_ids=t_ids, **options
        )
        if mode != "hybrid":
            assert cached.item() < live.item()


def test_a_student_equal_to_the_teacher_on_the_mapped_tokens_gets_zero_cached_exact_loss():
    student, teacher, s_rows, t_rows, s_ids, t_ids = _setup()
    student = student.reshape(-1, 11).clone()
    flat_teacher = teacher.reshape(-1, 17)
    student[s_rows[:, None], s_ids[None, :]] = flat_teacher[t_rows[:, None], t_ids[None, :]] - 1.0
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        leaf = student.clone().requires_grad_(True)
        loss = cached_cross_tokenizer_distillation_loss(
            leaf, s_rows, *_cached_rows(flat_teacher[t_rows], 3, t_ids, 1.5), teacher_vocab_size=17,
            student_ids=s_ids, teacher_ids=t_ids, mode="exact", kind=kind, temperature=1.5,
        )  # fmt: skip
        loss.backward()
        assert abs(loss.item()) < 1e-6 and leaf.grad.abs().max().item() < 1e-6


def _build_cross_cache(path, texts, student_tokenizer, teacher_tokenizer, teacher, top_k, block_size=24):
    return build_cross_tokenizer_cache(
        teacher, Dataset.from_dict({"text": texts}), path, tokenizer=student_tokenizer,
        teacher_tokenizer=teacher_tokenizer, teacher_name="tiny-teacher", block_size=block_size, temperature=2.0,
        top_k=top_k, batch_size=3,
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["exact", "uld", "hybrid"])
def test_training_from_a_full_cross_tokenizer_cache_equals_the_live_teacher(tmp_path, bpe, wordpiece, mode):
    """A byte-level BPE teacher, a WordPiece student, a cache of every teacher token at the aligned positions:
    the trainer's loss and gradient from the cache are those from the live teacher."""
    teacher, student = _llama(len(bpe), 0, layers=2), _llama(len(wordpiece), 1)
    texts = text_blocks(CORPUS, wordpiece, 24)[:6]
    manifest = _build_cross_cache(tmp_path / "cache", texts, wordpiece, bpe, teacher, len(bpe))
    assert manifest["cross_tokenizer"]["teacher_tokenizer"]["fingerprint"] == tokenizer_fingerprint(bpe)
    assert manifest["num_tokens"] > 0 and manifest["format_version"] == 4
    rows, _ = load_cross_tokenizer_cache(
        tmp_path / "cache", Dataset.from_dict({"text": texts}), tokenizer=wordpiece, teacher_tokenizer=bpe,
        block_size=24, temperature=2.0,
    )  # fmt: skip
    options = dict(
        cross_tokenizer=mode, alpha=0.5, uld_weight=0.5, kd_loss="jsd" if mode == "hybrid" else "forward_kl"
    )
    live_collator = CrossTokenizerCollator(wordpiece, bpe, max_length=24)
    live = DistillationTrainer(
        model=copy.deepcopy(student), teacher_model=teacher, args=_args(tmp_path / "live", **options),
        train_dataset=Dataset.from_dict({"text": texts}), processing_class=wordpiece, teacher_processing_class=bpe,
        data_collator=live_collator,
    )  # fmt: skip
    cached_collator = CachedCrossTokenizerCollator(wordpiece, max_length=24)
    cached = DistillationTrainer(
        model=copy.deepcopy(student), teacher_model=None,
        args=_args(tmp_path / "cached", teacher_logits_cache=str(tmp_path / "cache"), **options),
        train_dataset=rows, processing_class=wordpiece, teacher_processing_class=bpe, data_collator=cached_collator,
    )  # fmt: skip
    assert isinstance(cached.kd_source, CachedCrossTokenizerKD)
    live_batch = live_collator([{"text": text} for text in texts])
    cached_batch = cached_collator([rows[i] for i in range(len(texts))])
    assert torch.equal(live_batch["input_ids"], cached_batch["input_ids"])
    assert torch.equal(live_batch[ALIGNED_COLUMN], cached_batch[ALIGNED_COLUMN])
    items = live_batch["labels"][:, 1:].ne(-100).sum()
    results = []
    for trainer, batch in ((live, live_batch), (cached, cached_batch)):
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=items)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}))
    (live_loss, live_grads), (cached_loss, cached_grads) = results
    assert cached_loss == pytest.approx(live_loss, rel=1e-5)
    for name, grad in live_grads.items():
        torch.testing.assert_close(cached_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_cross_tokenizer_cache_is_refused_with_other_tokenizers(tmp_path, bpe, wordpiece, unigram):
    from hf_distill.caches.topk import load_logit_cache

    # the fingerprint is the tokenizer's definition: a saved copy keeps it, a truncating call leaves it alone
    bpe.save_pretrained(tmp_path / "bpe")
    from transformers import AutoTokenizer

    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path / "bpe")) == tokenizer_fingerprint(
        bpe
    )
    bpe("a long text", truncation=True, max_length=2)
    assert tokenizer_fingerprint(bpe) != tokenizer_fingerprint(unigram)

    texts = text_blocks(CORPUS, wordpiece, 24)[:3]
    data = Dataset.from_dict({"text": texts})
    _build_cross_cache(tmp_path / "cache", texts, wordpiece, bpe, _llama(len(bpe), 0), 8)
    load_cross_tokenizer_cache(
        tmp_path / "cache", data, tokenizer=wordpiece, teacher_tokenizer=bpe, block_size=24
    )
    with pytest.raises(ValueError, match=r"another teacher tokenizer .*as --teacher_tokenizer_name"):
        load_cross_tokenizer_cache(
            tmp_path / "cache", data, tokenizer=wordpiece, teacher_tokenizer=unigram, block_size=24
        )
    with pytest.raises(ValueError, match=r"another student tokenizer .*--student_tokenizer_name"):
        load_cross_tokenizer_cache(
            tmp_path / "cache", data, tokenizer=unigram, teacher_tokenizer=bpe, block_size=24
        )
    with pytest.raises(ValueError, match="block_size 24, this run uses 16.*other rows of text"):
        load_cross_tokenizer_cache(
            tmp_path / "cache", Dataset.from_dict({"text": texts[:2]}), tokenizer=wordpiece, teacher_tokenizer=bpe,
            block_size=16,
        )  # fmt: skip
    # the trainer checks too, before training
    args = _args(tmp_path, cross_tokenizer="exact", teacher_logits_cache=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="--teacher_tokenizer_name"):
        DistillationTrainer(
            model=_llama(len(wordpiece), 1), teacher_model=None, args=args, train_dataset=data,
            processing_class=wordpiece, teacher_processing_class=unigram,
            data_collator=CachedCrossTokenizerCollator(wordpiece),
        )  # fmt: skip
    # and a cache of either kind is refused where the other is expected
    with pytest.raises(ValueError, match="cross-tokenizer cache.*--cross_tokenizer"):
        load_logit_cache(tmp_path / "cache", data, tokenizer=wordpiece, block_size=24)
    with pytest.raises(ValueError, match="cross_tokenizer='exact', 'uld' or 'hybrid'"):
        DistillationTrainer(
            model=_llama(len(wordpiece), 1), teacher_model=None, train_dataset=data, processing_class=wordpiece,
            args=_args(tmp_path, teacher_logits_cache=str(tmp_path / "cache")),
        )  # fmt: skip
    plain = dict(json.loads((tmp_path / "cache" / "manifest.json").read_text()), cross_tokenizer=None)
    with pytest.raises(ValueError, match="over the student's own tokens.*--student_tokenizer_name"):
        verify_cross_tokenizer_manifest(plain, tokenizer=wordpiece, teacher_tokenizer=bpe)


def test_cache_script_then_distill_lm_across_tokenizers_from_the_cache(tmp_path, bpe, wordpiece, monkeypatch):
    """scripts/cache_teacher_logits.py --student_tokenizer_name (a WordPiece student, a byte-level BPE teacher),
    then scripts/distill_lm.py --cross_tokenizer hybrid --teacher_logits_cache without loading the teacher; a
    run given another teacher tokenizer is refused before training, naming the flag."""
    teacher_dir, student_dir, other_dir = tmp_path / "teacher", tmp_path / "student", tmp_path / "other"
    _llama(len(bpe), 0).save_pretrained(teacher_dir)
    bpe.save_pretrained(teacher_dir)
    _llama(len(wordpiece), 1).save_pretrained(student_dir)
    wordpiece.save_pretrained(student_dir)
    train_tokenizer("byte_bpe", TRAINING_TEXT, 380).save_pretrained(other_dir)
    train = tmp_path / "train.txt"
    train.write_text("\n".join(CORPUS * 2) + "\n")
    data = ["--train_file", str(train), "--block_size", "24", "--validation_split_percentage", "20"]
    cache = tmp_path / "cache"
    cache_script = _load("cache_teacher_logits")
    manifest = cache_script.main(
        ["--teacher_model_name_or_path", str(teacher_dir), "--student_tokenizer_name", str(student_dir),
         "--top_k", "16", "--cache_output_dir", str(cache)] + data
    )  # fmt: skip
    assert manifest["cross_tokenizer"]["student_tokenizer"]["fingerprint"] == tokenizer_fingerprint(wordpiece)
    assert manifest["top_k"] == 16 and manifest["num_tokens"] > 0

    distill_lm = _distill_lm()

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher must not be loaded when training from the cache")

    monkeypatch.setattr(distill_lm.lm, "load_teacher", no_teacher)
    argv = [
        "--teacher_model_name_or_path", str(teacher_dir), "--student_model_name_or_path", str(student_dir),
        "--cross_tokenizer", "hybrid", "--teacher_logits_cache", str(cache), "--do_train", "--do_eval",
        "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--save_strategy", "no", "--logging_steps", "1", "--report_to", "none", "--use_cpu", "true",
        "--disable_tqdm", "true",
    ] + data  # fmt: skip
    results = distill_lm.main(argv)
    assert torch.isfinite(torch.tensor(results["eval"]["perplexity"]))
    log_history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    kd = [entry["kd_loss"] for entry in log_history if "kd_loss" in entry]
    assert len(kd) == 2 and all(value > 0 for value in kd)
    with pytest.raises(ValueError, match="another teacher tokenizer.*--teacher_tokenizer_name"):
        distill_lm.main(
            argv + ["--teacher_tokenizer_name", str(other_dir), "--output_dir", str(tmp_path / "o2")]
        )
    assert not (tmp_path / "o2" / "trainer_state.json").exists()


def _load(name):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_script_{name}_cross", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
