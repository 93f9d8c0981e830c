"""Deep Mutual Learning: the loss against a float64 formula, invariants, saving and resume of every peer, and the
recipe's --mutual_learning (distill_glue.py) end to end."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch
import torch.nn.functional as F
from test_classification import (
    _rows,
    _save_teacher,
    _spec,
    _tiny_config,
    _training_flags,
    _write,
    distill_glue,
)
from test_trainer import bert, classification_data, make_args, snapshot
from transformers import AutoTokenizer, BertForSequenceClassification, BertModel, DataCollatorWithPadding

from hf_distill.mutual import MutualLearningTrainer
from hf_distill.tasks.classification import distill as glue_recipe


def sharp(model, scale=40.0):
    with torch.no_grad():
        model.classifier.weight.mul_(scale)
    return model


def _trainer(tmp_path, tokenizer, peers, **overrides):
    return MutualLearningTrainer(
        peers,
        make_args(tmp_path, **overrides),
        train_dataset=classification_data(tokenizer),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )


def _batch(tokenizer, labels):
    rows = tokenizer(["the movie was good", "bad movie", "i love this film", "it was not fun"])
    rows["labels"] = labels
    return DataCollatorWithPadding(tokenizer)([{k: v[i] for k, v in rows.items()} for i in range(4)])


def _kl(student_logits, teacher_logits, temperature):
    log_p = F.log_softmax(student_logits.double() / temperature, -1)
    log_q = F.log_softmax(teacher_logits.double() / temperature, -1)
    return (log_q.exp() * (log_q - log_p)).sum(-1) * temperature**2


@pytest.mark.parametrize("count", [2, 3])
def test_loss_is_the_sum_over_peers_of_task_plus_mean_kd_to_the_others(tmp_path, bert_tokenizer, count):
    peers = [sharp(bert(bert_tokenizer, layers=1, seed=seed)) for seed in range(count)]
    trainer = _trainer(tmp_path, bert_tokenizer, peers, alpha=0.4)
    labels = [0, 1, -100, 1]
    batch = _batch(bert_tokenizer, labels)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = [peer(**inputs).logits.double() for peer in peers]
    expected = 0.0
    labelled = torch.tensor(labels).ne(-100)
    for k in range(count):
        kd = sum(_kl(logits[k], logits[j], 2.0).mean() for j in range(count) if j != k) / (count - 1)
        ce = F.cross_entropy(logits[k][labelled], torch.tensor(labels)[labelled])
        expected = expected + 0.6 * ce + 0.4 * kd
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_identical_peers_get_no_kd_gradient(tmp_path, bert_tokenizer):
    peers = [sharp(bert(bert_tokenizer, layers=1, seed=3)), sharp(bert(bert_tokenizer, layers=1, seed=3))]
    trainer = _trainer(tmp_path, bert_tokenizer, peers, alpha=1.0)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, _batch(bert_tokenizer, [0, 1, 0, 1]))
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    for parameter in trainer.model.parameters():
        if parameter.grad is not None:
            assert parameter.grad.abs().max().item() < 1e-6


def test_every_peer_is_saved_and_resume_restores_all_of_them(tmp_path, bert_tokenizer):
    def peers():
        return [bert(bert_tokenizer, layers=1, seed=1), bert(bert_tokenizer, layers=2, seed=2)]

    options = dict(max_steps=4, save_strategy="steps", save_steps=2)
    full = _trainer(tmp_path / "full", bert_tokenizer, peers(), **options)
    full.train()
    full.save_model()
    expected = snapshot(full.model)
    for index, layers in enumerate((1, 2)):
        loaded = BertForSequenceClassification.from_pretrained(tmp_path / "full" / "out" / f"peer_{index}")
        assert loaded.config.num_hidden_layers == layers
        for name, value in loaded.state_dict().items():
            torch.testing.assert_close(value, expected[f"peers.{index}.{name}"])
    checkpoint = tmp_path / "full" / "out" / "checkpoint-2"
    assert os.path.isdir(checkpoint / "peer_0") and os.path.isdir(checkpoint / "peer_1")

    fresh = [bert(bert_tokenizer, layers=1, seed=7), bert(bert_tokenizer, layers=2, seed=8)]
    resumed = _trainer(tmp_path / "resumed", bert_tokenizer, fresh, **options)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    got = snapshot(resumed.model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_evaluation_reports_each_peer(tmp_path, bert_tokenizer):
    peers = [bert(bert_tokenizer, layers=1, seed=1), bert(bert_tokenizer, layers=1, seed=2)]
    trainer = _trainer(tmp_path, bert_tokenizer, peers)
    results = trainer.evaluate_peers(classification_data(bert_tokenizer))
    data = classification_data(bert_tokenizer)
    collated = DataCollatorWithPadding(bert_tokenizer)([data[i] for i in range(len(data))])
    inputs = {k: v for k, v in collated.items() if k != "labels"}
    for index, peer in enumerate(peers):
        with torch.no_grad():
            expected = F.cross_entropy(peer(**inputs).logits.double(), collated["labels"])
        assert results[index][f"eval_peer{index}_loss"] == pytest.approx(expected.item(), rel=1e-4)


def test_bad_peers_raise(tmp_path, bert_tokenizer):
    with pytest.raises(ValueError, match="at least two peers"):
        _trainer(tmp_path, bert_tokenizer, [bert(bert_tokenizer)])
    with pytest.raises(ValueError, match="label spaces"):
        _trainer(tmp_path, bert_tokenizer, [bert(bert_tokenizer), bert(bert_tokenizer, labels=3)])
    with pytest.raises(ValueError, match="hidden_weight=0"):
        _trainer(tmp_path, bert_tokenizer, [bert(bert_tokenizer), bert(bert_tokenizer)], hidden_weight=1.0)


# ---- the recipe: scripts/distill_glue.py --mutual_learning --------------------------------------------------


@pytest.fixture
def data(tmp_path):
    return {
        "train": _write(tmp_path / "train.csv", _rows(24, seed=1)),
        "validation": _write(tmp_path / "validation.csv", _rows(12, seed=2)),
        "test": _write(tmp_path / "test.csv", _rows(10, seed=3)),
    }


def _encoder(path, tokenizer, layers: int) -> str:
    """A pretrained encoder without a classification head (a peer gets a new one)."""
    torch.manual_seed(1)
    BertModel(_tiny_config(tokenizer, layers)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _accuracy(folder, csv_path) -> float:
    """A saved peer's accuracy on a CSV file, computed here from the folder alone."""
    model = BertForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    batch = tokenizer([row["text"] for row in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1).tolist()
    return sum(model.config.id2label[p] == row["label"] for p, row in zip(predicted, rows)) / len(rows)


def test_recipe_trains_saves_and_evaluates_every_peer(tmp_path, bert_tokenizer, data):
    encoder = _encoder(tmp_path / "encoder", bert_tokenizer, layers=2)
    base = _save_teacher(tmp_path / "base", bert_tokenizer, layers=3)
    output = tmp_path / "out"
    results = distill_glue.main(
        ["--mutual_learning", "--peer_model_name_or_path", encoder, "--peer_base_model_name_or_path", base,
         "--peer_num_layers", "2", "1", "--train_file", data["train"], "--validation_file", data["validation"],
         "--test_file", data["test"], "--do_train", "--do_eval", "--do_predict"] + _training_flags(output)
    )  # fmt: skip
    evaluation = json.loads((output / "eval_results.json").read_text())
    predictions = json.loads((output / "all_results.json").read_text())
    for index, layers in enumerate((2, 2, 1)):
        folder = output / f"peer_{index}"
        config = json.loads((folder / "config.json").read_text())
        assert config["num_hidden_layers"] == layers
        assert sorted(config["id2label"].values()) == ["neg", "pos"]
        assert (folder / "tokenizer.json").is_file()
        # Each peer's metrics are that peer's: recomputed here from its saved folder.
        assert evaluation[f"eval_peer{index}_accuracy"] == pytest.approx(
            _accuracy(folder, data["validation"])
        )
        assert predictions[f"test_peer{index}_accuracy"] == pytest.approx(_accuracy(folder, data["test"]))
        lines = (output / f"predict_results_custom_peer{index}.txt").read_text().splitlines()
        assert len(lines) == 11 and {line.split("\t")[1] for line in lines[1:]} <= {"neg", "pos"}
    assert evaluation["eval_peer0_samples"] == 12 and results["eval"] == evaluation
    peers = json.loads((output / "peers.json").read_text())
    assert [peer["source"] for peer in peers] == [encoder, f"2 layers of {base}", f"1 layers of {base}"]
    assert not (output / "distill_report.json").exists()  # no teacher, no report


def test_one_path_twice_gives_two_peers_with_their_own_heads(tmp_path, bert_tokenizer):
    encoder = _encoder(tmp_path / "encoder", bert_tokenizer, layers=1)
    classification = glue_recipe.classification
    model_args = classification.ClassificationModelArguments(
        mutual_learning=True, peer_model_name_or_path=[encoder, encoder]
    )
    peers = classification.load_peers(model_args, _spec())
    first, second = peers.models
    assert first is not second
    assert first.config.id2label == second.config.id2label == {0: "neg", 1: "pos"}
    assert not torch.equal(first.classifier.weight, second.classifier.weight)  # two new heads
    torch.testing.assert_close(
        first.bert.embeddings.word_embeddings.weight, second.bert.embeddings.word_embeddings.weight
    )


def test_recipe_resumes_every_peer_from_a_checkpoint(tmp_path, bert_tokenizer, data):
    base = _save_teacher(tmp_path / "base", bert_tokenizer, layers=3)
    # The resumed run starts from other weights: only the checkpoint can make it end where the full run ended.
    torch.manual_seed(5)
    BertForSequenceClassification(_tiny_config(bert_tokenizer, 3)).save_pretrained(tmp_path / "other")
    bert_tokenizer.save_pretrained(tmp_path / "other")

    def run(output, start, *extra):
        return distill_glue.main(
            ["--mutual_learning", "--peer_base_model_name_or_path", start, "--peer_num_layers", "2", "1",
             "--train_file", data["train"], "--do_train", *extra] + _training_flags(output)
            + ["--save_strategy", "steps", "--save_steps", "2"]
        )  # fmt: skip

    run(tmp_path / "full", base)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    for index in range(2):
        assert (checkpoint / f"peer_{index}" / "config.json").is_file()
    run(tmp_path / "resumed", str(tmp_path / "other"), "--resume_from_checkpoint", str(checkpoint))
    state = json.loads((tmp_path / "resumed" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    for index in range(2):
        full = BertForSequenceClassification.from_pretrained(tmp_path / "full" / f"peer_{index}").state_dict()
        resumed = BertForSequenceClassification.from_pretrained(
            tmp_path / "resumed" / f"peer_{index}"
        ).state_dict()
        for name, value in full.items():
            torch.testing.assert_close(resumed[name], value, atol=1e-6, rtol=1e-5, msg=name)


def test_recipe_mutual_learning_errors_before_training(tmp_path, bert_tokenizer, data, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the run got as far as building the trainer")

    monkeypatch.setattr(glue_recipe.mutual_recipe, "MutualLearningTrainer", refuse)
    monkeypatch.setattr(glue_recipe, "DistillationTrainer", refuse)
    base = _save_teacher(tmp_path / "base", bert_tokenizer, layers=2)
    three = _save_teacher(tmp_path / "three", bert_tokenizer, layers=1, num_labels=3)
    other_names = _save_teacher(
        tmp_path / "names",
        bert_tokenizer,
        layers=1,
        id2label={0: "bad", 1: "good"},
        label2id={"bad": 0, "good": 1},
    )
    common = ["--train_file", data["train"], "--validation_file", data["validation"], "--do_train",
              "--do_eval"] + _training_flags(tmp_path / "out")  # fmt: skip

    def main(*flags):
        distill_glue.main(["--mutual_learning", *flags] + common)

    with pytest.raises(ValueError, match="drop --teacher_model_name_or_path"):
        main("--teacher_model_name_or_path", base, "--peer_model_name_or_path", base, base)
    with pytest.raises(ValueError, match=r"at least two peers, got 1"):
        main("--peer_model_name_or_path", base)
    with pytest.raises(ValueError, match=r"different label spaces.*3.*2 labels \['neg', 'pos'\]"):
        main("--peer_model_name_or_path", base, three)
    with pytest.raises(ValueError, match=r"different label spaces.*\['bad', 'good'\].*\['neg', 'pos'\]"):
        main("--peer_model_name_or_path", base, other_names)
    with pytest.raises(ValueError, match="pass it as --peer_base_model_name_or_path"):
        main("--peer_num_layers", "1", "2")
    with pytest.raises(ValueError, match=r"peers, not a student: drop --student_num_layers"):
        main("--peer_model_name_or_path", base, base, "--student_num_layers", "1")
    with pytest.raises(ValueError, match="set without --mutual_learning"):
        distill_glue.main(["--teacher_model_name_or_path", base, "--student_num_layers", "1",
                           "--peer_num_layers", "1"] + common)  # fmt: skip
    with pytest.raises(ValueError, match="needs at least one teacher.*--mutual_learning"):
        distill_glue.main(["--student_num_layers", "1"] + common)
