"""The student's own (hard-label) loss, computed from its logits, plus how a model's outputs line up with labels.

The trainer computes this itself rather than reading `outputs.loss`, because many heads (sequence
classification among them) average inside the model and ignore `num_items_in_batch`, which makes the loss
scale wrong under gradient accumulation. Returning a sum and a count lets the trainer normalise every term
the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
)

SEQUENCE, TOKEN, CAUSAL_LM, SEQ2SEQ = "sequence", "token", "causal_lm", "seq2seq"


def _class_names(mapping: dict) -> set[str]:
    names: set[str] = set()
    for value in mapping.values():
        names.update(value if isinstance(value, (list, tuple)) else [value])
    return names


_CAUSAL_LM = _class_names(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
_SEQUENCE = _class_names(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)
_TOKEN = _class_names(MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES)


@dataclass(frozen=True)
class TaskKind:
    """What a model's logits mean: one prediction per example (`sequence`) or per token, shifted or not."""

    kind: str | None  # None: decided from the logits' rank at the first batch
    problem_type: str | None = None

    @property
    def is_regression(self) -> bool:
        return self.problem_type == "regression"


def infer_task(model: torch.nn.Module) -> TaskKind:
    config = getattr(model, "config", None)
    name = type(model).__name__
    if config is None:
        return TaskKind(None)
    if getattr(config, "is_encoder_decoder", False):
        return TaskKind(SEQ2SEQ)
    if name in _CAUSAL_LM:
        return TaskKind(CAUSAL_LM)
    if name in _SEQUENCE:
        problem_type = getattr(config, "problem_type", None)
        if problem_type is None:
            problem_type = "regression" if config.num_labels == 1 else "single_label_classification"
        return TaskKind(SEQUENCE, problem_type)
    if name in _TOKEN:
        return TaskKind(TOKEN)
    return TaskKind(None)


def resolve_kind(task: TaskKind, logits: torch.Tensor) -> str:
    if task.kind is not None:
        return task.kind
    return SEQUENCE if logits.dim() == 2 else TOKEN


def align_positions(
    kind: str,
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(logits, labels, mask) with every leading dim a prediction position.

    Causal LMs predict token t+1 at position t. As in transformers' own causal-LM loss, the labels are shifted
    left (padded with -100) rather than the logits cut, so the (batch, seq, vocab) logits are never copied; the
    last position has no target and is masked. The mask marks the positions that count: labels != -100 where
    labels exist, else the attention mask.
    """
    if kind == CAUSAL_LM:
        if labels is not None:
            labels = F.pad(labels[:, 1:], (0, 1), value=-100)
        else:
            if attention_mask is None:
                attention_mask = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
            attention_mask = F.pad(attention_mask[:, 1:].bool(), (0, 1), value=False)
    if labels is not None and not labels.is_floating_point():
        mask = labels.ne(-100)
    elif attention_mask is not None and kind != SEQUENCE:
        mask = attention_mask.bool()
    else:
        mask = None
    return logits, labels, mask


def hard_label_loss(
    kind: str, problem_type: str | None, logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-item losses, number of items) in float32; items are examples or label tokens != -100."""
    logits = logits.float()
    if kind == SEQUENCE and problem_type == "regression":
        predictions = logits.view(labels.shape[0], -1).squeeze(-1)
        total = F.mse_loss(predictions, labels.to(predictions.dtype).view_as(predictions), reduction="sum")
        return total, torch.tensor(labels.shape[0], device=logits.device)
    if kind == SEQUENCE and problem_type == "multi_label_classification":
        per_example = F.binary_cross_entropy_with_logits(
            logits, labels.to(logits.dtype), reduction="none"
        ).mean(-1)
        return per_example.sum(), torch.tensor(labels.shape[0], device=logits.device)
    flat_labels = labels.reshape(-1)
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), flat_labels, ignore_index=-100, reduction="sum"
    )
    return total, flat_labels.ne(-100).sum()


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of `hidden @ weight.T + bias` against `labels` without forming all the logits at once.

    hidden: (..., H); weight: (V, H); labels: (...), -100 ignored. Each chunk of positions is recomputed in the
    backward pass (activation checkpointing), so at most one (chunk_size, V) block of logits is alive.
    Returns (sum over label positions in float32, number of label positions).
    """
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    keep = flat_labels.ne(-100)
    flat_hidden, flat_labels = flat_hidden[keep], flat_labels[keep]
    total = hidden.new_zeros((), dtype=torch.float32) + 0.0 * hidden.sum()

    def chunk_loss(chunk_hidden, chunk_labels, weight, bias):
        logits = F.linear(chunk_hidden, weight, bias).float()
        return F.cross_entropy(logits, chunk_labels, reduction="sum")

    for start in range(0, flat_hidden.shape[0], chunk_size):
        end = start + chunk_size
        total = total + torch.utils.checkpoint.checkpoint(
            chunk_loss, flat_hidden[start:end], flat_labels[start:end], weight, bias, use_reentrant=False
        )
    return total, keep.sum()
