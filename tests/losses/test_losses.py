"""Tests for hf_distill.losses against reference formulas written here, in float64, from softmax/log/sum."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hf_distill.losses import (
    attention_distillation_loss,
    fused_linear_distillation_loss,
    hidden_state_loss,
    logit_distillation_loss,
    sparse_distillation_and_cross_entropy,
    sparse_distillation_loss,
)

KINDS = ["forward_kl", "reverse_kl", "jsd", "mse"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------------------------
# Independent references
# ----------------------------------------------------------------------------------------------------------------


def reference_per_position(student, teacher, kind, temperature=1.0, beta=0.5):
    """(..., V) -> (...) in float64, straight from the definitions in probability space."""
    s, t = student.double(), teacher.double()
    if kind == "mse":
        return ((s - t) ** 2).mean(-1)
    p_s = torch.softmax(s / temperature, dim=-1)
    p_t = torch.softmax(t / temperature, dim=-1)
    if kind == "forward_kl":
        value = (p_t * (torch.log(p_t) - torch.log(p_s))).sum(-1)
    elif kind == "reverse_kl":
        value = (p_s * (torch.log(p_s) - torch.log(p_t))).sum(-1)
    else:
        m = beta * p_t + (1 - beta) * p_s
        value = beta * (p_t * torch.log(p_t / m)).sum(-1) + (1 - beta) * (p_s * torch.log(p_s / m)).sum(-1)
    return value * temperature**2


def reference_reduce(per_position, mask, reduction):
    weights = torch.ones_like(per_position) if mask is None else mask.double()
    total = (per_position * weights).sum()
    if reduction == "sum":
        return total
    return total / weights.sum() if weights.sum() > 0 else total * 0


def reference_loss(student, teacher, kind, temperature=1.0, beta=0.5, mask=None, reduction="mean"):
    return reference_reduce(
        reference_per_position(student, teacher, kind, temperature, beta), mask, reduction
    )


def random_logits(*shape, scale=2.0, dtype=torch.float32):
    return (torch.randn(*shape) * scale).to(dtype)


def grad_of(loss, tensor):
    (grad,) = torch.autograd.grad(loss, tensor)
    return grad


# ----------------------------------------------------------------------------------------------------------------
# logit_distillation_loss: values and gradients against the references
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_logit_loss_matches_reference_with_mask(kind, reduction, temperature):
    student = random_logits(3, 4, 13).requires_grad_()
    teacher = random_logits(3, 4, 13)
    mask = torch.rand(3, 4) > 0.4
    loss = logit_distillation_loss(
        student, teacher, kind=kind, temperature=temperature, beta=0.3, mask=mask, reduction=reduction
    )
    student64 = student.detach().double().requires_grad_()
    expected = reference_loss(student64, teacher, kind, temperature, 0.3, mask, reduction)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        grad_of(loss, student).double(), grad_of(expected, student64), atol=1e-6, rtol=1e-4
    )


# beta = 0 and 1 are forward and reverse KL (TRL's convention): test_loss_conventions.py
@pytest.mark.parametrize("beta", [0.001, 0.1, 0.5, 0.9, 0.999])
def test_jsd_over_beta_near_the_end_points(beta):
    student = random_logits(5, 17).requires_grad_()
    teacher = random_logits(5, 17)
    loss = logit_distillation_loss(student, teacher, kind="jsd", beta=beta, temperature=1.5)
    student64 = student.detach().double().requires_grad_()
    expected = reference_loss(student64, teacher, "jsd", 1.5, beta)
    torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=1e-5)
    grad = grad_of(loss, student)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), grad_of(expected, student64), atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_forward_kl_is_temperature_squared_times_torch_kl_div(temperature):
    student, teacher = random_logits(6, 9), random_logits(6, 9)
    kl = F.kl_div(
        torch.log_softmax(student.double() / temperature, -1),
        torch.log_softmax(teacher.double() / temperature, -1),
        log_target=True,
        reduction="batchmean",
    )
    loss = logit_distillation_loss(student, teacher, temperature=temperature)
    torch.testing.assert_close(loss.double(), temperature**2 * kl, atol=1e-6, rtol=1e-5)


def test_mse_ignores_temperature_and_handles_a_single_output():
    student, teacher = torch.randn(8, 1), torch.randn(8, 1)
    expected = ((student - teacher) ** 2).mean()
    for temperature in (1.0, 3.0):
        loss = logit_distillation_loss(student, teacher, kind="mse", temperature=temperature)
        torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_sum_is_mean_times_unmasked_count(kind):
    student, teacher = random_logits(2, 5, 7), random_logits(2, 5, 7)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    mean = logit_distillation_loss(student, teacher, kind=kind, mask=mask)
    total = logit_distillation_loss(student, teacher, kind=kind, mask=mask, reduction="sum")
    torch.testing.assert_close(total, mean * 7)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_masked_gives_zero_and_zero_gradient(kind, chunk_size, reduction):
    student = random_logits(2, 3, 5).requires_grad_()
    mask = torch.zeros(2, 3, dtype=torch.bool)
    loss = logit_distillation_loss(
        student, random_logits(2, 3, 5), kind=kind, mask=mask, chunk_size=chunk_size, reduction=reduction
    )
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    grad = grad_of(loss, student)
    assert torch.equal(grad, torch.zeros_like(student))


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf")])
def test_masked_positions_do_not_matter_even_when_non_finite(kind, garbage):
    """Value and gradient: rows the mask drops may hold anything (fully masked padding can give NaN logits)."""
    student, teacher = random_logits(2, 4, 6), random_logits(2, 4, 6)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    # Reference: the kept rows alone, no mask at all.
    kept = student[mask].clone().requires_grad_(True)
    clean = logit_distillation_loss(kept, teacher[mask], kind=kind)
    clean.backward()
    for chunk_size in (None, 3):
        for poison_teacher in (False, True):
            poisoned = student.detach().clone()
            poisoned[~mask] = garbage
            poisoned_teacher = teacher.clone()
            if poison_teacher:
                poisoned_teacher[~mask] = garbage
            poisoned.requires_grad_(True)
            loss = logit_distillation_loss(
                poisoned, poisoned_teacher, kind=kind, mask=mask, chunk_size=chunk_size
            )
            torch.testing.assert_close(loss, clean.detach())
            loss.backward()
            assert torch.isfinite(poisoned.grad).all()
            torch.testing.assert_close(poisoned.grad[mask], kept.grad)
            assert torch.equal(poisoned.grad[~mask], torch.zeros_like(poisoned.grad[~mask]))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_with_tokens_the_teacher_never_predicts(temperature):
    """Teacher logits of -inf (probability 0) add nothing, as q log q -> 0: against a float64 reference that sums
    over the teacher's support only."""
    student, teacher = random_logits(3, 5, 7), random_logits(3, 5, 7)
    teacher[..., 2] = -float("inf")
    teacher[0, 1, 4] = -float("inf")
    student.requires_grad_(True)
    loss = logit_distillation_loss(student, teacher, temperature=temperature)
    log_q = torch.log_softmax(student.double() / temperature, -1)
    p = torch.softmax(teacher.double() / temperature, -1)
    support = p > 0
    per_position = torch.where(support, p * (torch.log(p.clamp_min(1e-300)) - log_q), 0.0).sum(-1)
    reference = per_position.mean() * temperature**2
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, student)
    (reference_grad,) = torch.autograd.grad(reference, student)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), reference_grad.double(), rtol=1e-4, atol=1e-7)


