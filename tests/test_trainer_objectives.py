"""Each training objective of DistillationTrainer checked against an independent reference: transformers' own
heads and LabelSmoother, torch's F.kl_div and cross-entropy, float64 formulas written here, or invariants."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from test_trainer import TEXTS, bert, classification_data, llama, lm_data, make_args
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertModel,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    LlamaForCausalLM,
    default_data_collator,
)
from transformers.trainer_pt_utils import LabelSmoother

from hf_distill import DistillationTrainer, create_student


def _compute(trainer, batch):
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _kl64(student_logits, teacher_logits, temperature):
    """KL(p_t || p_s) per row at temperature T, times T^2, via torch's F.kl_div in float64."""
    log_p_s = F.log_softmax(student_logits.double() / temperature, -1)
    log_p_t = F.log_softmax(teacher_logits.double() / temperature, -1)
    return F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1) * temperature**2


# ---- 2. the task is read from what the model is -----------------------------------------------------------------


class MyLlamaForCausalLM(LlamaForCausalLM):
    """What a trust_remote_code model or a user's subclass looks like: a causal LM outside the auto mappings."""


def test_causal_lm_subclass_trains_on_the_next_token(tmp_path, lm_tokenizer):
    student = llama(len(lm_tokenizer), layers=1, seed=1)
    student.__class__ = MyLlamaForCausalLM
    trainer = DistillationTrainer(
        model=student,
        teacher_model=llama(len(lm_tokenizer), seed=2),
        args=make_args(tmp_path, alpha=0.0),
        processing_class=lm_tokenizer,
        teacher_processing_class=lm_tokenizer,
    )
    batch = DataCollatorForLanguageModeling(lm_tokenizer, mlm=False)(
        [lm_data(lm_tokenizer)[i] for i in (0, 3)]
    )
    loss, _ = _compute(trainer, batch)
    with torch.no_grad():
        # transformers' own causal-LM loss (it shifts the labels itself) is the reference
        reference = LlamaForCausalLM.forward(
            student,
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        ).loss
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        unshifted = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert abs(loss.item() - unshifted.item()) > 1e-3  # the old, unshifted objective: 500x the tolerance away


class TinyDecoder(LlamaForCausalLM):
    """A causal LM whose class name transformers' loss mapping does not know (its `loss_type` is None)."""


def test_causal_lm_under_an_unknown_name_is_normalised_by_its_next_token_targets(tmp_path, lm_tokenizer):
    """Trained through `train()`, so the Trainer's own label count (`num_items_in_batch`) divides the CE: it must
    count the next-token targets (labels[:, 1:]), as transformers' causal-LM loss does, not every label."""
    base = llama(len(lm_tokenizer), layers=1, seed=1)
    student = TinyDecoder(base.config)
    student.load_state_dict(base.state_dict())
    assert student.loss_type is None
    data = lm_data(lm_tokenizer, n=4)
    collator = DataCollatorForLanguageModeling(lm_tokenizer, mlm=False)
    batch = collator([data[i] for i in range(4)])
    with torch.no_grad():
        reference = LlamaForCausalLM.forward(
            student,
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        ).loss.item()
    trainer = DistillationTrainer(
        model=student,
        teacher_model=llama(len(lm_tokenizer), seed=2),
        args=make_args(tmp_path, alpha=0.0, max_steps=1, per_device_train_batch_size=4, learning_rate=1e-3),
        train_dataset=data,
        data_collator=collator,
        processing_class=lm_tokenizer,
        teacher_processing_class=lm_tokenizer,
    )
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["ce_loss"] == pytest.approx(reference, rel=1e-5)
    assert logged["loss"] == pytest.approx(reference, rel=1e-5)


def test_loss_components_are_logged_unrounded(tmp_path, bert_tokenizer):
    """A KD term of order 1e-3 must keep its digits in the logs (it was rounded to 4 decimals)."""
    teacher = bert(bert_tokenizer, seed=2)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.classifier.bias[0] += 0.1
    data = classification_data(bert_tokenizer, n=4)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, alpha=1.0, max_steps=1, learning_rate=1e-6),
        train_dataset=data,
        processing_class=bert_tokenizer,
        data_collator=DataCollatorWithPadding(bert_tokenizer),
    )
    rows = DataCollatorWithPadding(bert_tokenizer)(
        [{k: data[i][k] for k in ("input_ids", "attention_mask")} for i in range(4)]
    )
    with torch.no_grad():
        reference = _kl64(student(**rows).logits, teacher(**rows).logits, 2.0).mean().item()
    assert 1e-4 < reference < 1e-2  # 4 decimals would keep one or two digits of it
    trainer.train()
    assert trainer.state.log_history[0]["kd_loss"] == pytest.approx(reference, rel=1e-3)


