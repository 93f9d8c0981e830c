"""Several teachers: the mixture loss against float64 formulas, and the trainer against invariants (two identical
teachers equal one, a mixture of one teacher equals that teacher) and its checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_trainer import bert, classification_data, llama, lm_data, make_args, snapshot
from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding

from hf_distill import DistillationTrainer
from hf_distill.ensemble import EnsembleLogitsKD, normalised_weights, teacher_set
from hf_distill.losses import logit_distillation_loss, logprob_distillation_loss, teacher_mixture_logprobs

# ---- the losses --------------------------------------------------------------------------------------------


def reference_mixture(teacher_logits, weights, temperature):
    """log(sum_i w_i softmax(z_i / T)) in float64, written out: weighted sum of probabilities, then the log."""
    probs = sum(w * F.softmax(z.double() / temperature, dim=-1) for w, z in zip(weights, teacher_logits))
    return probs.log()


def reference_divergence(student_logits, log_q, temperature, kind, beta=0.5):
    log_p = F.log_softmax(student_logits.double() / temperature, dim=-1)
    p, q = log_p.exp(), log_q.double().exp()
    if kind == "forward_kl":
        rows = (q * (log_q - log_p)).sum(-1)
    elif kind == "reverse_kl":
        rows = (p * (log_p - log_q)).sum(-1)
    else:
        m = beta * q + (1 - beta) * p
        rows = beta * (q * (log_q - m.log())).sum(-1) + (1 - beta) * (p * (log_p - m.log())).sum(-1)
    return rows * temperature**2


def test_mixture_matches_the_weighted_sum_of_probabilities():
    torch.manual_seed(0)
    teachers = [torch.randn(5, 7) * 3 for _ in range(3)]
    weights = [0.2, 0.5, 0.3]
    got = teacher_mixture_logprobs(teachers, torch.tensor(weights), temperature=2.0)
    torch.testing.assert_close(got.double(), reference_mixture(teachers, weights, 2.0), atol=1e-5, rtol=1e-5)
    # A zero weight drops that teacher.
    dropped = teacher_mixture_logprobs(teachers, torch.tensor([0.0, 1.0, 0.0]), temperature=2.0)
    torch.testing.assert_close(dropped, F.log_softmax(teachers[1] / 2.0, dim=-1), atol=1e-5, rtol=1e-5)


def test_mixture_takes_per_example_weights():
    torch.manual_seed(1)
    teachers = [torch.randn(4, 3) for _ in range(2)]
    weights = torch.tensor([[0.1, 0.9, 0.5, 1.0], [0.9, 0.1, 0.5, 0.0]])  # (K, batch)
    got = teacher_mixture_logprobs(teachers, weights, temperature=1.5)
    for row in range(4):
        expected = reference_mixture([t[row] for t in teachers], weights[:, row].tolist(), 1.5)
        torch.testing.assert_close(got[row].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_logprob_loss_matches_the_formula_and_the_logit_loss_for_one_teacher(kind):
    torch.manual_seed(2)
    student, teacher = torch.randn(6, 9) * 2, torch.randn(6, 9) * 2
    mask = torch.tensor([True, False, True, True, False, True])
    temperature = 3.0
    log_q = teacher_mixture_logprobs([teacher], torch.tensor([1.0]), temperature=temperature)
    got = logprob_distillation_loss(student, log_q, temperature=temperature, kind=kind, beta=0.3, mask=mask)
    expected = reference_divergence(student, log_q, temperature, kind, beta=0.3)[mask].mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    from_logits = logit_distillation_loss(
        student, teacher, temperature=temperature, kind=kind, beta=0.3, mask=mask
    )
    assert got.item() == pytest.approx(from_logits.item(), rel=1e-5, abs=1e-6)


def test_logprob_loss_gradient_matches_the_logit_loss_and_is_finite_where_the_teacher_has_no_mass():
    torch.manual_seed(3)
    student = torch.randn(4, 5, requires_grad=True)
    teacher = torch.randn(4, 5)
    log_q = F.log_softmax(teacher / 2.0, dim=-1)
    logprob_distillation_loss(student, log_q, temperature=2.0).backward()
    grad = student.grad.clone()
    student.grad = None
    logit_distillation_loss(student, teacher, temperature=2.0).backward()
    torch.testing.assert_close(grad, student.grad, atol=1e-6, rtol=1e-5)
    # A class with q = 0 (log q = -inf) contributes 0 log 0 = 0, not NaN.
    log_q = torch.log(torch.tensor([[0.5, 0.5, 0.0]]))
    student = torch.zeros(1, 3, requires_grad=True)
    loss = logprob_distillation_loss(student, log_q)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(0.5 / (1 / 3)), abs=1e-6)  # sum of 0.5 log(0.5 / (1/3))
    assert torch.isfinite(student.grad).all()


# ---- weights and teacher sets ------------------------------------------------------------------------------


def test_weights_are_normalised_and_bad_weights_raise():
    assert normalised_weights([1, 3], 2) == [0.25, 0.75]
    assert normalised_weights(None, 4) == [0.25] * 4
    with pytest.raises(ValueError, match="3 values .* for 2 teacher"):
        normalised_weights([1, 1, 1], 2)
    with pytest.raises(ValueError, match="sum to a positive"):
        normalised_weights([0, 0], 2)
    with pytest.raises(ValueError, match=">= 0"):
        normalised_weights([2, -1], 2)


def test_teacher_set_names_and_matching_teacher(bert_tokenizer):
    a, b = bert(bert_tokenizer, seed=1), bert(bert_tokenizer, seed=2)
    assert teacher_set(a, None) is None
    named = teacher_set({"big": a, "small": b}, [1, 1], "small")
    assert named.names == ["big", "small"] and named.matching == 1 and named.matching_model is b
    with pytest.raises(ValueError, match="not one of the teachers"):
        teacher_set([a, b], None, "nope")
    with pytest.raises(ValueError, match="2 values"):
        teacher_set(a, [1, 2])
    with pytest.raises(ValueError, match="empty"):
        teacher_set([], None)


# ---- the trainer -------------------------------------------------------------------------------------------


def _trainer(tmp_path, tokenizer, teachers, student=None, matching_teacher=None, **overrides):
    return DistillationTrainer(
        model=student if student is not None else bert(tokenizer, layers=1, seed=1),
        teacher_model=teachers,
        args=make_args(tmp_path, **overrides),
        train_dataset=classification_data(tokenizer),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        matching_teacher=matching_teacher,
    )


def _trained(trainer):
    trainer.train()
    return snapshot(trainer.model)


def _assert_same_weights(left, right):
    for name in left:
        torch.testing.assert_close(left[name], right[name], atol=2e-5, rtol=1e-4, msg=name)


def test_two_identical_teachers_with_any_weights_equal_one_teacher(tmp_path, bert_tokenizer):
    one = _trained(_trainer(tmp_path / "one", bert_tokenizer, bert(bert_tokenizer, seed=2)))
    copies = [bert(bert_tokenizer, seed=2), bert(bert_tokenizer, seed=2)]
    two = _trained(_trainer(tmp_path / "two", bert_tokenizer, copies, teacher_weights=[0.9, 0.1]))
    _assert_same_weights(one, two)


def test_a_mixture_of_one_teacher_equals_that_teacher(tmp_path, bert_tokenizer):
    one = _trained(_trainer(tmp_path / "one", bert_tokenizer, bert(bert_tokenizer, seed=2), kd_loss="jsd"))
    mixture = _trainer(
        tmp_path / "mix", bert_tokenizer, {"only": bert(bert_tokenizer, seed=2)}, kd_loss="jsd"
    )
    assert isinstance(mixture.kd_source, EnsembleLogitsKD)
    _assert_same_weights(one, _trained(mixture))


def sharp(model, scale=40.0):
    """Tiny random models score every class about equally; a scaled head gives the divergences a size that float32
    resolves to 1e-4 of the value."""
    with torch.no_grad():
        model.classifier.weight.mul_(scale)
    return model


def _batch(tokenizer, labels):
    rows = tokenizer(["the movie was good", "bad movie", "i love this film", "it was not fun"])
    rows["labels"] = labels
    features = [{k: v[i] for k, v in rows.items()} for i in range(4)]
    return DataCollatorWithPadding(tokenizer)(features)


def test_kd_term_is_the_divergence_from_the_weighted_mixture(tmp_path, bert_tokenizer):
    teachers = [sharp(bert(bert_tokenizer, seed=2)), sharp(bert(bert_tokenizer, layers=3, seed=3))]
    trainer = _trainer(tmp_path, bert_tokenizer, teachers, alpha=1.0, teacher_weights=[1.0, 3.0])
    batch = _batch(bert_tokenizer, [0, 1, 1, 0])
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = [teacher(**inputs).logits for teacher in teachers]
        student_logits = trainer.model(**inputs).logits
    log_q = reference_mixture(logits, [0.25, 0.75], 2.0)
    expected = reference_divergence(student_logits, log_q, 2.0, "forward_kl").mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_confidence_weighting_weighs_each_teacher_by_its_gold_probability(tmp_path, bert_tokenizer):
    teachers = [sharp(bert(bert_tokenizer, seed=2)), sharp(bert(bert_tokenizer, seed=5))]
    trainer = _trainer(
        tmp_path, bert_tokenizer, teachers, alpha=1.0, teacher_weights=[1, 1], teacher_weighting="confidence"
    )
    labels = [0, 1, -100, 0]
    batch = _batch(bert_tokenizer, labels)
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = [teacher(**inputs).logits.double() for teacher in teachers]
        student_logits = trainer.model(**inputs).logits
    rows = []
    for row, label in enumerate(labels):
        weights = [0.5, 0.5]
        if label != -100:
            gold = [F.softmax(z[row], -1)[label].item() * 0.5 for z in logits]
            weights = [g / sum(gold) for g in gold]
        log_q = reference_mixture([z[row] for z in logits], weights, 2.0)
        rows.append(reference_divergence(student_logits[row], log_q, 2.0, "forward_kl"))
    assert loss.item() == pytest.approx(torch.stack(rows).mean().item(), rel=1e-4)


def test_unlabelled_rows_get_kd_only(tmp_path, bert_tokenizer):
    """Label -100 marks a transfer-set row: the hard loss averages over labelled rows, KD over all rows."""
    teacher = sharp(bert(bert_tokenizer, seed=2))
    trainer = _trainer(tmp_path, bert_tokenizer, teacher, alpha=0.3)
    labels = [0, -100, 1, -100]
    batch = _batch(bert_tokenizer, labels)
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        teacher_logits, student_logits = teacher(**inputs).logits, trainer.model(**inputs).logits
    log_q = F.log_softmax(teacher_logits.double() / 2.0, dim=-1)
    kd = reference_divergence(student_logits, log_q, 2.0, "forward_kl").mean()
    log_p = F.log_softmax(student_logits.double(), dim=-1)
    ce = -(log_p[0, 0] + log_p[2, 1]) / 2
    assert loss.item() == pytest.approx((0.7 * ce + 0.3 * kd).item(), rel=1e-4)


def test_teachers_are_reordered_to_the_student_labels_one_by_one(tmp_path, bert_tokenizer):
    names = ["a", "b", "c"]
    student = bert(bert_tokenizer, layers=1, labels=3, seed=1, id2label=dict(enumerate(names)))
    same = bert(bert_tokenizer, labels=3, seed=2, id2label=dict(enumerate(names)))
    permuted = bert(bert_tokenizer, labels=3, seed=2, id2label=dict(enumerate(["c", "a", "b"])))
    # the permuted teacher's head rows are moved so that it scores each named label as `same` does
    with torch.no_grad():
        order = [2, 0, 1]
        permuted.classifier.weight.copy_(same.classifier.weight[order])
        permuted.classifier.bias.copy_(same.classifier.bias[order])
    trainer = _trainer(tmp_path, bert_tokenizer, [same, permuted], student=student, alpha=1.0)
    batch = _batch(bert_tokenizer, [0, 1, 2, 0])
    step = trainer._student_step(trainer.model, batch, trainer._model_inputs(trainer.model, batch))
    first, second = trainer.kd_source.teacher_logits(step)
    torch.testing.assert_close(first, second, atol=1e-5, rtol=1e-5)


def test_mismatched_teachers_raise_before_training(tmp_path, bert_tokenizer):
    with pytest.raises(ValueError, match="teacher 'teacher_1'.*labels"):
        _trainer(
            tmp_path,
            bert_tokenizer,
            [
                bert(bert_tokenizer, seed=2, id2label={0: "neg", 1: "pos"}),
                bert(bert_tokenizer, seed=2, id2label={0: "x", 1: "y"}),
            ],
            student=bert(bert_tokenizer, layers=1, seed=1, id2label={0: "neg", 1: "pos"}),
        )
    with pytest.raises(ValueError, match="2 values .* for 3 teacher"):
        _trainer(
            tmp_path, bert_tokenizer, [bert(bert_tokenizer, seed=s) for s in range(3)], teacher_weights=[1, 1]
        )


def test_ensemble_options_that_cannot_work_raise(tmp_path):
    from hf_distill.ensemble import check_ensemble_options
    from hf_distill.task_loss import TaskKind

    sequence = TaskKind("sequence", "single_label_classification")
    with pytest.raises(ValueError, match="teacher_logits_cache"):
        check_ensemble_options(make_args(tmp_path, teacher_logits_cache=str(tmp_path)), sequence, False)
    with pytest.raises(ValueError, match="fused_kd_loss"):
        check_ensemble_options(make_args(tmp_path), sequence, True)
    with pytest.raises(ValueError, match="multi-label"):
        check_ensemble_options(make_args(tmp_path), TaskKind("sequence", "multi_label_classification"), False)


def test_ensemble_errors_name_the_problem(tmp_path, bert_tokenizer):
    teachers = [bert(bert_tokenizer, seed=2), bert(bert_tokenizer, seed=3)]
    with pytest.raises(ValueError, match="mse"):
        _trainer(tmp_path, bert_tokenizer, teachers, kd_loss="mse")


def test_hidden_matching_follows_the_matching_teacher(tmp_path, bert_tokenizer):
    small, deep = bert(bert_tokenizer, layers=2, seed=2), bert(bert_tokenizer, layers=4, seed=3)
    options = dict(hidden_weight=1.0, layer_map="1:4")
    trainer = _trainer(
        tmp_path, bert_tokenizer, {"small": small, "deep": deep}, matching_teacher="deep", **options
    )
    assert trainer.layer_maps["layers"] == [(1, 4)]
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    with pytest.raises(ValueError, match="4"):  # layer 4 does not exist in the 2-layer teacher
        _trainer(
            tmp_path, bert_tokenizer, {"small": small, "deep": deep}, matching_teacher="small", **options
        )


def test_language_model_teachers_mix_over_the_vocabulary(tmp_path, lm_tokenizer):
    vocab = len(lm_tokenizer)
    teachers = [llama(vocab, seed=2), llama(vocab, seed=3)]
    trainer = DistillationTrainer(
        model=llama(vocab, layers=1, seed=1),
        teacher_model=teachers,
        args=make_args(tmp_path, alpha=1.0, teacher_weights=[0.4, 0.6]),
        train_dataset=lm_data(lm_tokenizer),
        processing_class=lm_tokenizer,
        teacher_processing_class=lm_tokenizer,
        data_collator=DataCollatorForLanguageModeling(lm_tokenizer, mlm=False),
    )
    batch = DataCollatorForLanguageModeling(lm_tokenizer, mlm=False)(
        [{"input_ids": ids} for ids in lm_tokenizer(["the movie was good", "bad movie"])["input_ids"]]
    )
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        logits = [teacher(**inputs).logits for teacher in teachers]
        student_logits = trainer.model(**inputs).logits
    mask = F.pad(batch["labels"][:, 1:], (0, 1), value=-100).ne(-100)
    log_q = reference_mixture(logits, [0.4, 0.6], 2.0)
    expected = reference_divergence(student_logits, log_q, 2.0, "forward_kl")[mask].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
