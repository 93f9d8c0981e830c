"""The translation recipe: data and language keys, the source prefix, sacreBLEU/chrF, word-level KD masking and
hidden matching through the trainer, the sequence-level KD cache, the errors raised before training, and
distill_translation.py end to end, on tiny Marian and T5 models and JSON lines files in tmp_path."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import math
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    EvalPrediction,
    MarianConfig,
    MarianMTModel,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.testing_utils import CaptureLogger

from hf_distill import Seq2SeqDistillationTrainer, Seq2SeqDistillationTrainingArguments, create_student
from hf_distill.storage.fingerprint import texts_checksum

REPO = Path(__file__).resolve().parents[2]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


distill_translation = _load_script("distill_translation")
translation = distill_translation.translation  # hf_distill.tasks.translation, as the script uses it
translation_models = importlib.import_module("hf_distill.tasks.translation.models")
translation_seq_kd = importlib.import_module("hf_distill.tasks.translation.seq_kd")
seq_kd_cache = importlib.import_module("hf_distill.tasks.common.seq_kd_cache")

PAIRS = [
    ("the cat is big", "die katze ist gross"),
    ("the dog is small", "der hund ist klein"),
    ("hello world", "hallo welt"),
    ("the house is red", "das haus ist rot"),
    ("one two three", "eins zwei drei"),
    ("the car is blue", "das auto ist blau"),
    ("the tree is green", "der baum ist gruen"),
    ("the cat is not good", "die katze ist nicht gut"),
]
EN_DE = translation.LanguagePair("en", "de", "en", "de")


# --------------------------------------------------------------------------------------------- helpers
def _marian(
    tokenizer, encoder_layers: int = 2, decoder_layers: int = 2, vocab_size: int | None = None
) -> MarianMTModel:
    torch.manual_seed(0)
    config = MarianConfig(
        vocab_size=vocab_size or len(tokenizer),
        d_model=32,
        encoder_layers=encoder_layers,
        decoder_layers=decoder_layers,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        forced_eos_token_id=1,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        init_std=0.2,  # peaked output distributions, so that KD terms are far from float32 rounding
    )
    return MarianMTModel(config).eval()


def _t5(tokenizer) -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=16,
        d_ff=37,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        dropout_rate=0.0,
    )
    return T5ForConditionalGeneration(config).eval()


def _save(model, tokenizer, directory: Path) -> str:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def _write_jsonl(path: Path, pairs, source: str = "en", target: str = "de") -> str:
    path.write_text("".join(json.dumps({"translation": {source: s, target: t}}) + "\n" for s, t in pairs))
    return str(path)


def _data_args(**overrides) -> translation.DataArguments:
    values = {"source_lang": "en", "target_lang": "de", "train_file": "unused.jsonl", "max_source_length": 16}
    values.update(overrides)
    return translation.DataArguments(**values)


def _batch(tokenizer, pairs, prefix: str | None = None) -> dict[str, torch.Tensor]:
    features = translation.preprocess_batch(
        {"translation": [{"en": s, "de": t} for s, t in pairs]},
        tokenizer,
        EN_DE,
        source_prefix=prefix,
        max_source_length=16,
        max_target_length=16,
    )
    rows = [{key: features[key][i] for key in features} for i in range(len(pairs))]
    return dict(DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)(rows))


def _decoder_inputs(labels: torch.Tensor, start: int = 0, pad: int = 0) -> torch.Tensor:
    """Teacher forcing: the labels shifted right behind the decoder start token, -100 read as padding."""
    shifted = torch.cat([torch.full_like(labels[:, :1], start), labels[:, :-1]], dim=1)
    return shifted.masked_fill(shifted == -100, pad)


def _forward_kl(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """Per position: T**2 * KL(softmax(teacher / T) || softmax(student / T))."""
    log_p_t = F.log_softmax(teacher_logits.double() / temperature, dim=-1)
    log_p_s = F.log_softmax(student_logits.double() / temperature, dim=-1)
    return temperature**2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)


def _trainer(student, teacher, tokenizer, tmp_path, **args) -> Seq2SeqDistillationTrainer:
    training_args = Seq2SeqDistillationTrainingArguments(
        output_dir=str(tmp_path / "trainer"), report_to=[], use_cpu=True, **args
    )
    return Seq2SeqDistillationTrainer(
        model=student, teacher_model=teacher, args=training_args, processing_class=tokenizer
    )


# --------------------------------------------------------------------------------------------- reference metrics
def _ngrams(tokens, n):
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _reference_bleu(hypotheses, references) -> float:
    """Corpus BLEU (Papineni et al., 2002) on whitespace tokens, for inputs where every order has a match."""
    matches, totals = [0] * 4, [0] * 4
    hypothesis_length = reference_length = 0
    for hypothesis, reference in zip(hypotheses, references):
        hyp, ref = hypothesis.split(), reference.split()
        hypothesis_length, reference_length = hypothesis_length + len(hyp), reference_length + len(ref)
        for n in range(1, 5):
            hyp_ngrams, ref_ngrams = _ngrams(hyp, n), _ngrams(ref, n)
            matches[n - 1] += sum(min(count, ref_ngrams[gram]) for gram, count in hyp_ngrams.items())
            totals[n - 1] += sum(hyp_ngrams.values())
    assert all(matches), (
        "the reference formula here has no smoothing: pick strings with matches at every order"
    )
    brevity = (
        1.0 if hypothesis_length >= reference_length else math.exp(1 - reference_length / hypothesis_length)
    )
    return 100 * brevity * math.exp(sum(math.log(m / t) for m, t in zip(matches, totals)) / 4)


def _reference_chrf(hypotheses, references, order: int = 6, beta: float = 2.0) -> float:
    """Corpus chrF (Popovic, 2015): character n-grams without spaces, precision and recall averaged over orders."""
    stats = np.zeros((order, 3))  # hypothesis n-grams, reference n-grams, matches
    for hypothesis, reference in zip(hypotheses, references):
        hyp, ref = "".join(hypothesis.split()), "".join(reference.split())
        for n in range(1, order + 1):
            hyp_ngrams, ref_ngrams = _ngrams(hyp, n), _ngrams(ref, n)
            stats[n - 1] += [
                sum(hyp_ngrams.values()),
                sum(ref_ngrams.values()),
                sum(min(count, ref_ngrams[gram]) for gram, count in hyp_ngrams.items()),
            ]
    usable = [(m / h, m / r) for h, r, m in stats if h > 0 and r > 0]
    precision = sum(p for p, _ in usable) / len(usable)
    recall = sum(r for _, r in usable) / len(usable)
    return 100 * (1 + beta**2) * precision * recall / (beta**2 * precision + recall)


# --------------------------------------------------------------------------------------------- data and flags
def test_source_prefix_is_applied_to_sources_only(seq2seq_tokenizer):
    features = translation.preprocess_batch(
        {"translation": [{"en": "the cat", "de": "die katze"}]},
        seq2seq_tokenizer,
        EN_DE,
        source_prefix="hello world ",
        max_source_length=16,
        max_target_length=16,
    )
    ids = seq2seq_tokenizer.convert_tokens_to_ids
    eos = seq2seq_tokenizer.eos_token_id
    assert features["input_ids"][0] == ids(["hello", "world", "the", "cat"]) + [eos]
    assert features["attention_mask"][0] == [1] * 5
    assert features["labels"][0] == ids(["die", "katze"]) + [eos]
    assert "token_type_ids" not in features

    no_prefix = translation.preprocess_batch(
        {"translation": [{"en": "the cat", "de": "die katze"}]},
        seq2seq_tokenizer,
        EN_DE,
        source_prefix=None,
        max_source_length=16,
        max_target_length=16,
    )
    assert no_prefix["input_ids"][0] == ids(["the", "cat"]) + [eos]


def test_padding_to_max_length_masks_label_padding(seq2seq_tokenizer):
    examples = {"translation": [{"en": "the cat", "de": "die katze ist gross"}]}
    common = {
        "source_prefix": None,
        "max_source_length": 6,
        "max_target_length": 6,
        "pad_to_max_length": True,
    }
    ignored = translation.preprocess_batch(
        examples, seq2seq_tokenizer, EN_DE, ignore_pad_token_for_loss=True, **common
    )
    kept = translation.preprocess_batch(
        examples, seq2seq_tokenizer, EN_DE, ignore_pad_token_for_loss=False, **common
    )
    assert len(ignored["input_ids"][0]) == 6
    assert ignored["labels"][0][-1] == -100 and ignored["labels"][0][:5] == kept["labels"][0][:5]
    assert kept["labels"][0][-1] == seq2seq_tokenizer.pad_token_id
    # truncation keeps eos
    long = translation.preprocess_batch(
        {"translation": [{"en": "one two three four five six seven", "de": "eins"}]},
        seq2seq_tokenizer,
        EN_DE,
        source_prefix=None,
        max_source_length=4,
        max_target_length=4,
    )
    assert len(long["input_ids"][0]) == 4 and long["input_ids"][0][-1] == seq2seq_tokenizer.eos_token_id


def test_missing_language_key_names_the_keys_found(tmp_path):
    raw = DatasetDict({"train": Dataset.from_list([{"translation": {"en": "a", "fr": "b"}}])})
    with pytest.raises(ValueError, match=r"target language 'de'.*train.*keys found: \['en', 'fr'\]"):
        translation.resolve_languages(raw, _data_args())
    no_column = DatasetDict({"train": Dataset.from_list([{"en": "a", "de": "b"}])})
    with pytest.raises(ValueError, match=r"no 'translation' column \(columns found: \['en', 'de'\]\)"):
        translation.resolve_languages(no_column, _data_args())
    # mBART/NLLB codes select the data key before the underscore
    pairs = translation.resolve_languages(
        DatasetDict({"train": Dataset.from_list([{"translation": {"en": "a", "de": "b"}}])}),
        _data_args(source_lang="en_XX", target_lang="de_DE"),
    )
    assert (pairs.source_key, pairs.target_key, pairs.target_lang) == ("en", "de", "de_DE")


def test_missing_language_key_fails_before_loading_models(tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", PAIRS[:2], target="fr")
    argv = [
        "--teacher_model_name_or_path", str(tmp_path / "does-not-exist"),
        "--student_num_layers", "1",
        "--train_file", train, "--source_lang", "en", "--target_lang", "de",
        "--do_train", "--output_dir", str(tmp_path / "out"), "--report_to", "none",
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"'de'.*keys found: \['en', 'fr'\]"):
        distill_translation.main(argv)


def test_model_arguments_decoder_depth():
    args = translation.Seq2SeqModelArguments(teacher_model_name_or_path="t", student_num_decoder_layers=1)
    assert args.student_num_layers is None and args.student_num_decoder_layers == 1
    args = translation.Seq2SeqModelArguments(teacher_model_name_or_path="t", student_decoder_layers="0,3")
    assert args.student_decoder_layer_indices() == [0, 3]
    with pytest.raises(ValueError, match="not both"):
        translation.Seq2SeqModelArguments(
            teacher_model_name_or_path="t", student_model_name_or_path="s", student_num_decoder_layers=1
        )
    with pytest.raises(ValueError, match="lists 2 layers but student_num_decoder_layers is 3"):
        translation.Seq2SeqModelArguments(
            teacher_model_name_or_path="t", student_num_decoder_layers=3, student_decoder_layers="0,1"
        )
    with pytest.raises(ValueError, match="No student given"):
        translation.Seq2SeqModelArguments(teacher_model_name_or_path="t")


# --------------------------------------------------------------------------------------------- metrics
def test_corpus_scores_match_the_bleu_and_chrf_formulas():
    hypotheses = ["die katze ist sehr gross und rot", "der hund ist klein und nicht gut"]
    references = ["die katze ist gross und rot", "der hund ist sehr klein und nicht gut heute"]
    scores = translation.corpus_scores(hypotheses, references)
    assert scores["bleu"] == pytest.approx(_reference_bleu(hypotheses, references), abs=1e-6)
    assert scores["chrf"] == pytest.approx(_reference_chrf(hypotheses, references), abs=1e-6)
    assert 0 < scores["bleu"] < 100 and 0 < scores["chrf"] < 100
    # references and hypotheses are not interchangeable (brevity penalty, precision vs recall)
    swapped = translation.corpus_scores(references, hypotheses)
    assert swapped["bleu"] != pytest.approx(scores["bleu"]) and swapped["chrf"] != pytest.approx(
        scores["chrf"]
    )


def test_compute_metrics_decodes_generated_ids(seq2seq_tokenizer):
    tokenizer = seq2seq_tokenizer
    # words of the tokenizer's vocabulary only: unknown words would decode to nothing
    hypotheses = ["die katze ist gross und rot und blau", "der hund ist klein und nicht gut"]
    references = ["die katze ist gross und rot", "der hund ist nicht klein und nicht gut"]
    # generate() output: decoder start (pad), tokens, eos, then padding; the Trainer pads across batches with -100
    generated = [[0] + tokenizer(text)["input_ids"] for text in hypotheses]
    width = max(map(len, generated)) + 2
    generated = np.array([row + [0] + [-100] * (width - len(row) - 1) for row in generated])
    labels = [tokenizer(text_target=text)["input_ids"] for text in references]
    labels = np.array([row + [-100] * (12 - len(row)) for row in labels])
    metrics = translation.make_compute_metrics(tokenizer)(
        EvalPrediction(predictions=generated, label_ids=labels)
    )
    assert metrics["bleu"] == pytest.approx(_reference_bleu(hypotheses, references), abs=1e-4)
    assert metrics["chrf"] == pytest.approx(_reference_chrf(hypotheses, references), abs=1e-4)
    # generated tokens that are not padding: the words plus eos
    assert metrics["gen_len"] == pytest.approx(np.mean([len(h.split()) + 1 for h in hypotheses]))


# --------------------------------------------------------------------------------------------- trainer
def test_word_level_kd_counts_only_label_positions(seq2seq_tokenizer, tmp_path):
    teacher = _marian(seq2seq_tokenizer)
    student = create_student(teacher, num_hidden_layers=1, num_decoder_layers=1)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    temperature = 2.0
    trainer = _trainer(student, teacher, seq2seq_tokenizer, tmp_path, alpha=1.0, temperature=temperature)
    batch = _batch(seq2seq_tokenizer, [PAIRS[0], PAIRS[2], PAIRS[7]])
    batch.pop("decoder_input_ids", None)
    batch["labels"][0, 1] = -100  # a masked position inside a sequence, not only padding
    labels = batch["labels"]
    assert (labels == -100).sum() >= 3

    student.train()
    loss = trainer.compute_loss(student, dict(batch))

    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        decoder_input_ids = _decoder_inputs(labels)
        teacher_logits = teacher(**inputs, decoder_input_ids=decoder_input_ids).logits
        student_logits = student(**inputs, decoder_input_ids=decoder_input_ids).logits
    per_position = _forward_kl(student_logits, teacher_logits, temperature)
    mask = labels != -100
    expected = per_position[mask].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # a loss that also counted the -100 positions would differ
    assert abs(per_position.mean().item() - expected.item()) > 1e-3


def test_hidden_matching_uses_encoder_and_decoder_maps(seq2seq_tokenizer, tmp_path):
    teacher = _marian(seq2seq_tokenizer)
    student = create_student(teacher, num_hidden_layers=1, num_decoder_layers=1)
    with torch.no_grad():  # move the student away from the teacher in both stacks
        for parameter in student.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    trainer = _trainer(
        student,
        teacher,
        seq2seq_tokenizer,
        tmp_path,
        alpha=1.0,
        hidden_weight=0.5,
        layer_map="1:2",
        decoder_layer_map="0:0,1:1",
    )
    batch = _batch(seq2seq_tokenizer, [PAIRS[0], PAIRS[2]])
    batch.pop("decoder_input_ids", None)
    labels = batch["labels"]
    student.train()
    loss = trainer.compute_loss(student, dict(batch))

    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        kwargs = {"decoder_input_ids": _decoder_inputs(labels), "output_hidden_states": True}
        teacher_out = teacher(**inputs, **kwargs)
        student_out = student(**inputs, **kwargs)

    def masked_mse(a, b, mask):
        return ((a - b).pow(2).mean(-1))[mask.bool()].mean()

    encoder_mask, decoder_mask = batch["attention_mask"], labels != -100
    encoder = masked_mse(
        student_out.encoder_hidden_states[1], teacher_out.encoder_hidden_states[2], encoder_mask
    )
    decoder = (
        masked_mse(student_out.decoder_hidden_states[0], teacher_out.decoder_hidden_states[0], decoder_mask)
        + masked_mse(student_out.decoder_hidden_states[1], teacher_out.decoder_hidden_states[1], decoder_mask)
    ) / 2
    kd = _forward_kl(student_out.logits, teacher_out.logits, 2.0)[decoder_mask].mean()
    assert encoder.item() > 1e-4 and decoder.item() > 1e-4
    assert loss.item() == pytest.approx((kd + 0.5 * (encoder + decoder) / 2).item(), rel=1e-5)


# --------------------------------------------------------------------------------------------- models and errors
def test_vocabulary_mismatch_is_reported_before_training(seq2seq_tokenizer, tmp_path):
    tokenizer = seq2seq_tokenizer
    teacher_dir = _save(_marian(tokenizer), tokenizer, tmp_path / "teacher")
    small = _marian(tokenizer, 1, 1, vocab_size=len(tokenizer) - 10)
    small.save_pretrained(tmp_path / "student")  # no tokenizer saved with it
    train = _write_jsonl(tmp_path / "train.jsonl", PAIRS[:2])
    argv = [
        "--teacher_model_name_or_path", teacher_dir,
        "--student_model_name_or_path", str(tmp_path / "student"),
        "--train_file", train, "--source_lang", "en", "--target_lang", "de",
        "--do_train", "--output_dir", str(tmp_path / "out"), "--report_to", "none",
    ]  # fmt: skip
    message = rf"teacher's vocabulary has {len(tokenizer)} tokens and the student's {len(tokenizer) - 10}.*share a tokenizer"
    with pytest.raises(ValueError, match=message):
        distill_translation.main(argv)
    assert not (tmp_path / "out" / "train_results.json").exists()

    # a student saved with another tokenizer: different vocabularies, even at the same size
    other = AutoTokenizer.from_pretrained(teacher_dir)
    other.add_tokens(["zebra"])
    with pytest.raises(ValueError, match=r"different vocabularies.*cannot be distilled word by word"):
        translation.check_vocabularies(
            _marian(tokenizer).config, _marian(tokenizer).config, seq2seq_tokenizer, student_tokenizer=other
        )
    # an embedding matrix padded past the tokenizer is fine
    translation.check_vocabularies(
        _marian(tokenizer).config, _marian(tokenizer, vocab_size=len(tokenizer) + 8).config, seq2seq_tokenizer
    )


def test_forced_bos_token_reaches_teacher_and_student_generation(seq2seq_tokenizer, tmp_path):
    teacher_dir = _save(_marian(seq2seq_tokenizer), seq2seq_tokenizer, tmp_path / "teacher")
    model_args = translation.Seq2SeqModelArguments(
        teacher_model_name_or_path=teacher_dir, student_num_layers=1, student_num_decoder_layers=1
    )
    models = translation.load_translation_models(model_args, _data_args(forced_bos_token="hallo"), EN_DE)
    hallo = seq2seq_tokenizer.convert_tokens_to_ids("hallo")
    assert models.forced_bos_token_id == hallo
    assert models.teacher.generation_config.forced_bos_token_id == hallo
    student = models.make_student()
    assert student.generation_config.forced_bos_token_id == hallo
    encoded = seq2seq_tokenizer(["the cat"], return_tensors="pt", return_token_type_ids=False)
    assert student.generate(**encoded, max_length=4)[0, 1].item() == hallo  # right after the decoder start
    with pytest.raises(
        ValueError, match=r"--forced_bos_token 'xx_YY' is not a token of the teacher's tokenizer"
    ):
        translation.load_translation_models(model_args, _data_args(forced_bos_token="xx_YY"), EN_DE)


def test_t5_teacher_without_prefix_warns_and_builds_a_shallow_decoder(seq2seq_tokenizer, tmp_path):
    teacher_dir = _save(_t5(seq2seq_tokenizer), seq2seq_tokenizer, tmp_path / "t5")
    model_args = translation.Seq2SeqModelArguments(
        teacher_model_name_or_path=teacher_dir, student_num_layers=2, student_num_decoder_layers=1
    )
    with CaptureLogger(translation_models.logger) as captured:
        models = translation.load_translation_models(model_args, _data_args(), EN_DE)
    assert "t5 model but didn't provide a source prefix" in captured.out
    with CaptureLogger(translation_models.logger) as captured:
        translation.load_translation_models(model_args, _data_args(source_prefix="hello world "), EN_DE)
    assert "source prefix" not in captured.out

    student = models.make_student()
    assert (student.config.num_layers, student.config.num_decoder_layers) == (2, 1)
    trainer = _trainer(student, models.teacher, seq2seq_tokenizer, tmp_path, alpha=0.5, hidden_weight=1.0)
    batch = _batch(seq2seq_tokenizer, PAIRS[:2], prefix="hello world ")
    student.train()
    loss = trainer.compute_loss(student, dict(batch))
    assert torch.isfinite(loss) and loss.item() > 0


# --------------------------------------------------------------------------------------------- seq-KD cache
TOKENIZER = {"name_or_path": "teacher-dir", "vocab_size": 10, "vocab_hash": "0123"}


def _identity(sources, teacher_fingerprint="abc", **settings):
    values = {
        "source_lang": "en",
        "target_lang": "de",
        "source_prefix": "",
        "max_source_length": 16,
        "num_beams": 4,
        "max_length": 16,
        "forced_bos_token": None,
    }
    values.update(settings)
    return seq_kd_cache.cache_identity(
        task="translation",
        teacher_name="teacher-dir",
        teacher_fingerprint=teacher_fingerprint,
        tokenizer=TOKENIZER,
        vocab_size=None,
        inputs_checksum=texts_checksum(sources),
        num_inputs=len(sources),
        settings=values,
    )


class _FakeTeacher:
    """Stands in for beam search: upper-cases, and counts calls."""

    def __init__(self, tag: str = ""):
        self.calls = 0
        self.tag = tag

    def __call__(self, sources):
        self.calls += 1
        return [source.upper() + self.tag for source in sources]


def _load_or_build(cache_dir, identity, sources, teacher, **options):
    def generate():
        return Dataset.from_dict({"source": list(sources), "target": teacher(sources)})

    return seq_kd_cache.load_or_build(cache_dir, identity, generate, **options)


SOURCES = [source for source, _ in PAIRS]


def test_seq_kd_cache_round_trip(tmp_path):
    cache_dir = tmp_path / "cache"
    identity = _identity(SOURCES)
    teacher = _FakeTeacher()
    first = _load_or_build(cache_dir, identity, SOURCES, teacher)
    assert teacher.calls == 1
    assert first["source"] == SOURCES and first["target"] == [s.upper() for s in SOURCES]

    second = _load_or_build(cache_dir, identity, SOURCES, teacher)
    assert teacher.calls == 1  # read from disk
    assert second["target"] == first["target"]

    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["kind"] == "seq_kd_completions" and manifest["task"] == "translation"
    assert manifest["num_inputs"] == len(SOURCES) and manifest["num_rows"] == len(SOURCES)
    assert manifest["num_beams"] == 4 and manifest["columns"] == ["source", "target"]
    assert {name for name in os.listdir(cache_dir)} == {"manifest.json", "data"}
    assert sorted(os.listdir(tmp_path)) == ["cache"]  # no temporary left beside it
    # the checksum sees the texts, their order and their boundaries
    assert texts_checksum(SOURCES) == manifest["inputs_checksum"]
    assert texts_checksum(SOURCES[::-1]) != manifest["inputs_checksum"]
    assert texts_checksum(["ab", "c"]) != texts_checksum(["a", "bc"])

    overwritten = _load_or_build(cache_dir, identity, SOURCES, _FakeTeacher("!"), overwrite=True)
    assert overwritten["target"][0].endswith("!")


@pytest.mark.parametrize(
    "change",
    [
        {"num_beams": 5},
        {"max_length": 32},
        {"source_prefix": "translate: "},
        {"teacher_fingerprint": "retrained"},
        {"sources": SOURCES[:-1] + ["a different last source"]},
    ],
    ids=["num_beams", "max_length", "prefix", "teacher_weights", "sources"],
)
def test_seq_kd_stale_cache_is_rebuilt_with_a_warning(tmp_path, change):
    cache_dir = tmp_path / "cache"
    _load_or_build(cache_dir, _identity(SOURCES), SOURCES, _FakeTeacher())
    sources = change.get("sources", SOURCES)
    identity = _identity(**{"sources": SOURCES, **change})
    state = seq_kd_cache.inspect_cache(cache_dir, identity)
    assert state.status == seq_kd_cache.STALE
    key = "inputs_checksum" if "sources" in change else next(iter(change))
    assert key in state.detail

    teacher = _FakeTeacher("!")
    with CaptureLogger(seq_kd_cache.logger) as captured:
        rebuilt = _load_or_build(cache_dir, identity, sources, teacher)
    assert teacher.calls == 1 and rebuilt["target"][0].endswith("!")
    assert "built for another run" in captured.out and key in captured.out
    assert seq_kd_cache.inspect_cache(cache_dir, identity).status == seq_kd_cache.VALID
    assert sorted(os.listdir(cache_dir)) == ["data", "manifest.json"]
    assert sorted(os.listdir(tmp_path)) == ["cache"]


def test_seq_kd_cache_of_an_older_format_is_rebuilt(tmp_path):
    # The translation recipe's format 1: manifest.json pointing at a data-<id> directory, other keys.
    cache_dir = tmp_path / "cache"
    (cache_dir / "data-0a1b2c").mkdir(parents=True)
    old = {"format_version": 1, "teacher": "teacher-dir", "data": "data-0a1b2c", "num_examples": len(SOURCES)}
    (cache_dir / "manifest.json").write_text(json.dumps(old))
    identity = _identity(SOURCES)
    state = seq_kd_cache.inspect_cache(cache_dir, identity)
    assert state.status == seq_kd_cache.STALE and "format" in state.detail
    teacher = _FakeTeacher()
    with CaptureLogger(seq_kd_cache.logger) as captured:
        _load_or_build(cache_dir, identity, SOURCES, teacher)
    assert teacher.calls == 1 and "built for another run" in captured.out
    assert sorted(os.listdir(cache_dir)) == ["data", "manifest.json"]


def test_seq_kd_partial_cache_is_never_used(tmp_path):
    cache_dir = tmp_path / "cache"
    identity = _identity(SOURCES)
    _load_or_build(cache_dir, identity, SOURCES, _FakeTeacher())

    # no manifest: partial, rebuilt (the whole directory is replaced)
    (cache_dir / "manifest.json").unlink()
    assert seq_kd_cache.inspect_cache(cache_dir, identity).status == seq_kd_cache.PARTIAL
    teacher = _FakeTeacher("!")
    with CaptureLogger(seq_kd_cache.logger) as captured:
        rebuilt = _load_or_build(cache_dir, identity, SOURCES, teacher)
    assert teacher.calls == 1 and rebuilt["target"][0].endswith("!")
    assert "incomplete cache" in captured.out

    # data that is gone, or that the manifest does not describe, or a truncated manifest: partial
    shutil.rmtree(cache_dir / "data")
    assert seq_kd_cache.inspect_cache(cache_dir, identity).status == seq_kd_cache.PARTIAL
    Dataset.from_dict({"source": SOURCES[:2], "target": SOURCES[:2]}).save_to_disk(str(cache_dir / "data"))
    assert seq_kd_cache.inspect_cache(cache_dir, identity).status == seq_kd_cache.PARTIAL
    (cache_dir / "manifest.json").write_text('{"format_version": 2, "teach')
    assert seq_kd_cache.inspect_cache(cache_dir, identity).status == seq_kd_cache.PARTIAL
    _load_or_build(cache_dir, identity, SOURCES, teacher)
    assert teacher.calls == 2
    assert seq_kd_cache.inspect_cache(cache_dir, identity).status == seq_kd_cache.VALID


def test_seq_kd_cache_never_replaces_a_directory_of_other_files(tmp_path):
    cache_dir = tmp_path / "results"
    cache_dir.mkdir()
    (cache_dir / "notes.txt").write_text("mine")
    teacher = _FakeTeacher()
    with pytest.raises(
        ValueError, match=r"holds \['notes.txt'\].*--seq_kd_cache_dir at a directory of its own"
    ):
        _load_or_build(cache_dir, _identity(SOURCES), SOURCES, teacher)
    assert teacher.calls == 0  # refused before the teacher spends any time
    assert sorted(os.listdir(cache_dir)) == ["notes.txt"]


def test_seq_kd_cache_write_is_atomic(tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    old_identity = _identity(SOURCES)
    _load_or_build(cache_dir, old_identity, SOURCES, _FakeTeacher())
    new_identity = _identity(SOURCES, num_beams=2)
    listing = sorted(os.listdir(cache_dir))

    # killed while saving the data: the previous cache is untouched and nothing half-written remains
    def crash_while_saving(self, path, *args, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "data-00000-of-00001.arrow").write_bytes(b"partial")
        raise KeyboardInterrupt("killed")

    with monkeypatch.context() as patch:
        patch.setattr(Dataset, "save_to_disk", crash_while_saving)
        with pytest.raises(KeyboardInterrupt):
            _load_or_build(cache_dir, new_identity, SOURCES, _FakeTeacher("!"))
    state = seq_kd_cache.inspect_cache(cache_dir, old_identity)
    assert state.status == seq_kd_cache.VALID and state.dataset["target"][0] == SOURCES[0].upper()
    assert sorted(os.listdir(cache_dir)) == listing and sorted(os.listdir(tmp_path)) == ["cache"]

    # killed after the data is saved but before the manifest is written: still the previous cache
    with monkeypatch.context() as patch:
        patch.setattr(
            seq_kd_cache, "write_manifest", lambda *args: (_ for _ in ()).throw(OSError("disk full"))
        )
        with pytest.raises(OSError, match="disk full"):
            _load_or_build(cache_dir, new_identity, SOURCES, _FakeTeacher("!"))
    assert seq_kd_cache.inspect_cache(cache_dir, old_identity).status == seq_kd_cache.VALID
    assert sorted(os.listdir(cache_dir)) == listing and sorted(os.listdir(tmp_path)) == ["cache"]

    # the cache directory is never visible without a manifest: a first write into a new directory either
    # completes or leaves nothing that inspect_cache would load
    fresh = tmp_path / "fresh"
    with monkeypatch.context() as patch:
        patch.setattr(Dataset, "save_to_disk", crash_while_saving)
        with pytest.raises(KeyboardInterrupt):
            _load_or_build(fresh, old_identity, SOURCES, _FakeTeacher())
    assert seq_kd_cache.inspect_cache(fresh, old_identity).status == seq_kd_cache.MISSING
    assert sorted(os.listdir(tmp_path)) == ["cache"]


def test_translate_with_teacher_matches_generate_and_keeps_order(seq2seq_tokenizer):
    tokenizer = seq2seq_tokenizer
    teacher = _marian(tokenizer)
    sources = [source for source, _ in PAIRS[:5]]
    translations = translation_seq_kd.translate_with_teacher(
        teacher, tokenizer, sources, source_prefix="hello ", max_source_length=16, num_beams=2, max_length=6,
        batch_size=2,
    )  # fmt: skip
    expected = []
    for source in sources:  # one at a time, no padding
        encoded = tokenizer("hello " + source, return_tensors="pt", return_token_type_ids=False)
        generated = teacher.generate(**encoded, num_beams=2, max_length=6, do_sample=False)
        expected.append(tokenizer.decode(generated[0], skip_special_tokens=True).strip())
    assert translations == expected


def test_seq_kd_training_set_alone_or_mixed(seq2seq_tokenizer, tmp_path, monkeypatch):
    tokenizer = seq2seq_tokenizer
    teacher_dir = _save(_marian(tokenizer), tokenizer, tmp_path / "teacher")
    model_args = translation.Seq2SeqModelArguments(
        teacher_model_name_or_path=teacher_dir, student_num_layers=1
    )
    data_args = _data_args()
    models = translation.load_translation_models(model_args, data_args, EN_DE)
    train = Dataset.from_list(
        [{"translation": {"en": s, "de": t, "fr": "x"}, "id": i} for i, (s, t) in enumerate(PAIRS)]
    )
    calls = []

    def fake_translate(teacher, tok, sources, **kwargs):
        calls.append(kwargs)
        return [f"teacher {source}" for source in sources]

    monkeypatch.setattr(translation_seq_kd, "translate_with_teacher", fake_translate)
    for mix, expected_size in (("none", len(PAIRS)), ("concat", 2 * len(PAIRS))):
        seq_kd_args = translation.SeqKDArguments(seq_kd=True, seq_kd_mix=mix, seq_kd_num_beams=3)
        dataset = translation.build_seq_kd_train_dataset(
            train, models, model_args, data_args, seq_kd_args, EN_DE, str(tmp_path / "cache")
        )
        assert len(dataset) == expected_size and dataset.column_names == ["translation"]
        pairs = dataset["translation"]
        assert pairs[-1] == {"en": PAIRS[-1][0], "de": f"teacher {PAIRS[-1][0]}"}
        if mix == "concat":
            assert pairs[0] == {"en": PAIRS[0][0], "de": PAIRS[0][1]}
    assert len(calls) == 1  # the second run read the cache
    # The default --max_target_length (128) is lowered to the teacher's 64 positions, which it cannot exceed.
    assert calls[0]["num_beams"] == 3 and calls[0]["max_length"] == 64 < data_args.max_target_length
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["teacher"] == teacher_dir and manifest["num_beams"] == 3


# --------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_distill_translation_end_to_end(seq2seq_tokenizer, tmp_path):
    tokenizer = seq2seq_tokenizer
    teacher_dir = _save(_marian(tokenizer), tokenizer, tmp_path / "teacher")
    train = _write_jsonl(tmp_path / "train.jsonl", PAIRS)
    validation = _write_jsonl(tmp_path / "validation.jsonl", PAIRS[:4])
    output_dir = tmp_path / "out"
    argv = [
        "--teacher_model_name_or_path", teacher_dir,
        "--student_num_layers", "2", "--student_num_decoder_layers", "1",
        "--train_file", train, "--validation_file", validation,
        "--source_lang", "en", "--target_lang", "de",
        "--max_source_length", "16", "--max_target_length", "16",
        "--do_train", "--do_eval", "--predict_with_generate", "--generation_max_length", "8", "--num_beams", "2",
        "--max_steps", "3", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
        "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no",
        "--hidden_weight", "0.5", "--decoder_layer_map", "1:2",
        "--seq_kd", "--seq_kd_num_beams", "2", "--seq_kd_mix", "concat", "--seq_kd_max_length", "8",
        "--report_batch_sizes", "1,2", "--latency_warmup", "0", "--latency_repeats", "1",
        "--output_dir", str(output_dir), "--report_to", "none", "--use_cpu", "--seed", "0",
    ]  # fmt: skip
    results = distill_translation.main(argv)

    for name in ("train_results.json", "eval_results.json", "all_results.json", "trainer_state.json",
                 "config.json", "model.safetensors", "tokenizer.json", "distill_report.json"):  # fmt: skip
        assert (output_dir / name).is_file(), name
    train_results = json.loads((output_dir / "train_results.json").read_text())
    assert train_results["train_samples"] == 2 * len(PAIRS)  # references + teacher translations
    manifest = json.loads((output_dir / "seq_kd_cache" / "manifest.json").read_text())
    assert manifest["num_inputs"] == len(PAIRS) and manifest["num_beams"] == 2 and manifest["max_length"] == 8
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in history if "loss" in entry]
    assert len(steps) == 3 and all(math.isfinite(entry["hidden_loss"]) for entry in steps)

    # eval_bleu/eval_chrf are sacreBLEU on the saved student's own translations of the validation sources
    eval_results = json.loads((output_dir / "eval_results.json").read_text())
    student = AutoModelForSeq2SeqLM.from_pretrained(output_dir).eval()
    assert (student.config.encoder_layers, student.config.decoder_layers) == (2, 1)
    saved_tokenizer = AutoTokenizer.from_pretrained(output_dir)
    encoded = saved_tokenizer(
        [s for s, _ in PAIRS[:4]], padding=True, return_tensors="pt", return_token_type_ids=False
    )
    with torch.no_grad():
        generated = student.generate(**encoded, num_beams=2, max_length=8)
    hypotheses = [text.strip() for text in saved_tokenizer.batch_decode(generated, skip_special_tokens=True)]
    import sacrebleu

    references = [[t for _, t in PAIRS[:4]]]
    assert eval_results["eval_bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(hypotheses, references).score, abs=1e-3
    )
    assert eval_results["eval_chrf"] == pytest.approx(
        sacrebleu.corpus_chrf(hypotheses, references).score, abs=1e-3
    )
    assert eval_results["eval_chrf"] > 0 and "eval_gen_len" in eval_results and "eval_loss" in eval_results

    report = json.loads((output_dir / "distill_report.json").read_text())
    assert report["primary_metric"] == "bleu" and set(report["models"]) == {"teacher", "student"}
    teacher_entry, student_entry = report["models"]["teacher"], report["models"]["student"]
    assert student_entry["metrics"]["chrf"] == eval_results["eval_chrf"]
    assert teacher_entry["metrics"]["chrf"] == results["teacher"]["teacher_chrf"]
    assert set(student_entry["latency_ms"]) == {"1", "2"} and student_entry["throughput"]["2"] > 0
    assert student_entry["params"] < teacher_entry["params"]
    assert (output_dir / "distill_report.md").read_text().count("| student |") == 2


# --------------------------------------------------------------------------------------------- generation limits
def _generation_limits():
    return importlib.import_module("hf_distill.tasks.common.generation_limits")


def _padded_marian(tokenizer, extra_rows: int = 8) -> tuple[MarianMTModel, MarianMTModel]:
    """(a Marian teacher with `extra_rows` vocabulary rows past the tokenizer whose logit bias makes them the
    likeliest tokens, the same teacher with those rows cut off). On the shared ids both give the same logits, so
    generation restricted to the shared vocabulary must match the cut-off teacher's exactly."""
    shared = len(tokenizer)
    padded = _marian(tokenizer, vocab_size=shared + extra_rows)
    with torch.no_grad():
        padded.final_logits_bias[:, shared:] = 20.0
    cut = copy.deepcopy(padded)
    cut.resize_token_embeddings(shared)
    return padded, cut


