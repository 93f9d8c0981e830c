"""Students for a sentence embedder: the teacher's encoder cut to fewer layers (`create_student`) or pruned narrower
(the compression pipeline's structured pruning), under the teacher's pooling and normalisation, with a projection
into the teacher's space where the widths differ, initialised by least squares on a few texts.

    student = embedding_student(teacher, num_layers=3)                                   cut: 3 of 6 layers
    student = embedding_student(teacher, hidden=192, layers=3, calibration=batches)      pruned: 3 layers x 192
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from transformers.utils import logging

from hf_distill.compression.pruning import PruningSpec, measure_importance, prune_model
from hf_distill.embeddings.model import SentenceEmbedder
from hf_distill.embeddings.pooling import pool
from hf_distill.students import create_student
from hf_distill.training.teacher import forward_inputs

logger = logging.get_logger(__name__)


def embedding_student(
    teacher: SentenceEmbedder,
    *,
    num_layers: int | None = None,
    layers: Sequence[int] | None = None,
    hidden: int | None = None,
    heads: float = 0.0,
    ffn: float = 0.0,
    calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
) -> SentenceEmbedder:
    """A student of `teacher` with its pooling, normalisation, max_seq_length and folder format.

    Depth only (`num_layers` or `layers`): `create_student` copies those teacher layers. Any width (`hidden`, or
    the `heads` / `ffn` fractions removed per layer): `prune_model` on `measure_importance` scores from
    `calibration` (tokenized batches, needed then), and the layers of `num_layers` / `layers`. Where the student's
    width equals the teacher's, it keeps the teacher's Dense layers; otherwise one identity-activation projection
    maps its pooled embedding to the teacher's dimension (initialise it with `fit_projection`)."""
    if num_layers is None and layers is None and hidden is None and not heads and not ffn:
        raise ValueError(
            "embedding_student needs a smaller shape: num_layers / layers (a cut student) or hidden / heads / ffn "
            "(a pruned one)."
        )
    encoder = teacher.encoder
    if hidden is not None or heads or ffn:
        if calibration is None:
            raise ValueError(
                "pruning the width needs calibration batches (tokenized texts) to score heads, neurons and channels."
            )
        spec = PruningSpec(
            heads=heads,
            ffn=ffn,
            hidden=hidden,
            layers=num_layers,
            layer_indices=list(layers) if layers else None,
        )
        student_encoder = prune_model(encoder, spec, measure_importance(encoder, calibration))
    else:
        student_encoder = create_student(encoder, num_layers, list(layers) if layers else "uniform")
    same_width = student_encoder.config.hidden_size == teacher.hidden_size
    return SentenceEmbedder(
        student_encoder,
        teacher.pooling,
        # the same width: the teacher's own Dense layers fit; another: one projection to the teacher's dimension
        dense_layers=[copy.deepcopy(layer) for layer in teacher.dense_layers] if same_width else (),
        projection_dim=None if same_width else teacher.embedding_dimension,
        normalize=teacher.normalize,
        max_seq_length=teacher.max_seq_length,
        folder_format=copy.deepcopy(teacher.folder_format),
    )


def _pooled(model: SentenceEmbedder, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    inputs = forward_inputs(model.encoder, batch)
    token_embeddings = model.encoder(**inputs, return_dict=True).last_hidden_state
    return pool(token_embeddings, batch.get("attention_mask"), model.pooling).float()


@torch.no_grad()
def fit_projection(
    student: SentenceEmbedder,
    teacher: SentenceEmbedder,
    batches: Iterable[Mapping[str, Any]],
    *,
    ridge: float = 1e-3,
) -> dict[str, float]:
    """Set the student's projection (its one Dense layer) to the least-squares map from its pooled embeddings to the
    teacher's embeddings before normalisation, on `batches` (tokenized texts the teacher and student both read):
    W = argmin ||[P 1] W - T||^2 + ridge * mean(diag(P^T P)) * ||W||^2, in float64. The teacher's Dense layers are
    applied to its targets. Returns the fit's mean cosine between [P 1] W and T, before and after."""
    if (
        len(student.dense_layers) != 1
        or student.dense_layers[0].activation_name.rsplit(".", 1)[-1] != "Identity"
    ):
        raise ValueError(
            "fit_projection sets a student's single identity-activation projection; this one has none."
        )
    layer = student.dense_layers[0].linear
    was_training = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    pooled, targets = [], []
    for batch in batches:
        tensors = {k: v.to(layer.weight.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        pooled.append(_pooled(student, tensors).double())
        target = _pooled(teacher, tensors)
        for dense in teacher.dense_layers:
            target = dense(target)
        targets.append(target.double())
    student.train(was_training[0])
    teacher.train(was_training[1])
    if not pooled:
        raise ValueError("fit_projection got no batches.")
    inputs = torch.cat(pooled)  # (n, hidden_student)
    target = torch.cat(targets)  # (n, dim_teacher)
    design = torch.cat([inputs, torch.ones(inputs.shape[0], 1, dtype=inputs.dtype)], dim=1)
    gram = design.T @ design
    penalty = ridge * torch.diagonal(gram).mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    penalty[-1, -1] = 0.0  # the bias is not shrunk
    solution = torch.linalg.solve(gram + penalty, design.T @ target)  # (hidden_student + 1, dim_teacher)
    before = torch.nn.functional.cosine_similarity(layer(inputs.float()).double(), target, dim=-1).mean()
    layer.weight.copy_(solution[:-1].T.to(layer.weight.dtype))
    if layer.bias is not None:
        layer.bias.copy_(solution[-1].to(layer.bias.dtype))
    after = torch.nn.functional.cosine_similarity(design @ solution, target, dim=-1).mean()
    logger.info(
        f"fit_projection: {inputs.shape[0]} texts, cosine to the teacher before normalisation {float(before):.4f} "
        f"-> {float(after):.4f}"
    )
    return {"texts": float(inputs.shape[0]), "cosine_before": float(before), "cosine_after": float(after)}
