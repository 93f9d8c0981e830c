"""Layer maps and hidden-state projections."""

from __future__ import annotations

import pytest
import torch

from hf_distill.training.matching import (
    HiddenProjections,
    attention_matching_loss,
    parse_layer_map,
    resolve_layer_map,
)


def test_uniform_map_spreads_student_layers_over_the_teacher():
    assert resolve_layer_map("uniform", 3, 6) == [(1, 2), (2, 4), (3, 6)]
    assert resolve_layer_map("uniform", 2, 12) == [(1, 6), (2, 12)]
    assert resolve_layer_map("uniform", 4, 4) == [(1, 1), (2, 2), (3, 3), (4, 4)]
    assert resolve_layer_map("UNIFORM", 1, 5) == [(1, 5)]


def test_explicit_pairs_are_parsed_and_checked():
    assert parse_layer_map(" 0:0, 1:3 ,2:6") == [(0, 0), (1, 3), (2, 6)]
    assert resolve_layer_map("0:0,2:6", 2, 6) == [(0, 0), (2, 6)]
    with pytest.raises(ValueError, match=r"student indices must be in \[0, 2\]"):
        resolve_layer_map("3:6", 2, 6)
    with pytest.raises(ValueError, match=r"teacher indices must be in \[0, 6\]"):
        resolve_layer_map("1:7", 2, 6)
    with pytest.raises(ValueError, match="not a 'student_layer:teacher_layer' pair"):
        parse_layer_map("1:2;2:4")
    with pytest.raises(ValueError, match="maps a student layer twice"):
        parse_layer_map("1:2,1:4")


def test_projections_only_when_widths_differ_and_loss_matches_reference():
    torch.manual_seed(0)
    same = HiddenProjections([(1, 2)], 8, 8)
    assert len(list(same.parameters())) == 0
    student = tuple(torch.randn(2, 3, 8) for _ in range(2))
    teacher = tuple(torch.randn(2, 3, 8) for _ in range(3))
    mask = torch.tensor([[True, True, False], [True, False, False]])
    expected = ((student[1] - teacher[2]) ** 2).mean(-1)[mask].mean()
    torch.testing.assert_close(same(student, teacher, mask=mask), expected)

    wide = HiddenProjections([(1, 2), (2, 2)], 8, 12)
    assert sorted(name for name, _ in wide.named_parameters()) == [
        "projections.layer_1.bias",
        "projections.layer_1.weight",
        "projections.layer_2.bias",
        "projections.layer_2.weight",
    ]
    student_three = student + (torch.randn(2, 3, 8),)  # embeddings, layer 1, layer 2
    teacher_wide = tuple(torch.randn(2, 3, 12) for _ in range(3))
    projection_1, projection_2 = wide.projections["layer_1"], wide.projections["layer_2"]
    reference = (
        ((projection_1(student_three[1]) - teacher_wide[2]) ** 2).mean(-1)[mask].mean()
        + ((projection_2(student_three[2]) - teacher_wide[2]) ** 2).mean(-1)[mask].mean()
    ) / 2
    loss = wide(student_three, teacher_wide, mask=mask)
    torch.testing.assert_close(loss, reference)
    loss.backward()
    assert projection_1.weight.grad is not None and projection_2.weight.grad.abs().sum() > 0
    cosine = wide(student_three, teacher_wide, kind="cosine")
    cosine_reference = (
        (1 - torch.cosine_similarity(projection_1(student_three[1]), teacher_wide[2], dim=-1)).mean()
        + (1 - torch.cosine_similarity(projection_2(student_three[2]), teacher_wide[2], dim=-1)).mean()
    ) / 2
    torch.testing.assert_close(cosine, cosine_reference, rtol=1e-5, atol=1e-6)


def test_attention_matching_skips_embedding_pairs_and_needs_one_layer():
    torch.manual_seed(0)
    student = tuple(torch.softmax(torch.randn(1, 2, 3, 3), -1) for _ in range(2))
    teacher = tuple(torch.softmax(torch.randn(1, 2, 3, 3), -1) for _ in range(4))
    loss = attention_matching_loss(student, teacher, [(0, 0), (2, 4)])
    p, q = teacher[3], student[1]
    reference = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(loss, reference, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="at least one layer pair"):
        attention_matching_loss(student, teacher, [(0, 0)])
