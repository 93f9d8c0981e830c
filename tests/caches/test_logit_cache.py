"""The teacher logits cache (hf_distill/logit_cache.py): round trip against the teacher's own top-k, manifest
checks, atomic builds that a killed run cannot leave half-used, and scripts/cache_teacher_logits.py ->
scripts/distill_lm.py --teacher_logits_cache end to end."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import random
import shutil
import signal
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WORDS
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from hf_distill.caches import topk as logit_cache
from hf_distill.caches.format import (
    INDICES_COLUMN,
    LOGPROBS_COLUMN,
    TAIL_COLUMN,
    read_manifest,
    token_ids_checksum,
)
from hf_distill.caches.manifest import verify_manifest
from hf_distill.caches.topk import build_logit_cache, load_logit_cache
from hf_distill.storage import atomic
from hf_distill.storage.fingerprint import model_fingerprint, vocab_hash

REPO = Path(__file__).resolve().parents[2]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(vocab_size: int, *, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def rows_dataset(lengths: list[int], vocab: int, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randint(4, vocab, (length,), generator=generator).tolist() for length in lengths]
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


def reference_topk(teacher, input_ids: list[int], k: int, vocab: int, temperature: float = 1.0):
    """The teacher's top-k log-probabilities and token ids for one unpadded row, straight from its logits, and
    the log of the remaining mass tempered at `temperature`, sum over the other tokens of p ** (1 / T), summed in
    float64 over their probabilities (at T = 1 their plain mass)."""
    with torch.no_grad():
        logits = teacher(torch.tensor([input_ids])).logits[0, :, :vocab]  # (T, vocab)
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    values, indices = torch.topk(log_probs, k, dim=-1)
    others = torch.ones_like(log_probs, dtype=torch.bool).scatter(-1, indices, False)
    tail = torch.where(others, log_probs.exp() ** (1.0 / temperature), 0.0).sum(-1).log()
    return values.float(), indices, tail


def build(teacher, dataset, path, tokenizer, **options):
    values = dict(
        tokenizer=tokenizer,
        teacher_name="tiny-teacher",
        block_size=16,
        top_k=5,
        batch_size=3,
        temperature=2.0,
    )
    values.update(options)
    return build_logit_cache(teacher, dataset, path, **values)


# --------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize(
    "dtype, tolerance, temperature", [("float32", 1e-5, 2.0), ("float16", 2e-2, 2.0), ("float32", 1e-5, 0.5)]
)
def test_cached_topk_equals_the_teachers_topk(tmp_path, lm_tokenizer, dtype, tolerance, temperature):
    vocab = len(lm_tokenizer)
    teacher = tiny_llama(vocab)
    # Rows of different lengths are padded together in batches of 3; padding must not change any row.
    dataset = rows_dataset([16, 9, 16, 4, 12, 16, 7], vocab)
    manifest = build(
        teacher, dataset, tmp_path / "cache", lm_tokenizer, logprobs_dtype=dtype, temperature=temperature
    )
    assert manifest["num_rows"] == 7 and manifest["num_tokens"] == 16 + 9 + 16 + 4 + 12 + 16 + 7
    assert manifest["logprobs_dtype"] == dtype and manifest["top_k"] == 5
    assert manifest["format_version"] == 4 and manifest["tail_temperature"] == temperature

    cached, _ = load_logit_cache(tmp_path / "cache", dataset, tokenizer=lm_tokenizer, block_size=16)
    assert cached.column_names == ["input_ids", "labels", LOGPROBS_COLUMN, INDICES_COLUMN, TAIL_COLUMN]
    assert (
        cached.features[INDICES_COLUMN].feature.dtype == "uint16"
    )  # a vocabulary of < 65,536 ids: 2 bytes each
    assert cached.features[LOGPROBS_COLUMN].feature.dtype == dtype
    assert cached.features[TAIL_COLUMN].feature.dtype == "float32"  # stored exactly whatever the top-k dtype
    for i in range(len(dataset)):
        row = cached[i]
        length = len(row["input_ids"])
        values = np.asarray(row[LOGPROBS_COLUMN]).reshape(length, 5)
        indices = np.asarray(row[INDICES_COLUMN]).reshape(length, 5)
        expected_values, expected_indices, expected_tail = reference_topk(
            teacher, dataset[i]["input_ids"], 5, vocab, temperature
        )
        # Position t holds the distribution over token t + 1: the teacher's logits[:, t].
        np.testing.assert_array_equal(indices, expected_indices.numpy())
        np.testing.assert_allclose(values.astype(np.float32), expected_values.numpy(), atol=tolerance, rtol=0)
        np.testing.assert_allclose(np.asarray(row[TAIL_COLUMN]), expected_tail.numpy(), atol=1e-5, rtol=0)


def test_stored_remaining_mass_is_exact_where_deriving_it_from_the_top_k_is_not(tmp_path, lm_tokenizer):
    """A confident teacher: its top 5 hold nearly all the mass, and 1 - sum(exp(top k)) loses the rest to rounding
    (entirely so from float16 log-probabilities), while the stored remaining mass keeps it."""
    vocab = len(lm_tokenizer)
    teacher = tiny_llama(vocab)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(300.0)
    dataset = rows_dataset([16, 9], vocab)
    # at temperature 1 the stored tail is the plain mass, comparable with 1 - sum(exp(top k))
    build(teacher, dataset, tmp_path / "cache", lm_tokenizer, logprobs_dtype="float16", temperature=1.0)
    cached, _ = load_logit_cache(tmp_path / "cache", dataset, tokenizer=lm_tokenizer, block_size=16)
    for i in range(len(dataset)):
        _, _, expected_tail = reference_topk(teacher, dataset[i]["input_ids"], 5, vocab)
        assert (expected_tail < -8).any()  # somewhere the top 5 hold all but a tiny remainder
        stored = np.asarray(cached[i][TAIL_COLUMN], dtype=np.float64)
        np.testing.assert_allclose(stored, expected_tail.numpy(), atol=1e-3, rtol=1e-5)
        derived_mass = 1.0 - np.exp(np.asarray(cached[i][LOGPROBS_COLUMN], dtype=np.float64)).reshape(
            -1, 5
        ).sum(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            derived = np.log(np.clip(derived_mass, 0.0, None))
        assert (
            np.nanmax(np.abs(derived - expected_tail.numpy())) > 1.0
        )  # the derived tail is far off somewhere


def test_padded_teacher_vocabulary_is_cut_to_the_tokenizer(tmp_path, lm_tokenizer):
    vocab = len(lm_tokenizer)
    teacher = tiny_llama(vocab + 28)
    with torch.no_grad():
        teacher.lm_head.weight[vocab:] = 50.0  # padded rows that would dominate if they were kept
    dataset = rows_dataset([8, 8], vocab)
    manifest = build(teacher, dataset, tmp_path / "cache", lm_tokenizer, block_size=8)
    assert manifest["cached_vocab_size"] == vocab and manifest["teacher_vocab_size"] == vocab + 28
    cached, _ = load_logit_cache(tmp_path / "cache", dataset, tokenizer=lm_tokenizer, block_size=8)
    indices = np.asarray(cached[0][INDICES_COLUMN]).reshape(8, 5)
    values = np.asarray(cached[0][LOGPROBS_COLUMN]).reshape(8, 5)
    expected_values, expected_indices, expected_tail = reference_topk(
        teacher, dataset[0]["input_ids"], 5, vocab, manifest["tail_temperature"]
    )
    assert indices.max() < vocab
    np.testing.assert_array_equal(indices, expected_indices.numpy())
    np.testing.assert_allclose(values, expected_values.numpy(), atol=1e-5)
    # the remaining mass is over the tokenizer's vocabulary too: the padded rows count in neither bucket
    np.testing.assert_allclose(np.asarray(cached[0][TAIL_COLUMN]), expected_tail.numpy(), atol=1e-5)


def test_manifest_describes_the_cache(tmp_path, lm_tokenizer):
    dataset = rows_dataset([16, 16], len(lm_tokenizer))
    build(teacher := tiny_llama(len(lm_tokenizer)), dataset, tmp_path / "cache", lm_tokenizer)
    manifest = read_manifest(tmp_path / "cache")
    from hf_distill import __version__

    assert manifest["teacher"] == "tiny-teacher"
    assert manifest["tokenizer"]["vocab_size"] == len(lm_tokenizer)
    assert manifest["tokenizer"]["vocab_hash"] == vocab_hash(lm_tokenizer)
    assert manifest["block_size"] == 16 and manifest["num_rows"] == 2
    assert manifest["data_checksum"] == token_ids_checksum(dataset)
    assert manifest["hf_distill_version"] == __version__
    assert manifest["teacher_fingerprint"] == model_fingerprint(teacher)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["data", "manifest.json"]


def test_checksum_depends_on_ids_order_and_row_boundaries():
    checksum = lambda rows: token_ids_checksum(Dataset.from_dict({"input_ids": rows}))  # noqa: E731
    assert checksum([[1, 2], [3]]) == checksum([[1, 2], [3]])
    assert checksum([[1, 2], [3]]) != checksum([[1], [2, 3]])
    assert checksum([[1, 2], [3]]) != checksum([[3], [1, 2]])
    assert checksum([[1, 2], [3]]) != checksum([[1, 2], [4]])
    # The value caches record and compare: each row's length, then its ids, as little-endian int64.
    reference = hashlib.sha256()
    for row in ([1, 2], [3]):
        reference.update(struct.pack("<q", len(row)) + struct.pack(f"<{len(row)}q", *row))
    assert checksum([[1, 2], [3]]) == reference.hexdigest()


def test_model_fingerprint_sees_every_bit_of_the_weights_and_nothing_else(tmp_path, lm_tokenizer):
    teacher = tiny_llama(len(lm_tokenizer))
    fingerprint = model_fingerprint(teacher)
    assert model_fingerprint(copy.deepcopy(teacher)) == fingerprint
    teacher.save_pretrained(tmp_path / "teacher")
    assert model_fingerprint(LlamaForCausalLM.from_pretrained(tmp_path / "teacher")) == fingerprint
    # The smallest change of one weight, far below what sums of the weights would show.
    changed = copy.deepcopy(teacher)
    with torch.no_grad():
        weight = changed.model.layers[0].mlp.up_proj.weight
        weight[0, 0] = torch.nextafter(weight[0, 0], weight[0, 0] + 1)
    assert model_fingerprint(changed) != fingerprint
    assert model_fingerprint(copy.deepcopy(teacher).to(torch.bfloat16)) != fingerprint


# --------------------------------------------------------------------------------------------- manifest checks
@pytest.fixture
def built_cache(tmp_path, lm_tokenizer):
    dataset = rows_dataset([16, 16, 16], len(lm_tokenizer))
    build(tiny_llama(len(lm_tokenizer)), dataset, tmp_path / "cache", lm_tokenizer)
    return tmp_path / "cache", dataset


def test_mismatched_block_size_tokenizer_k_or_data_is_an_error(built_cache, lm_tokenizer):
    cache, dataset = built_cache
    with pytest.raises(ValueError, match="built with block_size 16, this run uses 32"):
        load_logit_cache(cache, dataset, tokenizer=lm_tokenizer, block_size=32)
    other = copy.deepcopy(lm_tokenizer)
    other.add_tokens(["zebra"])
    with pytest.raises(ValueError, match="another tokenizer"):
        load_logit_cache(cache, dataset, tokenizer=other, block_size=16)
    with pytest.raises(ValueError, match="holds the top 5 tokens, this run asks for top_k 8"):
        load_logit_cache(cache, dataset, tokenizer=lm_tokenizer, block_size=16, top_k=8)
    shuffled = dataset.select([1, 0, 2])
    with pytest.raises(ValueError, match="other training data"):
        load_logit_cache(cache, shuffled, tokenizer=lm_tokenizer, block_size=16)
    with pytest.raises(ValueError, match="other training data"):
        load_logit_cache(cache, dataset.select([0, 1]), tokenizer=lm_tokenizer, block_size=16)
    # Every difference is listed at once.
    manifest = read_manifest(cache)
    with pytest.raises(ValueError, match="block_size.*top_k") as error:
        verify_manifest(
            manifest, tokenizer=lm_tokenizer, block_size=8, top_k=3, data_checksum="x", num_rows=3
        )
    assert "other training data" in str(error.value)


# --------------------------------------------------------------------------------------------- atomic builds
class _FailingTeacher(torch.nn.Module):
    """Wraps a teacher and raises on its second forward, as if the build were killed midway."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher
        self.config = teacher.config
        self.calls = 0

    def forward(self, **inputs):
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt("killed")
        return self.teacher(**inputs)


