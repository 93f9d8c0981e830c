"""Adding classes without forgetting: the grown head, the LwF loss, IncrementalTrainer and the recipe's flags
(`distill_glue.py --previous_model_name_or_path`), on tiny BERT models built from configs.

References: the previous model's own logits (the grown head before training), the LwF loss as a float64 formula
written here, torch's cross-entropy in float64 (the trainer's loss), predictions recomputed from the saved model
(the recipe's old/new-class accuracies)."""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from hf_distill import DistillationTrainingArguments, IncrementalTrainer, grow_classifier
from hf_distill.heads import align_new_class_weights
from hf_distill.incremental import select_exemplars
from hf_distill.losses import lwf_distillation_loss

REPO = Path(__file__).resolve().parents[2]
OLD = {0: "sport", 1: "tech"}
WORDS = {
    "sport": "game team win lose star".split(),
    "tech": "phone computer price market".split(),
    "politics": "vote election world".split(),
    "weather": "blue green red".split(),
}
FILLER = "the a it this that and very".split()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bert(tokenizer, labels=OLD, seed=0, layers=1):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_labels=len(labels), id2label=dict(labels), label2id={v: k for k, v in labels.items()},
    )  # fmt: skip
    return BertForSequenceClassification(config)


def batch(tokenizer, texts=("the game was good", "a phone and a computer", "vote in the election")):
    return DataCollatorWithPadding(tokenizer)([dict(tokenizer(text)) for text in texts])


# --------------------------------------------------------------------------------------------- the grown head
def test_grown_head_gives_the_old_logits_on_the_old_classes_and_loads_back(tmp_path, bert_tokenizer):
    previous = bert(bert_tokenizer).eval()
    before = {name: value.clone() for name, value in previous.state_dict().items()}
    grown = grow_classifier(previous, ["politics", "business"], seed=3).eval()
    inputs = batch(bert_tokenizer)
    with torch.no_grad():
        old_logits, new_logits = previous(**inputs).logits, grown(**inputs).logits
    assert new_logits.shape == (3, 4)
    torch.testing.assert_close(new_logits[:, :2], old_logits, rtol=0, atol=1e-6)
    assert grown.config.id2label == {0: "sport", 1: "tech", 2: "politics", 3: "business"}
    assert grown.config.label2id["business"] == 3 and grown.config.num_labels == 4
    assert all(torch.equal(before[name], value) for name, value in previous.state_dict().items())  # untouched
    # new rows: small random weights, zero bias, reproducible from the seed
    assert torch.equal(grown.classifier.bias[2:], torch.zeros(2))
    assert 0 < grown.classifier.weight[2:].std() < 0.1
    assert torch.equal(
        grow_classifier(previous, ["politics", "business"], seed=3).classifier.weight, grown.classifier.weight
    )
    grown.save_pretrained(tmp_path / "grown")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "grown").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, new_logits, rtol=0, atol=1e-6)


def test_a_roberta_head_grows_too(bert_tokenizer):
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=len(bert_tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=80, pad_token_id=0, num_labels=2, id2label=OLD,
        label2id={v: k for k, v in OLD.items()}, hidden_dropout_prob=0.0,
    )  # fmt: skip
    previous = RobertaForSequenceClassification(config).eval()
    grown = grow_classifier(previous, ["politics"], seed=0).eval()
    inputs = {key: value for key, value in batch(bert_tokenizer).items() if key != "token_type_ids"}
    with torch.no_grad():
        torch.testing.assert_close(
            grown(**inputs).logits[:, :2], previous(**inputs).logits, rtol=0, atol=1e-6
        )
    assert grown.classifier.out_proj.out_features == 3 and grown.classifier.dense.out_features == 32