def test_teacher_gets_no_gradient_even_if_it_requires_grad():
    student = random_logits(4, 6).requires_grad_()
    teacher = random_logits(4, 6).requires_grad_()
    for chunk_size in (None, 3):
        loss = logit_distillation_loss(student, teacher, chunk_size=chunk_size)
        loss.backward()
        assert teacher.grad is None
        assert student.grad is not None
        student.grad = None


# ----------------------------------------------------------------------------------------------------------------
# Chunked == naive
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 7, 64])
@pytest.mark.parametrize("use_mask", [False, True])
def test_chunked_matches_naive_value_and_gradient(kind, chunk_size, use_mask):
    student = random_logits(3, 7, 19).requires_grad_()  # 21 positions: 3, 4 and 64 do not divide it
    teacher = random_logits(3, 7, 19)
    mask = (torch.rand(3, 7) > 0.3) if use_mask else None
    options = dict(kind=kind, temperature=2.0, beta=0.3, mask=mask)
    naive = logit_distillation_loss(student, teacher, **options)
    chunked = logit_distillation_loss(student, teacher, chunk_size=chunk_size, **options)
    torch.testing.assert_close(chunked, naive, atol=1e-6, rtol=1e-5)
    # A grad_output other than 1, as when the trainer divides a "sum" by num_items_in_batch.
    torch.testing.assert_close(
        grad_of(chunked * 0.37, student), grad_of(naive * 0.37, student), atol=1e-7, rtol=1e-5
    )


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_chunked_sum_reduction_and_reference(kind):
    student = random_logits(10, 23).requires_grad_()
    teacher = random_logits(10, 23)
    mask = torch.arange(10) % 3 != 0
    loss = logit_distillation_loss(student, teacher, kind=kind, mask=mask, chunk_size=4, reduction="sum")
    student64 = student.detach().double().requires_grad_()
    expected = reference_loss(student64, teacher, kind, mask=mask, reduction="sum")
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        grad_of(loss, student).double(), grad_of(expected, student64), atol=1e-6, rtol=1e-4
    )


def test_chunked_accepts_non_contiguous_vocab_slices_and_no_grad():
    full_student = random_logits(2, 5, 12).requires_grad_()
    teacher = random_logits(2, 5, 12)[..., :10]
    student = full_student[..., :10]  # as when the trainer drops padded vocabulary rows
    naive = logit_distillation_loss(student, teacher)
    chunked = logit_distillation_loss(student, teacher, chunk_size=3)
    torch.testing.assert_close(chunked, naive)
    torch.testing.assert_close(grad_of(chunked, full_student), grad_of(naive, full_student))
    with torch.no_grad():
        torch.testing.assert_close(logit_distillation_loss(student, teacher, chunk_size=3), naive.detach())