def test_an_interrupted_build_leaves_nothing_usable(tmp_path, lm_tokenizer):
    dataset = rows_dataset([16] * 6, len(lm_tokenizer))
    teacher = _FailingTeacher(tiny_llama(len(lm_tokenizer)))
    with pytest.raises(KeyboardInterrupt):
        build(teacher, dataset, tmp_path / "cache", lm_tokenizer)
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary directory remains
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_logit_cache(tmp_path / "cache", dataset, tokenizer=lm_tokenizer, block_size=16)


def test_a_directory_without_manifest_is_never_used(built_cache, lm_tokenizer):
    cache, dataset = built_cache
    (cache / "manifest.json").unlink()  # a partial cache: data written, manifest never reached
    with pytest.raises(ValueError, match="has no manifest.json: it is incomplete"):
        load_logit_cache(cache, dataset, tokenizer=lm_tokenizer, block_size=16)


def test_a_cache_of_format_1_without_the_remaining_mass_still_loads(built_cache, lm_tokenizer):
    from datasets import load_from_disk

    cache, dataset = built_cache
    manifest = read_manifest(cache)
    old_data = load_from_disk(str(cache / "data")).remove_columns([TAIL_COLUMN])
    old_data.save_to_disk(str(cache / "data_v1"))
    shutil.rmtree(cache / "data")
    (cache / "data_v1").rename(cache / "data")
    old_manifest = {key: value for key, value in manifest.items() if key != "tail_temperature"}
    logit_cache.write_manifest(cache, dict(old_manifest, format_version=1))
    cached, _ = load_logit_cache(cache, dataset, tokenizer=lm_tokenizer, block_size=16, temperature=1.0)
    assert TAIL_COLUMN not in cached.column_names and LOGPROBS_COLUMN in cached.column_names
    # the loss derives its remaining mass from the top k, which is right at temperature 1 only
    with pytest.raises(ValueError, match=r"no remaining-mass column \(format 1\).*--temperature 2"):
        load_logit_cache(cache, dataset, tokenizer=lm_tokenizer, block_size=16, temperature=2.0)

    logit_cache.write_manifest(cache, dict(manifest))  # format 3 promises the column, which is gone
    with pytest.raises(ValueError, match="is damaged.*teacher_tail_logmass.*Rebuild it"):
        load_logit_cache(cache, dataset, tokenizer=lm_tokenizer, block_size=16)


