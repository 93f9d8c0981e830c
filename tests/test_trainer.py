"""DistillationTrainer behaviour on tiny models built from configs."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import TEXTS_FOR_TESTS
from datasets import Dataset
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    LlamaConfig,
    LlamaForCausalLM,
    TrainerCallback,
)

from hf_distill import DistillationTrainer, DistillationTrainingArguments
from hf_distill.losses import sparse_distillation_loss

TEXTS = TEXTS_FOR_TESTS[:12]


def bert(tokenizer, *, layers=2, hidden=32, heads=2, labels=2, seed=0, **config):
    torch.manual_seed(seed)
    base = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    base.update(config)
    return BertForSequenceClassification(BertConfig(**base))


def llama(vocab_size, *, layers=2, hidden=32, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def classification_data(tokenizer, n=12):
    rows = tokenizer(TEXTS[:n], truncation=True)
    rows["labels"] = [i % 2 for i in range(n)]
    return Dataset.from_dict(dict(rows))


def lm_data(tokenizer, n=12):
    return Dataset.from_dict(dict(tokenizer(TEXTS[:n])))


def make_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        temperature=2.0,
        alpha=0.5,
        use_cpu=True,
        disable_tqdm=True,
    )
    values.update(overrides)
    return DistillationTrainingArguments(**values)


def classification_trainer(tmp_path, tokenizer, *, student=None, teacher=None, **overrides):
    return DistillationTrainer(
        model=student if student is not None else bert(tokenizer, layers=1, seed=1),
        teacher_model=teacher if teacher is not None else bert(tokenizer, layers=2, seed=2),
        args=make_args(tmp_path, **overrides),
        train_dataset=classification_data(tokenizer),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )


def lm_trainer(tmp_path, tokenizer, *, student=None, teacher=None, teacher_tokenizer="same", **overrides):
    return DistillationTrainer(
        model=student if student is not None else llama(len(tokenizer), layers=1, seed=1),
        teacher_model=teacher if teacher is not None else llama(len(tokenizer), layers=2, seed=2),
        args=make_args(tmp_path, **overrides),
        train_dataset=lm_data(tokenizer),
        processing_class=tokenizer,
        teacher_processing_class=tokenizer if teacher_tokenizer == "same" else teacher_tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )


def reference_kl(student_logits, teacher_logits, temperature):
    """KL(teacher || student) per row at temperature T, times T^2, in float64."""
    log_p_s = F.log_softmax(student_logits.double() / temperature, dim=-1)
    p_t = F.softmax(teacher_logits.double() / temperature, dim=-1)
    return (p_t * (p_t.clamp_min(1e-30).log() - log_p_s)).sum(-1) * temperature**2


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


# ---- arguments ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"temperature": -1.0}, "temperature must be > 0"),
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
        ({"alpha": -0.1}, r"alpha must be in \[0, 1\]"),
        ({"kd_loss": "kl"}, "kd_loss must be one of"),
        ({"jsd_beta": 2.0}, "jsd_beta"),
        ({"hidden_loss": "l1"}, "hidden_loss must be one of"),
        ({"layer_map": "1-2"}, "not a 'student_layer:teacher_layer' pair"),
        ({"layer_map": "1:2,1:3"}, "maps a student layer twice"),
        ({"teacher_dtype": "int8"}, "teacher_dtype must be one of"),
        ({"hidden_weight": -1.0}, "hidden_weight must be >= 0"),
        ({"attention_head_mapping": "max"}, "attention_head_mapping must be one of"),
    ],
)
def test_bad_arguments_raise_before_training(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


def test_layer_map_out_of_range_raises_at_construction(tmp_path, bert_tokenizer):
    with pytest.raises(ValueError, match=r"teacher has 2 layers, so teacher indices must be in \[0, 2\]"):
        classification_trainer(tmp_path, bert_tokenizer, hidden_weight=1.0, layer_map="1:5")
    with pytest.raises(ValueError, match=r"student has 1 layers"):
        classification_trainer(tmp_path, bert_tokenizer, hidden_weight=1.0, layer_map="3:1")


def test_attention_matching_with_different_head_counts_raises(tmp_path, bert_tokenizer):
    student = bert(bert_tokenizer, layers=1, heads=4, seed=1)
    with pytest.raises(
        ValueError, match="student has 4 heads and the teacher 2.*--attention_head_mapping mean"
    ):
        classification_trainer(tmp_path, bert_tokenizer, student=student, attention_weight=1.0)


def test_attention_matching_across_head_counts_compares_head_averaged_maps(tmp_path, bert_tokenizer):
    student = bert(bert_tokenizer, layers=1, heads=4, seed=1)
    teacher = bert(bert_tokenizer, layers=2, heads=2, seed=2)
    trainer = classification_trainer(
        tmp_path,
        bert_tokenizer,
        student=student,
        teacher=teacher,
        alpha=0.0,
        attention_weight=1.0,
        attention_head_mapping="mean",
        layer_map="1:2",
    )
    batch = trainer.data_collator([classification_data(bert_tokenizer)[i] for i in range(4)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    with torch.no_grad():
        student_out = student(**inputs, labels=batch["labels"], output_attentions=True)
        p_t = teacher(**inputs, output_attentions=True).attentions[1].double().mean(1)
    p_s = student_out.attentions[0].double().mean(1)  # (batch, q, k), rows sum to 1
    mask = batch["attention_mask"].bool()
    kl = torch.where(p_t > 0, p_t * (p_t.log() - p_s.clamp_min(1e-300).log()), torch.zeros_like(p_t)).sum(-1)
    expected = student_out.loss.double() + kl[mask].mean()
    torch.testing.assert_close(loss.detach().double(), expected, atol=1e-5, rtol=1e-5)


def test_hidden_matching_on_a_model_without_config_raises(tmp_path, bert_tokenizer):
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)

        def forward(self, input_ids=None, labels=None, attention_mask=None):
            return self.linear(torch.zeros(input_ids.shape[0], 2))

    with pytest.raises(ValueError, match="hidden/attention matching needs the student"):
        DistillationTrainer(
            model=Plain(),
            teacher_model=bert(bert_tokenizer),
            args=make_args(tmp_path, hidden_weight=1.0, task_type="sequence_classification"),
            train_dataset=classification_data(bert_tokenizer),
        )


def test_missing_teacher_raises(tmp_path, bert_tokenizer):
    with pytest.raises(ValueError, match="needs a teacher"):
        DistillationTrainer(model=bert(bert_tokenizer), args=make_args(tmp_path))


# ---- the teacher is a guest --------------------------------------------------------------------------------


def test_teacher_is_frozen_untouched_and_absent_from_checkpoints(tmp_path, bert_tokenizer):
    teacher = bert(bert_tokenizer, layers=2, seed=2)
    before = snapshot(teacher)
    trainer = classification_trainer(
        tmp_path, bert_tokenizer, teacher=teacher, save_strategy="steps", save_steps=3
    )
    student_before = snapshot(trainer.model)
    trainer.train()

    assert not trainer.teacher_model.training
    assert all(not p.requires_grad for p in trainer.teacher_model.parameters())
    for name, tensor in snapshot(trainer.teacher_model).items():
        assert torch.equal(tensor, before[name]), name
    assert any(not torch.equal(t, student_before[n]) for n, t in snapshot(trainer.model).items())

    teacher_ids = {id(p) for p in trainer.teacher_model.parameters()}
    optimized = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert not any(id(p) in teacher_ids for p in optimized)
    assert sum(p.numel() for p in optimized) == sum(p.numel() for p in trainer.model.parameters())

    checkpoint = tmp_path / "out" / "checkpoint-3"
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert set(saved) == set(trainer.model.state_dict())
    optimizer_state = torch.load(checkpoint / "optimizer.pt", weights_only=False)
    assert len(optimizer_state["state"]) == len(list(trainer.model.parameters()))


def test_teacher_dtype_casts_the_teacher(tmp_path, bert_tokenizer):
    trainer = classification_trainer(tmp_path, bert_tokenizer, teacher_dtype="bfloat16", max_steps=1)
    assert all(p.dtype == torch.bfloat16 for p in trainer.teacher_model.parameters())
    trainer.train()
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


# ---- the loss ----------------------------------------------------------------------------------------------


def test_classification_loss_matches_reference_formula(tmp_path, bert_tokenizer):
    trainer = classification_trainer(tmp_path, bert_tokenizer, alpha=0.3, temperature=3.0)
    batch = trainer.data_collator([classification_data(bert_tokenizer)[i] for i in range(4)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))

    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        student_logits = trainer.model(**inputs).logits
        teacher_logits = trainer.teacher_model(**inputs).logits
    ce = F.cross_entropy(student_logits, batch["labels"])
    kd = reference_kl(student_logits, teacher_logits, 3.0).mean()
    assert loss.item() == pytest.approx((0.7 * ce + 0.3 * kd).item(), rel=1e-5)


def test_teacher_logits_are_reordered_to_the_student_label_order(tmp_path, bert_tokenizer):
    names = ["negative", "neutral", "positive"]
    teacher = bert(bert_tokenizer, labels=3, seed=2, id2label=dict(enumerate(names)))
    student_names = ["positive", "negative", "neutral"]
    student = bert(bert_tokenizer, layers=1, labels=3, seed=1, id2label=dict(enumerate(student_names)))
    with torch.no_grad():  # confident heads, so that the label order changes the loss a lot
        teacher.classifier.weight.mul_(50)
        student.classifier.weight.mul_(50)
    trainer = classification_trainer(tmp_path, bert_tokenizer, teacher=teacher, student=student, alpha=1.0)
    batch = trainer.data_collator([classification_data(bert_tokenizer)[i] for i in range(4)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))

    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        student_logits = trainer.model(**inputs).logits
        teacher_logits = trainer.teacher_model(**inputs).logits
    expected = reference_kl(student_logits, teacher_logits[:, [2, 0, 1]], 2.0).mean()
    unordered = reference_kl(student_logits, teacher_logits, 2.0).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert abs(unordered.item() - expected.item()) > 0.1 * expected.item()


def test_label_spaces_that_differ_raise(tmp_path, bert_tokenizer):
    teacher = bert(bert_tokenizer, labels=2, id2label={0: "neg", 1: "pos"})
    student = bert(bert_tokenizer, labels=2, id2label={0: "bad", 1: "good"})
    with pytest.raises(ValueError, match="different names"):
        classification_trainer(tmp_path, bert_tokenizer, teacher=teacher, student=student)
    with pytest.raises(ValueError, match="teacher has 3 labels"):
        classification_trainer(tmp_path, bert_tokenizer, teacher=bert(bert_tokenizer, labels=3))


def test_regression_head_uses_mse_to_the_teacher(tmp_path, bert_tokenizer):
    teacher = bert(bert_tokenizer, labels=1, seed=2)
    student = bert(bert_tokenizer, layers=1, labels=1, seed=1)
    trainer = classification_trainer(tmp_path, bert_tokenizer, teacher=teacher, student=student, alpha=0.4)
    rows = [classification_data(bert_tokenizer)[i] for i in range(4)]
    batch = trainer.data_collator(rows)
    batch["labels"] = torch.tensor([0.5, 1.5, 2.5, 3.5])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        s = trainer.model(**inputs).logits.squeeze(-1)
        t = trainer.teacher_model(**inputs).logits.squeeze(-1)
    expected = 0.6 * ((s - batch["labels"]) ** 2).mean() + 0.4 * ((s - t) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_causal_lm_loss_shifts_and_masks_padding(tmp_path, lm_tokenizer):
    trainer = lm_trainer(tmp_path, lm_tokenizer, alpha=0.5, temperature=1.5)
    batch = trainer.data_collator([lm_data(lm_tokenizer)[i] for i in (0, 1)])  # different lengths: padding
    assert (batch["labels"] == -100).any()
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))

    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        s = trainer.model(**inputs).logits[:, :-1]
        t = trainer.teacher_model(**inputs).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    ce = F.cross_entropy(s[keep], labels[keep])
    kd = reference_kl(s[keep], t[keep], 1.5).mean()
    assert loss.item() == pytest.approx((0.5 * ce + 0.5 * kd).item(), rel=1e-5)


def test_batch_with_nothing_to_learn_gives_zero_loss_not_nan(tmp_path, lm_tokenizer):
    trainer = lm_trainer(tmp_path, lm_tokenizer, hidden_weight=1.0)
    batch = trainer.data_collator([lm_data(lm_tokenizer)[i] for i in (0, 1)])
    batch["labels"][:] = -100
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(0))
    loss_value = loss.item()
    assert not math.isnan(loss_value)
    # only the hidden-state term is left; the token-level terms are exactly zero
    kd_and_ce = trainer._logged_sums["kd_loss"].item() + trainer._logged_sums["ce_loss"].item()
    assert kd_and_ce == 0.0
    loss.backward()
    assert all(not torch.isnan(p.grad).any() for p in trainer.model.parameters() if p.grad is not None)


def test_padded_teacher_vocabulary_is_sliced(tmp_path, lm_tokenizer):
    vocab = len(lm_tokenizer)
    teacher = llama(vocab + 28, seed=2)  # rounded up as many checkpoints are
    trainer = lm_trainer(tmp_path, lm_tokenizer, teacher=teacher, alpha=1.0)
    batch = trainer.data_collator([lm_data(lm_tokenizer)[i] for i in (0, 2)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        s = trainer.model(**inputs).logits[:, :-1]
        t = trainer.teacher_model(**inputs).logits[:, :-1, :vocab]
    keep = batch["labels"][:, 1:] != -100
    # float32 loss against a float64 reference: a small KL is a difference of nearly equal sums, so its relative
    # error in float32 reaches 1e-5 on some CPUs; 2e-4 still tells any wrong slice (which moves it by > 10%).
    assert loss.item() == pytest.approx(reference_kl(s[keep], t[keep], 2.0).mean().item(), rel=2e-4)
    trainer.train()


def test_different_tokenizers_are_rejected(tmp_path, lm_tokenizer, bert_tokenizer):
    with pytest.raises(ValueError, match="student's tokenizer has 105 tokens"):
        lm_trainer(tmp_path, lm_tokenizer, teacher=llama(40))
    with pytest.raises(ValueError, match="different vocabularies"):
        DistillationTrainer(
            model=llama(len(lm_tokenizer)),
            teacher_model=llama(len(lm_tokenizer)),
            args=make_args(tmp_path),
            processing_class=lm_tokenizer,
            teacher_processing_class=bert_tokenizer,
        )


# ---- gradient accumulation and logging ------------------------------------------------------------------------


def test_gradient_accumulation_matches_one_large_batch(tmp_path, lm_tokenizer):
    """Micro-batches with different numbers of label tokens must give the same update as one big batch."""

    def train(batch_size, accumulation):
        trainer = lm_trainer(
            tmp_path,
            lm_tokenizer,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            learning_rate=0.1,
            optim="sgd",
            lr_scheduler_type="constant",
            hidden_weight=0.5,
            output_dir=str(tmp_path / f"ga{accumulation}"),
        )
        trainer.train()
        return snapshot(trainer.model), trainer.state.log_history[0]

    weights_big, log_big = train(8, 1)
    weights_small, log_small = train(4, 2)
    for name, tensor in weights_big.items():
        torch.testing.assert_close(tensor, weights_small[name], rtol=1e-4, atol=1e-6, msg=name)
    for key in ("loss", "kd_loss", "ce_loss"):
        assert log_small[key] == pytest.approx(log_big[key], rel=1e-3), key


def test_loss_components_are_logged_and_add_up(tmp_path, bert_tokenizer):
    trainer = classification_trainer(
        tmp_path, bert_tokenizer, hidden_weight=0.25, alpha=0.6, max_steps=4, logging_steps=2
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        for key in ("ce_loss", "kd_loss", "hidden_loss"):
            assert key in entry and entry[key] >= 0
        combined = 0.4 * entry["ce_loss"] + 0.6 * entry["kd_loss"] + 0.25 * entry["hidden_loss"]
        assert combined == pytest.approx(entry["loss"], rel=2e-3, abs=2e-4)


def test_eval_loss_is_the_students_own_task_loss(tmp_path, bert_tokenizer):
    trainer = classification_trainer(tmp_path, bert_tokenizer, per_device_eval_batch_size=12)
    data = classification_data(bert_tokenizer)
    metrics = trainer.evaluate(eval_dataset=data)
    batch = trainer.data_collator([data[i] for i in range(len(data))])
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert metrics["eval_loss"] == pytest.approx(F.cross_entropy(logits, batch["labels"]).item(), rel=1e-4)


# ---- projections, checkpoints and resuming --------------------------------------------------------------------


class StopAt(TrainerCallback):
    """Simulates a kill right after a given step's checkpoint was written."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def _wide_teacher_trainer(tmp_path, tokenizer, output_dir, callbacks=None):
    teacher = bert(tokenizer, layers=2, hidden=48, heads=2, seed=2)
    student = bert(tokenizer, layers=1, hidden=32, heads=2, seed=1)
    trainer = classification_trainer(
        tmp_path,
        tokenizer,
        teacher=teacher,
        student=student,
        hidden_weight=1.0,
        max_steps=6,
        save_strategy="steps",
        save_steps=2,
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
    )
    for callback in callbacks or []:
        trainer.add_callback(callback)
    return trainer


