"""Several teachers: the mixture loss against float64 formulas, the trainer against invariants (two identical
teachers equal one, a mixture of one teacher equals that teacher) and its checks, and a cache of their mixture
against the live teachers (scripts/cache_teacher_logits.py -> distill_glue.py --teacher_logits_cache too)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TEXTS_FOR_TESTS
from datasets import Dataset
from test_trainer import bert, classification_data, llama, lm_data, make_args, snapshot
from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding

from hf_distill import DistillationTrainer
from hf_distill.caches.mixture import build_mixture_cache, label_names_of, load_sequence_cache
from hf_distill.caches.topk import load_logit_cache
from hf_distill.losses import logit_distillation_loss, logprob_distillation_loss, teacher_mixture_logprobs
from hf_distill.losses.mixture import normalised_weights
from hf_distill.sources.cached import CachedTopKKD
from hf_distill.sources.ensemble import EnsembleLogitsKD, teacher_set

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
    from hf_distill.sources.ensemble import check_ensemble_options
    from hf_distill.training.task_loss import TaskKind

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


# ---- several teachers in one cache -------------------------------------------------------------------------
# The independent reference is the live ensemble (EnsembleLogitsKD, checked against float64 formulas above): with
# every class (or the whole vocabulary) cached, training from the cache must give its loss and gradient.


def _loss_and_gradients(trainer, batch, num_items=None):
    model = trainer.model
    model.zero_grad()
    loss = trainer.compute_loss(model, batch, num_items_in_batch=num_items)
    loss.backward()
    return loss.item(), {
        name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None
    }


def _assert_same_loss_and_gradients(live, cached):
    assert cached[0] == pytest.approx(live[0], rel=1e-5, abs=1e-7)
    assert live[1].keys() == cached[1].keys() and live[1]
    for name, grad in live[1].items():
        torch.testing.assert_close(cached[1][name], grad, atol=1e-6, rtol=1e-4, msg=name)


def _labelled(tokenizer, labels):
    rows = tokenizer(["the movie was good", "bad movie", "i love this film", "it was not fun", "a sad story"])
    return Dataset.from_dict({**dict(rows), "labels": labels})


def _cache_classifiers(tmp_path, tokenizer, teachers, data, weighting, weights=(1.0, 3.0), temperature=2.0):
    return build_mixture_cache(
        [(f"teacher_{i}", teacher) for i, teacher in enumerate(teachers)], data, tmp_path / "cache",
        tokenizer=tokenizer, temperature=temperature, teacher_weights=list(weights), teacher_weighting=weighting,
        task="sequence", collator=DataCollatorWithPadding(tokenizer), batch_size=2,
    )  # fmt: skip


@pytest.mark.parametrize("weighting", ["fixed", "confidence"])
@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_a_cached_mixture_of_classifiers_trains_as_the_live_teachers(
    tmp_path, bert_tokenizer, weighting, kind
):
    teachers = [sharp(bert(bert_tokenizer, seed=2)), sharp(bert(bert_tokenizer, layers=3, seed=3))]
    data = _labelled(bert_tokenizer, [0, 1, -100, 0, 1])  # -100: a row that keeps the fixed weights
    manifest = _cache_classifiers(tmp_path, bert_tokenizer, teachers, data, weighting)
    assert manifest["target"] == "mixture" and manifest["target_temperature"] == 2.0
    assert manifest["teacher_weights"] == [0.25, 0.75] and manifest["teacher_weighting"] == weighting
    assert [entry["name"] for entry in manifest["teachers"]] == ["teacher_0", "teacher_1"]
    assert manifest["top_k"] == 2 and manifest["task"] == "sequence"  # every class: exact

    student = bert(bert_tokenizer, layers=1, seed=1)
    options = dict(alpha=0.5, kd_loss=kind, teacher_weighting=weighting)
    collator = DataCollatorWithPadding(bert_tokenizer)
    live = DistillationTrainer(
        model=copy.deepcopy(student), teacher_model=teachers,
        args=make_args(tmp_path / "live", teacher_weights=[1, 3], **options),
        train_dataset=data, processing_class=bert_tokenizer, data_collator=collator,
    )  # fmt: skip
    rows, cached_collator, _ = load_sequence_cache(
        tmp_path / "cache", data, collator, tokenizer=bert_tokenizer, label_names=label_names_of(student.config),
        temperature=2.0,
    )  # fmt: skip
    cached = DistillationTrainer(
        model=copy.deepcopy(student), teacher_model=None,
        args=make_args(tmp_path / "cached", teacher_logits_cache=str(tmp_path / "cache"), **options),
        train_dataset=rows, processing_class=bert_tokenizer, data_collator=cached_collator,
    )  # fmt: skip
    assert isinstance(live.kd_source, EnsembleLogitsKD) and isinstance(cached.kd_source, CachedTopKKD)
    _assert_same_loss_and_gradients(
        _loss_and_gradients(live, collator([data[i] for i in range(5)])),
        _loss_and_gradients(cached, cached_collator([rows[i] for i in range(5)])),
    )


def test_a_cached_mixture_follows_the_student_label_order(tmp_path, bert_tokenizer):
    """The cache holds the classes in its first teacher's order (and the gold labels in it for confidence); a
    student with the labels the other way round gets them mapped by name, as the live path reorders logits."""
    names = {0: "neg", 1: "pos"}
    teachers = [
        sharp(bert(bert_tokenizer, seed=2, id2label=names)),
        sharp(bert(bert_tokenizer, seed=3, id2label={0: "pos", 1: "neg"})),
    ]
    teacher_labels = [0, 1, 1, 0, 1]
    _cache_classifiers(
        tmp_path, bert_tokenizer, teachers, _labelled(bert_tokenizer, teacher_labels), "confidence"
    )
    student = bert(bert_tokenizer, layers=1, seed=1, id2label={0: "pos", 1: "neg"})
    data = _labelled(bert_tokenizer, [1 - label for label in teacher_labels])  # the student's label ids
    collator = DataCollatorWithPadding(bert_tokenizer)
    options = dict(alpha=0.5, teacher_weighting="confidence")
    live = DistillationTrainer(
        model=copy.deepcopy(student), teacher_model=teachers,
        args=make_args(tmp_path / "live", teacher_weights=[1, 3], **options),
        train_dataset=data, processing_class=bert_tokenizer, data_collator=collator,
    )  # fmt: skip
    rows, cached_collator, _ = load_sequence_cache(
        tmp_path / "cache",
        data,
        collator,
        tokenizer=bert_tokenizer,
        label_names=label_names_of(student.config),
    )
    cached = DistillationTrainer(
        model=copy.deepcopy(student), teacher_model=None,
        args=make_args(tmp_path / "cached", teacher_logits_cache=str(tmp_path / "cache"), **options),
        train_dataset=rows, processing_class=bert_tokenizer, data_collator=cached_collator,
    )  # fmt: skip
    _assert_same_loss_and_gradients(
        _loss_and_gradients(live, collator([data[i] for i in range(5)])),
        _loss_and_gradients(cached, cached_collator([rows[i] for i in range(5)])),
    )
    with pytest.raises(ValueError, match="not the same labels"):
        load_sequence_cache(
            tmp_path / "cache", data, collator, tokenizer=bert_tokenizer, label_names=["a", "b"]
        )


@pytest.mark.parametrize("weighting", ["fixed", "confidence"])
def test_a_cached_mixture_of_language_models_trains_as_the_live_teachers(tmp_path, lm_tokenizer, weighting):
    from hf_distill.tasks.lm.data import CausalLMCollator

    vocab = len(lm_tokenizer)
    teachers = [llama(vocab, seed=2), llama(vocab, layers=1, seed=3)]
    for teacher in teachers:
        with torch.no_grad():
            teacher.lm_head.weight.mul_(6.0)  # distributions far from uniform
    ids = lm_tokenizer(
        ["the movie was good", "bad movie", "i love this film and the music", "it was not fun"]
    )
    data = Dataset.from_dict({"input_ids": ids["input_ids"], "labels": ids["input_ids"]})
    manifest = build_mixture_cache(
        [("a", teachers[0]), ("b", teachers[1])], data, tmp_path / "cache", tokenizer=lm_tokenizer, temperature=2.0,
        teacher_weights=[0.4, 0.6], teacher_weighting=weighting, top_k=vocab, batch_size=3,
    )  # fmt: skip
    assert manifest["target"] == "mixture" and manifest["top_k"] == vocab
    rows, _ = load_logit_cache(
        tmp_path / "cache", data, tokenizer=lm_tokenizer, block_size=None, temperature=2.0
    )
    student = llama(vocab, layers=1, seed=1)
    collator = CausalLMCollator(lm_tokenizer.pad_token_id)
    options = dict(alpha=0.5, teacher_weighting=weighting)
    live = DistillationTrainer(
        model=copy.deepcopy(student), teacher_model=teachers,
        args=make_args(tmp_path / "live", teacher_weights=[0.4, 0.6], **options), train_dataset=data,
        processing_class=lm_tokenizer, teacher_processing_class=lm_tokenizer, data_collator=collator,
    )  # fmt: skip
    cached = DistillationTrainer(
        model=copy.deepcopy(student), teacher_model=None,
        args=make_args(tmp_path / "cached", teacher_logits_cache=str(tmp_path / "cache"), **options),
        train_dataset=rows, processing_class=lm_tokenizer, data_collator=collator,
    )  # fmt: skip
    live_batch, cached_batch = collator([data[i] for i in range(4)]), collator([rows[i] for i in range(4)])
    items = live_batch["labels"][:, 1:].ne(-100).sum()
    _assert_same_loss_and_gradients(
        _loss_and_gradients(live, live_batch, items), _loss_and_gradients(cached, cached_batch, items)
    )


def test_a_mixture_cache_refuses_other_weights_weighting_and_temperature(tmp_path, bert_tokenizer):
    teachers = [bert(bert_tokenizer, seed=2), bert(bert_tokenizer, seed=3)]
    data = _labelled(bert_tokenizer, [0, 1, 1, 0, 1])
    _cache_classifiers(tmp_path, bert_tokenizer, teachers, data, "fixed")

    def trainer(**overrides):
        args = make_args(tmp_path / "out", teacher_logits_cache=str(tmp_path / "cache"), **overrides)
        return DistillationTrainer(
            model=bert(bert_tokenizer, layers=1, seed=1), teacher_model=None, args=args, train_dataset=data,
            processing_class=bert_tokenizer,
        )  # fmt: skip

    assert trainer().kd_source.target_at_temperature  # the cache's weights apply
    trainer(teacher_weights=[2, 6])  # the same weights before normalising
    with pytest.raises(
        ValueError,
        match=r"--teacher_weights \[1, 1\] \(normalised \[0.5, 0.5\]\).*\[0.25, 0.75\].*Drop --teacher_weights",
    ):
        trainer(teacher_weights=[1, 1])
    with pytest.raises(ValueError, match=r"--teacher_weights \[1, 1, 2\]"):
        trainer(teacher_weights=[1, 1, 2])
    with pytest.raises(ValueError, match="--teacher_weighting confidence differs"):
        trainer(teacher_weighting="confidence")
    # a mixture of softened distributions holds at its own temperature only, even with every class cached
    with pytest.raises(ValueError, match=r"temperature 2 \(its target_temperature\).*--temperature 3"):
        trainer(temperature=3.0)
    with pytest.raises(ValueError, match="teacher_model=None"):  # live teachers and the cache: which one?
        DistillationTrainer(
            model=bert(bert_tokenizer, layers=1, seed=1), teacher_model=teachers,
            args=make_args(tmp_path / "out", teacher_logits_cache=str(tmp_path / "cache")), train_dataset=data,
            processing_class=bert_tokenizer,
        )  # fmt: skip
    with pytest.raises(ValueError, match="needs when it is built, but the data has no labels"):
        _cache_classifiers(
            tmp_path / "unlabelled", bert_tokenizer, teachers, data.remove_columns("labels"), "confidence"
        )


def test_cache_script_then_distill_glue_from_a_mixture_of_classifiers(tmp_path, bert_tokenizer):
    """scripts/cache_teacher_logits.py --task classification with two teachers (labels in other orders), then
    scripts/distill_glue.py --teacher_logits_cache: trains from the cache, and refuses other weights before
    training."""
    import csv
    import json

    from test_logit_cache import _load_script

    rows = [{"text": text, "label": "pos" if i % 3 else "neg"} for i, text in enumerate(TEXTS_FOR_TESTS)]
    train = tmp_path / "train.csv"
    with open(train, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    paths = []
    for seed, id2label in ((2, {0: "neg", 1: "pos"}), (3, {0: "pos", 1: "neg"})):
        path = tmp_path / f"teacher_{seed}"
        label2id = {name: index for index, name in id2label.items()}
        sharp(bert(bert_tokenizer, seed=seed, id2label=id2label, label2id=label2id)).save_pretrained(path)
        bert_tokenizer.save_pretrained(path)
        paths.append(str(path))
    cache = tmp_path / "cache"
    manifest = _load_script("cache_teacher_logits").main(
        ["--task", "classification", "--teacher_model_name_or_path", *paths, "--teacher_weights", "1", "3",
         "--teacher_weighting", "confidence", "--train_file", str(train), "--cache_output_dir", str(cache)]
    )  # fmt: skip
    assert manifest["teachers"][1]["name"] == paths[1] and manifest["teacher_weights"] == [0.25, 0.75]
    assert manifest["label_names"] == ["neg", "pos"] and manifest["num_rows"] == len(rows)

    distill_glue = _load_script("distill_glue")
    flags = [
        "--teacher_model_name_or_path", *paths, "--student_num_layers", "1", "--train_file", str(train),
        "--teacher_logits_cache", str(cache), "--teacher_weighting", "confidence", "--do_train",
        "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    distill_glue.main(flags)
    log_history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    kd = [entry["kd_loss"] for entry in log_history if "kd_loss" in entry]
    assert len(kd) == 2 and all(math.isfinite(value) and value > 0 for value in kd)
    with pytest.raises(ValueError, match="--teacher_weights"):
        distill_glue.main(flags + ["--teacher_weights", "1", "1", "--output_dir", str(tmp_path / "out2")])
    assert not (tmp_path / "out2" / "trainer_state.json").exists()
