"""Conventions shared with the peers, checked against torch's own divergences: the generalised JSD's end points
(TRL's: beta 0 is forward KL, beta 1 reverse KL) on every path, and the per-label Bernoulli KL of multi-label
heads against a float64 formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_distill.losses import (
    bernoulli_distillation_loss,
    fused_linear_distillation_loss,
    logit_distillation_loss,
    sparse_distillation_loss,
)


def _kl_div64(log_q, log_p):
    """KL(p || q) per row via torch's F.kl_div, float64."""
    return F.kl_div(log_q.double(), log_p.double(), reduction="none", log_target=True).sum(-1)


def _endpoint_reference(student_logits, teacher_logits, temperature, beta):
    log_p_s = F.log_softmax(student_logits.double() / temperature, -1)
    log_p_t = F.log_softmax(teacher_logits.double() / temperature, -1)
    if beta == 0.0:
        per_row = _kl_div64(log_p_s, log_p_t)  # KL(teacher || student)
    else:
        per_row = _kl_div64(log_p_t, log_p_s)  # KL(student || teacher)
    return per_row.mean() * temperature**2


@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_end_points_are_the_two_kls_on_every_path(beta, temperature):
    torch.manual_seed(0)
    hidden, vocab = 8, 50
    student_hidden, teacher_hidden = torch.randn(3, 5, hidden), torch.randn(3, 5, hidden)
    student_weight, teacher_weight = torch.randn(vocab, hidden), torch.randn(vocab, hidden)
    student_logits, teacher_logits = student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T
    expected = _endpoint_reference(student_logits, teacher_logits, temperature, beta).item()
    assert expected > 0.05
    options = dict(temperature=temperature, kind="jsd", beta=beta)
    dense = logit_distillation_loss(student_logits, teacher_logits, **options)
    chunked = logit_distillation_loss(student_logits, teacher_logits, chunk_size=4, **options)
    fused = fused_linear_distillation_loss(
        student_hidden, student_weight, teacher_hidden, teacher_weight, **options
    )
    top = F.log_softmax(teacher_logits, -1).topk(vocab, dim=-1)  # k = V: the sparse loss is exact
    sparse = sparse_distillation_loss(student_logits, top.values, top.indices, **options)
    for value in (dense, chunked, fused, sparse):
        assert value.item() == pytest.approx(expected, rel=1e-4)


def test_jsd_inside_the_interval_stays_the_mixture_divergence():
    torch.manual_seed(1)
    student_logits, teacher_logits = torch.randn(6, 20), torch.randn(6, 20)
    beta = 0.3
    p_s, p_t = F.softmax(student_logits.double(), -1), F.softmax(teacher_logits.double(), -1)
    log_m = (beta * p_t + (1 - beta) * p_s).log()
    expected = (beta * _kl_div64(log_m, p_t.log()) + (1 - beta) * _kl_div64(log_m, p_s.log())).mean()
    value = logit_distillation_loss(student_logits, teacher_logits, kind="jsd", beta=beta)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


def _bernoulli64(student_logits, teacher_logits, temperature, kind):
    p_s = torch.sigmoid(student_logits.double() / temperature)
    p_t = torch.sigmoid(teacher_logits.double() / temperature)

    def kl(p, q):
        return p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()

    per_label = kl(p_t, p_s) if kind == "forward_kl" else kl(p_s, p_t)
    return per_label.mean(-1) * temperature**2


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_bernoulli_kl_matches_the_float64_formula_and_its_gradient(kind, temperature):
    torch.manual_seed(2)
    student_logits = torch.randn(5, 7, dtype=torch.float64) * 3
    teacher_logits = torch.randn(5, 7, dtype=torch.float64) * 3
    mask = torch.tensor([True, False, True, True, False])
    student32 = student_logits.float().requires_grad_()
    value = bernoulli_distillation_loss(
        student32, teacher_logits.float(), temperature=temperature, kind=kind, mask=mask
    )
    value.backward()
    reference_input = student_logits.clone().requires_grad_()
    reference = _bernoulli64(reference_input, teacher_logits, temperature, kind)[mask].mean()
    reference.backward()
    assert value.item() == pytest.approx(reference.item(), rel=1e-5)
    assert torch.allclose(student32.grad.double(), reference_input.grad, atol=1e-6)


def test_bernoulli_kl_is_zero_at_the_teacher_and_sees_a_common_shift():
    torch.manual_seed(3)
    teacher_logits = torch.randn(4, 6)
    student_logits = teacher_logits.clone().requires_grad_()
    loss = bernoulli_distillation_loss(student_logits, teacher_logits, temperature=2.0)
    loss.backward()
    assert abs(loss.item()) <= 1e-6 and student_logits.grad.abs().max().item() <= 1e-6
    shifted = bernoulli_distillation_loss(teacher_logits + 5.0, teacher_logits, temperature=2.0)
    softmax_kl = logit_distillation_loss(teacher_logits + 5.0, teacher_logits, temperature=2.0)
    assert abs(softmax_kl.item()) <= 1e-5 and shifted.item() > 0.5


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_ours_is_temperature_squared_times_trl_generalized_jsd(beta, temperature):
    """TRL 1.16's own `generalized_jsd_loss` is the reference: with labels it divides by the unmasked tokens, as
    our "mean" does, so the only difference is our T**2 factor (README, "How these relate to TRL")."""
    gkd = pytest.importorskip(
        "trl.experimental.gkd", reason="TRL is the reference here: pip install -e '.[peers]'"
    )
    torch.manual_seed(1)
    student_logits, teacher_logits = torch.randn(3, 7, 40), torch.randn(3, 7, 40)
    labels = torch.randint(0, 40, (3, 7))
    labels[0, :3] = -100
    labels[2, 5:] = -100
    trl_loss = gkd.GKDTrainer.generalized_jsd_loss(
        student_logits, teacher_logits, labels=labels, beta=beta, temperature=temperature
    )
    kind = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta, "jsd")
    ours = logit_distillation_loss(
        student_logits, teacher_logits, temperature=temperature, kind=kind, beta=beta, mask=labels.ne(-100)
    )
    assert ours.item() == pytest.approx(temperature**2 * trl_loss.item(), rel=1e-5, abs=1e-7)