class _Plain(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, vocab)

    def forward(self, input_ids=None, attention_mask=None):
        from transformers.modeling_outputs import CausalLMOutput

        return CausalLMOutput(logits=self.embed(input_ids))


def test_a_model_whose_task_cannot_be_told_needs_task_type(tmp_path, lm_tokenizer):
    vocab = len(lm_tokenizer)
    with pytest.raises(ValueError, match="Set DistillationTrainingArguments.task_type"):
        DistillationTrainer(model=_Plain(vocab), teacher_model=_Plain(vocab), args=make_args(tmp_path))
    student = _Plain(vocab)
    trainer = DistillationTrainer(
        model=student, teacher_model=_Plain(vocab), args=make_args(tmp_path, alpha=0.0, task_type="causal_lm")
    )
    batch = DataCollatorForLanguageModeling(lm_tokenizer, mlm=False)(
        [lm_data(lm_tokenizer)[i] for i in (0, 3)]
    )
    loss, _ = _compute(trainer, batch)
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    assert loss.item() == pytest.approx(F.cross_entropy(logits.transpose(1, 2), labels).item(), rel=1e-5)
    with pytest.raises(ValueError, match="task_type must be one of"):
        make_args(tmp_path, task_type="lm")


def test_a_teacher_with_another_head_is_refused(tmp_path, lm_tokenizer, bert_tokenizer):
    with pytest.raises(ValueError, match="the teacher .* is a sequence model and the student .* a causal_lm"):
        DistillationTrainer(
            model=llama(len(lm_tokenizer)), teacher_model=bert(bert_tokenizer), args=make_args(tmp_path)
        )


# ---- 4. multi-label heads: per-label Bernoulli KL ------------------------------------------------------------------


def _bernoulli_kl64(student_logits, teacher_logits, temperature):
    p_s = torch.sigmoid(student_logits.double() / temperature)
    p_t = torch.sigmoid(teacher_logits.double() / temperature)
    per_label = p_t * (p_t / p_s).log() + (1 - p_t) * ((1 - p_t) / (1 - p_s)).log()
    return per_label.mean(-1) * temperature**2  # (B,)


def test_multi_label_kd_sees_a_shift_that_softmax_kl_cannot(tmp_path, bert_tokenizer):
    teacher = bert(bert_tokenizer, labels=4, problem_type="multi_label_classification", seed=2)
    student, twin = copy.deepcopy(teacher), copy.deepcopy(teacher)
    with torch.no_grad():
        student.classifier.bias += (
            5.0  # every logit + 5: softmax over labels unchanged, every sigmoid changed
        )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, alpha=1.0))
    rows = bert_tokenizer(TEXTS[:4], padding=True, return_tensors="pt")
    batch = dict(rows)
    loss, _ = _compute(trainer, batch)
    with torch.no_grad():
        s, t = student(**rows).logits, teacher(**rows).logits
    assert _kl64(s, t, 2.0).abs().max().item() < 1e-6  # the old objective: blind to the shift
    assert loss.item() == pytest.approx(_bernoulli_kl64(s, t, 2.0).mean().item(), rel=1e-5)
    assert loss.item() > 0.1

    equal = DistillationTrainer(model=twin, teacher_model=teacher, args=make_args(tmp_path, alpha=1.0))
    loss, grads = _compute(equal, batch)
    assert abs(loss.item()) <= 1e-6
    assert max(g.abs().max().item() for g in grads.values()) <= 1e-6


def test_a_multi_label_student_cannot_use_a_softmax_cache(tmp_path, bert_tokenizer):
    student = bert(bert_tokenizer, labels=3, problem_type="multi_label_classification")
    with pytest.raises(ValueError, match="cannot stand in for a multi-label teacher"):
        DistillationTrainer(
            model=student, args=make_args(tmp_path, teacher_logits_cache=str(tmp_path / "cache"))
        )


# ---- 5. vocabularies of different sizes ------------------------------------------------------------------------