def test_projections_train_checkpoint_resume_and_stay_out_of_the_model(tmp_path, bert_tokenizer):
    straight = _wide_teacher_trainer(tmp_path, bert_tokenizer, tmp_path / "straight")
    assert len(list(straight.hidden_projections.parameters())) > 0
    projections_before = snapshot(straight.hidden_projections)
    straight.train()
    assert any(
        not torch.equal(t, projections_before[n]) for n, t in snapshot(straight.hidden_projections).items()
    )

    killed = _wide_teacher_trainer(tmp_path, bert_tokenizer, tmp_path / "killed", callbacks=[StopAt(4)])
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    checkpoint = tmp_path / "killed" / "checkpoint-4"
    assert (checkpoint / "distill_projections.safetensors").is_file()
    assert not any("projection" in key for key in load_file(str(checkpoint / "model.safetensors")))
    # a later checkpoint that was cut off while being written must be skipped
    partial = tmp_path / "killed" / "checkpoint-6"
    partial.mkdir()
    (partial / "trainer_state.json").write_text("{ truncated")

    resumed = _wide_teacher_trainer(tmp_path, bert_tokenizer, tmp_path / "killed")
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 6
    for name, tensor in snapshot(straight.model).items():
        torch.testing.assert_close(snapshot(resumed.model)[name], tensor, msg=name)
    for name, tensor in snapshot(straight.hidden_projections).items():
        torch.testing.assert_close(snapshot(resumed.hidden_projections)[name], tensor, msg=name)

    resumed.save_model(str(tmp_path / "final"))
    final_keys = set(load_file(str(tmp_path / "final" / "model.safetensors")))
    assert final_keys == set(resumed.model.state_dict())
    assert not (tmp_path / "final" / "distill_projections.safetensors").exists()