@pytest.mark.parametrize(
    ("labels", "new", "message"),
    [
        (OLD, ["Sport"], r"reuse old class names: 'Sport' \(old class 'sport'\)"),
        (OLD, ["politics", "politics"], r"repeat \['politics'\]"),
        (OLD, [], r"no new classes"),
        ({0: "LABEL_0", 1: "LABEL_1"}, ["politics"], r"have no names.*cannot be matched by name"),
    ],
)
def test_bad_new_classes_are_refused(bert_tokenizer, labels, new, message):
    with pytest.raises(ValueError, match=message):
        grow_classifier(bert(bert_tokenizer, labels=labels), new)


# --------------------------------------------------------------------------------------------- the loss
def reference_lwf(student, previous, temperature, columns):
    """T**2 * KL(softmax(previous / T) || softmax(student[:, columns] / T)) per row, float64."""
    p_previous = F.softmax(previous.double() / temperature, dim=-1)
    log_p_student = F.log_softmax(student.double()[:, columns] / temperature, dim=-1)
    return (p_previous * (p_previous.log() - log_p_student)).sum(-1) * temperature**2


def test_lwf_loss_equals_the_float64_formula():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(6, 5, generator=generator) * 3
    previous = torch.randn(6, 3, generator=generator) * 3
    mask = torch.tensor([True, False, True, True, False, True])
    for temperature in (1.0, 2.0, 3.5):
        expected = reference_lwf(student, previous, temperature, [0, 1, 2])
        got = lwf_distillation_loss(student, previous, temperature=temperature)
        torch.testing.assert_close(got.double(), expected.mean(), rtol=1e-5, atol=1e-6)
        masked = lwf_distillation_loss(student, previous, temperature=temperature, mask=mask)
        torch.testing.assert_close(masked.double(), expected[mask].mean(), rtol=1e-5, atol=1e-6)
        summed = lwf_distillation_loss(student, previous, temperature=temperature, reduction="sum")
        torch.testing.assert_close(summed.double(), expected.sum(), rtol=1e-5, atol=1e-5)
    # old classes at other columns of the student, named by old_columns
    expected = reference_lwf(student, previous, 2.0, [4, 0, 2])
    got = lwf_distillation_loss(student, previous, temperature=2.0, old_columns=[4, 0, 2])
    torch.testing.assert_close(got.double(), expected.mean(), rtol=1e-5, atol=1e-6)


def test_lwf_loss_and_gradient_vanish_when_the_student_keeps_the_old_logits():
    previous = torch.randn(4, 3) * 2
    new_columns = torch.randn(4, 2) * 5  # whatever the new classes say
    student = torch.cat([previous.clone(), new_columns], -1).requires_grad_(True)
    loss = lwf_distillation_loss(student, previous, temperature=2.0)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert float(student.grad.abs().max()) < 1e-6


@pytest.mark.parametrize(
    ("student_shape", "previous_shape", "options", "message"),
    [
        ((4, 2), (4, 3), {}, r"fewer than the previous model's 3"),
        ((4, 5), (3, 3), {}, r"leading \(position\) dims must match"),
        ((4, 5), (4, 3), {"old_columns": [0, 0, 1]}, r"repeat a column"),
        ((4, 5), (4, 3), {"old_columns": [0, 1, 7]}, r"outside the student's 5 classes"),
        ((4, 5), (4, 3), {"kind": "cosine"}, r"unknown kind 'cosine'"),
    ],
)
def test_lwf_loss_names_bad_shapes(student_shape, previous_shape, options, message):
    with pytest.raises(ValueError, match=message):
        lwf_distillation_loss(torch.zeros(student_shape), torch.zeros(previous_shape), **options)


def test_exemplars_are_class_balanced_seeded_and_in_row_order():
    labels = ["a"] * 10 + ["b"] * 3 + [None] * 2 + ["c"] * 6
    chosen = select_exemplars(labels, 4, seed=1)
    assert chosen == sorted(chosen)
    counts = {label: sum(labels[i] == label for i in chosen) for label in "abc"}
    assert counts == {"a": 4, "b": 3, "c": 4}
    assert chosen == select_exemplars(labels, 4, seed=1) and chosen != select_exemplars(labels, 4, seed=2)
    with pytest.raises(ValueError, match="per_class must be an integer >= 1"):
        select_exemplars(labels, 0, seed=0)