# ----------------------------------------------------------------------------------------------------------------
# Low precision inputs
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_half_inputs_give_float32_result_of_the_float32_computation(dtype, kind, chunk_size):
    student = random_logits(2, 5, 11, dtype=dtype).requires_grad_()
    teacher = random_logits(2, 5, 11, dtype=dtype)
    mask = torch.rand(2, 5) > 0.2
    loss = logit_distillation_loss(
        student, teacher, kind=kind, temperature=2.0, mask=mask, chunk_size=chunk_size
    )
    assert loss.dtype == torch.float32
    expected = reference_loss(
        student.detach(), teacher, kind, 2.0, 0.5, mask
    )  # same rounded values, in float64
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    grad = grad_of(loss, student)
    assert grad.dtype == dtype and torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_logits_of_magnitude_1e4_stay_finite(dtype, kind, chunk_size):
    student = ((torch.rand(6, 32) * 2 - 1) * 1e4).to(dtype).requires_grad_()
    teacher = ((torch.rand(6, 32) * 2 - 1) * 1e4).to(dtype)
    # At T = 0.1 the scaled logits reach 1e5, past float16's 65504: scaling before the upcast would give inf,
    # and so would squaring 1e4 differences for mse.
    temperature = 0.1
    loss = logit_distillation_loss(
        student, teacher, kind=kind, temperature=temperature, chunk_size=chunk_size
    )
    assert torch.isfinite(loss)
    assert torch.isfinite(grad_of(loss, student).float()).all()
    # Probabilities underflow to 0 here, so the reference works with log-probabilities (float64).
    log_p_s = torch.log_softmax(student.detach().double() / temperature, -1)
    log_p_t = torch.log_softmax(teacher.double() / temperature, -1)
    p_s, p_t = log_p_s.exp(), log_p_t.exp()
    if kind == "forward_kl":
        per_position = (p_t * (log_p_t - log_p_s)).sum(-1)
    elif kind == "reverse_kl":
        per_position = (p_s * (log_p_s - log_p_t)).sum(-1)
    elif kind == "jsd":
        log_m = torch.logaddexp(log_p_t + math.log(0.5), log_p_s + math.log(0.5))
        per_position = 0.5 * (p_t * (log_p_t - log_m)).sum(-1) + 0.5 * (p_s * (log_p_s - log_m)).sum(-1)
    if kind == "mse":
        expected = ((student.detach().double() - teacher.double()) ** 2).mean()
    else:
        expected = per_position.mean() * temperature**2
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# Fused linear == F.linear + logit loss
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [None, 1, 5])
@pytest.mark.parametrize("use_mask", [False, True])
def test_fused_matches_naive_values_and_gradients(kind, chunk_size, use_mask):
    vocab, student_width, teacher_width = 29, 8, 12
    student_hidden = torch.randn(2, 7, student_width, requires_grad=True)
    student_weight = (torch.randn(vocab, student_width) / 2).requires_grad_()
    student_bias = torch.randn(vocab, requires_grad=True)
    teacher_hidden = torch.randn(2, 7, teacher_width, requires_grad=True)
    teacher_weight = (torch.randn(vocab, teacher_width) / 2).requires_grad_()
    teacher_bias = torch.randn(vocab, requires_grad=True)
    mask = (torch.rand(2, 7) > 0.3) if use_mask else None
    options = dict(kind=kind, temperature=2.0, beta=0.4, mask=mask, reduction="sum")
    student_params = (student_hidden, student_weight, student_bias)

    naive = logit_distillation_loss(
        F.linear(student_hidden, student_weight, student_bias),
        F.linear(teacher_hidden, teacher_weight, teacher_bias),
        **options,
    )
    naive_grads = torch.autograd.grad(naive * 0.5, student_params)
    fused = fused_linear_distillation_loss(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        chunk_size=chunk_size,
        **options,
    )
    torch.testing.assert_close(fused, naive, atol=1e-5, rtol=1e-5)
    (fused * 0.5).backward()
    for param, expected in zip(student_params, naive_grads):
        torch.testing.assert_close(param.grad, expected, atol=1e-6, rtol=1e-5)
    for teacher_tensor in (teacher_hidden, teacher_weight, teacher_bias):
        assert teacher_tensor.grad is None


def test_fused_mean_reduction_without_bias_and_against_the_reference():
    hidden = torch.randn(9, 6, requires_grad=True)
    weight = torch.randn(15, 6, requires_grad=True)
    teacher_hidden, teacher_weight = torch.randn(9, 4), torch.randn(15, 4)
    loss = fused_linear_distillation_loss(hidden, weight, teacher_hidden, teacher_weight, chunk_size=4)
    expected = reference_loss(
        hidden.detach() @ weight.detach().T, teacher_hidden @ teacher_weight.T, "forward_kl"
    )
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        no_grad_loss = fused_linear_distillation_loss(hidden, weight, teacher_hidden, teacher_weight)
    torch.testing.assert_close(no_grad_loss, loss.detach())


def test_fused_bfloat16_matches_naive_bfloat16():
    hidden = torch.randn(2, 6, 8, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(21, 8) / 2).to(torch.bfloat16).requires_grad_()
    teacher_hidden, teacher_weight = torch.randn(2, 6, 8).bfloat16(), (torch.randn(21, 8) / 2).bfloat16()
    naive = logit_distillation_loss(F.linear(hidden, weight), F.linear(teacher_hidden, teacher_weight))
    naive_grads = torch.autograd.grad(naive, (hidden, weight))
    fused = fused_linear_distillation_loss(hidden, weight, teacher_hidden, teacher_weight, chunk_size=5)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, naive, atol=1e-4, rtol=1e-3)
    fused_grads = torch.autograd.grad(fused, (hidden, weight))
    for got, expected in zip(fused_grads, naive_grads):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), expected.float(), atol=2e-3, rtol=2e-2)