def test_resuming_from_an_incomplete_checkpoint_is_refused(tmp_path, bert_tokenizer):
    trainer = classification_trainer(tmp_path, bert_tokenizer)
    partial = tmp_path / "out" / "checkpoint-2"
    partial.mkdir(parents=True)
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        trainer.train(resume_from_checkpoint=str(partial))
    with pytest.raises(ValueError, match="has no complete checkpoint"):
        trainer.train(resume_from_checkpoint=True)


def test_resume_flag_words_from_the_command_line(tmp_path, bert_tokenizer, monkeypatch):
    """`--resume_from_checkpoint true` resumes (it was read as a folder named "true"); a missing folder names the
    fix; the Trainer itself is the reference for what true means (the newest complete checkpoint)."""
    from hf_distill.tasks.common.running import resume_checkpoint

    first = classification_trainer(tmp_path, bert_tokenizer, save_strategy="steps", save_steps=3)
    first.train()
    monkeypatch.chdir(tmp_path)  # no folder named "true" or "TRUE" here
    for word in ("true", "TRUE"):
        args = make_args(tmp_path, max_steps=4, resume_from_checkpoint=word)
        assert resume_checkpoint(args) is True
        # another learning rate: a run from scratch would log other losses at steps 1-3
        resumed = classification_trainer(tmp_path, bert_tokenizer, max_steps=4, learning_rate=0.5)
        resumed.train(resume_from_checkpoint=word)
        assert resumed.state.global_step == 4
        history = [entry["loss"] for entry in resumed.state.log_history if "loss" in entry]
        assert history[:3] == [entry["loss"] for entry in first.state.log_history if "loss" in entry]
    assert resume_checkpoint(make_args(tmp_path, resume_from_checkpoint="false")) is False
    with pytest.raises(ValueError, match="no such folder.*or true to resume"):
        classification_trainer(tmp_path, bert_tokenizer).train(resume_from_checkpoint="checkpoint-99")