def test_a_larger_teacher_vocabulary_needs_the_teachers_tokenizer(tmp_path, lm_tokenizer):
    vocab = len(lm_tokenizer)
    teacher = llama(5000, seed=2)  # a GPT-2-like teacher vocabulary: its first rows are other tokens
    common = dict(model=llama(vocab, seed=1), teacher_model=teacher, args=make_args(tmp_path))
    with pytest.raises(
        ValueError, match=f"has 5000 rows and the student's {vocab}.*teacher_processing_class"
    ):
        DistillationTrainer(**common, processing_class=lm_tokenizer)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    other = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(5000)}, unk_token="t0"))
    )
    with pytest.raises(ValueError, match="teacher's tokenizer has 5000 tokens"):
        DistillationTrainer(**common, processing_class=lm_tokenizer, teacher_processing_class=other)


# ---- 6. on-policy steps are the divergence alone ------------------------------------------------------------


def _prompt_completion_rows(tokenizer):
    rows = []
    for prompt, completion in [
        ("the movie was", "good"),
        ("i love", "this film"),
        ("a very", "happy story"),
    ] * 2:
        prompt_ids = tokenizer(prompt)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        ids = prompt_ids + completion_ids
        rows.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * len(ids),
                "labels": [-100] * len(prompt_ids) + completion_ids,
            }
        )
    return Dataset.from_list(rows)


def test_on_policy_steps_log_loss_equal_to_kd_loss(tmp_path, lm_tokenizer):
    from transformers import DataCollatorForSeq2Seq

    trainer = DistillationTrainer(
        model=llama(len(lm_tokenizer), layers=1, seed=1),
        teacher_model=llama(len(lm_tokenizer), seed=2),
        args=make_args(tmp_path, lmbda=1.0, alpha=0.5, on_policy_max_new_tokens=3, max_steps=3),
        train_dataset=_prompt_completion_rows(lm_tokenizer),
        processing_class=lm_tokenizer,
        teacher_processing_class=lm_tokenizer,
        data_collator=DataCollatorForSeq2Seq(lm_tokenizer, padding=True),
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "kd_loss" in entry]
    assert len(logged) == 3
    for entry in logged:
        assert "ce_loss" not in entry
        assert entry["loss"] == pytest.approx(entry["kd_loss"], rel=1e-3, abs=1e-4)


def test_on_policy_needs_a_model_that_generates(tmp_path, bert_tokenizer):
    with pytest.raises(ValueError, match="lmbda=0.5 asks for on-policy steps"):
        DistillationTrainer(
            model=bert(bert_tokenizer),
            teacher_model=bert(bert_tokenizer, seed=2),
            args=make_args(tmp_path, lmbda=0.5),
            train_dataset=classification_data(bert_tokenizer),
        )


# ---- 7. clipping covers the projections ------------------------------------------------------------------------


def _one_sgd_step(tmp_path, tokenizer, max_grad_norm):
    torch.manual_seed(0)
    trainer = DistillationTrainer(
        model=bert(tokenizer, layers=1, hidden=16, heads=2, seed=1),
        teacher_model=bert(tokenizer, layers=2, hidden=32, seed=2),
        args=make_args(
            tmp_path,
            hidden_weight=1.0,
            optim="sgd",
            learning_rate=1.0,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=max_grad_norm,
            max_steps=1,
        ),
        train_dataset=classification_data(tokenizer),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    parameters = [*trainer.model.parameters(), *trainer.hidden_projections.parameters()]
    assert len(list(trainer.hidden_projections.parameters())) > 0
    before = [p.detach().clone() for p in parameters]
    trainer.train()
    steps = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(parameters, before)])
    grad_norm = next(entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry)
    return steps, grad_norm


def test_gradient_clipping_and_grad_norm_cover_the_projections(tmp_path, bert_tokenizer):
    free, free_norm = _one_sgd_step(tmp_path / "free", bert_tokenizer, max_grad_norm=1e9)
    clipped, clipped_norm = _one_sgd_step(tmp_path / "clipped", bert_tokenizer, max_grad_norm=1e-3)
    # SGD with lr 1: the unclipped step is the gradient itself
    assert free_norm == pytest.approx(free.norm().item(), rel=1e-4)
    assert clipped_norm == pytest.approx(free_norm, rel=1e-4)
    assert clipped.norm().item() == pytest.approx(
        1e-3, rel=1e-3
    )  # everything moved 1e-3, projections included
    assert torch.allclose(clipped, free * (1e-3 / free.norm()), atol=1e-7)