def test_a_cache_is_refused_at_a_temperature_its_tail_was_not_built_for(tmp_path, lm_tokenizer):
    dataset = rows_dataset([16, 16], len(lm_tokenizer))
    teacher = tiny_llama(len(lm_tokenizer))
    cache = tmp_path / "cache"
    build(teacher, dataset, cache, lm_tokenizer, temperature=1.0)
    load_logit_cache(cache, dataset, tokenizer=lm_tokenizer, block_size=16, temperature=1.0)
    fix = (
        r"tempered at temperature 1, but this run distils at temperature 2.*Rebuild the cache with "
        r"scripts/cache_teacher_logits.py --temperature 2 .*or train with --temperature 1\."
    )
    with pytest.raises(ValueError, match=fix):
        load_logit_cache(cache, dataset, tokenizer=lm_tokenizer, block_size=16, temperature=2.0)
    with pytest.raises(ValueError, match=fix):
        logit_cache.check_cache_temperature(cache, 2.0)

    # format 2 stored the plain mass: its tail temperature is 1
    manifest = read_manifest(cache)
    format_2 = {key: value for key, value in manifest.items() if key != "tail_temperature"}
    format_2["format_version"] = 2
    logit_cache.check_tail_temperature(format_2, 1.0)
    with pytest.raises(
        ValueError, match=r"at temperature 1 \(format 2\), but this run distils at temperature 4"
    ):
        logit_cache.check_tail_temperature(format_2, 4.0)
    # top k covering the whole vocabulary leave an empty tail, right at every temperature
    logit_cache.check_tail_temperature(dict(manifest, top_k=manifest["cached_vocab_size"]), 4.0)