# ---- model card, PEFT ----------------------------------------------------------------------------------------


def test_model_card_names_teacher_settings_size_and_metrics(tmp_path, bert_tokenizer):
    teacher = bert(bert_tokenizer, layers=2, seed=2)
    teacher.config._name_or_path = "org/tiny-teacher"
    trainer = classification_trainer(tmp_path, bert_tokenizer, teacher=teacher, temperature=3.5, alpha=0.7)
    trainer.train()
    trainer.evaluate(eval_dataset=classification_data(bert_tokenizer))
    trainer.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model: org/tiny-teacher" in card
    assert "distilled from **org/tiny-teacher**" in card
    assert "| temperature | 3.5 |" in card and "| alpha | 0.7 |" in card
    student_params = sum(p.numel() for p in trainer.model.parameters())
    teacher_params = sum(p.numel() for p in teacher.parameters())
    assert f"| Parameters | {teacher_params:,} | {student_params:,} |" in card
    assert "eval_loss" in card

    trainer.create_model_card(tags=["text-classification"])
    assert "- text-classification" in (tmp_path / "out" / "README.md").read_text()


def test_push_to_hub_writes_the_card_and_uploads_the_folder(tmp_path, bert_tokenizer, monkeypatch):
    import transformers.trainer as trainer_module

    uploads = []

    class FakeApi:
        def upload_folder(self, **kwargs):
            uploads.append(kwargs)

    trainer = classification_trainer(tmp_path, bert_tokenizer, hub_model_id="me/student")
    trainer.hub_model_id = "me/student"
    monkeypatch.setattr(trainer_module, "hf_api", lambda: FakeApi())
    trainer.train()
    trainer.push_to_hub(blocking=True)
    assert uploads and uploads[0]["repo_id"] == "me/student"
    card = (tmp_path / "out" / "README.md").read_text()
    assert "# student" in card and "hf-distill" in card