# ---- 8. compute_loss_func and label smoothing --------------------------------------------------------------------


def test_compute_loss_func_is_the_hard_loss(tmp_path, bert_tokenizer):
    calls = []

    def squared_error_to_one_hot(outputs, labels, num_items_in_batch=None):
        calls.append(num_items_in_batch)
        probs = outputs.logits.float().softmax(-1)
        return (probs - F.one_hot(labels, probs.shape[-1]).float()).pow(2).sum(-1).mean()

    student, teacher = bert(bert_tokenizer, layers=1, seed=1), bert(bert_tokenizer, seed=2)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, alpha=0.3),
        compute_loss_func=squared_error_to_one_hot,
    )
    rows = bert_tokenizer(TEXTS[:4], padding=True, return_tensors="pt")
    labels = torch.tensor([0, 1, 1, 0])
    loss, _ = _compute(trainer, dict(rows, labels=labels))
    with torch.no_grad():
        s, t = student(**rows).logits, teacher(**rows).logits
    hard = (s.softmax(-1) - F.one_hot(labels, 2).float()).pow(2).sum(-1).mean()
    assert calls
    assert loss.item() == pytest.approx((0.7 * hard + 0.3 * _kl64(s, t, 2.0).mean()).item(), rel=1e-5)


def test_label_smoothing_applies_to_the_hard_loss(tmp_path, bert_tokenizer):
    student = bert(bert_tokenizer, layers=1, seed=1)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=bert(bert_tokenizer, seed=2),
        args=make_args(tmp_path, alpha=0.0, label_smoothing_factor=0.2),
    )
    rows = bert_tokenizer(TEXTS[:4], padding=True, return_tensors="pt")
    labels = torch.tensor([0, 1, 1, 0])
    loss, _ = _compute(trainer, dict(rows, labels=labels))
    with torch.no_grad():
        outputs = student(**rows)
    reference = LabelSmoother(epsilon=0.2)(outputs, labels)  # transformers' own smoother
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


# ---- 9. question answering ---------------------------------------------------------------------------------------


def _qa_model(tokenizer, seed, layers=2):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForQuestionAnswering(config)


def _qa_batch(tokenizer):
    rows = tokenizer(TEXTS[:4], padding=True, return_tensors="pt")
    return dict(rows, start_positions=torch.tensor([1, 2, 0, 3]), end_positions=torch.tensor([2, 4, 1, 3]))


def test_question_answering_hard_loss_is_the_heads_own(tmp_path, bert_tokenizer):
    student = _qa_model(bert_tokenizer, seed=1, layers=1)
    teacher = _qa_model(bert_tokenizer, seed=2)
    twin = copy.deepcopy(teacher)
    batch = _qa_batch(bert_tokenizer)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, alpha=0.4))
    loss, _ = _compute(trainer, batch)
    with torch.no_grad():
        own = student(**batch)  # the head's span loss, from transformers
        teacher_out = teacher(**{k: v for k, v in batch.items() if "positions" not in k})
    kd = (
        _kl64(own.start_logits, teacher_out.start_logits, 2.0)
        + _kl64(own.end_logits, teacher_out.end_logits, 2.0)
    ).mean() / 2
    assert loss.item() == pytest.approx((0.6 * own.loss + 0.4 * kd).item(), rel=1e-5)

    same = DistillationTrainer(model=twin, teacher_model=teacher, args=make_args(tmp_path, alpha=1.0))
    loss, grads = _compute(same, batch)
    assert abs(loss.item()) <= 1e-6 and max(g.abs().max().item() for g in grads.values()) <= 1e-6


def test_question_answering_trains_and_evaluates(tmp_path, bert_tokenizer):
    rows = bert_tokenizer(TEXTS[:8], padding="max_length", max_length=16)
    rows["start_positions"] = [1, 2, 0, 3] * 2
    rows["end_positions"] = [2, 4, 1, 3] * 2
    data = Dataset.from_dict(dict(rows))
    trainer = DistillationTrainer(
        model=_qa_model(bert_tokenizer, seed=1, layers=1),
        teacher_model=_qa_model(bert_tokenizer, seed=2),
        args=make_args(tmp_path),
        train_dataset=data,
        eval_dataset=data,
        data_collator=default_data_collator,
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])
    assert all(math.isfinite(entry["kd_loss"]) for entry in trainer.state.log_history if "kd_loss" in entry)


