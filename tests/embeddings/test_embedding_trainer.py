"""DistillationTrainer with sentence embedders (task type sentence_embedding, sources/embeddings.py): a student equal
to its teacher has zero loss and zero gradient through the trainer; training moves a cut and a pruned student
towards the teacher; an interrupted run resumed from its checkpoint ends where an uninterrupted one does; what the
source cannot honour is refused when the trainer is built."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from embedding_helpers import TEXTS, st_teacher_folder, tiny_bert
from transformers import DataCollatorWithPadding, TrainerCallback

from hf_distill import DistillationTrainer, DistillationTrainingArguments
from hf_distill.embeddings import SentenceEmbedder, embedding_student, fit_projection, load_sentence_embedder
from hf_distill.losses import embedding_distillation_loss
from hf_distill.sources.embeddings import EmbeddingKD


def _args(tmp_path, **overrides) -> DistillationTrainingArguments:
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=6,
        learning_rate=5e-3,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        embedding_mse_weight=1.0,
        embedding_cosine_weight=1.0,
    )
    values.update(overrides)
    return DistillationTrainingArguments(**values)


def _dataset(tokenizer) -> Dataset:
    encoded = tokenizer(TEXTS, truncation=True, max_length=32)
    return Dataset.from_dict({key: list(value) for key, value in encoded.items()})


def _trainer(student, teacher, tokenizer, args, dataset=None) -> DistillationTrainer:
    return DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=dataset if dataset is not None else _dataset(tokenizer),
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )


@pytest.fixture
def teacher(tmp_path):
    return load_sentence_embedder(st_teacher_folder(tmp_path))


def _distance(student, teacher_model, tokenizer) -> float:
    teacher_embeddings = teacher_model.encode(TEXTS, tokenizer)
    student_embeddings = student.encode(TEXTS, tokenizer)
    return embedding_distillation_loss(student_embeddings, teacher_embeddings, cosine_weight=1.0).item()


def test_a_student_equal_to_its_teacher_has_zero_loss_and_gradient(tmp_path, teacher):
    model, tokenizer = teacher
    student = copy.deepcopy(model).train()
    trainer = _trainer(student, model, tokenizer, _args(tmp_path, embedding_similarity_weight=1.0))
    assert isinstance(trainer.kd_source, EmbeddingKD)
    batch = DataCollatorWithPadding(tokenizer)([_dataset(tokenizer)[i] for i in range(8)])
    loss = trainer.compute_loss(student, batch)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    largest = max(p.grad.abs().max().item() for p in student.parameters() if p.grad is not None)
    assert largest < 1e-5


@pytest.mark.parametrize("hidden", [32, 16])
def test_training_brings_a_student_towards_the_teacher(tmp_path, teacher, hidden):
    model, tokenizer = teacher
    # a student that starts far from the teacher (its own random weights); 16 wide: through a projection to 32
    student = SentenceEmbedder(
        tiny_bert(tokenizer, hidden=hidden, layers=1, seed=7),
        "mean",
        projection_dim=None if hidden == 32 else 32,
        normalize=True,
    )
    before = _distance(student, model, tokenizer)
    trainer = _trainer(student, model, tokenizer, _args(tmp_path, max_steps=20, learning_rate=1e-3))
    trainer.train()
    assert _distance(student, model, tokenizer) < 0.5 * before
    assert not any(p.requires_grad for p in trainer.teacher_model.parameters())  # the teacher stays frozen


def test_the_projection_fit_solves_the_ridge_normal_equations(teacher):
    model, tokenizer = teacher
    batch = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    student = embedding_student(model, num_layers=1, hidden=16, calibration=[batch])
    ridge = 1e-3
    fit_projection(student, model, [batch], ridge=ridge)
    mask = batch["attention_mask"].double().unsqueeze(-1)

    def mean_pooled(encoder):  # the mean over real tokens, written here in float64
        hidden = encoder(**batch).last_hidden_state.double()
        return (hidden * mask).sum(1) / mask.sum(1)

    with torch.no_grad():
        features, target = mean_pooled(student.encoder), mean_pooled(model.encoder)  # no teacher Dense here
    design = torch.cat([features, torch.ones(len(TEXTS), 1, dtype=torch.float64)], dim=1)
    layer = student.dense_layers[0].linear
    weights = torch.cat([layer.weight.detach().double().T, layer.bias.detach().double()[None]], dim=0)
    # ridge regression's optimum: X^T (X W - T) + lambda * W = 0, lambda = ridge * mean(diag(X^T X)), bias not shrunk
    penalty = ridge * torch.diagonal(design.T @ design).mean() * weights
    penalty[-1] = 0.0
    gradient = design.T @ (design @ weights - target) + penalty
    assert gradient.abs().max().item() < 1e-4 * (design.T @ target).abs().max().item()


class _StopAt(TrainerCallback):
    """Ends training after `step` optimizer steps, as a killed run would (its checkpoint at that step written)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def test_an_interrupted_run_resumes_where_an_uninterrupted_one_ends(tmp_path, teacher):
    model, tokenizer = teacher
    initial = embedding_student(model, num_layers=1)
    straight = copy.deepcopy(initial)
    _trainer(straight, model, tokenizer, _args(tmp_path / "a", max_steps=4)).train()
    options = dict(max_steps=4, save_strategy="steps", save_steps=2)
    stopped = _trainer(copy.deepcopy(initial), model, tokenizer, _args(tmp_path / "b", **options))
    stopped.add_callback(_StopAt(2))
    stopped.train()
    assert (tmp_path / "b" / "out" / "checkpoint-2").is_dir()
    resumed = copy.deepcopy(initial)  # a fresh process would build the same student, then load the checkpoint
    _trainer(resumed, model, tokenizer, _args(tmp_path / "b", **options)).train(resume_from_checkpoint=True)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name
    trained = resumed.encoder.encoder.layer[0].output.dense.weight
    assert not torch.equal(trained, initial.encoder.encoder.layer[0].output.dense.weight)  # it did train