def test_lora_student_trains_only_adapters_and_saves_them(tmp_path, bert_tokenizer):
    from peft import LoraConfig, get_peft_model

    student = get_peft_model(
        bert(bert_tokenizer, layers=2, seed=1),
        LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"),
    )
    frozen_before = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    adapters_before = {n: p.detach().clone() for n, p in student.named_parameters() if "lora_B" in n}
    trainer = classification_trainer(tmp_path, bert_tokenizer, student=student, max_steps=2)
    trainer.train()
    for name, param in student.named_parameters():
        if name in frozen_before:
            assert torch.equal(param, frozen_before[name]), name
    assert any(not torch.equal(p, adapters_before[n]) for n, p in student.named_parameters() if "lora_B" in n)
    trainer.save_model()
    saved = os.listdir(tmp_path / "out")
    assert "adapter_model.safetensors" in saved and "model.safetensors" not in saved


def test_peft_teacher_works(tmp_path, bert_tokenizer):
    from peft import LoraConfig, get_peft_model

    teacher = get_peft_model(
        bert(bert_tokenizer, layers=2, seed=2),
        LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
    )
    trainer = classification_trainer(
        tmp_path, bert_tokenizer, teacher=teacher, max_steps=2, hidden_weight=1.0
    )
    trainer.train()
    assert all(not p.requires_grad for p in trainer.teacher_model.parameters())
    assert "kd_loss" in json.dumps(trainer.state.log_history)