# ----------------------------------------------------------------------------------------------------------------
# hidden_state_loss and attention_distillation_loss
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_state_loss_matches_reference(kind):
    student = torch.randn(3, 5, 8, requires_grad=True)
    teacher = torch.randn(3, 5, 8)
    mask = torch.rand(3, 5) > 0.4
    s, t = student.detach().double().requires_grad_(), teacher.double()
    if kind == "mse":
        per_position = ((s - t) ** 2).mean(-1)
    else:
        per_position = 1 - (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))
    expected = (per_position * mask).sum() / mask.sum()
    loss = hidden_state_loss(student, teacher, kind=kind, mask=mask)
    torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad_of(loss, student).double(), grad_of(expected, s), atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_state_loss_all_masked_is_zero(kind):
    student = torch.randn(2, 3, 4, requires_grad=True)
    loss = hidden_state_loss(
        student, torch.randn(2, 3, 4), kind=kind, mask=torch.zeros(2, 3, dtype=torch.bool)
    )
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    assert torch.equal(grad_of(loss, student), torch.zeros_like(student))


def test_hidden_state_loss_half_inputs_return_float32():
    student, teacher = torch.randn(4, 8).half(), torch.randn(4, 8).half()
    loss = hidden_state_loss(student, teacher)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ((student.double() - teacher.double()) ** 2).mean())


def _attention_maps(scores, key_mask):
    return torch.softmax(scores.masked_fill(~key_mask[:, None, None, :], float("-inf")), dim=-1)


def test_attention_loss_matches_loop_reference_with_padding():
    batch, heads, seq = 2, 3, 5
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    student_scores = torch.randn(batch, heads, seq, seq, requires_grad=True)
    student = _attention_maps(student_scores, mask)
    teacher = _attention_maps(torch.randn(batch, heads, seq, seq), mask)
    loss = attention_distillation_loss(student, teacher, mask=mask)

    total, count = 0.0, 0
    for b in range(batch):
        for q in range(seq):
            if not mask[b, q]:
                continue
            for h in range(heads):
                row_kl = 0.0
                for k in range(seq):
                    p_t, p_s = teacher[b, h, q, k].item(), student[b, h, q, k].item()
                    if p_t > 0:
                        row_kl += p_t * math.log(p_t / p_s)
                total += row_kl / heads
            count += 1
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(total / count, rel=1e-5, abs=1e-7)
    grad = grad_of(loss, student_scores)
    assert torch.isfinite(grad).all()


def test_attention_loss_without_mask_and_all_masked():
    student_scores = torch.randn(2, 2, 4, 4, requires_grad=True)
    student = torch.softmax(student_scores, -1)
    teacher = torch.softmax(torch.randn(2, 2, 4, 4), -1)
    loss = attention_distillation_loss(student, teacher)
    t, s = teacher.double(), student.detach().double()
    expected = (t * (t.log() - s.log())).sum(-1).mean()
    torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=1e-5)
    empty = attention_distillation_loss(student, teacher, mask=torch.zeros(2, 4, dtype=torch.bool))
    assert empty.item() == 0.0
    assert torch.equal(grad_of(empty, student_scores), torch.zeros_like(student_scores))


def test_attention_loss_head_mean_across_head_counts_matches_float64():
    # A student with 2 heads against a teacher with 6: the maps averaged over heads are compared.
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    student_scores = torch.randn(2, 2, 5, 5, requires_grad=True)
    student = _attention_maps(student_scores, mask)
    teacher = _attention_maps(torch.randn(2, 6, 5, 5), mask)
    loss = attention_distillation_loss(student, teacher, mask=mask, heads="mean")

    s64 = student_scores.detach().double().requires_grad_()
    p_s = torch.softmax(s64.masked_fill(~mask[:, None, None, :], float("-inf")), -1).mean(1)  # (b, q, k)
    p_t = teacher.double().mean(1)
    terms = torch.where(p_t > 0, p_t * (p_t.log() - p_s.clamp_min(1e-300).log()), torch.zeros_like(p_t))
    expected = terms.sum(-1)[mask].mean()
    torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        grad_of(loss, student_scores).double(), grad_of(expected, s64), atol=1e-7, rtol=1e-4
    )


def test_attention_loss_head_mean_is_zero_when_the_averages_agree():
    # Different per-head maps with the same head average: per_head sees a difference, mean does not.
    teacher_scores = torch.randn(1, 2, 3, 3)
    teacher = torch.softmax(teacher_scores, -1)
    swapped_scores = teacher_scores.flip(1).clone().requires_grad_()
    swapped = torch.softmax(swapped_scores, -1)
    assert attention_distillation_loss(swapped, teacher).item() > 0
    loss = attention_distillation_loss(swapped, teacher, heads="mean")
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    assert grad_of(loss, swapped_scores).abs().max().item() < 1e-6
    with pytest.raises(ValueError, match="heads='mean'"):
        attention_distillation_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 4, 3, 3))
    with pytest.raises(ValueError, match="unknown heads"):
        attention_distillation_loss(teacher, teacher, heads="max")


# ----------------------------------------------------------------------------------------------------------------
# sparse_distillation_loss
# ----------------------------------------------------------------------------------------------------------------


def reference_buckets(logits, topk_indices, temperature, tail_bucket=True):
    """(N, k [+ 1]) float64 bucket probabilities from full logits (..., V): softmax(logits / T) over the whole
    vocabulary at the k listed tokens, then (k < V and tail_bucket) the summed probability of all other tokens;
    with tail_bucket=False the k listed probabilities renormalised among themselves."""
    vocab = logits.shape[-1]
    probs = torch.softmax(logits.double().reshape(-1, vocab) / temperature, dim=-1)
    indices = topk_indices.reshape(probs.shape[0], -1)
    listed = probs.gather(-1, indices)
    if indices.shape[1] == vocab or not tail_bucket:
        return listed / listed.sum(-1, keepdim=True)
    others = probs.scatter(-1, indices, 0.0).sum(-1, keepdim=True)
    return torch.cat([listed, others], dim=-1)


