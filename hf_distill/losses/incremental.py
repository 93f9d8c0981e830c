"""Learning without Forgetting (Li & Hoiem, 2016): the model trained on the old classes teaches a model that also
predicts new classes, on the old classes only.

The paper's old-task loss is a "modified cross-entropy" between the previous model's and the new model's
temperature-softened distributions over the old classes (T = 2). Here it is written as the KL divergence
KL(p_previous || p_new_on_old_classes), which differs from that cross-entropy by the previous model's entropy (a
constant: the same gradient) and is zero, with a zero gradient, when the new model reproduces the old one. As
everywhere in this package it is scaled by T**2 (Hinton et al., 2015), so that its weight does not depend on T.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hf_distill.losses._common import LOGIT_KINDS
from hf_distill.losses.dense import logit_distillation_loss


def lwf_distillation_loss(
    student_logits: torch.Tensor,
    previous_logits: torch.Tensor,
    *,
    temperature: float = 2.0,
    old_columns: torch.Tensor | Sequence[int] | None = None,
    kind: str = "forward_kl",
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """The previous model's softened distribution over the old classes against the student's on the same classes.

    student_logits: (..., C_new), the grown model's logits over old and new classes.
    previous_logits: (..., C_old), the previous model's logits (a constant: no gradient reaches it).
    old_columns: the C_old columns of `student_logits` that are the old classes, in the previous model's order;
        None = the first C_old columns (where `hf_distill.heads.grow_classifier` keeps them).
    mask: (...) bool over the leading dims, True = counts; None = every position counts.
    Returns a float32 scalar: per position

        T**2 * KL(softmax(previous / T) || softmax(student[..., old_columns] / T))      (kind="forward_kl")

    averaged over unmasked positions (reduction="mean") or summed ("sum"). The softmax of the student runs over
    the old columns alone: the new classes take no part in what the old model teaches. Other `kind`s are those of
    `logit_distillation_loss` ("mse" matches the old logits themselves, without a temperature).
    """
    if kind not in LOGIT_KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid kinds are {', '.join(repr(k) for k in LOGIT_KINDS)}.")
    if student_logits.dim() == 0 or previous_logits.dim() == 0:
        raise ValueError("student_logits and previous_logits need a class dim (..., classes); got a scalar.")
    old = previous_logits.shape[-1]
    if student_logits.shape[:-1] != previous_logits.shape[:-1]:
        raise ValueError(
            f"student_logits has shape {tuple(student_logits.shape)} and previous_logits "
            f"{tuple(previous_logits.shape)}: the leading (position) dims must match; run both models on the same "
            "batch."
        )
    if old_columns is None:
        if student_logits.shape[-1] < old:
            raise ValueError(
                f"the student has {student_logits.shape[-1]} classes, fewer than the previous model's {old}: grow "
                "its head with the new classes after the old ones (hf_distill.heads.grow_classifier)."
            )
        old_student = student_logits[..., :old]
    else:
        columns = torch.as_tensor(old_columns, dtype=torch.long, device=student_logits.device)
        if columns.dim() != 1 or columns.numel() != old:
            raise ValueError(
                f"old_columns must list one student column per old class ({old}), got shape {tuple(columns.shape)}."
            )
        if columns.numel() and (int(columns.min()) < 0 or int(columns.max()) >= student_logits.shape[-1]):
            raise ValueError(
                f"old_columns {columns.tolist()} fall outside the student's {student_logits.shape[-1]} classes."
            )
        if columns.unique().numel() != columns.numel():
            raise ValueError(f"old_columns {columns.tolist()} repeat a column; each old class has its own.")
        old_student = student_logits.index_select(-1, columns)
    return logit_distillation_loss(
        old_student,
        previous_logits.to(student_logits.device),
        temperature=temperature,
        kind=kind,
        mask=mask,
        reduction=reduction,
    )
