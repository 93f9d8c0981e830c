"""The classification recipe: data and label resolution, metrics, errors raised before training, and the
distill_glue.py / train_teacher.py scripts end to end on tiny BERT models and files in tmp_path."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from transformers import BertConfig, BertForSequenceClassification, BertModel, PretrainedConfig

REPO = Path(__file__).resolve().parents[2]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


distill_glue = _load_script("distill_glue")
train_teacher = _load_script("train_teacher")
# The modules the scripts use (hf_distill.tasks.* when installed, tasks.* in a checkout).
glue_recipe = distill_glue.recipe  # the flow the script runs (tasks/classification/distill.py)
classification = glue_recipe.classification
common = glue_recipe.common

POSITIVE = "good great happy fun love".split()
NEGATIVE = "bad terrible sad boring hate".split()
NEUTRAL = "the a movie film plot story music it this that".split()


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP spinning makes them slow.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------- helpers
def _sentence(rng: random.Random, words: list[str]) -> str:
    return " ".join([rng.choice(words)] + [rng.choice(NEUTRAL) for _ in range(rng.randint(2, 6))])


def _rows(n: int, seed: int, two_columns: bool = False, regression: bool = False) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        words = POSITIVE if positive else NEGATIVE
        row = {"sentence1" if two_columns else "text": _sentence(rng, words)}
        if two_columns:
            row["sentence2"] = _sentence(rng, words)
        row["label"] = (
            (4.0 if positive else 1.0) + rng.random() if regression else ("pos" if positive else "neg")
        )
        rows.append(row)
    return rows


def _write(path: Path, rows: list[dict]) -> str:
    if path.suffix == ".csv":
        import csv

        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:  # jsonl
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _tiny_config(tokenizer, layers: int, **kwargs) -> BertConfig:
    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        **kwargs,
    )


def _save_teacher(path: Path, tokenizer, layers: int = 4, **config_kwargs) -> str:
    torch.manual_seed(0)
    model = BertForSequenceClassification(_tiny_config(tokenizer, layers, **config_kwargs))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _training_flags(output_dir: Path, max_steps: int = 4) -> list[str]:
    return [
        "--output_dir", str(output_dir),
        "--max_steps", str(max_steps),
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "16",
        "--learning_rate", "1e-3",
        "--save_strategy", "no",
        "--logging_steps", "2",
        "--disable_tqdm", "true",
        "--seed", "0",
        "--latency_repeats", "2",
        "--latency_warmup", "1",
    ]  # fmt: skip


def _spec(**overrides) -> object:
    values = dict(
        name="custom",
        text_columns=("text",),
        label_column="label",
        is_regression=False,
        label_values=["neg", "pos"],
        label_names=["neg", "pos"],
        metrics=("accuracy",),
        primary_metric="accuracy",
        eval_splits=("validation",),
        predict_splits=(),
    )
    values.update(overrides)
    return classification.TaskSpec(**values)


# --------------------------------------------------------------------------------------------- metrics
def test_metrics_match_their_formulas():
    references = np.array([1, 0, 1, 1, 0, 0, 1, 0])
    predictions = np.array([1, 0, 0, 1, 1, 0, 1, 0])
    tp, tn, fp, fn = 3, 3, 1, 1
    result = classification.compute_task_metrics(
        predictions, references, ("accuracy", "f1", "matthews_correlation", "combined_score")
    )
    assert result["accuracy"] == pytest.approx((tp + tn) / 8)
    assert result["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert result["matthews_correlation"] == pytest.approx(mcc)
    assert result["combined_score"] == pytest.approx((result["accuracy"] + result["f1"] + mcc) / 3)


def test_regression_metrics_match_their_formulas():
    references = np.array([0.1, 1.5, 2.0, 3.7, 4.9])
    predictions = np.array([0.3, 1.1, 2.8, 3.0, 4.5])
    result = classification.compute_task_metrics(
        predictions, references, ("pearson", "spearmanr", "combined_score")
    )
    pearson = np.corrcoef(predictions, references)[0, 1]
    ranks = np.corrcoef(np.argsort(np.argsort(predictions)), np.argsort(np.argsort(references)))[0, 1]
    assert result["pearson"] == pytest.approx(pearson)
    assert result["spearmanr"] == pytest.approx(ranks)
    assert result["combined_score"] == pytest.approx((pearson + ranks) / 2)


def test_glue_table_uses_the_official_metrics():
    tasks = classification.GLUE_TASKS
    assert set(tasks) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    assert tasks["cola"].metrics == ("matthews_correlation",)
    assert set(tasks["mrpc"].metrics) >= {"accuracy", "f1"} and set(tasks["qqp"].metrics) >= {
        "accuracy",
        "f1",
    }
    assert tasks["stsb"].num_labels == 1 and set(tasks["stsb"].metrics) >= {"pearson", "spearmanr"}
    assert tasks["mnli"].eval_splits == ("validation_matched", "validation_mismatched")
    assert tasks["mnli"].num_labels == 3 and tasks["qnli"].text_columns == ("question", "sentence")


# --------------------------------------------------------------------------------------------- data and labels
def test_resolve_task_from_files_string_int_and_float_labels():
    data_args = classification.DataArguments(train_file="x.csv")
    strings = DatasetDict(
        train=Dataset.from_dict({"id": [1, 2, 3], "review": ["a", "b", "c"], "label": ["b", "a", "b"]})
    )
    spec = classification.resolve_task(strings, data_args)
    assert spec.text_columns == ("review",)  # the int id column is not text
    assert spec.label_values == ["a", "b"] and spec.label_names == ["a", "b"] and not spec.is_regression

    ints = DatasetDict(
        train=Dataset.from_dict({"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [5, 3]})
    )
    spec = classification.resolve_task(ints, data_args)
    assert spec.text_columns == ("sentence1", "sentence2")
    assert spec.label_values == [3, 5] and spec.label_names is None

    floats = DatasetDict(train=Dataset.from_dict({"s": ["a", "b"], "t": ["c", "d"], "label": [0.5, 4.0]}))
    spec = classification.resolve_task(floats, data_args)
    assert spec.is_regression and spec.num_labels == 1 and spec.primary_metric == "combined_score"

    classes = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    glue_like = DatasetDict(train=Dataset.from_dict({"text": ["a"], "label": [1]}, features=classes))
    spec = classification.resolve_task(glue_like, data_args)
    assert spec.label_values == [0, 1] and spec.label_names == ["neg", "pos"]


def test_align_labels_follows_a_named_model_and_names_mismatches():
    spec = _spec()
    named = PretrainedConfig(id2label={0: "pos", 1: "neg"}, label2id={"pos": 0, "neg": 1})
    alignment = classification.align_labels(spec, named)
    assert alignment.label_to_id == {"pos": 0, "neg": 1} and alignment.id2label == {0: "pos", 1: "neg"}

    unnamed = PretrainedConfig(num_labels=2)
    assert classification.align_labels(spec, unnamed).id2label == {0: "neg", 1: "pos"}

    with pytest.raises(ValueError, match=r"3 labels.*train_teacher\.py"):
        classification.align_labels(spec, PretrainedConfig(num_labels=3))
    with pytest.raises(ValueError, match="differ from the data's labels"):
        classification.align_labels(
            spec, PretrainedConfig(id2label={0: "x", 1: "y"}, label2id={"x": 0, "y": 1})
        )
    with pytest.raises(ValueError, match="regression"):
        classification.align_labels(_spec(is_regression=True, label_values=[], label_names=None), unnamed)


@pytest.mark.parametrize(
    ("columns", "flags", "message"),
    [
        (
            {"text": ["a"], "label": ["x"]},
            {"label_column_name": "y"},
            r"Label column 'y' not found.*\['text', 'label'\]",
        ),
        (
            {"text": ["a"], "label": ["x"]},
            {"text_column_names": "body"},
            r"\['body'\] not found.*\['text', 'label'\]",
        ),
        ({"n": [1], "label": ["x"]}, {}, r"No text column found.*\['n', 'label'\]"),
    ],
)
def test_missing_columns_name_the_columns_found(columns, flags, message):
    data_args = classification.DataArguments(train_file="x.csv", **flags)
    with pytest.raises(ValueError, match=message):
        classification.resolve_task(DatasetDict(train=Dataset.from_dict(columns)), data_args)


def test_wrong_task_name_lists_the_valid_ones():
    with pytest.raises(
        ValueError, match=r"Unknown task_name 'sst3'.*cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli"
    ):
        classification.DataArguments(task_name="sst3")


def test_tokenize_maps_labels_and_keeps_unlabelled_test(bert_tokenizer):
    raw = DatasetDict(
        train=Dataset.from_dict({"text": ["good movie", "bad film"], "label": ["pos", "neg"]}),
        test=Dataset.from_dict({"text": ["great plot"]}),
    )
    spec = _spec(predict_splits=("test",), eval_splits=())
    data_args = classification.DataArguments(train_file="x.csv", max_seq_length=8)
    tokenized = classification.tokenize_datasets(raw, spec, bert_tokenizer, {"neg": 1, "pos": 0}, data_args)
    assert tokenized["train"]["labels"] == [0, 1]
    assert "labels" not in tokenized["test"].column_names
    assert tokenized["train"][0]["input_ids"] == bert_tokenizer("good movie")["input_ids"]


# --------------------------------------------------------------------------------------------- end to end
@pytest.fixture
def pair_data(tmp_path):
    return {
        "train": _write(tmp_path / "train.csv", _rows(48, seed=1, two_columns=True)),
        "validation": _write(tmp_path / "validation.csv", _rows(16, seed=2, two_columns=True)),
        "test": _write(tmp_path / "test.csv", _rows(16, seed=3, two_columns=True)),
    }


def test_train_teacher_then_distil_with_report(tmp_path, bert_tokenizer, pair_data):
    """String labels, two text columns, a teacher fine-tuned by train_teacher.py from an encoder without a
    head, then distillation with --compare_no_kd and the report checked against its own numbers."""
    encoder = tmp_path / "encoder"
    torch.manual_seed(0)
    BertModel(_tiny_config(bert_tokenizer, 4)).save_pretrained(encoder)
    bert_tokenizer.save_pretrained(encoder)
    teacher_dir = tmp_path / "teacher"
    teacher_results = train_teacher.main(
        ["--model_name_or_path", str(encoder), "--train_file", pair_data["train"],
         "--validation_file", pair_data["validation"], "--do_train", "--do_eval"]
        + _training_flags(teacher_dir, max_steps=12)[:-4]  # no report flags for train_teacher
    )  # fmt: skip
    assert "eval_accuracy" in teacher_results["eval"]
    teacher_config = json.loads((teacher_dir / "config.json").read_text())
    assert sorted(teacher_config["id2label"].values()) == ["neg", "pos"]

    output = tmp_path / "student"
    results = distill_glue.main(
        ["--teacher_model_name_or_path", str(teacher_dir), "--student_num_layers", "2",
         "--train_file", pair_data["train"], "--validation_file", pair_data["validation"],
         "--test_file", pair_data["test"], "--do_train", "--do_eval", "--do_predict",
         "--compare_no_kd", "--temperature", "2", "--alpha", "0.7", "--hidden_weight", "0.1"]
        + _training_flags(output)
    )  # fmt: skip

    for name in ("train_results.json", "eval_results.json", "all_results.json", "trainer_state.json",
                 "config.json", "model.safetensors", "tokenizer.json", "README.md", "predict_results_custom.txt",
                 "distill_report.json", "distill_report.md", "distill_report.png", "no_kd/model.safetensors"):  # fmt: skip
        assert (output / name).is_file(), name
    student_config = json.loads((output / "config.json").read_text())
    assert student_config["num_hidden_layers"] == 2
    assert student_config["id2label"] == teacher_config["id2label"]
    assert "eval_accuracy" in json.loads((output / "eval_results.json").read_text())

    report = json.loads((output / "distill_report.json").read_text())
    assert report == json.loads(json.dumps(results["report"]))
    assert report["split"] == "test" and report["primary_metric"] == "accuracy"
    models = report["models"]
    assert set(models) == {"teacher", "student", "student_no_kd"}
    all_results = json.loads((output / "all_results.json").read_text())
    assert models["student"]["metrics"]["accuracy"] == pytest.approx(all_results["test_accuracy"])
    assert models["teacher"]["metrics"]["accuracy"] == pytest.approx(all_results["teacher_accuracy"])
    no_kd = json.loads((output / "no_kd" / "all_results.json").read_text())
    assert models["student_no_kd"]["metrics"]["accuracy"] == pytest.approx(no_kd["test_accuracy"])
    teacher = models["teacher"]
    for name in ("student", "student_no_kd"):
        entry = models[name]
        assert entry["retained_pct"] == pytest.approx(100 * entry["primary"] / teacher["primary"])
        for batch in ("1", "32"):
            assert entry["speedup"][batch] == pytest.approx(
                teacher["latency_ms"][batch] / entry["latency_ms"][batch]
            )
        assert entry["compression"] == pytest.approx(teacher["params"] / entry["params"])
        assert entry["params"] < teacher["params"]
    assert teacher["params"] == sum(
        p.numel() for p in BertForSequenceClassification.from_pretrained(teacher_dir).parameters()
    )
    assert (output / "distill_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (output / "distill_report.md").read_text()
    assert "student_no_kd" in markdown and f"{models['student']['retained_pct']:.4g}" in markdown
    assert "Student against teacher" in (output / "README.md").read_text()


def test_one_text_column_int_labels_from_a_yaml_config(tmp_path, bert_tokenizer):
    rows = [{"review": row["text"], "stars": 5 if row["label"] == "pos" else 1} for row in _rows(40, seed=4)]
    train = _write(tmp_path / "train.jsonl", rows[:32])
    validation = _write(tmp_path / "validation.jsonl", rows[32:])
    teacher = _save_teacher(tmp_path / "teacher", bert_tokenizer, layers=3)
    output = tmp_path / "out"
    config = {
        "teacher_model_name_or_path": teacher, "student_layers": "0,2", "train_file": train,
        "validation_file": validation, "label_column_name": "stars", "do_train": True, "do_eval": True,
        "output_dir": str(output), "max_steps": 4, "per_device_train_batch_size": 8, "learning_rate": 1e-3,
        "save_strategy": "no", "disable_tqdm": True, "latency_repeats": 2, "latency_warmup": 1,
    }  # fmt: skip
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(config))

    results = distill_glue.main([str(config_path)])
    assert set(results["eval"]) >= {"eval_accuracy", "eval_f1_macro", "eval_loss"}
    student_config = json.loads((output / "config.json").read_text())
    assert student_config["num_hidden_layers"] == 2 and student_config["id2label"] == {"0": "1", "1": "5"}
    report = json.loads((output / "distill_report.json").read_text())
    assert report["split"] == "validation" and set(report["models"]) == {"teacher", "student"}


def test_pretrained_student_gets_a_head_for_the_data(tmp_path, bert_tokenizer, pair_data):
    labels = {"id2label": {0: "pos", 1: "neg"}, "label2id": {"pos": 0, "neg": 1}}
    teacher = _save_teacher(tmp_path / "teacher", bert_tokenizer, **labels)
    student = _save_teacher(tmp_path / "pretrained_student", bert_tokenizer, layers=1, num_labels=3)
    output = tmp_path / "out"
    results = distill_glue.main(
        ["--teacher_model_name_or_path", teacher, "--student_model_name_or_path", student,
         "--train_file", pair_data["train"], "--validation_file", pair_data["validation"],
         "--do_train", "--do_eval"] + _training_flags(output)
    )  # fmt: skip
    student_config = json.loads((output / "config.json").read_text())
    assert student_config["num_hidden_layers"] == 1
    assert student_config["id2label"] == {"0": "pos", "1": "neg"}  # the teacher's order, a new 2-way head
    assert 0.0 <= results["eval"]["eval_accuracy"] <= 1.0


def test_stsb_style_regression(tmp_path, bert_tokenizer):
    train = _write(tmp_path / "train.jsonl", _rows(32, seed=5, two_columns=True, regression=True))
    validation = _write(tmp_path / "validation.jsonl", _rows(16, seed=6, two_columns=True, regression=True))
    teacher = _save_teacher(tmp_path / "teacher", bert_tokenizer, num_labels=1)
    output = tmp_path / "out"
    results = distill_glue.main(
        ["--teacher_model_name_or_path", teacher, "--student_num_layers", "1", "--train_file", train,
         "--validation_file", validation, "--do_train", "--do_eval"] + _training_flags(output)
    )  # fmt: skip
    assert set(results["eval"]) >= {"eval_pearson", "eval_spearmanr", "eval_combined_score"}
    student_config = json.loads((output / "config.json").read_text())
    assert len(student_config["id2label"]) == 1
    assert student_config["problem_type"] == "regression"
    assert json.loads((output / "distill_report.json").read_text())["primary_metric"] == "combined_score"


# --------------------------------------------------------------------------------------------- errors
@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if a run gets as far as building the trainer."""

    def refuse(*args, **kwargs):
        raise AssertionError("the error should have been raised before training")

    monkeypatch.setattr(glue_recipe, "DistillationTrainer", refuse)