def reference_divergence(p_teacher, p_student, kind, beta):
    """(N, B) float64 probabilities -> (N,), with 0 * log 0 = 0."""

    def kl(a, b):
        return torch.where(a > 0, a * (a.log() - b.log()), torch.zeros_like(a)).sum(-1)

    if kind == "forward_kl":
        return kl(p_teacher, p_student)
    if kind == "reverse_kl":
        return kl(p_student, p_teacher)
    m = beta * p_teacher + (1 - beta) * p_student
    return beta * kl(p_teacher, m) + (1 - beta) * kl(p_student, m)


def reference_sparse(student, teacher, topk_indices, kind, temperature, beta, tail_bucket=True):
    """Per-position KD between the two models' bucket distributions at temperature T, each summed in float64 from
    its own full softmax(logits / T) (the teacher's full logits, which a cache never holds), times T**2."""
    p_teacher = reference_buckets(teacher, topk_indices, temperature, tail_bucket)
    p_student = reference_buckets(student, topk_indices, temperature, tail_bucket)
    per_position = reference_divergence(p_teacher, p_student, kind, beta) * temperature**2
    return per_position.reshape(student.shape[:-1])


def reference_tail(teacher, topk_indices, temperature):
    """log sum_{j not in top k} p_j**(1/T) in float64, p = softmax(teacher): the remaining mass tempered at T, as
    a cache built for temperature T stores it (at T = 1 the log of the plain remaining mass)."""
    log_probs = torch.log_softmax(teacher.double(), dim=-1)
    return (log_probs / temperature).scatter(-1, topk_indices, -math.inf).logsumexp(-1)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_sparse_with_k_equal_vocab_is_the_full_loss(kind, temperature):
    vocab = 13
    student = random_logits(2, 4, vocab).requires_grad_()
    teacher = random_logits(2, 4, vocab)
    mask = torch.rand(2, 4) > 0.3
    topk_logprobs, topk_indices = torch.log_softmax(teacher, -1).topk(
        vocab, dim=-1
    )  # a permutation of the vocab
    # the cache's tail of a k = V cache is empty (-inf) at every temperature: whatever it says, it is unused
    empty_tail = {"teacher_tail_logmass": torch.full((2, 4), -math.inf), "tail_temperature": 1.0}
    sparse = sparse_distillation_loss(
        student, topk_logprobs, topk_indices, kind=kind, temperature=temperature, mask=mask, **empty_tail
    )
    full = logit_distillation_loss(student, teacher, kind=kind, temperature=temperature, mask=mask)
    sparse_grad = grad_of(sparse, student)
    torch.testing.assert_close(sparse, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse_grad, grad_of(full, student), atol=1e-6, rtol=1e-4)
    student64 = student.detach().double().requires_grad_()
    expected = reference_loss(student64, teacher, kind, temperature, mask=mask)  # dense, float64
    torch.testing.assert_close(sparse.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse_grad.double(), grad_of(expected, student64), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("with_tail", [True, False])
def test_sparse_with_small_k_is_the_kd_between_both_full_softmaxes_in_buckets(
    kind, reduction, temperature, with_tail
):
    """Against both models' full softmax(logits / T) summed into the k + 1 buckets: with the tail tempered at T,
    and at T = 1 without it (derived from the top k); without it at T != 1, both renormalised over the top k."""
    vocab, k = 17, 4
    student = random_logits(3, 5, vocab).requires_grad_()
    teacher = random_logits(3, 5, vocab, scale=3.0)
    mask = torch.rand(3, 5) > 0.3
    topk_logprobs, topk_indices = torch.log_softmax(teacher, -1).topk(k, dim=-1)
    tail = reference_tail(teacher, topk_indices, temperature).float() if with_tail else None
    options = {
        "kind": kind,
        "temperature": temperature,
        "beta": 0.3,
        "mask": mask,
        "reduction": reduction,
        "teacher_tail_logmass": tail,
        "tail_temperature": temperature,
    }
    loss = sparse_distillation_loss(student, topk_logprobs, topk_indices, **options)
    student64 = student.detach().double().requires_grad_()
    tail_bucket = with_tail or temperature == 1.0
    per_position = reference_sparse(
        student64, teacher, topk_indices, kind, temperature, 0.3, tail_bucket=tail_bucket
    )
    expected = reference_reduce(per_position, mask, reduction)
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        grad_of(loss, student).double(), grad_of(expected, student64), atol=1e-6, rtol=1e-4
    )
    # the same KD through the one-pass function that also gives the cross-entropy
    labels = torch.randint(0, vocab, (3, 5))
    kd, _ = sparse_distillation_and_cross_entropy(student, topk_logprobs, topk_indices, labels, **options)
    torch.testing.assert_close(kd, loss)


