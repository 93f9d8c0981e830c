"""The model card (README.md) that DistillationTrainer writes, read back with huggingface_hub.

References are independent of hf_distill: huggingface_hub's own parser and repo-id validation, the model-index that
transformers' `TrainingSummary` builds for a plain Trainer, the metrics `trainer.evaluate()` returned, and the
adapter_config.json PEFT writes. Nothing here reaches the Hub (conftest sets offline mode).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import yaml
from conftest import TEXTS_FOR_TESTS
from datasets import Dataset, DatasetInfo, NamedSplit
from huggingface_hub import ModelCard, metadata_load
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.modelcard import TrainingSummary

from hf_distill import DistillationTrainer, DistillationTrainingArguments
from hf_distill.reporting.model_card import is_hub_repo_id

TEXTS = TEXTS_FOR_TESTS[:8]


def bert(tokenizer, *, layers, seed):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def llama(vocab_size, *, layers, seed):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def classification_data(tokenizer, info=None, split=None):
    rows = dict(tokenizer(TEXTS, truncation=True))
    rows["labels"] = [i % 2 for i in range(len(TEXTS))]
    return Dataset.from_dict(rows, info=info, split=split)


def accuracy(prediction):
    return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}


def make_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=2,
        save_strategy="no",
        report_to="none",
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
    )
    values.update(overrides)
    return DistillationTrainingArguments(**values)


def classification_trainer(
    tmp_path, tokenizer, *, teacher=None, student=None, eval_dataset=None, **overrides
):
    return DistillationTrainer(
        model=student if student is not None else bert(tokenizer, layers=1, seed=1),
        teacher_model=teacher if teacher is not None else bert(tokenizer, layers=2, seed=2),
        args=make_args(tmp_path, **overrides),
        train_dataset=classification_data(tokenizer),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
    )


def load_card(tmp_path):
    """The card as huggingface_hub reads it (raises on metadata it cannot parse) and its raw YAML block."""
    path = tmp_path / "out" / "README.md"
    card = ModelCard.load(path)
    raw = yaml.safe_load(path.read_text().split("---\n")[1])
    return card, raw


# ---- base_model --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("google-bert/bert-base-uncased", True),
        ("org/tiny-teacher", True),
        ("./teachers/bbc", False),  # fails huggingface_hub's validation
        ("teacher_glue", False),  # valid for huggingface_hub, but no owner: a local folder's name
        ("/abs/teachers/bbc", False),
        ("~/teachers/bbc", False),
        ("org/bad--name", False),
        ("", False),
        (None, False),
    ],
)
def test_is_hub_repo_id(name, expected):
    assert is_hub_repo_id(name) is expected


def test_an_existing_local_folder_is_not_a_repo_id(tmp_path, monkeypatch):
    (tmp_path / "teachers" / "bbc").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_hub_repo_id("teachers/bbc")


@pytest.mark.parametrize("teacher_dir", ["./teachers/bbc", "teacher_glue", "teachers/bbc"])
def test_local_teacher_is_described_in_text_not_base_model(
    tmp_path, monkeypatch, bert_tokenizer, teacher_dir
):
    monkeypatch.chdir(tmp_path)
    bert(bert_tokenizer, layers=2, seed=2).save_pretrained(teacher_dir)
    teacher = BertForSequenceClassification.from_pretrained(teacher_dir)
    trainer = classification_trainer(tmp_path, bert_tokenizer, teacher=teacher)
    trainer.train()
    trainer.save_model()

    card, raw = load_card(tmp_path)
    assert "base_model" not in raw and card.data.base_model is None
    assert card.data.library_name == "transformers"
    assert f"distilled from **{teacher_dir}**" in card.text
    assert f"The teacher, `{teacher_dir}`, is a local path" in card.text


def test_hub_teacher_is_base_model(tmp_path, bert_tokenizer):
    teacher = bert(bert_tokenizer, layers=2, seed=2)
    teacher.config._name_or_path = "org/tiny-teacher"
    trainer = classification_trainer(tmp_path, bert_tokenizer, teacher=teacher)
    trainer.save_model()
    card, _ = load_card(tmp_path)
    assert card.data.base_model == "org/tiny-teacher"


def test_finetuned_from_that_is_a_local_path_is_left_out(tmp_path, bert_tokenizer):
    teacher = bert(bert_tokenizer, layers=2, seed=2)
    teacher.config._name_or_path = "org/tiny-teacher"
    trainer = classification_trainer(tmp_path, bert_tokenizer, teacher=teacher)
    trainer.create_model_card(finetuned_from="./checkpoints/base")
    card, raw = load_card(tmp_path)
    # An explicit finetuned_from replaces the guess from the teacher, as in Trainer; a path is only described.
    assert "base_model" not in raw
    assert "fine-tuned from `./checkpoints/base`" in card.text


# ---- names: Hub ids and folder names, never a path of this machine -------------------------------------------

ABSOLUTE_PATH = re.compile(r"(?<![\w:/.])(?:/|~/|[A-Za-z]:\\)[\w.-]+[/\\]")


def assert_no_machine_path(tmp_path) -> None:
    text = (tmp_path / "out" / "README.md").read_text()
    assert str(tmp_path) not in text
    assert not ABSOLUTE_PATH.search(text), ABSOLUTE_PATH.search(text)


def test_absolute_paths_are_named_by_their_folder(tmp_path, bert_tokenizer):
    teacher_dir = tmp_path / "teachers" / "bbc_teacher"
    bert(bert_tokenizer, layers=2, seed=2).save_pretrained(teacher_dir)
    teacher = BertForSequenceClassification.from_pretrained(str(teacher_dir))  # absolute, as scripts pass it
    trainer = classification_trainer(tmp_path, bert_tokenizer, teacher=teacher)
    trainer.create_model_card(finetuned_from=str(tmp_path / "stages" / "pruned"))

    card, raw = load_card(tmp_path)
    assert_no_machine_path(tmp_path)
    with open(tmp_path / "out" / "README.md", encoding="utf-8") as handle:
        assert metadata_load(handle.name) == raw  # huggingface_hub's own reader of the metadata block
    assert "base_model" not in raw
    assert "distilled from **bbc_teacher**" in card.text and "| Model | bbc_teacher | out |" in card.text
    assert "fine-tuned from `pruned`" in card.text


def test_teacher_name_and_parameters_describe_the_teacher_a_stand_in_was_made_from(tmp_path, bert_tokenizer):
    """scripts/compress.py distils from a vocabulary-pruned view of its teacher: the card names the real one."""
    trainer = classification_trainer(tmp_path, bert_tokenizer)
    trainer.create_model_card(
        teacher_name="org/real-teacher", teacher_parameters=22_713_216, model_name="distilled"
    )
    card, raw = load_card(tmp_path)
    assert card.text.lstrip().startswith("# distilled\n")
    assert "distilled from **org/real-teacher**" in card.text
    assert "| Parameters | 22,713,216 |" in card.text and "of the teacher's 22.7M" in card.text
    assert card.data.base_model == "org/real-teacher"  # a Hub id is linked, as for a live Hub teacher
    trainer.save_model()  # later saves keep what create_model_card was told
    again, _ = load_card(tmp_path)
    assert "distilled from **org/real-teacher**" in again.text


# ---- Trainer.create_model_card's arguments and model-index ---------------------------------------------------


def test_create_model_card_arguments_are_honoured_like_trainer(tmp_path, bert_tokenizer):
    eval_data = classification_data(bert_tokenizer)
    trainer = classification_trainer(tmp_path, bert_tokenizer, eval_dataset=eval_data)
    trainer.train()
    metrics = trainer.evaluate()
    tags = ["my-tag: v1", "yes", "1.0", "text-classification"]
    arguments = dict(
        language="en",
        license="mit",
        tags=list(tags),
        model_name="tiny-student",
        finetuned_from="google-bert/bert-base-uncased",
        tasks="text-classification",
        dataset_tags="glue",
        dataset="GLUE MRPC",
        dataset_args="mrpc",
    )
    trainer.create_model_card(**arguments)

    card, raw = load_card(tmp_path)
    assert card.data.base_model == "google-bert/bert-base-uncased"
    assert card.data.language == ["en"] and card.data.license == "mit" and card.data.datasets == ["glue"]
    # Every tag reads back as the same string (unquoted, these would be a mapping, a bool and a float).
    assert all(isinstance(tag, str) for tag in raw["tags"])
    assert set(tags) | {"hf-distill", "distillation"} <= set(raw["tags"])
    assert "on the GLUE MRPC dataset" in card.text

    # model-index as transformers builds it for a plain Trainer with the same arguments.
    reference = TrainingSummary.from_trainer(trainer, **arguments).create_metadata()
    (reference_result,) = reference["model-index"][0]["results"]
    (result,) = raw["model-index"][0]["results"]
    assert raw["model-index"][0]["name"] == "tiny-student"
    assert result["task"] == reference_result["task"]
    assert {k: result["dataset"][k] for k in ("name", "type")} == {
        k: reference_result["dataset"][k] for k in ("name", "type")
    }
    assert result["metrics"] == reference_result["metrics"]
    assert raw["metrics"] == reference["metrics"] == ["accuracy"]
    (eval_result,) = card.data.eval_results
    assert eval_result.metric_value == pytest.approx(metrics["eval_accuracy"])

    # A later save_model (the scripts save again to add the report) keeps what create_model_card was told.
    trainer.save_model()
    card_again, raw_again = load_card(tmp_path)
    assert raw_again["model-index"] == raw["model-index"]
    assert card_again.data.base_model == "google-bert/bert-base-uncased" and card_again.data.license == "mit"


def test_model_index_from_a_hub_dataset_matches_trainer(tmp_path, bert_tokenizer):
    info = DatasetInfo(builder_name="glue", config_name="mrpc")
    eval_data = classification_data(bert_tokenizer, info=info, split=NamedSplit("validation"))
    trainer = classification_trainer(tmp_path, bert_tokenizer, eval_dataset=eval_data)
    trainer.train()
    trainer.evaluate()
    trainer.save_model()

    card, raw = load_card(tmp_path)
    reference = TrainingSummary.from_trainer(trainer).create_metadata()
    (reference_result,) = reference["model-index"][0]["results"]
    (result,) = raw["model-index"][0]["results"]
    assert (
        result["task"]
        == reference_result["task"]
        == {"type": "text-classification", "name": "Text Classification"}
    )
    assert result["dataset"]["type"] == reference_result["dataset"]["type"] == "glue"
    assert result["dataset"]["config"] == reference_result["dataset"]["config"] == "mrpc"
    assert result["dataset"]["split"] == reference_result["dataset"]["split"] == "validation"
    assert result["metrics"] == reference_result["metrics"]
    assert card.data.datasets == reference["datasets"] == ["glue"]


def test_no_model_index_without_a_dataset(tmp_path, bert_tokenizer):
    trainer = classification_trainer(
        tmp_path, bert_tokenizer, eval_dataset=classification_data(bert_tokenizer)
    )
    trainer.evaluate()
    trainer.save_model()
    card, raw = load_card(tmp_path)
    # A result without a dataset is rejected by the Hub; TrainingSummary drops it the same way.
    assert "model-index" not in raw
    assert "| eval_accuracy |" in card.text


# ---- an existing README ----------------------------------------------------------------------------------------


def test_existing_readme_metadata_is_merged(tmp_path, bert_tokenizer):
    readme = tmp_path / "out" / "README.md"
    readme.parent.mkdir(parents=True)
    readme.write_text(
        "---\nlicense: apache-2.0\npipeline_tag: text-classification\nbase_model: ./old/teacher\n"
        "tags:\n- custom\n- my-tag: v1\n---\n\n# old\n"
    )
    trainer = classification_trainer(tmp_path, bert_tokenizer)
    trainer.save_model()

    card, raw = load_card(tmp_path)
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "text-classification"
    assert "base_model" not in raw  # computed for this run, never kept
    # The unquoted "my-tag: v1" of an old card is a mapping and is dropped; the string tags are kept.
    assert "custom" in raw["tags"] and all(isinstance(tag, str) for tag in raw["tags"])
    assert "# old" not in card.text


# ---- PEFT students -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base_name", ["org/tiny-llama", ""])
def test_lora_student_keeps_a_peft_card(tmp_path, lm_tokenizer, base_name):
    from peft import LoraConfig, get_peft_model

    base = llama(len(lm_tokenizer), layers=1, seed=1)
    base.config._name_or_path = base_name
    base.name_or_path = base_name
    student = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    teacher = llama(len(lm_tokenizer), layers=2, seed=2)
    teacher.config._name_or_path = "org/tiny-teacher"
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, max_steps=1),
        train_dataset=Dataset.from_dict(dict(lm_tokenizer(TEXTS))),
        processing_class=lm_tokenizer,
        data_collator=DataCollatorForLanguageModeling(lm_tokenizer, mlm=False),
    )
    trainer.train()
    trainer.save_model()

    card, raw = load_card(tmp_path)
    adapter_config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert card.data.library_name == "peft"
    assert card.data.pipeline_tag == "text-generation"  # written by PEFT's save_pretrained, kept
    assert {"lora", "hf-distill"} <= set(raw["tags"])
    if base_name:
        assert card.data.base_model == adapter_config["base_model_name_or_path"] == base_name
        assert f"base_model:adapter:{base_name}" in raw["tags"]
    else:
        assert "base_model" not in raw
        assert not any(tag.startswith("base_model:") for tag in raw["tags"])
    assert "PEFT adapter" in card.text and "distilled from **org/tiny-teacher**" in card.text