def _distil_flags(teacher: str, data: dict, output: Path, *extra: str) -> list[str]:
    return [
        "--teacher_model_name_or_path", teacher, "--student_num_layers", "2",
        "--train_file", data["train"], "--validation_file", data["validation"],
        "--do_train", "--do_eval", "--output_dir", str(output), *extra,
    ]  # fmt: skip


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize(
    ("extra", "error", "message"),
    [
        (["--task_name", "sst3"], ValueError, r"valid GLUE tasks are cola, sst2"),
        (["--text_column_names", "premise"], ValueError, r"\['premise'\] not found.*sentence1"),
        (
            ["--label_column_name", "gold"],
            ValueError,
            r"Label column 'gold' not found.*\['sentence1', 'sentence2', 'label'\]",
        ),
    ],
)
def test_flag_errors_are_raised_before_training(tmp_path, bert_tokenizer, pair_data, extra, error, message):
    teacher = _save_teacher(
        tmp_path / "teacher", bert_tokenizer, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1}
    )
    with pytest.raises(error, match=message):
        distill_glue.main(_distil_flags(teacher, pair_data, tmp_path / "out", *extra))


@pytest.mark.usefixtures("no_training")
def test_teacher_errors_are_raised_before_training(tmp_path, bert_tokenizer, pair_data):
    three = _save_teacher(tmp_path / "three", bert_tokenizer, num_labels=3)
    with pytest.raises(
        ValueError, match=r"teacher has 3 labels.*2 labels \['neg', 'pos'\].*train_teacher\.py"
    ):
        distill_glue.main(_distil_flags(three, pair_data, tmp_path / "out"))

    encoder = tmp_path / "encoder"  # a pretrained encoder with 2 default labels but no classification head
    BertModel(_tiny_config(bert_tokenizer, 2)).save_pretrained(encoder)
    bert_tokenizer.save_pretrained(encoder)
    with pytest.raises(ValueError, match=r"no trained weights.*classifier.*train_teacher\.py"):
        distill_glue.main(_distil_flags(str(encoder), pair_data, tmp_path / "out"))

    with pytest.raises(
        OSError, match=r"could not be found locally and this machine is offline; pass a local path"
    ):
        distill_glue.main(_distil_flags("someone/not-a-cached-model", pair_data, tmp_path / "out"))
    with pytest.raises(OSError, match=r"does not exist"):
        distill_glue.main(_distil_flags(str(tmp_path / "missing" / "teacher"), pair_data, tmp_path / "out"))