@pytest.mark.parametrize("vocab, k", [(1000, 8), (32000, 64)])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("with_tail", [True, False])
@pytest.mark.parametrize("one_pass", [False, True])
def test_sparse_student_equal_to_the_teacher_gives_zero_loss_and_gradient(
    vocab, k, temperature, kind, with_tail, one_pass
):
    """The invariant that a biased tail broke (8.93 at T = 2 for k = 64 of 32000): nothing to learn, at every
    temperature, from the cache's columns (top-k log-probabilities at T = 1, tail tempered at T) or without a
    tail."""
    teacher = random_logits(2, 4, vocab, scale=3.0)
    student = teacher.clone().requires_grad_()
    topk_logprobs, topk_indices = torch.log_softmax(teacher, -1).topk(k, dim=-1)
    options = {"kind": kind, "temperature": temperature, "beta": 0.3}
    if with_tail:
        options["teacher_tail_logmass"] = reference_tail(teacher, topk_indices, temperature).float()
        options["tail_temperature"] = temperature
    if one_pass:
        labels = torch.randint(0, vocab, (2, 4))
        loss, _ = sparse_distillation_and_cross_entropy(
            student, topk_logprobs, topk_indices, labels, **options
        )
    else:
        loss = sparse_distillation_loss(student, topk_logprobs, topk_indices, **options)
    assert abs(loss.item()) <= 1e-5
    assert grad_of(loss, student).abs().max().item() <= 1e-6


def _float16_grid_teacher(positions, vocab, k):
    """Teacher logits (positions, V), float32, whose top-k log-probabilities are float16 numbers: the top k drawn on
    the float16 grid in [-5, -4.3], the other tokens sharing the remaining mass, each below the top k."""
    top = (-4.3 - 0.7 * torch.rand(positions, k)).half().double()
    rest = torch.log1p(-top.exp().sum(-1, keepdim=True))  # log of the remaining mass
    others = rest + torch.log_softmax(torch.randn(positions, vocab - k).double(), dim=-1)
    assert others.max() < top.min()
    logits = torch.cat([top, others], dim=-1)
    return logits[:, torch.randperm(vocab)].float()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("with_tail", [True, False])
def test_sparse_student_equal_to_the_teacher_with_float16_stored_logprobs(temperature, kind, with_tail):
    """float16 storage loses nothing for log-probabilities on its grid (zero loss and gradient), and rounds a
    generic teacher's by up to ~0.004, which leaves a loss far below 1e-5 and a gradient of that rounding's size
    only (the biased tail gave O(1) losses)."""
    vocab, k = 32000, 64
    for teacher, gradient_bound in (
        (_float16_grid_teacher(8, vocab, k), 1e-6),
        (random_logits(8, vocab), 1e-4),
    ):
        student = teacher.clone().requires_grad_()
        topk_logprobs, topk_indices = torch.log_softmax(teacher, -1).topk(k, dim=-1)
        options = {"kind": kind, "temperature": temperature}
        if with_tail:
            options["teacher_tail_logmass"] = reference_tail(teacher, topk_indices, temperature).float()
            options["tail_temperature"] = temperature
        loss = sparse_distillation_loss(student, topk_logprobs.half(), topk_indices, **options)
        assert abs(loss.item()) <= 1e-5
        assert grad_of(loss, student).abs().max().item() <= gradient_bound


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_sparse_without_a_tail_at_t_not_1_ignores_the_mass_outside_the_top_k(kind):
    """T != 1 without a stored tail: only the shape within the top k counts. A student equal to the teacher there
    but putting nearly all its mass on other tokens has nothing to learn, finitely, and those tokens get no
    gradient."""
    vocab, k, temperature = 50, 5, 2.0
    teacher = random_logits(3, vocab, scale=3.0)
    topk_logprobs, topk_indices = torch.log_softmax(teacher, -1).topk(k, dim=-1)
    others = torch.ones(3, vocab, dtype=torch.bool).scatter(-1, topk_indices, False)
    student = torch.where(others, teacher + 300.0, teacher).requires_grad_()
    loss = sparse_distillation_loss(
        student, topk_logprobs, topk_indices, kind=kind, temperature=temperature, beta=0.3
    )
    grad = grad_of(loss, student)
    assert abs(loss.item()) <= 1e-5 and grad.abs().max().item() <= 1e-6
    assert torch.equal(grad[others], torch.zeros_like(grad[others]))


def test_sparse_refuses_a_tail_tempered_at_another_temperature():
    vocab, k = 20, 4
    student = random_logits(2, 3, vocab).requires_grad_()
    teacher = random_logits(2, 3, vocab)
    topk_logprobs, topk_indices = torch.log_softmax(teacher, -1).topk(k, dim=-1)
    plain_tail = reference_tail(teacher, topk_indices, 1.0).float()  # what a format-2 cache stores
    with pytest.raises(
        ValueError,
        match=r"computed at temperature 1 \(tail_temperature\) but the loss runs at temperature 2.*"
        r"--temperature 2\) with tail_temperature=2, or pass no tail",
    ):
        sparse_distillation_loss(
            student, topk_logprobs, topk_indices, temperature=2.0, teacher_tail_logmass=plain_tail
        )
    labels = torch.randint(0, vocab, (2, 3))
    with pytest.raises(ValueError, match="computed at temperature 2 .* runs at temperature 4"):
        sparse_distillation_and_cross_entropy(
            student,
            topk_logprobs,
            topk_indices,
            labels,
            temperature=4.0,
            teacher_tail_logmass=plain_tail,
            tail_temperature=2.0,
        )
    with pytest.raises(ValueError, match=r"tail_temperature must be a finite number > 0, got -1\.0"):
        sparse_distillation_loss(
            student, topk_logprobs, topk_indices, teacher_tail_logmass=plain_tail, tail_temperature=-1.0
        )