# ---- fused, cached and attention variants --------------------------------------------------------------------


def _loss_and_grads(trainer, batch):
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None
    }


def test_fused_kd_loss_matches_the_unfused_loss_and_gradients(tmp_path, lm_tokenizer):
    teacher = llama(len(lm_tokenizer) + 28, seed=2)  # padded vocabulary, sliced on both paths
    batch = None
    results = []
    for fused in (False, True):
        trainer = lm_trainer(
            tmp_path,
            lm_tokenizer,
            teacher=teacher,
            student=llama(len(lm_tokenizer), layers=1, seed=1),
            fused_kd_loss=fused,
            kd_loss="jsd",
            alpha=0.4,
        )
        batch = batch or trainer.data_collator([lm_data(lm_tokenizer)[i] for i in (0, 1, 2)])
        results.append(_loss_and_grads(trainer, batch))
    (loss, grads), (fused_loss, fused_grads) = results
    assert fused_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    assert grads.keys() == fused_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_kd_loss_is_refused_for_classification(tmp_path, bert_tokenizer):
    with pytest.raises(ValueError, match="only causal LMs"):
        classification_trainer(tmp_path, bert_tokenizer, fused_kd_loss=True)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 1.5])
def test_cached_teacher_topk_replaces_the_teacher(tmp_path, lm_tokenizer, temperature):
    """With k = vocabulary size the cache holds the whole distribution, so the loss equals the live teacher's."""
    teacher = llama(len(lm_tokenizer), seed=2)
    live = lm_trainer(tmp_path, lm_tokenizer, teacher=teacher, alpha=0.7, temperature=temperature)
    batch = live.data_collator([lm_data(lm_tokenizer)[i] for i in (0, 3)])
    live_loss, live_grads = _loss_and_grads(live, batch)

    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    top = torch.log_softmax(teacher_logits, -1).topk(len(lm_tokenizer), dim=-1)
    cached_batch = dict(batch, teacher_topk_logprobs=top.values, teacher_topk_indices=top.indices)
    cached = DistillationTrainer(
        model=llama(len(lm_tokenizer), layers=1, seed=1),
        teacher_model=None,
        args=make_args(
            tmp_path, alpha=0.7, temperature=temperature, teacher_logits_cache=str(tmp_path / "cache")
        ),
        processing_class=lm_tokenizer,
    )
    cached_loss, cached_grads = _loss_and_grads(cached, cached_batch)
    assert cached_loss.item() == pytest.approx(live_loss.item(), rel=1e-4)
    for name, grad in live_grads.items():
        torch.testing.assert_close(cached_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_cached_teacher_without_labels_is_pure_kd_over_the_attended_positions(tmp_path, lm_tokenizer):
    student = llama(len(lm_tokenizer), layers=1, seed=1)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=None,
        args=make_args(tmp_path, alpha=0.7, teacher_logits_cache=str(tmp_path / "cache")),
        processing_class=lm_tokenizer,
    )
    collator = DataCollatorForLanguageModeling(lm_tokenizer, mlm=False)
    batch = collator([lm_data(lm_tokenizer)[i] for i in (0, 3)])  # two lengths: the second row is padded
    batch.pop("labels")
    with torch.no_grad():
        teacher_logits = llama(len(lm_tokenizer), seed=2)(input_ids=batch["input_ids"]).logits
    top = torch.log_softmax(teacher_logits, -1).topk(5, dim=-1)
    # a remaining mass unlike 1 - sum(exp(top k)), so the loss shows whether the stored column was used
    tail = torch.full(top.values.shape[:-1], math.log(0.05))
    batch = dict(
        batch, teacher_topk_logprobs=top.values, teacher_topk_indices=top.indices, teacher_tail_logmass=tail
    )
    loss, _ = _loss_and_grads(trainer, batch)

    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # position t predicts token t + 1: it counts where that next token is attended
    mask = torch.nn.functional.pad(batch["attention_mask"][:, 1:].bool(), (0, 1), value=False)
    assert not mask.all()
    options = {"temperature": 2.0, "mask": mask, "tail_temperature": 2.0}
    expected = sparse_distillation_loss(logits, top.values, top.indices, teacher_tail_logmass=tail, **options)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    derived = sparse_distillation_loss(logits, top.values, top.indices, **options)
    assert abs(derived.item() - expected.item()) > 1e-3