def test_student_flags_are_validated():
    with pytest.raises(ValueError, match="No student given"):
        common.ModelArguments(teacher_model_name_or_path="t")
    with pytest.raises(ValueError, match="not both"):
        common.ModelArguments(
            teacher_model_name_or_path="t", student_model_name_or_path="s", student_num_layers=2
        )
    with pytest.raises(ValueError, match="lists 3 layers but student_num_layers is 2"):
        common.ModelArguments(teacher_model_name_or_path="t", student_num_layers=2, student_layers="0,2,4")


# --------------------------------------------------------------------------------------------- GLUE from the Hub
MNLI_LABELS = ["entailment", "neutral", "contradiction"]


def _fake_mnli(seed: int) -> DatasetDict:
    """GLUE MNLI's layout: premise/hypothesis/label/idx, two validation and two test splits (test labels -1)."""
    rng = random.Random(seed)
    features = Features(
        {
            "premise": Value("string"),
            "hypothesis": Value("string"),
            "label": ClassLabel(names=MNLI_LABELS),
            "idx": Value("int32"),
        }
    )

    def split(n: int, labelled: bool = True) -> Dataset:
        rows = {"premise": [], "hypothesis": [], "label": [], "idx": []}
        for i in range(n):
            label = rng.randrange(3)
            words = [POSITIVE, NEUTRAL, NEGATIVE][label]
            rows["premise"].append(_sentence(rng, NEUTRAL))
            rows["hypothesis"].append(_sentence(rng, words))
            rows["label"].append(label if labelled else -1)
            rows["idx"].append(i)
        return Dataset.from_dict(rows, features=features)

    return DatasetDict(
        train=split(48),
        validation_matched=split(12),
        validation_mismatched=split(10),
        test_matched=split(8, labelled=False),
        test_mismatched=split(6, labelled=False),
    )