def test_seq_kd_translations_of_a_padded_teacher_stay_in_the_shared_vocabulary(seq2seq_tokenizer, tmp_path):
    tokenizer = seq2seq_tokenizer
    shared = len(tokenizer)
    padded, cut = _padded_marian(tokenizer)
    sources = [source for source, _ in PAIRS]
    encoded = tokenizer(sources[:2], padding=True, return_tensors="pt", return_token_type_ids=False)
    # Precondition: left alone, the teacher writes padded ids between the start token and the forced eos.
    assert (padded.generate(**encoded, max_length=6, num_beams=3)[:, 1:-1] >= shared).all()

    generated_ids = []
    original_generate = padded.generate

    def recording_generate(*args, **kwargs):
        output = original_generate(*args, **kwargs)
        generated_ids.append(output)
        return output

    padded.generate = recording_generate
    options = dict(max_source_length=16, num_beams=3, max_length=8, batch_size=3)
    restricted = translation_seq_kd.translate_with_teacher(
        padded, tokenizer, sources, vocab_size=shared, **options
    )
    assert generated_ids and all(int(ids.max()) < shared for ids in generated_ids)
    # Beam search over the renormalised shared vocabulary is the cut-off teacher's beam search.
    assert restricted == translation_seq_kd.translate_with_teacher(cut, tokenizer, sources, **options)

    # Through the script: a pretrained student with exactly the tokenizer's rows trains on the cached translations.
    teacher_dir = _save(padded, tokenizer, tmp_path / "teacher")
    student_dir = _save(_marian(tokenizer, decoder_layers=1), tokenizer, tmp_path / "student")
    output_dir = tmp_path / "out"
    argv = [
        "--teacher_model_name_or_path", teacher_dir, "--student_model_name_or_path", student_dir,
        "--train_file", _write_jsonl(tmp_path / "train.jsonl", PAIRS), "--source_lang", "en", "--target_lang", "de",
        "--max_source_length", "16", "--max_target_length", "8", "--do_train", "--seq_kd", "--seq_kd_num_beams", "3",
        "--max_steps", "1", "--per_device_train_batch_size", "4", "--save_strategy", "no",
        "--output_dir", str(output_dir), "--report_to", "none", "--use_cpu", "--seed", "0",
    ]  # fmt: skip
    distill_translation.main(argv)
    cache_dir = output_dir / "seq_kd_cache"
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["vocab_size"] == shared
    cached = Dataset.load_from_disk(str(cache_dir / "data"))
    assert cached["target"] == restricted
    assert json.loads((output_dir / "train_results.json").read_text())["train_samples"] == len(PAIRS)