# Multi-label heads are refused with a cache (test_trainer_objectives.py): top-k softmax mass is not their target.
@pytest.mark.parametrize("problem_type", ["single_label_classification"])
def test_cached_teacher_for_sequence_classification_keeps_its_own_hard_loss(
    tmp_path, bert_tokenizer, problem_type
):
    """Cached top-k columns over a classifier's labels: the hard loss stays the task's (cross-entropy or BCE),
    averaged over examples, mixed with the sparse KD."""
    student = bert(bert_tokenizer, labels=3, problem_type=problem_type)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=None,
        args=make_args(tmp_path, alpha=0.7, teacher_logits_cache=str(tmp_path / "cache")),
    )
    torch.manual_seed(3)
    input_ids = torch.randint(5, len(bert_tokenizer), (4, 6))
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones(4, 6, dtype=torch.long)}
    if problem_type == "multi_label_classification":
        labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    else:
        labels = torch.tensor([0, 2, 1, 2])
    top = torch.log_softmax(torch.randn(4, 3) * 2, -1).topk(2, dim=-1)
    batch = dict(inputs, labels=labels, teacher_topk_logprobs=top.values, teacher_topk_indices=top.indices)
    loss, _ = _loss_and_grads(trainer, batch)

    with torch.no_grad():
        logits = student(**inputs).logits
    if problem_type == "multi_label_classification":
        hard = F.binary_cross_entropy_with_logits(logits, labels)
    else:
        hard = F.cross_entropy(logits, labels)
    kd = sparse_distillation_loss(logits, top.values, top.indices, temperature=2.0)
    assert loss.item() == pytest.approx((0.3 * hard + 0.7 * kd).item(), rel=1e-5)