def test_the_trainer_refuses_a_cache_built_for_another_temperature(tmp_path, lm_tokenizer):
    from hf_distill import DistillationTrainer, DistillationTrainingArguments

    dataset = rows_dataset([16, 16], len(lm_tokenizer))
    build(tiny_llama(len(lm_tokenizer)), dataset, tmp_path / "cache", lm_tokenizer, temperature=1.0)
    args = DistillationTrainingArguments(
        output_dir=str(tmp_path / "out"),
        temperature=2.0,
        teacher_logits_cache=str(tmp_path / "cache"),
        report_to="none",
        use_cpu=True,
    )
    with pytest.raises(ValueError, match=r"--temperature 2 .*or train with --temperature 1\."):
        DistillationTrainer(model=tiny_llama(len(lm_tokenizer), layers=1), teacher_model=None, args=args)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="simulates the kill with os.fork")
def test_a_killed_build_leaves_a_temporary_directory_that_is_ignored_and_cleaned(tmp_path, lm_tokenizer):
    dataset = rows_dataset([16, 16], len(lm_tokenizer))
    target = tmp_path / "cache"
    # A child process builds into its temporary directory and is killed (SIGKILL) before the rename.
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            with atomic.atomic_directory(target) as temporary:
                (temporary / "data").mkdir()
                os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    leftovers = list(tmp_path.glob(".cache.tmp-*"))
    assert len(leftovers) == 1 and not target.exists()
    with pytest.raises(FileNotFoundError):
        load_logit_cache(target, dataset, tokenizer=lm_tokenizer, block_size=16)

    build(tiny_llama(len(lm_tokenizer)), dataset, target, lm_tokenizer)
    assert not leftovers[0].exists()  # removed: its owner is dead
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_rebuilding_needs_overwrite_and_replaces_atomically(built_cache, lm_tokenizer):
    cache, dataset = built_cache
    teacher = tiny_llama(len(lm_tokenizer), seed=7)
    with pytest.raises(FileExistsError, match="already exists"):
        build(teacher, dataset, cache, lm_tokenizer)
    build(teacher, dataset, cache, lm_tokenizer, top_k=3, overwrite=True)
    assert read_manifest(cache)["top_k"] == 3
    assert sorted(p.name for p in cache.parent.iterdir()) == ["cache"]


