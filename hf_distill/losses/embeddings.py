"""Sentence-embedding distillation: the student's pooled sentence embeddings against the teacher's.

Three per-text terms, each a row of a (batch, dim) pair, summed or averaged over the rows:

- mse:        mean over dim of (student - teacher)**2 (sentence-transformers' MSELoss, Reimers & Gurevych 2020);
- cosine:     1 - cos(student, teacher), blind to the length of the vectors;
- similarity: mean over the batch's texts j of (cos(s_i, s_j) - cos(t_i, t_j))**2, the in-batch similarity
              matrix's row i: the student learns which texts the teacher finds alike, not their coordinates.

The student's embeddings must already live in the teacher's space (projected to its dimension where the widths
differ). The teacher is a constant: no gradient reaches it. Every term is 0 with a zero gradient when the student's
embeddings equal the teacher's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hf_distill.losses._common import _mean_or_sum

EMBEDDING_TERMS = ("mse", "cosine", "similarity")
_EPS = 1e-8


def _check(student: torch.Tensor, teacher: torch.Tensor, reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"unknown reduction {reduction!r}; valid reductions are 'mean' and 'sum'.")
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"student embeddings have shape {tuple(student.shape)} and teacher embeddings {tuple(teacher.shape)}: "
            "both must be (batch, dim) with the same dim; give the student a projection to the teacher's "
            "dimension (hf_distill.embeddings.SentenceEmbedder(projection_dim=...))."
        )


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def embedding_mse_loss(
    student: torch.Tensor, teacher: torch.Tensor, *, reduction: str = "mean"
) -> torch.Tensor:
    """Per text: mean over dim of (student - teacher)**2; then the mean (or sum) over texts.

    student, teacher: (batch, dim). Returns a float32 scalar."""
    _check(student, teacher, reduction)
    per_text = (student.float() - teacher.detach().float()).pow(2).mean(-1)
    return _mean_or_sum(per_text.sum(), per_text.shape[0], reduction)


def embedding_cosine_loss(
    student: torch.Tensor, teacher: torch.Tensor, *, reduction: str = "mean"
) -> torch.Tensor:
    """Per text: 1 - cos(student, teacher) (norms clamped at 1e-8); then the mean (or sum) over texts.

    student, teacher: (batch, dim). Returns a float32 scalar."""
    _check(student, teacher, reduction)
    per_text = 1.0 - F.cosine_similarity(student.float(), teacher.detach().float(), dim=-1, eps=_EPS)
    return _mean_or_sum(per_text.sum(), per_text.shape[0], reduction)


def similarity_matrix_loss(
    student: torch.Tensor, teacher: torch.Tensor, *, reduction: str = "mean"
) -> torch.Tensor:
    """Per text i: mean over the batch's texts j of (cos(s_i, s_j) - cos(t_i, t_j))**2; then the mean (or sum)
    over texts. The diagonal (1 - 1 = 0 for nonzero rows) is included, so a batch of one text gives 0.

    student, teacher: (batch, dim); the dims may differ here, since only each side's own cosines are compared.
    Returns a float32 scalar."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"unknown reduction {reduction!r}; valid reductions are 'mean' and 'sum'.")
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student embeddings have shape {tuple(student.shape)} and teacher embeddings {tuple(teacher.shape)}: "
            "both must be (batch, dim) over the same texts."
        )
    student_unit = _unit(student.float())
    teacher_unit = _unit(teacher.detach().float())
    difference = student_unit @ student_unit.T - teacher_unit @ teacher_unit.T  # (batch, batch)
    per_text = difference.pow(2).mean(-1)
    return _mean_or_sum(per_text.sum(), per_text.shape[0], reduction)


def embedding_distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    mse_weight: float = 1.0,
    cosine_weight: float = 0.0,
    similarity_weight: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """mse_weight * mse + cosine_weight * cosine + similarity_weight * similarity (the module docstring's terms),
    each reduced over the texts the same way.

    student, teacher: (batch, dim), the student in the teacher's space. Weights >= 0, not all 0. Returns a float32
    scalar; "sum" adds the per-text terms for callers that normalise over an accumulation window themselves."""
    weights = {"mse": mse_weight, "cosine": cosine_weight, "similarity": similarity_weight}
    if any(weight < 0 for weight in weights.values()) or not any(weight > 0 for weight in weights.values()):
        raise ValueError(
            f"embedding loss weights must be >= 0 and at least one > 0, got {weights}; e.g. mse_weight=1."
        )
    _check(student, teacher, reduction)
    terms = {
        "mse": embedding_mse_loss,
        "cosine": embedding_cosine_loss,
        "similarity": similarity_matrix_loss,
    }
    total = student.new_zeros((), dtype=torch.float32)
    for name, weight in weights.items():
        if weight > 0:
            total = total + weight * terms[name](student, teacher, reduction=reduction)
    return total