# --------------------------------------------------------------------------------------------- the trainer
def _args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, learning_rate=1e-2, max_steps=2,
        save_strategy="no", report_to="none", seed=0, temperature=2.0, alpha=0.5, use_cpu=True, disable_tqdm=True,
        logging_steps=1,
    )  # fmt: skip
    values.update(overrides)
    return DistillationTrainingArguments(**values)


def _trainer(
    tmp_path, tokenizer, previous, student, weight_aligning=False, task_aware_loss=False, **overrides
):
    rows = dict(tokenizer(["vote in the election", "the game was good", "a phone"]))
    rows["labels"] = [2, 0, -100]  # a new-class row, an exemplar of an old class, an unlabelled row
    return IncrementalTrainer(
        student, previous, _args(tmp_path, **overrides), train_dataset=Dataset.from_dict(rows),
        processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
        weight_aligning=weight_aligning, task_aware_loss=task_aware_loss,
    )  # fmt: skip


def test_trainer_loss_is_weighted_cross_entropy_plus_lwf(tmp_path, bert_tokenizer):
    previous = bert(bert_tokenizer, seed=0)
    # a student whose old classes come in another order than the previous model's: matched by name
    student = bert(bert_tokenizer, labels={0: "tech", 1: "politics", 2: "sport"}, seed=1)
    trainer = _trainer(tmp_path, bert_tokenizer, previous, student, alpha=0.3, temperature=3.0)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    student.train()
    loss = trainer.compute_loss(student, inputs)
    with torch.no_grad():
        features = {key: value for key, value in inputs.items() if key != "labels"}
        student_logits, previous_logits = student(**features).logits, previous(**features).logits
    labels = inputs["labels"]
    ce = F.cross_entropy(student_logits.double(), labels, ignore_index=-100)
    lwf = reference_lwf(student_logits, previous_logits, 3.0, [2, 0]).mean()  # sport -> column 2, tech -> 0
    torch.testing.assert_close(loss.double(), 0.7 * ce + 0.3 * lwf, rtol=1e-5, atol=1e-6)


def test_alpha_zero_is_plain_fine_tuning_and_the_previous_model_stays_a_guest(tmp_path, bert_tokenizer):
    previous = bert(bert_tokenizer, seed=0)
    before = {name: value.clone() for name, value in previous.state_dict().items()}
    # grown before the previous model is frozen as a guest (a copy of a frozen model would be frozen too)
    student, other = (grow_classifier(previous, ["politics"], seed=0) for _ in range(2))
    trainer = _trainer(tmp_path, bert_tokenizer, previous, student, alpha=0.0)
    trainer.previous_model.forward = lambda *a, **k: pytest.fail("alpha=0 must not run the previous model")
    trainer.train()
    del trainer.previous_model.forward
    lwf = _trainer(tmp_path, bert_tokenizer, previous, other)
    lwf.train()
    lwf.save_model()
    assert all(torch.equal(before[name], value) for name, value in previous.state_dict().items())
    assert not any(p.requires_grad for p in previous.parameters())
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert saved.config.id2label == {0: "sport", 1: "tech", 2: "politics"}
    assert {"ce_loss", "lwf_loss"} <= {key for entry in lwf.state.log_history for key in entry}


def test_a_student_without_the_old_class_names_is_refused(tmp_path, bert_tokenizer):
    previous = bert(bert_tokenizer)
    other = bert(bert_tokenizer, labels={0: "sport", 1: "science", 2: "politics"})
    with pytest.raises(ValueError, match=r"previous model's classes \['tech'\] are not among the student's"):
        _trainer(tmp_path, bert_tokenizer, previous, other)