def test_heads_without_logits_and_positional_args_fail_with_the_fix(tmp_path, bert_tokenizer):
    encoder = BertModel(
        BertConfig(
            vocab_size=len(bert_tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
        )
    )
    with pytest.raises(ValueError, match="Supported heads: sequence classification"):
        DistillationTrainer(model=encoder, teacher_model=copy.deepcopy(encoder), args=make_args(tmp_path))
    args = make_args(tmp_path)
    with pytest.raises(TypeError, match="teacher_model=teacher"):
        DistillationTrainer(bert(bert_tokenizer), args)


# ---- 10. the default layer map follows the layers the student was built from -----------------------------------


def test_uniform_layer_map_follows_create_student(tmp_path, bert_tokenizer):
    teacher = bert(bert_tokenizer, layers=6, seed=2)
    student = create_student(teacher, num_hidden_layers=3)
    assert student.distilled_from_layers == {"layers": [0, 3, 5]}
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=make_args(tmp_path, hidden_weight=1.0, alpha=0.0)
    )
    # hidden_states index k is the output of layer k: student layer j+1 is teacher layer [0, 3, 5][j] + 1
    assert trainer.layer_maps["layers"] == [(1, 1), (2, 4), (3, 6)]
    # where the student's first layer is its teacher layer, their outputs are equal at initialisation
    rows = bert_tokenizer(TEXTS[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        s = student(**rows, output_hidden_states=True).hidden_states
        t = teacher(**rows, output_hidden_states=True).hidden_states
    assert torch.allclose(s[1], t[1], atol=1e-5)
    plain = DistillationTrainer(
        model=bert(bert_tokenizer, layers=3, seed=1),
        teacher_model=teacher,
        args=make_args(tmp_path, hidden_weight=1.0),
    )
    assert plain.layer_maps["layers"] == [(1, 2), (2, 4), (3, 6)]


# ---- 11. bad data fails before training ------------------------------------------------------------------------


def test_empty_training_set_and_string_labels_fail_before_training(tmp_path, bert_tokenizer):
    common = dict(
        model=bert(bert_tokenizer), teacher_model=bert(bert_tokenizer, seed=2), args=make_args(tmp_path)
    )
    empty = classification_data(bert_tokenizer).select([])
    with pytest.raises(ValueError, match="training set is empty"):
        DistillationTrainer(**common, train_dataset=empty)
    rows = dict(bert_tokenizer(TEXTS[:4]))
    rows["label"] = ["sport", "tech", "sport", "tech"]
    with pytest.raises(
        ValueError, match=r"column 'label' of the training set holds strings.*class_encode_column"
    ):
        DistillationTrainer(**common, train_dataset=Dataset.from_dict(rows))


# ---- one KD source per configuration, chosen at construction -------------------------------------------------


def test_the_kd_source_is_chosen_once_from_the_configuration(tmp_path, lm_tokenizer, bert_tokenizer):
    from hf_distill.sources.cached import CachedTopKKD
    from hf_distill.sources.logits import FusedLMHeadKD, LogitsKD, SpanKD

    vocab = len(lm_tokenizer)
    common = dict(processing_class=lm_tokenizer, teacher_processing_class=lm_tokenizer)
    live = DistillationTrainer(
        model=llama(vocab), teacher_model=llama(vocab, seed=2), args=make_args(tmp_path), **common
    )
    fused = DistillationTrainer(
        model=llama(vocab),
        teacher_model=llama(vocab, seed=2),
        args=make_args(tmp_path, fused_kd_loss=True),
        **common,
    )
    cached = DistillationTrainer(
        model=llama(vocab), args=make_args(tmp_path, teacher_logits_cache=str(tmp_path / "none")), **common
    )
    spans = DistillationTrainer(
        model=_qa_model(bert_tokenizer, seed=1),
        teacher_model=_qa_model(bert_tokenizer, seed=2),
        args=make_args(tmp_path),
    )
    assert [type(t.kd_source) for t in (live, fused, cached, spans)] == [
        LogitsKD,
        FusedLMHeadKD,
        CachedTopKKD,
        SpanKD,
    ]
    assert fused.kd_source.model_kwargs() == {"output_hidden_states": True, "logits_to_keep": 1}
    assert not cached.kd_source.needs_teacher and cached.teacher_model is None