# --------------------------------------------------------------------------------------------- scripts
def test_cache_script_then_training_from_the_cache(tmp_path, lm_tokenizer, monkeypatch):
    cache_script = _load_script("cache_teacher_logits")
    distill_lm = _load_script("distill_lm")
    lm = distill_lm.lm
    vocab = len(lm_tokenizer)
    teacher_dir = tmp_path / "teacher"
    tiny_llama(vocab).save_pretrained(teacher_dir)
    lm_tokenizer.save_pretrained(teacher_dir)
    student_dir = tmp_path / "student"
    tiny_llama(vocab, layers=1, seed=1).save_pretrained(student_dir)
    rng = random.Random(0)
    train = tmp_path / "train.txt"
    train.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(12)) + "\n" for _ in range(40)))
    data = ["--train_file", str(train), "--block_size", "16", "--validation_split_percentage", "10"]
    cache = tmp_path / "cache"
    manifest = cache_script.main(
        ["--teacher_model_name_or_path", str(teacher_dir), "--cache_output_dir", str(cache), "--top_k", "8"]
        + data
    )
    assert manifest["top_k"] == 8 and manifest["block_size"] == 16

    training = [
        "--teacher_model_name_or_path", str(teacher_dir), "--student_model_name_or_path", str(student_dir),
        "--teacher_logits_cache", str(cache), "--do_train", "--output_dir", str(tmp_path / "out"),
        "--max_steps", "3", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_strategy", "no",
        "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true", "--learning_rate", "1e-2",
    ]  # fmt: skip
    # A cache built with another block size is refused before training.
    with pytest.raises(ValueError, match="built with block_size 16, this run uses 8"):
        distill_lm.main(training + [value if value != "16" else "8" for value in data])

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher must not be loaded when training from the cache")

    monkeypatch.setattr(lm, "load_teacher", no_teacher)
    distill_lm.main(training + data)
    log_history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    kd = [entry["kd_loss"] for entry in log_history if "kd_loss" in entry]
    assert len(kd) == 3 and all(np.isfinite(kd)) and all(value > 0 for value in kd)
    assert (tmp_path / "out" / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------------- nothing to learn
def _kd_losses(log_history) -> list[float]:
    return [entry["kd_loss"] for entry in log_history if "kd_loss" in entry]


@pytest.mark.parametrize("temperature", [2.0, 4.0])
def test_a_student_equal_to_the_teacher_learns_nothing_from_the_cache(tmp_path, lm_tokenizer, temperature):
    """The invariant a remaining mass tempered from its temperature-1 value broke: trained from a cache of its own
    top-5 (of ~120 tokens) with alpha = 1, a copy of the teacher logs a zero KD loss at T != 1."""
    from hf_distill import DistillationTrainer, DistillationTrainingArguments

    lm = _load_script("distill_lm").lm
    vocab = len(lm_tokenizer)
    teacher = tiny_llama(vocab)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)  # a peaked teacher whose top 5 hold much, but not all, of the mass
    dataset = rows_dataset([16] * 8, vocab)
    build(teacher, dataset, tmp_path / "cache", lm_tokenizer, temperature=temperature)
    cached, _ = load_logit_cache(
        tmp_path / "cache", dataset, tokenizer=lm_tokenizer, block_size=16, temperature=temperature
    )
    args = DistillationTrainingArguments(
        output_dir=str(tmp_path / "out"),
        temperature=temperature,
        alpha=1.0,
        teacher_logits_cache=str(tmp_path / "cache"),
        per_device_train_batch_size=4,
        optim="sgd",  # Adam would turn a rounding-sized gradient into a learning-rate-sized step
        learning_rate=1e-2,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = DistillationTrainer(
        model=copy.deepcopy(teacher).train(),
        teacher_model=None,
        args=args,
        train_dataset=cached,
        data_collator=lm.CausalLMCollator(lm_tokenizer.pad_token_id),
        processing_class=lm_tokenizer,
    )
    trainer.train()
    kd = _kd_losses(trainer.state.log_history)  # logged rounded to 4 decimals
    assert len(kd) == 2 and all(abs(value) <= 1e-5 for value in kd), kd
    # unrounded: with alpha = 1 the training loss is the KD term; zero, with a zero gradient
    student = trainer.model.train()
    student.zero_grad()
    loss = trainer.compute_loss(student, trainer.data_collator([cached[i] for i in range(4)]))
    loss.backward()
    assert abs(loss.item()) <= 1e-5
    assert max(parameter.grad.abs().max().item() for parameter in student.parameters()) <= 1e-6


def test_cache_script_then_a_student_equal_to_the_teacher_and_a_refused_temperature(tmp_path, lm_tokenizer):
    """scripts/cache_teacher_logits.py builds for the training default temperature (2); scripts/distill_lm.py
    then trains a copy of the teacher with alpha = 1 to a zero KD loss, and refuses a cache built for T = 1."""
    cache_script = _load_script("cache_teacher_logits")
    distill_lm = _load_script("distill_lm")
    vocab = len(lm_tokenizer)
    teacher_dir = tmp_path / "teacher"
    tiny_llama(vocab).save_pretrained(teacher_dir)
    lm_tokenizer.save_pretrained(teacher_dir)
    rng = random.Random(0)
    train = tmp_path / "train.txt"
    train.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(12)) + "\n" for _ in range(40)))
    data = ["--train_file", str(train), "--block_size", "16", "--validation_split_percentage", "10"]
    build_flags = ["--teacher_model_name_or_path", str(teacher_dir), "--top_k", "8"] + data
    manifest = cache_script.main(build_flags + ["--cache_output_dir", str(tmp_path / "cache")])
    assert manifest["tail_temperature"] == 2.0  # the training default, which the run below uses

    def training(cache: Path, output: str) -> list[str]:
        return [
            "--teacher_model_name_or_path", str(teacher_dir), "--student_model_name_or_path", str(teacher_dir),
            "--teacher_logits_cache", str(cache), "--alpha", "1", "--do_train", "--output_dir", str(tmp_path / output),
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_strategy", "no",
            "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true", "--learning_rate", "1e-2",
            "--optim", "sgd",  # Adam would turn a rounding-sized gradient into a learning-rate-sized step
        ] + data  # fmt: skip

    distill_lm.main(training(tmp_path / "cache", "out"))
    log_history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    kd = _kd_losses(log_history)
    assert len(kd) == 2 and all(abs(value) <= 1e-5 for value in kd), kd

    cache_script.main(build_flags + ["--cache_output_dir", str(tmp_path / "cache_t1"), "--temperature", "1"])
    with pytest.raises(
        ValueError, match=r"Rebuild the cache with .*--temperature 2 .*or train with --temperature 1"
    ):
        distill_lm.main(training(tmp_path / "cache_t1", "out_t1"))
    assert not (tmp_path / "out_t1" / "trainer_state.json").exists()