def test_generation_length_flags_are_lowered_to_the_position_limit(seq2seq_tokenizer, tmp_path):
    limits = _generation_limits()
    marian_dir = _save(_marian(seq2seq_tokenizer), seq2seq_tokenizer, tmp_path / "marian")
    model_args = translation.Seq2SeqModelArguments(
        teacher_model_name_or_path=marian_dir, student_num_layers=1
    )
    models = translation.load_translation_models(model_args, _data_args(), EN_DE)
    assert models.max_positions == 64 and models.vocab_size == len(seq2seq_tokenizer)

    data_args = _data_args(max_source_length=1024, max_target_length=32)
    training_args = Seq2SeqDistillationTrainingArguments(
        output_dir=str(tmp_path / "o"), report_to=[], use_cpu=True, generation_max_length=100
    )
    with CaptureLogger(limits.logger) as captured:
        translation.bound_lengths(data_args, models.max_positions)
        translation.set_generation_defaults(training_args, data_args, models.max_positions)
    lengths = (data_args.max_source_length, data_args.max_target_length, data_args.val_max_target_length)
    assert lengths == (64, 32, 32)
    assert training_args.generation_max_length == 64
    assert "--max_source_length 1024 exceeds the 64 positions" in captured.out
    assert "--generation_max_length 100 exceeds the 64 positions" in captured.out
    assert "--max_target_length" not in captured.out  # within the limit: untouched, no warning

    # T5's relative positions have no limit: nothing is lowered.
    t5_dir = _save(_t5(seq2seq_tokenizer), seq2seq_tokenizer, tmp_path / "t5")
    t5_models = translation.load_translation_models(
        translation.Seq2SeqModelArguments(teacher_model_name_or_path=t5_dir, student_num_layers=1),
        _data_args(source_prefix="translate: "),
        EN_DE,
    )
    assert t5_models.max_positions is None
    data_args = _data_args(max_source_length=1024)
    translation.bound_lengths(data_args, t5_models.max_positions)
    assert data_args.max_source_length == 1024