def test_what_sentence_embeddings_cannot_use_is_refused_before_training(tmp_path, teacher):
    model, tokenizer = teacher
    labelled = _dataset(tokenizer).add_column("label", [0] * len(TEXTS))
    with pytest.raises(ValueError, match="remove_columns"):
        _trainer(embedding_student(model, num_layers=1), model, tokenizer, _args(tmp_path), labelled)
    narrow = SentenceEmbedder(embedding_student(model, num_layers=1, hidden=16, calibration=[
        dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))]).encoder, "mean")  # fmt: skip
    with pytest.raises(ValueError, match="projection_dim=32"):
        _trainer(narrow, model, tokenizer, _args(tmp_path))
    with pytest.raises(ValueError, match="several teachers"):
        _trainer(
            embedding_student(model, num_layers=1), [model, copy.deepcopy(model)], tokenizer, _args(tmp_path)
        )
    with pytest.raises(ValueError, match="at least one > 0"):
        _args(tmp_path, embedding_mse_weight=0.0, embedding_cosine_weight=0.0)


def test_cached_teacher_embeddings_give_the_live_teachers_loss_and_gradient(tmp_path, teacher):
    from hf_distill.sources.embeddings import TEACHER_EMBEDDING_COLUMN

    model, tokenizer = teacher
    student = SentenceEmbedder(tiny_bert(tokenizer, layers=1, seed=3), "mean", normalize=True)
    options = dict(embedding_similarity_weight=1.0)
    live = _trainer(student, model, tokenizer, _args(tmp_path / "live", **options))
    targets = model.encode(TEXTS, tokenizer, max_length=32).tolist()
    cached_set = _dataset(tokenizer).add_column(TEACHER_EMBEDDING_COLUMN, targets)
    cached = _trainer(student, model, tokenizer, _args(tmp_path / "cached", **options), cached_set)
    assert live.kd_source.needs_teacher and not cached.kd_source.needs_teacher
    results = []
    for trainer in (live, cached):
        dataloader = trainer.get_train_dataloader()  # as training collates it: the column survives
        batch = trainer._prepare_inputs(next(iter(dataloader)))
        student.zero_grad()
        loss = trainer.compute_loss(student, batch)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in student.parameters() if p.grad is not None]))
    assert TEACHER_EMBEDDING_COLUMN in batch
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-4, abs=1e-7)
    for live_grad, cached_grad in zip(results[0][1], results[1][1]):
        assert torch.allclose(live_grad, cached_grad, rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="hidden_weight"):
        _trainer(student, model, tokenizer, _args(tmp_path / "h", hidden_weight=1.0), cached_set)