# --------------------------------------------------------------------------------------------- format 4
def test_a_cache_of_format_3_still_loads_as_one_teachers(built_cache, lm_tokenizer):
    cache, dataset = built_cache
    manifest = read_manifest(cache)
    assert manifest["target"] == "teacher" and manifest["teachers"][0]["name"] == "tiny-teacher"
    assert manifest["teacher_weights"] == [1.0] and manifest["task"] == "causal_lm"
    format_3 = {
        key: value
        for key, value in manifest.items()
        if key
        not in ("target", "target_temperature", "task", "teachers", "teacher_weights", "teacher_weighting")
    }
    logit_cache.write_manifest(cache, dict(format_3, format_version=3, cross_tokenizer=None))
    cached, loaded = load_logit_cache(cache, dataset, tokenizer=lm_tokenizer, block_size=16, temperature=2.0)
    assert loaded["format_version"] == 3 and not logit_cache.is_mixture(loaded)
    assert LOGPROBS_COLUMN in cached.column_names and TAIL_COLUMN in cached.column_names


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_a_target_stored_at_the_temperature_is_the_teachers_buckets(kind):
    """teacher_at_temperature: the top k and the tail are log q at T already (a mixture); the loss is the
    divergence between q's k + 1 buckets and the student's softmax(s / T) summed into them, in float64 here."""
    from hf_distill.losses import sparse_distillation_loss

    generator = torch.Generator().manual_seed(0)
    temperature, k = 2.0, 4
    log_q = torch.log_softmax(torch.randn(5, 12, generator=generator, dtype=torch.float64) * 2, -1)
    student = torch.randn(5, 12, generator=generator, dtype=torch.float64)
    values, indices = log_q.topk(k, -1)
    tail = log_q.scatter(-1, indices, -float("inf")).logsumexp(-1)
    got = sparse_distillation_loss(
        student.float(), values.float(), indices, teacher_tail_logmass=tail.float(), tail_temperature=temperature,
        temperature=temperature, kind=kind, teacher_at_temperature=True,
    )  # fmt: skip
    p = torch.softmax(student / temperature, -1)
    q_b = torch.cat([values.exp(), tail.exp()[:, None]], -1)
    p_top = p.gather(-1, indices)
    p_b = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    m = 0.5 * q_b + 0.5 * p_b
    rows = {
        "forward_kl": (q_b * (q_b / p_b).log()).sum(-1),
        "reverse_kl": (p_b * (p_b / q_b).log()).sum(-1),
        "jsd": 0.5 * (q_b * (q_b / m).log()).sum(-1) + 0.5 * (p_b * (p_b / m).log()).sum(-1),
    }[kind]
    assert got.item() == pytest.approx((rows * temperature**2).mean().item(), rel=1e-5)