@pytest.mark.slow
def test_default_lengths_run_with_a_64_position_marian(seq2seq_tokenizer, tmp_path):
    # Marian's sinusoidal position table has max_position_embeddings rows; run_translation.py's default lengths
    # (1024 source, 128 target and generation tokens) index past it. This teacher (and the student built from
    # it) never emits eos, so generation runs to the length limit.
    tokenizer = seq2seq_tokenizer
    teacher = _marian(tokenizer)
    with torch.no_grad():
        teacher.final_logits_bias[:, tokenizer.eos_token_id] = -1e4
    encoded = tokenizer(["the cat is big"], return_tensors="pt", return_token_type_ids=False)
    with pytest.raises(IndexError):  # precondition: the default generation length fails
        teacher.generate(**encoded, max_length=128, num_beams=1)
    teacher_dir = _save(teacher, tokenizer, tmp_path / "teacher")
    output_dir = tmp_path / "out"
    argv = [
        "--teacher_model_name_or_path", teacher_dir, "--student_num_layers", "1", "--student_num_decoder_layers", "1",
        "--train_file", _write_jsonl(tmp_path / "train.jsonl", PAIRS),
        "--validation_file", _write_jsonl(tmp_path / "validation.jsonl", PAIRS[:2]),
        "--source_lang", "en", "--target_lang", "de", "--do_train", "--do_eval", "--predict_with_generate",
        "--seq_kd", "--seq_kd_num_beams", "1", "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "2", "--save_strategy", "no", "--report_batch_sizes", "1",
        "--latency_warmup", "0", "--latency_repeats", "1",
        "--output_dir", str(output_dir), "--report_to", "none", "--use_cpu", "--seed", "0",
    ]  # fmt: skip
    with CaptureLogger(_generation_limits().logger) as captured:
        results = distill_translation.main(argv)
    for flag in ("--max_source_length 1024", "--max_target_length 128", "--val_max_target_length 128"):
        assert f"{flag} exceeds the 64 positions" in captured.out
    # Generation ran up to the lowered limit: the decoder start token plus 63 tokens, the last one eos.
    assert results["eval"]["eval_gen_len"] == 63
    assert json.loads((output_dir / "seq_kd_cache" / "manifest.json").read_text())["max_length"] == 64
    assert results["report"]["generation_max_length"] == 64