def test_glue_task_from_the_hub_mnli_end_to_end(tmp_path, bert_tokenizer, monkeypatch):
    """--task_name mnli with the Hub loader replaced by a local stand-in of the same layout: both validation
    splits are evaluated, both unlabelled test splits predicted with label names, and nothing else is fetched."""
    requested = []

    def fake_load_dataset(name, config=None, **kwargs):
        requested.append((name, config))
        return _fake_mnli(seed=7)

    monkeypatch.setattr(common.loading.datasets, "load_dataset", fake_load_dataset)
    teacher = _save_teacher(
        tmp_path / "teacher",
        bert_tokenizer,
        num_labels=3,
        id2label=dict(enumerate(MNLI_LABELS)),
        label2id={name: i for i, name in enumerate(MNLI_LABELS)},
    )
    output = tmp_path / "out"
    results = distill_glue.main(
        ["--task_name", "mnli", "--teacher_model_name_or_path", teacher, "--student_num_layers", "1",
         "--do_train", "--do_eval", "--do_predict"] + _training_flags(output)
    )  # fmt: skip
    assert requested == [("nyu-mll/glue", "mnli")]
    evaluation = json.loads((output / "eval_results.json").read_text())
    assert evaluation["eval_samples"] == 12 and evaluation["eval_samples_mm"] == 10
    for key in ("eval_accuracy", "eval_accuracy_mm"):
        assert 0.0 <= evaluation[key] <= 1.0
    assert results["eval"]["eval_accuracy_mm"] == evaluation["eval_accuracy_mm"]
    # run_glue's file names; one prediction per test row, as label names
    for name, rows in (("predict_results_mnli.txt", 8), ("predict_results_mnli-mm.txt", 6)):
        lines = (output / name).read_text().splitlines()
        assert lines[0] == "index\tprediction" and len(lines) == rows + 1
        assert {line.split("\t")[1] for line in lines[1:]} <= set(MNLI_LABELS)
    report = json.loads((output / "distill_report.json").read_text())
    assert report["primary_metric"] == "accuracy" and report["split"] == "validation_matched"
    # the model card carries run_glue's card arguments, and no local path as base_model
    from huggingface_hub import ModelCard

    card = ModelCard.load(output / "README.md").data
    assert card.datasets == ["glue"] and card.language == ["en"]
    assert getattr(card, "base_model", None) is None
    assert any(
        result["dataset"]["name"] == "GLUE MNLI" for result in card.to_dict()["model-index"][0]["results"]
    )