# --------------------------------------------------------------------------------------------- the recipe
def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(
        f"_incremental_script_{name}", REPO / "scripts" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


distill_glue = _load_script("distill_glue")
incremental_recipe = distill_glue.recipe.incremental


def _rows(labels: list[str], count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "text": " ".join([rng.choice(WORDS[label]), *rng.sample(FILLER, 3), rng.choice(WORDS[label])]),
            "label": label,
        }
        for label in labels
        for _ in range(count)
    ]


def _write(path: Path, rows: list[dict]) -> str:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


@pytest.fixture
def files(tmp_path, bert_tokenizer):
    previous = bert(bert_tokenizer, seed=0)
    previous.save_pretrained(tmp_path / "previous")
    bert_tokenizer.save_pretrained(tmp_path / "previous")
    return {
        "previous": str(tmp_path / "previous"),
        "train": _write(tmp_path / "train.csv", _rows(["politics"], 8, 0)),
        "validation": _write(tmp_path / "validation.csv", _rows(["sport", "tech", "politics"], 4, 1)),
        "exemplars": _write(tmp_path / "memory.csv", _rows(["sport", "tech"], 5, 2)),
    }


def _flags(files, output: Path, *extra: str) -> list[str]:
    return [
        "--previous_model_name_or_path", files["previous"], "--train_file", files["train"],
        "--validation_file", files["validation"], "--do_train", "--do_eval", "--output_dir", str(output),
        "--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", *extra,
    ]  # fmt: skip


def test_recipe_adds_a_class_and_reports_old_and_new_class_accuracy(tmp_path, bert_tokenizer, files):
    output = tmp_path / "run"
    flags = ["--exemplar_file", files["exemplars"], "--exemplars_per_class", "2", "--alpha", "0.5"]
    results = distill_glue.main(_flags(files, output, *flags))
    summary = json.loads((output / "incremental.json").read_text())
    assert summary["old_classes"] == ["sport", "tech"] and summary["new_classes"] == ["politics"]
    assert summary["exemplar_rows"] == 4 and summary["training_rows"] == 12
    model = AutoModelForSequenceClassification.from_pretrained(output).eval()
    assert model.config.id2label == {0: "sport", 1: "tech", 2: "politics"}
    # the reported accuracies, recomputed from the saved model
    rows = list(csv.DictReader(open(files["validation"])))
    encoded = DataCollatorWithPadding(bert_tokenizer)([dict(bert_tokenizer(row["text"])) for row in rows])
    with torch.no_grad():
        predicted = model(**encoded).logits.argmax(-1).numpy()
    truth = np.array([model.config.label2id[row["label"]] for row in rows])
    old, new = truth < 2, truth >= 2
    assert results["eval"]["eval_accuracy_old_classes"] == pytest.approx(
        float((predicted[old] == truth[old]).mean())
    )
    assert results["eval"]["eval_accuracy_new_classes"] == pytest.approx(
        float((predicted[new] == truth[new]).mean())
    )
    assert results["eval"]["eval_accuracy"] == pytest.approx(float((predicted == truth).mean()))
    # task-aware: argmax over the old columns for old rows, over the new ones for new rows
    with torch.no_grad():
        logits = model(**encoded).logits.numpy()
    within_old, within_new = logits[:, :2].argmax(-1), 2 + logits[:, 2:].argmax(-1)
    assert results["eval"]["eval_accuracy_old_classes_task_aware"] == pytest.approx(
        float((within_old[old] == truth[old]).mean())
    )
    assert results["eval"]["eval_accuracy_new_classes_task_aware"] == pytest.approx(
        float((within_new[new] == truth[new]).mean())
    )


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the error should have been raised before training")

    monkeypatch.setattr(incremental_recipe, "IncrementalTrainer", refuse)


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--new_labels", "Tech"], r"reuse old class names: 'Tech' \(old class 'tech'\)"),
        (["--new_labels", "economy"], r"train data has labels \['politics'\] that are neither old nor new"),
        (["--teacher_model_name_or_path", "x"], r"drop --teacher_model_name_or_path"),
        (["--compare_no_kd"], r"--compare_no_kd belong to other modes"),
        (["--exemplars_per_class", "2"], r"draws rows from --exemplar_file"),
    ],
)
def test_recipe_flag_errors_come_before_training(tmp_path, files, extra, message):
    with pytest.raises(ValueError, match=message):
        distill_glue.main(_flags(files, tmp_path / "run", *extra))
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.usefixtures("no_training")
def test_recipe_data_and_model_errors_come_before_training(tmp_path, bert_tokenizer, files):
    unknown = _write(tmp_path / "weather.csv", _rows(["sport", "weather"], 2, 3))
    with pytest.raises(
        ValueError, match=r"validation data has labels \['weather'\] that are neither old nor new"
    ):
        distill_glue.main(_flags({**files, "validation": unknown}, tmp_path / "a"))
    new_in_memory = _write(tmp_path / "bad_memory.csv", _rows(["politics"], 2, 4))
    with pytest.raises(ValueError, match=r"exemplar data has labels \['politics'\] that are not old classes"):
        distill_glue.main(_flags(files, tmp_path / "b", "--exemplar_file", new_in_memory))
    unnamed = bert(bert_tokenizer, labels={0: "LABEL_0", 1: "LABEL_1"})
    unnamed.save_pretrained(tmp_path / "unnamed")
    bert_tokenizer.save_pretrained(tmp_path / "unnamed")
    with pytest.raises(ValueError, match=r"labels have no names.*cannot be matched by name"):
        distill_glue.main(_flags({**files, "previous": str(tmp_path / "unnamed")}, tmp_path / "c"))
    with pytest.raises(
        ValueError,
        match=r"--weight_aligning / --task_aware_loss add classes to a trained classifier",
    ):
        distill_glue.main(
            ["--teacher_model_name_or_path", files["previous"], "--student_num_layers", "1", "--train_file",
             files["train"], "--output_dir", str(tmp_path / "d"), "--new_labels", "politics"]
        )  # fmt: skip