def test_cached_teacher_columns_survive_the_dataloader_and_train(tmp_path, lm_tokenizer):
    data = lm_data(lm_tokenizer, n=8)
    data = data.map(lambda row: {"input_ids": (row["input_ids"] + [1] * 6)[:6]})
    data = data.map(lambda row: {"attention_mask": [1] * 6, "labels": row["input_ids"]})
    k = 4
    data = data.map(
        lambda row: {
            "teacher_topk_logprobs": [[math.log(0.5)] + [math.log(0.1)] * (k - 1)] * 6,
            "teacher_topk_indices": [list(range(2, 2 + k))] * 6,
        }
    )
    trainer = DistillationTrainer(
        model=llama(len(lm_tokenizer), layers=1, seed=1),
        teacher_model=None,
        args=make_args(tmp_path, teacher_logits_cache=str(tmp_path / "cache"), max_steps=2),
        train_dataset=data,
        processing_class=lm_tokenizer,
    )
    trainer.train()
    assert all("kd_loss" in entry for entry in trainer.state.log_history if "loss" in entry)


def test_cache_cannot_stand_in_for_hidden_matching(tmp_path):
    with pytest.raises(ValueError, match="teacher_logits_cache holds only"):
        make_args(tmp_path, teacher_logits_cache="cache", hidden_weight=1.0)


def test_attention_matching_trains_and_logs(tmp_path, bert_tokenizer):
    trainer = classification_trainer(
        tmp_path, bert_tokenizer, attention_weight=1.0, hidden_weight=0.5, max_steps=2
    )
    assert trainer.model.config._attn_implementation == "eager"
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(entry["attention_loss"] >= 0 and "hidden_loss" in entry for entry in logged)


def test_bf16_mixed_precision_with_a_bf16_teacher(tmp_path, lm_tokenizer):
    trainer = lm_trainer(
        tmp_path, lm_tokenizer, bf16=True, teacher_dtype="bfloat16", kd_loss="reverse_kl", max_steps=2
    )
    assert next(trainer.teacher_model.parameters()).dtype == torch.bfloat16
    batch = trainer.data_collator([lm_data(lm_tokenizer)[i] for i in (0, 1)])
    trainer.model.train()
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(trainer.model, dict(batch))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    trainer.train()
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)


def test_on_policy_steps_train_on_student_samples_scored_by_the_teacher(tmp_path, lm_tokenizer, monkeypatch):
    import hf_distill.training.on_policy as on_policy

    prompts, completions = (
        ["the movie was", "i love", "the cat and", "a very"],
        ["good", "this film", "the dog", "happy story"],
    )
    rows = []
    for prompt, completion in zip(prompts, completions):
        prompt_ids = lm_tokenizer(prompt)["input_ids"]
        completion_ids = lm_tokenizer(completion, add_special_tokens=False)["input_ids"]
        ids = prompt_ids + completion_ids
        rows.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * len(ids),
                "labels": [-100] * len(prompt_ids) + completion_ids,
            }
        )
    sampled, teacher_inputs = [], []
    real = on_policy.student_completions

    def spy(model, batch, **kwargs):
        new_batch = real(model, batch, **kwargs)
        sampled.append(new_batch["input_ids"])
        return new_batch

    monkeypatch.setattr(on_policy, "student_completions", spy)
    trainer = lm_trainer(tmp_path, lm_tokenizer, lmbda=1.0, on_policy_max_new_tokens=3, max_steps=2)
    trainer.train_dataset = Dataset.from_list(rows)
    trainer.data_collator = DataCollatorForSeq2Seq(lm_tokenizer, padding=True)
    trainer.teacher_model.register_forward_hook(
        lambda module, args, kwargs, out: teacher_inputs.append(kwargs["input_ids"]), with_kwargs=True
    )
    trainer.train()
    assert len(sampled) == 2 and len(teacher_inputs) == 2
    for batch_ids, seen in zip(sampled, teacher_inputs):
        assert torch.equal(batch_ids, seen)
    assert all(math.isfinite(entry["kd_loss"]) for entry in trainer.state.log_history if "loss" in entry)

    # lmbda = 0.5 decides per step from the seed: the same steps on every run
    half = lm_trainer(tmp_path, lm_tokenizer, lmbda=0.5)
    decisions = []
    for step in range(20):
        half.state.global_step = step
        decisions.append(half._on_policy_step())
    assert decisions == [half._on_policy_step() for half.state.global_step in range(20)]
    assert 0 < sum(decisions) < 20
