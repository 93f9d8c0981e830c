"""Several tasks in one student: the multi-task loss against the single-task trainer's, the saved folder loaded
back, the sampling rules against their formulas, resume mid-epoch, per-task evaluation and the checks on tasks and
teachers. Tiny BERT models built from configs.

References: `DistillationTrainer` (the single-task trainer) computing each task's loss on the same batch; a float64
cosine formula written here (embedding tasks); the rules' probabilities written here; predictions recomputed by hand
(per-task accuracy)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import TEXTS_FOR_TESTS
from datasets import Dataset
from transformers import (
    AutoModel,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DataCollatorWithPadding,
)

from hf_distill import (
    DistillationTask,
    DistillationTrainer,
    DistillationTrainingArguments,
    MultiTaskDistillationTrainer,
    MultiTaskModel,
    TaskHead,
)
from hf_distill.multitask import TaskBatchSampler, task_probabilities

SENTIMENT = ("neg", "pos")
TOPIC = ("film", "music", "animals")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(tokenizer, hidden=32, layers=1, **extra) -> BertConfig:
    return BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        **extra,
    )  # fmt: skip


def classifier(tokenizer, labels, seed, layers=2):
    torch.manual_seed(seed)
    config = _config(tokenizer, layers=layers, num_labels=len(labels), id2label=dict(enumerate(labels)),
                     label2id={label: i for i, label in enumerate(labels)})  # fmt: skip
    return BertForSequenceClassification(config)


def student(tokenizer, heads, seed=0):
    torch.manual_seed(seed)
    return MultiTaskModel(BertModel(_config(tokenizer)), heads)


def data(tokenizer, labels: int | None, n=8, offset=0):
    texts = [TEXTS_FOR_TESTS[(offset + i) % len(TEXTS_FOR_TESTS)] for i in range(n)]
    rows = dict(tokenizer(texts))
    if labels is not None:
        rows["labels"] = [i % labels for i in range(n)]
    return Dataset.from_dict(rows)


def args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=4,
        save_strategy="no", report_to="none", seed=0, temperature=2.0, alpha=0.5, use_cpu=True, disable_tqdm=True,
        logging_steps=1,
    )  # fmt: skip
    values.update(overrides)
    return DistillationTrainingArguments(**values)


HEADS = [
    TaskHead("sentiment", "classification", 2, SENTIMENT),
    TaskHead("topic", "classification", 3, TOPIC, pooling="cls"),
    TaskHead("embedding", "embedding", 32),
]


def tasks(tokenizer):
    # the topic teacher orders its classes differently: matched by name
    return [
        DistillationTask("sentiment", classifier(tokenizer, SENTIMENT, 1), data(tokenizer, 2), weight=0.3),
        DistillationTask(
            "topic", classifier(tokenizer, ("music", "animals", "film"), 2), data(tokenizer, 3, offset=4),
            weight=2.0, alpha=0.8, temperature=3.0,
        ),
        DistillationTask("embedding", AutoModel.from_config(_config(tokenizer, layers=2)), data(tokenizer, None, n=6)),
    ]  # fmt: skip


def trainer(tmp_path, tokenizer, model=None, task_list=None, **overrides):
    sampling = overrides.pop("sampling", "round_robin")
    return MultiTaskDistillationTrainer(
        model if model is not None else student(tokenizer, HEADS),
        task_list if task_list is not None else tasks(tokenizer),
        args(tmp_path, **overrides),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        sampling=sampling,
    )


def _batch(tokenizer, dataset, task_id=None):
    rows = [dataset[i] for i in range(len(dataset))][:4]
    if task_id is not None:
        rows = [{**row, "task_id": task_id} for row in rows]
    return DataCollatorWithPadding(tokenizer)(rows)


# --------------------------------------------------------------------------------------------- the loss
def test_multitask_loss_is_the_weighted_sum_of_the_single_task_trainers_losses(tmp_path, bert_tokenizer):
    multi = trainer(tmp_path, bert_tokenizer)
    model = multi.model
    model.train()
    total = expected_total = 0.0
    for index, task in enumerate(multi.tasks[:2]):  # the classification tasks
        alpha = multi.args.alpha if task.alpha is None else task.alpha
        temperature = multi.args.temperature if task.temperature is None else task.temperature
        single = DistillationTrainer(
            model=model.task_model(task.name), teacher_model=task.teacher,
            args=args(tmp_path / task.name, alpha=alpha, temperature=temperature), processing_class=bert_tokenizer,
        )  # fmt: skip
        batch = _batch(bert_tokenizer, task.train_dataset)
        single_loss = single.compute_loss(single.model, dict(batch))
        multi_loss = multi.compute_loss(model, {**batch, "task_id": torch.full((4,), index)})
        torch.testing.assert_close(multi_loss, task.weight * single_loss, rtol=1e-5, atol=1e-6)
        total = total + multi_loss
        expected_total = expected_total + task.weight * single_loss
    # the gradient of the window is that of the weighted sum
    parameters = list(model.encoder.parameters())  # BERT's pooler takes no part: its gradient is None in both
    grads_multi = torch.autograd.grad(total, parameters, retain_graph=True, allow_unused=True)
    grads_single = torch.autograd.grad(expected_total, parameters, allow_unused=True)
    assert sum(g is not None for g in grads_multi) > len(parameters) // 2
    for got, want in zip(grads_multi, grads_single):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_embedding_task_loss_is_one_minus_the_cosine_to_the_mean_pooled_teacher(tmp_path, bert_tokenizer):
    multi = trainer(tmp_path, bert_tokenizer)
    task = multi.tasks[2]
    batch = _batch(bert_tokenizer, task.train_dataset, task_id=2)
    loss = multi.compute_loss(multi.model, dict(batch))
    with torch.no_grad():
        features = {key: batch[key] for key in ("input_ids", "attention_mask", "token_type_ids")}
        hidden = multi.model.encoder(**features).last_hidden_state.double()
        mask = batch["attention_mask"].double().unsqueeze(-1)
        student_embedding = multi.model.heads["embedding"](
            (hidden * mask).sum(1).float() / mask.sum(1).float()
        ).double()
        teacher_hidden = task.teacher(**features).last_hidden_state.double()
        teacher_embedding = (teacher_hidden * mask).sum(1) / mask.sum(1)
    expected = (1 - F.cosine_similarity(student_embedding, teacher_embedding, dim=-1)).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------- the sampling
def test_sampling_rules_follow_their_formulas():
    sizes = {"big": 30, "small": 6}
    assert task_probabilities(sizes, "proportional") == pytest.approx({"big": 30 / 36, "small": 6 / 36})
    t = 3.0
    share = 30 ** (1 / t) / (30 ** (1 / t) + 6 ** (1 / t))
    assert task_probabilities(sizes, "temperature", t) == pytest.approx({"big": share, "small": 1 - share})
    assert task_probabilities(sizes, "round_robin") == {"big": 0.5, "small": 0.5}

    proportional = TaskBatchSampler([30, 6], 4, "proportional", seed=1)
    batches = list(proportional)
    assert len(batches) == len(proportional) == math.ceil(30 / 4) + math.ceil(6 / 4)
    assert Counter(0 if batch[0] < 30 else 1 for batch in batches) == {0: 8, 1: 2}
    for batch in batches:  # every batch is full and of one task
        assert len(batch) == 4 and (all(i < 30 for i in batch) or all(30 <= i < 36 for i in batch))
    assert {i for batch in batches if batch[0] < 30 for i in batch} == set(range(30))  # every row of the pass
    proportional.set_epoch(1)
    assert list(proportional) != batches
    proportional.set_epoch(0)
    assert list(proportional) == batches  # an epoch is the same whenever it is drawn

    robin = TaskBatchSampler([30, 6], 4, "round_robin")
    assert [0 if batch[0] < 30 else 1 for batch in robin] == [0, 1] * 5

    sampler = TaskBatchSampler([30, 6], 4, "temperature", temperature=t, seed=0)
    draws = []
    for epoch in range(400):
        sampler.set_epoch(epoch)
        draws += [0 if batch[0] < 30 else 1 for batch in sampler]
    assert abs(draws.count(0) / len(draws) - share) < 0.02  # 4,000 draws: 4 standard deviations


def test_training_resumed_mid_epoch_equals_an_uninterrupted_run(tmp_path, bert_tokenizer):
    straight = trainer(tmp_path / "a", bert_tokenizer, sampling="proportional", max_steps=5)
    straight.train()
    killed = trainer(
        tmp_path / "b",
        bert_tokenizer,
        sampling="proportional",
        max_steps=5,
        save_strategy="steps",
        save_steps=3,
    )
    killed.train()
    resumed = trainer(tmp_path / "b", bert_tokenizer, sampling="proportional", max_steps=5)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-3"))
    for (name, want), got in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)
    logged = [key for entry in straight.state.log_history for key in entry if key.endswith("_loss")]
    assert {"sentiment_loss", "topic_loss", "embedding_loss"} <= set(logged)


# --------------------------------------------------------------------------------------------- saving, evaluating
def test_the_saved_folder_loads_back_with_every_head(tmp_path, bert_tokenizer):
    multi = trainer(tmp_path, bert_tokenizer, max_steps=2)
    multi.train()
    multi.save_model()
    loaded = MultiTaskModel.from_pretrained(tmp_path / "out").eval()
    multi.model.eval()
    assert loaded.task_names == multi.model.task_names
    assert loaded.task_heads["topic"].labels == TOPIC and loaded.task_heads["topic"].pooling == "cls"
    for index in range(len(loaded.task_names)):
        batch = _batch(bert_tokenizer, data(bert_tokenizer, None), task_id=index)
        with torch.no_grad():
            torch.testing.assert_close(loaded(**batch).logits, multi.model(**batch).logits, rtol=0, atol=1e-6)
    assert isinstance(AutoModel.from_pretrained(tmp_path / "out" / "encoder"), BertModel)  # a standard folder
    view = loaded.task_model("sentiment")
    assert view.config.id2label == {0: "neg", 1: "pos"}


def test_evaluate_reports_each_task(tmp_path, bert_tokenizer):
    task_list = tasks(bert_tokenizer)
    for task, labels in zip(task_list, (2, 3, None)):
        task.eval_dataset = data(bert_tokenizer, labels, n=6, offset=7)
    multi = trainer(tmp_path, bert_tokenizer, task_list=task_list)
    metrics = multi.evaluate()
    assert {"eval_sentiment_accuracy", "eval_topic_accuracy", "eval_embedding_cosine"} <= set(metrics)
    dataset = task_list[1].eval_dataset
    collated = DataCollatorWithPadding(bert_tokenizer)([{**dataset[i], "task_id": 1} for i in range(6)])
    with torch.no_grad():
        predicted = multi.model(**{k: v for k, v in collated.items() if k != "labels"}).logits.argmax(-1)
    assert metrics["eval_topic_accuracy"] == pytest.approx(
        float((predicted == collated["labels"]).float().mean())
    )


# --------------------------------------------------------------------------------------------- bad input
def test_tasks_and_teachers_that_cannot_pair_are_refused(tmp_path, bert_tokenizer):
    good = tasks(bert_tokenizer)
    with pytest.raises(ValueError, match=r"do not match the model's heads"):
        trainer(tmp_path, bert_tokenizer, task_list=good[:2])
    other_names = [*good]
    other_names[0] = DistillationTask(
        "sentiment", classifier(bert_tokenizer, ("bad", "good"), 1), data(bert_tokenizer, 2)
    )
    with pytest.raises(ValueError, match=r"task 'sentiment': .*different names"):
        trainer(tmp_path, bert_tokenizer, task_list=other_names)
    wide = [*good]
    wide[2] = DistillationTask(
        "embedding", AutoModel.from_config(_config(bert_tokenizer, hidden=64)), data(bert_tokenizer, None)
    )
    with pytest.raises(ValueError, match=r"embeddings have width 64 and the head 32"):
        trainer(tmp_path, bert_tokenizer, task_list=wide)
    vocab = [*good]
    teacher = classifier(bert_tokenizer, SENTIMENT, 1)
    teacher.resize_token_embeddings(len(bert_tokenizer) + 10)
    vocab[0] = DistillationTask("sentiment", teacher, data(bert_tokenizer, 2))
    with pytest.raises(ValueError, match=r"must share its tokenizer"):
        trainer(tmp_path, bert_tokenizer, task_list=vocab)
    with pytest.raises(ValueError, match=r"sampling rule must be one of"):
        trainer(tmp_path, bert_tokenizer, sampling="random")
    with pytest.raises(ValueError, match=r"task name 'two words'"):
        TaskHead("two words", "classification", 2)
    with pytest.raises(ValueError, match=r"a batch must hold rows of one task"):
        model = student(bert_tokenizer, HEADS)
        model(**_batch(bert_tokenizer, data(bert_tokenizer, None)), task_id=torch.tensor([0, 1, 0, 0]))


def test_an_identity_embedding_head_starts_at_the_pooled_output_and_saves_its_init(tmp_path, bert_tokenizer):
    heads = [
        TaskHead("topic", "classification", 3, TOPIC),
        TaskHead("embedding", "embedding", 32, init="identity"),
    ]
    model = student(bert_tokenizer, heads).eval()
    batch = _batch(bert_tokenizer, data(bert_tokenizer, None), task_id=1)
    features = {key: value for key, value in batch.items() if key not in ("task_id", "labels")}
    with torch.no_grad():
        hidden = model.encoder(**features).last_hidden_state.double()
        mask = features["attention_mask"].double().unsqueeze(-1)
        expected = (hidden * mask).sum(1) / mask.sum(1)  # mean pooling in float64, no projection
        torch.testing.assert_close(model(**batch).logits.double(), expected, rtol=1e-5, atol=1e-6)
    model.save_pretrained(tmp_path / "saved")
    assert MultiTaskModel.from_pretrained(tmp_path / "saved").task_heads["embedding"].init == "identity"
    with pytest.raises(ValueError, match=r"init='identity' is for embedding heads"):
        TaskHead("topic", "classification", 3, TOPIC, init="identity")
    with pytest.raises(ValueError, match=r"init must be one of"):
        TaskHead("embedding", "embedding", 32, init="zeros")
    with pytest.raises(ValueError, match=r"needs num_outputs equal to the encoder's hidden_size \(32\)"):
        student(bert_tokenizer, [TaskHead("embedding", "embedding", 16, init="identity")])
