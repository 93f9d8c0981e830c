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
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES,
    MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
)

from hf_distill.args import CAUSAL_LM, QUESTION_ANSWERING, SEQ2SEQ, SEQUENCE, TASK_TYPES, TOKEN  # noqa: F401 - importable from here as before


def _class_names(mapping: dict) -> set[str]:
    names: set[str] = set()
    for value in mapping.values():
        names.update(value if isinstance(value, (list, tuple)) else [value])
    return names


# Checked in this order against every class of the model's hierarchy (its MRO), so a user's subclass or a
# trust_remote_code class deriving from a transformers head is recognised like the head itself.
_HEADS = (
    (SEQ2SEQ, _class_names(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)),
    (CAUSAL_LM, _class_names(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)),
    (SEQUENCE, _class_names(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)),
    (SEQUENCE, _class_names(MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES)),
    (TOKEN, _class_names(MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES)),
    (TOKEN, _class_names(MODEL_FOR_MASKED_LM_MAPPING_NAMES)),
    (QUESTION_ANSWERING, _class_names(MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES)),
)
SUPPORTED_HEADS = (
    "sequence classification (single-label, multi-label, regression; multiple choice), token classification "
    "and masked LM, extractive "
    "question answering (start/end logits), causal LM, encoder-decoder (seq2seq) LM"
)


@dataclass(frozen=True)
class TaskKind:
    """What a model's outputs mean: one prediction per example (`sequence`), per token (`token`, `causal_lm`
    shifted by one, `seq2seq` on the decoder side) or a start/end span (`question_answering`)."""

    kind: str
    problem_type: str | None = None

    @property
    def is_regression(self) -> bool:
        return self.problem_type == "regression"

    @property
    def is_multi_label(self) -> bool:
        return self.problem_type == "multi_label_classification"

    @property
    def token_level(self) -> bool:
        return self.kind in (TOKEN, CAUSAL_LM, SEQ2SEQ)


def _sequence_problem_type(config) -> str:
    problem_type = getattr(config, "problem_type", None)
    if problem_type in ("regression", "single_label_classification", "multi_label_classification"):
        return problem_type
    return "regression" if getattr(config, "num_labels", 2) == 1 else "single_label_classification"


def infer_task(model: torch.nn.Module, task_type: str | None = None) -> TaskKind:
    """What `model`'s outputs mean: `task_type` when given, else what the model is.

    In order: the task a model class declares (`distillation_task_type`, a `TASK_TYPES` key), the class hierarchy
    against transformers' auto-model mappings (by class name over the MRO, so subclasses and trust_remote_code
    classes built on a head count), `config.is_encoder_decoder`, a
    sequence-level `config.problem_type`, and `can_generate()` (a decoder that generates is a causal LM). A model
    that none of these place raises: guessing from the shape of its logits once trained a causal LM on unshifted
    targets without a word.
    """
    name = type(model).__name__
    config = getattr(model, "config", None)
    if task_type is not None:
        if task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {sorted(TASK_TYPES)}, got {task_type!r}.")
        kind, problem_type = TASK_TYPES[task_type]
        return TaskKind(kind, problem_type)
    declared = getattr(type(model), "distillation_task_type", None)  # a model class that says what it is
    if declared in TASK_TYPES:
        return TaskKind(*TASK_TYPES[declared])
    hierarchy = {cls.__name__ for cls in type(model).__mro__}
    for kind, names in _HEADS:
        if hierarchy & names:
            if kind == SEQUENCE:
                return TaskKind(SEQUENCE, _sequence_problem_type(config))
            if kind == CAUSAL_LM and getattr(config, "is_encoder_decoder", False):
                return TaskKind(SEQ2SEQ)
            return TaskKind(kind)
    if config is not None:
        if getattr(config, "is_encoder_decoder", False):
            return TaskKind(SEQ2SEQ)
        if getattr(config, "problem_type", None) is not None:
            return TaskKind(SEQUENCE, _sequence_problem_type(config))
        can_generate = getattr(model, "can_generate", None)
        if callable(can_generate) and can_generate():
            return TaskKind(CAUSAL_LM)
    raise ValueError(
        f"cannot tell what the outputs of {name} mean: it is not a transformers head class or a subclass of one, "
        f"and its config does not say. Set DistillationTrainingArguments.task_type (--task_type) to one of "
        f"{sorted(TASK_TYPES)}. Supported heads: {SUPPORTED_HEADS}."
    )


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
    labels exist, else the attention mask. Sequence-level heads have one position per example and every example
    counts for KD (None): an example labelled -100 is an unlabelled one (a transfer set mixed with labelled data),
    left out of the hard loss only (`hard_label_loss` ignores -100).
    """
    if kind == CAUSAL_LM:
        if labels is not None:
            labels = F.pad(labels[:, 1:], (0, 1), value=-100)
        else:
            if attention_mask is None:
                attention_mask = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
            attention_mask = F.pad(attention_mask[:, 1:].bool(), (0, 1), value=False)
    if kind == SEQUENCE:
        mask = None
    elif labels is not None and not labels.is_floating_point():
        mask = labels.ne(-100)
    elif attention_mask is not None and kind != SEQUENCE:
        mask = attention_mask.bool()
    else:
        mask = None
    return logits, labels, mask


def hard_label_loss(
    kind: str,
    problem_type: str | None,
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-item losses, number of items) in float32; items are examples or label tokens != -100.

    label_smoothing applies to the cross-entropy heads, as transformers' `LabelSmoother` does:
    (1 - eps) * nll + eps * mean over classes of -log p.
    """
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
        logits.reshape(-1, logits.shape[-1]),
        flat_labels,
        ignore_index=-100,
        reduction="sum",
        label_smoothing=label_smoothing,
    )
    return total, flat_labels.ne(-100).sum()


def span_loss(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    start_positions: torch.Tensor,
    end_positions: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Extractive question answering's own loss, as transformers' QA heads compute it, as (sum, count).

    start_logits, end_logits: (B, T); start_positions, end_positions: (B,). Positions outside [0, T) are clamped
    to T and ignored, as the heads do. Per example: (CE(start) + CE(end)) / 2. Returns (sum over examples in
    float32, number of examples).
    """
    length = start_logits.shape[-1]
    total = start_logits.new_zeros((), dtype=torch.float32)
    for logits, positions in ((start_logits, start_positions), (end_logits, end_positions)):
        targets = positions.reshape(-1).long().clamp(0, length)
        total = total + F.cross_entropy(
            logits.float().reshape(-1, length),
            targets,
            ignore_index=length,
            reduction="sum",
            label_smoothing=label_smoothing,
        )
    return total / 2, torch.tensor(start_positions.reshape(-1).shape[0], device=start_logits.device)


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
    label_smoothing: float = 0.0,
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
        return F.cross_entropy(logits, chunk_labels, reduction="sum", label_smoothing=label_smoothing)

    for start in range(0, flat_hidden.shape[0], chunk_size):
        end = start + chunk_size
        total = total + torch.utils.checkpoint.checkpoint(
            chunk_loss, flat_hidden[start:end], flat_labels[start:end], weight, bias, use_reentrant=False
        )
    return total, keep.sum()
