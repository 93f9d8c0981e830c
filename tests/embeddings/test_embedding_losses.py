"""hf_distill.losses.embeddings against float64 formulas written here, and the invariant that a student equal to
its teacher has zero loss and zero gradient."""

from __future__ import annotations

import math

import pytest
import torch

from hf_distill.losses import embedding_distillation_loss
from hf_distill.losses.embeddings import embedding_cosine_loss, embedding_mse_loss, similarity_matrix_loss


def _pair(batch: int = 5, dim: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=generator), torch.randn(batch, dim, generator=generator)


def _reference(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """Per-text means of the three terms, element by element in float64."""
    s, t = student.double().tolist(), teacher.double().tolist()
    n, d = len(s), len(s[0])

    def cos(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))

    mse = sum(sum((s[i][k] - t[i][k]) ** 2 for k in range(d)) / d for i in range(n)) / n
    cosine = sum(1 - cos(s[i], t[i]) for i in range(n)) / n
    similarity = (
        sum(sum((cos(s[i], s[j]) - cos(t[i], t[j])) ** 2 for j in range(n)) / n for i in range(n)) / n
    )
    return {"mse": mse, "cosine": cosine, "similarity": similarity}


def test_each_term_equals_the_float64_formula():
    student, teacher = _pair()
    expected = _reference(student, teacher)
    assert embedding_mse_loss(student, teacher).item() == pytest.approx(expected["mse"], rel=1e-5)
    assert embedding_cosine_loss(student, teacher).item() == pytest.approx(expected["cosine"], rel=1e-5)
    assert similarity_matrix_loss(student, teacher).item() == pytest.approx(expected["similarity"], rel=1e-4)
    combined = embedding_distillation_loss(
        student, teacher, mse_weight=0.5, cosine_weight=2.0, similarity_weight=3.0
    )
    reference = 0.5 * expected["mse"] + 2.0 * expected["cosine"] + 3.0 * expected["similarity"]
    assert combined.item() == pytest.approx(reference, rel=1e-5)


def test_sum_is_the_mean_times_the_texts():
    student, teacher = _pair(batch=6)
    for term in (embedding_mse_loss, embedding_cosine_loss, similarity_matrix_loss):
        total = term(student, teacher, reduction="sum")
        assert total.item() == pytest.approx(6 * term(student, teacher).item(), rel=1e-6)


def test_student_equal_to_teacher_gives_zero_loss_and_zero_gradient():
    _, teacher = _pair()
    student = teacher.clone().requires_grad_(True)
    loss = embedding_distillation_loss(
        student, teacher, mse_weight=1.0, cosine_weight=1.0, similarity_weight=1.0
    )
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert student.grad.abs().max().item() < 1e-5


def test_only_the_student_gets_a_gradient():
    student, teacher = _pair()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    embedding_distillation_loss(student, teacher, cosine_weight=1.0, similarity_weight=1.0).backward()
    assert teacher.grad is None
    assert student.grad.abs().sum() > 0


def test_half_precision_inputs_are_computed_in_float32():
    student, teacher = _pair()
    loss = embedding_distillation_loss(student.bfloat16(), teacher.bfloat16(), cosine_weight=1.0)
    assert loss.dtype == torch.float32


def test_bad_shapes_and_weights_are_refused_with_the_fix():
    student, teacher = _pair(dim=7)
    with pytest.raises(ValueError, match="projection"):
        embedding_mse_loss(student[:, :4], teacher)
    with pytest.raises(ValueError, match="at least one > 0"):
        embedding_distillation_loss(student, teacher, mse_weight=0.0)
    with pytest.raises(ValueError, match=">= 0"):
        embedding_distillation_loss(student, teacher, cosine_weight=-1.0)
