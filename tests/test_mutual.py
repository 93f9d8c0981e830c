"""Deep Mutual Learning: the loss against a float64 formula, invariants, saving and resume of every peer."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from test_trainer import bert, classification_data, make_args, snapshot
from transformers import BertForSequenceClassification, DataCollatorWithPadding

from hf_distill.mutual import MutualLearningTrainer


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