# --------------------------------------------------------------------------------------------- weight aligning
def test_weight_aligning_equals_the_float64_rescaling(bert_tokenizer):
    model = bert(bert_tokenizer, labels={0: "sport", 1: "tech", 2: "politics", 3: "weather"}, seed=3)
    head = model.classifier
    with torch.no_grad():  # new rows (1 and 3 here) longer than the old ones, non-zero biases
        head.weight[[1, 3]] *= 3.0
        head.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.4]))
    weight, bias = head.weight.detach().double().clone(), head.bias.detach().double().clone()
    norms = weight.norm(dim=1)
    expected_factor = float(norms[[0, 2]].mean() / norms[[1, 3]].mean())
    inputs = batch(bert_tokenizer)
    model.eval()
    with torch.no_grad():
        before = model(**inputs).logits.double()
    factor = align_new_class_weights(model, [0, 2])
    assert factor == pytest.approx(expected_factor, rel=1e-6)
    torch.testing.assert_close(head.weight.double()[[0, 2]], weight[[0, 2]])
    torch.testing.assert_close(head.bias.double()[[0, 2]], bias[[0, 2]])
    torch.testing.assert_close(
        head.weight.double()[[1, 3]], expected_factor * weight[[1, 3]], rtol=1e-6, atol=1e-7
    )
    new_norm = head.weight.detach().double().norm(dim=1)[[1, 3]].mean()
    torch.testing.assert_close(new_norm, norms[[0, 2]].mean(), rtol=1e-6, atol=1e-7)
    with torch.no_grad():  # old classes' logits unchanged, new classes' multiplied by the factor
        after = model(**inputs).logits.double()
    torch.testing.assert_close(after[:, [0, 2]], before[:, [0, 2]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after[:, [1, 3]], expected_factor * before[:, [1, 3]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("columns", "message"),
    [([0, 0], "distinct rows"), ([5], "distinct rows"), ([0, 1, 2], "no new class to align")],
)
def test_weight_aligning_names_bad_columns(bert_tokenizer, columns, message):
    model = bert(bert_tokenizer, labels={0: "sport", 1: "tech", 2: "politics"})
    with pytest.raises(ValueError, match=message):
        align_new_class_weights(model, columns)


def test_trainer_aligns_the_trained_weights_once_training_ends(tmp_path, bert_tokenizer):
    previous = bert(bert_tokenizer, seed=0)
    plain, aligned = (grow_classifier(previous, ["politics"], seed=0) for _ in range(2))
    _trainer(tmp_path / "plain", bert_tokenizer, previous, plain).train()
    trainer = _trainer(tmp_path / "aligned", bert_tokenizer, previous, aligned, weight_aligning=True)
    trainer.train()
    # the same training (same seed and data), then the rescaling applied here to the unaligned copy
    factor = align_new_class_weights(plain, [0, 1])
    assert trainer.weight_aligning_factor == pytest.approx(factor, rel=1e-6)
    for (name, value), other in zip(aligned.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(value, other, rtol=1e-5, atol=1e-6, msg=name)
    assert any("weight_aligning_factor" in entry for entry in trainer.state.log_history)


# --------------------------------------------------------------------------------------------- task-aware loss
def test_task_aware_loss_is_the_cross_entropy_within_each_rows_group(tmp_path, bert_tokenizer):
    """Reference: float64 cross-entropy over the columns of each row's group alone (old classes {sport, tech} for
    the exemplar row, new {politics, business} for the new-class row; the unlabelled row counts for LwF only)."""
    previous = bert(bert_tokenizer, seed=0)
    student = bert(bert_tokenizer, labels={0: "tech", 1: "sport", 2: "politics", 3: "business"}, seed=1)
    trainer = _trainer(tmp_path, bert_tokenizer, previous, student, alpha=0.3, task_aware_loss=True)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    student.train()
    loss = trainer.compute_loss(student, inputs)
    with torch.no_grad():
        features = {key: value for key, value in inputs.items() if key != "labels"}
        student_logits, previous_logits = student(**features).logits.double(), previous(**features).logits
    groups = {2: [2, 3], 0: [0, 1]}  # the row labelled 2 (politics, new) and the one labelled 0 (tech, old)
    terms = []
    for row, label in enumerate(inputs["labels"].tolist()):
        if label in groups:
            columns = groups[label]
            terms.append(-torch.log_softmax(student_logits[row, columns], -1)[columns.index(label)])
    ce = torch.stack(terms).mean()
    lwf = reference_lwf(student_logits.float(), previous_logits, 2.0, [1, 0]).mean()  # sport -> 1, tech -> 0
    torch.testing.assert_close(loss.double(), 0.7 * ce + 0.3 * lwf, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_group_mask_gives_each_groups_softmax_and_stays_finite(dtype):
    from hf_distill.incremental import within_own_group

    logits = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.2, 0.1, -1.0, 2.0], [4.0, 1.0, 0.0, 0.0]], dtype=dtype)
    old = torch.tensor([True, False, True, False])  # columns 0 and 2 old
    masked = within_own_group(logits, torch.tensor([2, 3, -100]), old)
    assert torch.isfinite(masked).all()
    probabilities = torch.softmax(masked.double(), -1)
    expected_old = torch.softmax(logits[0, [0, 2]].double(), -1)
    expected_new = torch.softmax(logits[1, [1, 3]].double(), -1)
    torch.testing.assert_close(probabilities[0, [0, 2]], expected_old, rtol=0, atol=1e-12)
    torch.testing.assert_close(probabilities[1, [1, 3]], expected_new, rtol=0, atol=1e-12)
    assert probabilities[0, [1, 3]].max() == 0 and probabilities[1, [0, 2]].max() == 0
