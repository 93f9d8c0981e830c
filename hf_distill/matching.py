"""Layer maps and learned projections for hidden-state and attention matching.

Layer indices follow the `hidden_states` tuple that transformers models return: 0 is the embedding output and
k is the output of layer k, so a model with L layers has indices 0..L. Attention maps exist for layers 1..L only.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from .losses import attention_distillation_loss, hidden_state_loss

LayerMap = list[tuple[int, int]]

_PAIR = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_layer_map(spec: str | LayerMap) -> str | LayerMap:
    """Parse `"uniform"` or `"s:t,s:t,..."` (student_layer:teacher_layer) into `"uniform"` or a list of pairs."""
    if isinstance(spec, list):
        return [(int(s), int(t)) for s, t in spec]
    if spec.strip().lower() == "uniform":
        return "uniform"
    pairs = []
    for item in spec.split(","):
        match = _PAIR.match(item)
        if match is None:
            raise ValueError(
                f"layer map {spec!r} is not valid: {item!r} is not a 'student_layer:teacher_layer' pair. "
                "Use 'uniform' or pairs such as '1:2,2:4,3:6'."
            )
        pairs.append((int(match.group(1)), int(match.group(2))))
    students = [s for s, _ in pairs]
    if len(set(students)) != len(students):
        raise ValueError(
            f"layer map {spec!r} maps a student layer twice; give each student layer one teacher layer."
        )
    return pairs


def resolve_layer_map(
    spec: str | LayerMap,
    num_student_layers: int,
    num_teacher_layers: int,
    built_from: list[int] | None = None,
) -> LayerMap:
    """Pairs (student_index, teacher_index) into the `hidden_states` tuples, checked against the layer counts.

    `uniform` maps student layer i (1..S) to teacher layer round(i * T / S), so the last layers always match.
    When the student was initialised from teacher layers (`built_from[j]` = the 0-based teacher layer copied into
    student layer j, as `create_student` records it), `uniform` follows them instead: student output j + 1 is
    matched with teacher output built_from[j] + 1, the layer it started as.
    """
    parsed = parse_layer_map(spec)
    if parsed == "uniform":
        if built_from is not None and len(built_from) == num_student_layers:
            if all(0 <= index < num_teacher_layers for index in built_from):
                return [(j + 1, index + 1) for j, index in enumerate(built_from)]
        return [
            (i, round(i * num_teacher_layers / num_student_layers)) for i in range(1, num_student_layers + 1)
        ]
    for student_layer, teacher_layer in parsed:
        if not 0 <= student_layer <= num_student_layers:
            raise ValueError(
                f"layer map pair {student_layer}:{teacher_layer}: the student has {num_student_layers} layers, so "
                f"student indices must be in [0, {num_student_layers}] (0 = embeddings)."
            )
        if not 0 <= teacher_layer <= num_teacher_layers:
            raise ValueError(
                f"layer map pair {student_layer}:{teacher_layer}: the teacher has {num_teacher_layers} layers, so "
                f"teacher indices must be in [0, {num_teacher_layers}] (0 = embeddings)."
            )
    return parsed


class HiddenProjections(nn.Module):
    """One learned linear map per matched student layer, from the student's width to the teacher's.

    When the widths agree no parameters are created and hidden states are compared directly.
    """

    def __init__(self, layer_map: LayerMap, student_width: int, teacher_width: int, prefix: str = ""):
        super().__init__()
        self.layer_map = list(layer_map)
        self.prefix = prefix
        self.projections = nn.ModuleDict()
        if student_width != teacher_width:
            for student_layer, _ in self.layer_map:
                self.projections[self._key(student_layer)] = nn.Linear(student_width, teacher_width)

    def _key(self, student_layer: int) -> str:
        return f"{self.prefix}layer_{student_layer}"

    def project(self, student_layer: int, hidden: torch.Tensor) -> torch.Tensor:
        key = self._key(student_layer)
        if key not in self.projections:
            return hidden
        projection = self.projections[key]
        return projection(hidden.to(projection.weight.dtype))

    def forward(
        self,
        student_hidden_states: tuple[torch.Tensor, ...],
        teacher_hidden_states: tuple[torch.Tensor, ...],
        *,
        kind: str = "mse",
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean over the matched pairs of `hidden_state_loss` between projected student and teacher states."""
        losses = [
            hidden_state_loss(
                self.project(s, student_hidden_states[s]), teacher_hidden_states[t], kind=kind, mask=mask
            )
            for s, t in self.layer_map
        ]
        return torch.stack(losses).mean()


def attention_matching_loss(
    student_attentions: tuple[torch.Tensor, ...],
    teacher_attentions: tuple[torch.Tensor, ...],
    layer_map: LayerMap,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over matched layers (embedding pairs skipped) of the attention-map KL; attentions are (b, heads, q, k)."""
    pairs = [(s, t) for s, t in layer_map if s > 0 and t > 0]
    if not pairs:
        raise ValueError("attention matching needs at least one layer pair whose indices are both > 0.")
    losses = [
        attention_distillation_loss(student_attentions[s - 1], teacher_attentions[t - 1], mask=mask)
        for s, t in pairs
    ]
    return torch.stack(losses).mean()


# ---- what a model's config says about its layers -------------------------------------------------------------


def layer_counts(config: Any) -> dict[str, int]:
    """Layer counts per stack: {'layers': n}, or {'encoder': n, 'decoder': m} for encoder-decoder models."""
    if getattr(config, "is_encoder_decoder", False):
        encoder = getattr(config, "encoder_layers", None) or getattr(config, "num_layers", None)
        decoder = (
            getattr(config, "decoder_layers", None) or getattr(config, "num_decoder_layers", None) or encoder
        )
        return {"encoder": encoder, "decoder": decoder}
    text_config = config.get_text_config()
    return {"layers": text_config.num_hidden_layers}


def hidden_width(config: Any) -> int:
    text_config = config.get_text_config()
    for name in ("hidden_size", "d_model", "dim", "n_embd"):
        if getattr(text_config, name, None):
            return getattr(text_config, name)
    raise ValueError(f"cannot tell the hidden width of {type(config).__name__}; set hidden_weight=0.")


def attention_heads(config: Any) -> int | None:
    text_config = config.get_text_config()
    return getattr(text_config, "num_attention_heads", None) or getattr(
        text_config, "encoder_attention_heads", None
    )