def test_cache_script_with_two_teachers_then_training_from_their_mixture(tmp_path, lm_tokenizer):
    """scripts/cache_teacher_logits.py --teacher_model_name_or_path a b --teacher_weights 1 3 records the
    teachers and weights; scripts/distill_lm.py trains from the mixture and refuses other weights or another
    temperature before training."""
    cache_script, distill_lm = _load_script("cache_teacher_logits"), _load_script("distill_lm")
    vocab = len(lm_tokenizer)
    teachers = []
    for seed in (0, 5):
        path = tmp_path / f"teacher_{seed}"
        tiny_llama(vocab, seed=seed).save_pretrained(path)
        lm_tokenizer.save_pretrained(path)
        teachers.append(str(path))
    rng = random.Random(0)
    train = tmp_path / "train.txt"
    train.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(12)) + "\n" for _ in range(30)))
    data = ["--train_file", str(train), "--block_size", "16", "--validation_split_percentage", "10"]
    cache = tmp_path / "cache"
    manifest = cache_script.main(
        ["--teacher_model_name_or_path", *teachers, "--teacher_weights", "1", "3", "--teacher_weighting",
         "confidence", "--top_k", "8", "--cache_output_dir", str(cache)] + data
    )  # fmt: skip
    assert manifest["target"] == "mixture" and manifest["target_temperature"] == 2.0
    assert [entry["name"] for entry in manifest["teachers"]] == teachers
    assert manifest["teachers"][1]["fingerprint"] == model_fingerprint(tiny_llama(vocab, seed=5))
    assert manifest["teacher_weights"] == [0.25, 0.75] and manifest["teacher_weighting"] == "confidence"

    training = [
        "--teacher_model_name_or_path", teachers[0], "--student_model_name_or_path", teachers[0],
        "--teacher_logits_cache", str(cache), "--do_train", "--output_dir", str(tmp_path / "out"),
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_strategy", "no",
        "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true",
    ] + data  # fmt: skip
    distill_lm.main(training + ["--teacher_weights", "0.5", "1.5"])  # the cache's weights, not normalised
    kd = _kd_losses(json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"])
    assert len(kd) == 2 and all(np.isfinite(kd)) and all(value > 0 for value in kd)
    with pytest.raises(ValueError, match=r"--teacher_weights \[1.0, 1.0\].*rebuild the cache"):
        distill_lm.main(training + ["--teacher_weights", "1", "1", "--output_dir", str(tmp_path / "o2")])
    with pytest.raises(ValueError, match=r"mixture of 2 teachers.*--temperature 1"):
        distill_lm.main(training + ["--temperature", "1", "--output_dir", str(tmp_path / "o3")])
    assert not (tmp_path / "o2").exists() or not (tmp_path / "o2" / "trainer_state.json").exists()


def test_token_ids_are_stored_in_the_smallest_type_that_holds_every_id():
    from hf_distill.caches.topk import index_dtype

    for vocab_size in (1, 32_000, 65_536):
        assert np.iinfo(index_dtype(vocab_size)).max >= vocab_size - 1
        assert index_dtype(vocab_size) == np.uint16
    # 65,537 ids: the last one, 65,536, would wrap to 0 in uint16
    assert np.asarray([65_536]).astype(np.uint16)[0] == 0
    assert index_dtype(65_537) == np.int32 and index_dtype(128_256) == np.int32