def test_sparse_with_the_exact_remaining_mass_is_finite_where_the_top_k_hold_everything():
    vocab, k = 11, 3
    student = random_logits(4, vocab).requires_grad_()
    teacher = random_logits(4, vocab)
    teacher[:, 0] = 200.0
    log_probs = torch.log_softmax(teacher, -1)
    topk_logprobs, topk_indices = log_probs.topk(k, dim=-1)
    # tempered at T = 2: about -100, tiny but exact
    tail = log_probs.scatter(-1, topk_indices, -math.inf).div(2.0).logsumexp(-1)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        loss = sparse_distillation_loss(
            student,
            topk_logprobs,
            topk_indices,
            kind=kind,
            temperature=2.0,
            teacher_tail_logmass=tail,
            tail_temperature=2.0,
        )
        assert torch.isfinite(loss) and torch.isfinite(grad_of(loss, student)).all()
    with pytest.raises(
        ValueError, match=r"teacher_tail_logmass has shape \(4, 1\).*one value per position \(4,\)"
    ):
        sparse_distillation_loss(student, topk_logprobs, topk_indices, teacher_tail_logmass=tail[:, None])


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_sparse_is_finite_when_the_teacher_tail_is_zero(kind):
    vocab, k = 11, 3
    student = random_logits(4, vocab).requires_grad_()
    teacher = random_logits(4, vocab)
    teacher[:, 0] = 200.0  # the teacher is certain: the top-k mass rounds to 1 and the tail to 0
    topk_logprobs, topk_indices = torch.log_softmax(teacher, -1).topk(k, dim=-1)
    for temperature in (1.0, 3.0):
        loss = sparse_distillation_loss(
            student, topk_logprobs, topk_indices, kind=kind, temperature=temperature
        )
        assert torch.isfinite(loss)
        assert torch.isfinite(grad_of(loss, student)).all()


def test_sparse_all_masked_is_zero():
    student = random_logits(2, 3, 9).requires_grad_()
    topk_logprobs, topk_indices = torch.log_softmax(random_logits(2, 3, 9), -1).topk(3, dim=-1)
    loss = sparse_distillation_loss(
        student, topk_logprobs, topk_indices, mask=torch.zeros(2, 3, dtype=torch.bool)
    )
    assert loss.item() == 0.0
    assert torch.equal(grad_of(loss, student), torch.zeros_like(student))


# ----------------------------------------------------------------------------------------------------------------
# sparse_distillation_and_cross_entropy: both losses from one pass
# ----------------------------------------------------------------------------------------------------------------


ONE_PASS_TEMPERATURES = [1.0, 2.0, 1.7]  # the three ways softmax(logits) is formed inside


def _kd_and_ce_apart(logits, topk_logprobs, topk_indices, labels, reduction="mean", **options):
    vocab = logits.shape[-1]
    kd = sparse_distillation_loss(logits, topk_logprobs, topk_indices, reduction=reduction, **options)
    ce = F.cross_entropy(
        logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=-100, reduction=reduction
    )
    return kd, ce


@pytest.mark.parametrize("temperature", ONE_PASS_TEMPERATURES)
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("k", [4, 17])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_tail", [False, True])
def test_kd_and_ce_in_one_pass_equal_the_two_apart(temperature, kind, k, reduction, with_tail):
    vocab = 17
    padded = random_logits(3, 5, vocab + 3, scale=3.0)  # sliced below: logits with strides, as in the trainer
    together, apart = padded.clone().requires_grad_(), padded.clone().requires_grad_()
    labels = torch.randint(0, vocab, (3, 5))
    labels[0, :2] = -100
    labels[2, -1] = -100
    mask = torch.rand(3, 5) > 0.3  # independent of the labels: KD and CE each keep their own positions
    topk_logprobs, topk_indices = torch.log_softmax(random_logits(3, 5, vocab, scale=3.0), -1).topk(k, dim=-1)
    tail = torch.rand(3, 5).clamp_min(0.05).log() if with_tail else None
    options = {
        "temperature": temperature,
        "kind": kind,
        "beta": 0.3,
        "mask": mask,
        "teacher_tail_logmass": tail,
        "tail_temperature": temperature,
    }

    kd, ce = sparse_distillation_and_cross_entropy(
        together[..., :vocab], topk_logprobs, topk_indices, labels, reduction=reduction, **options
    )
    kd_apart, ce_apart = _kd_and_ce_apart(
        apart[..., :vocab], topk_logprobs, topk_indices, labels, reduction=reduction, **options
    )
    torch.testing.assert_close(kd, kd_apart)
    torch.testing.assert_close(ce, ce_apart)
    (0.3 * kd + 0.7 * ce).backward()
    (0.3 * kd_apart + 0.7 * ce_apart).backward()
    torch.testing.assert_close(together.grad, apart.grad, atol=1e-6, rtol=1e-5)
    assert together.grad[..., vocab:].abs().sum() == 0


@pytest.mark.parametrize("temperature", ONE_PASS_TEMPERATURES)
def test_kd_and_ce_in_one_pass_from_bfloat16_logits(temperature):
    vocab, k = 29, 5
    logits = random_logits(2, 6, vocab, dtype=torch.bfloat16).requires_grad_()
    labels = torch.randint(0, vocab, (2, 6))
    topk_logprobs, topk_indices = torch.log_softmax(random_logits(2, 6, vocab), -1).topk(k, dim=-1)
    kd, ce = sparse_distillation_and_cross_entropy(
        logits, topk_logprobs, topk_indices, labels, temperature=temperature
    )
    assert kd.dtype == ce.dtype == torch.float32
    (kd + ce).backward()
    assert logits.grad.dtype == torch.bfloat16

    reference = logits.detach().float().requires_grad_()
    expected = sum(_kd_and_ce_apart(reference, topk_logprobs, topk_indices, labels, temperature=temperature))
    expected.backward()
    torch.testing.assert_close(kd + ce, expected)
    torch.testing.assert_close(logits.grad.float(), reference.grad, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("temperature", ONE_PASS_TEMPERATURES)
def test_kd_and_ce_with_nothing_to_learn_are_zero(temperature):
    logits = random_logits(2, 3, 9).requires_grad_()
    topk_logprobs, topk_indices = torch.log_softmax(random_logits(2, 3, 9), -1).topk(3, dim=-1)
    labels = torch.full((2, 3), -100)
    kd, ce = sparse_distillation_and_cross_entropy(
        logits, topk_logprobs, topk_indices, labels, temperature=temperature, mask=labels.ne(-100)
    )
    assert kd.item() == 0.0 and ce.item() == 0.0
    (kd + ce).backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("temperature", ONE_PASS_TEMPERATURES)
def test_kd_and_ce_with_minus_inf_logits(temperature):
    """A token no position may produce (logit -inf), also at positions without a target: finite and equal to the
    two losses apart, never 0 * inf."""
    vocab, k = 9, 3
    base = random_logits(2, 4, vocab)
    base[..., 0] = -math.inf
    together, apart = base.clone().requires_grad_(), base.clone().requires_grad_()
    labels = torch.randint(1, vocab, (2, 4))
    labels[0, 0] = -100
    mask = labels.ne(-100)
    topk_logprobs, topk_indices = torch.log_softmax(random_logits(2, 4, vocab), -1)[..., 1:].topk(k, dim=-1)
    topk_indices = topk_indices + 1  # the teacher's top k avoid token 0 too
    options = {"temperature": temperature, "mask": mask}
    kd, ce = sparse_distillation_and_cross_entropy(together, topk_logprobs, topk_indices, labels, **options)
    kd_apart, ce_apart = _kd_and_ce_apart(apart, topk_logprobs, topk_indices, labels, **options)
    assert torch.isfinite(kd) and torch.isfinite(ce)
    torch.testing.assert_close(kd, kd_apart)
    torch.testing.assert_close(ce, ce_apart)
    (kd + ce).backward()
    (kd_apart + ce_apart).backward()
    assert torch.isfinite(together.grad).all()
    torch.testing.assert_close(together.grad, apart.grad, atol=1e-6, rtol=1e-5)


def test_kd_and_ce_reject_misaligned_or_float_labels():
    logits = torch.zeros(2, 5, 7)
    topk_logprobs, topk_indices = torch.zeros(2, 5, 2), torch.zeros(2, 5, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"labels has shape \(2, 4\).*position dims \(2, 5\).*shifted left"):
        sparse_distillation_and_cross_entropy(
            logits, topk_logprobs, topk_indices, torch.zeros(2, 4, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="labels must be integer token ids"):
        sparse_distillation_and_cross_entropy(logits, topk_logprobs, topk_indices, torch.zeros(2, 5))


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


def test_vocab_mismatch_names_both_sizes_and_the_fix():
    with pytest.raises(
        ValueError, match=r"teacher has vocab 32064, student 32000.*slice the teacher's padded rows"
    ):
        logit_distillation_loss(torch.zeros(1, 2, 32000), torch.zeros(1, 2, 32064))
    with pytest.raises(ValueError, match=r"teacher has vocab 12, student 10"):
        fused_linear_distillation_loss(
            torch.zeros(3, 4), torch.zeros(10, 4), torch.zeros(3, 5), torch.zeros(12, 5)
        )


def test_position_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"shape \(2, 5, 7\) but teacher_logits \(2, 6, 7\)"):
        logit_distillation_loss(torch.zeros(2, 5, 7), torch.zeros(2, 6, 7))
    with pytest.raises(ValueError, match=r"student_hidden has shape \(3, 4\) but teacher_hidden \(2, 4\)"):
        fused_linear_distillation_loss(
            torch.zeros(3, 4), torch.zeros(10, 4), torch.zeros(2, 4), torch.zeros(10, 4)
        )


def test_unknown_kind_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown kind 'kl'.*'forward_kl', 'reverse_kl', 'jsd', 'mse'"):
        logit_distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), kind="kl")
    with pytest.raises(ValueError, match=r"unknown kind 'l1'.*'mse' and 'cosine'"):
        hidden_state_loss(torch.zeros(2, 3), torch.zeros(2, 3), kind="l1")
    with pytest.raises(ValueError, match=r"unknown kind 'mse'.*'forward_kl', 'reverse_kl', 'jsd'"):
        sparse_distillation_loss(
            torch.zeros(2, 5), torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long), kind="mse"
        )


def test_bad_mask_temperature_beta_and_chunk_size():
    student, teacher = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 4\).*position dims \(2, 3\)"):
        logit_distillation_loss(student, teacher, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature must be"):
        logit_distillation_loss(student, teacher, temperature=0.0)
    with pytest.raises(ValueError, match="beta must lie in"):
        logit_distillation_loss(student, teacher, kind="jsd", beta=1.5)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        logit_distillation_loss(student, teacher, chunk_size=0)
    with pytest.raises(ValueError, match="unknown reduction"):
        logit_distillation_loss(student, teacher, reduction="batchmean")
    with pytest.raises(ValueError, match=r"mask has shape \(2, 3\), expected \(batch, q\) = \(2, 4\)"):
        attention_distillation_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), mask=torch.ones(2, 3))
