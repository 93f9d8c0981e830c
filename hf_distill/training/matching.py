"""Layer maps and learned projections for hidden-state and attention matching.

Layer indices follow the `hidden_states` tuple that transformers models return: 0 is the embedding output and
k is the output of layer k, so a model with L layers has indices 0..L. Attention maps exist for layers 1..L only.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

from hf_distill.args import LayerMap, parse_layer_map  # noqa: F401 - parse_layer_map importable from here as before
from hf_distill.losses import attention_distillation_loss, hidden_state_loss

logger = logging.get_logger(__name__)


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
    heads: str = "per_head",
) -> torch.Tensor:
    """Mean over matched layers (embedding pairs skipped) of the attention-map KL; attentions are (b, heads, q, k).
    heads: "per_head" or "mean" (head-averaged maps), as in attention_distillation_loss."""
    pairs = [(s, t) for s, t in layer_map if s > 0 and t > 0]
    if not pairs:
        raise ValueError("attention matching needs at least one layer pair whose indices are both > 0.")
    losses = [
        attention_distillation_loss(
            student_attentions[s - 1], teacher_attentions[t - 1], mask=mask, heads=heads
        )
        for s, t in pairs
    ]
    return torch.stack(losses).mean()


def matched_stacks(
    seq2seq: bool,
    layer_maps: dict[str, LayerMap],
    student_outputs: Any,
    teacher_outputs: Any,
    inputs: dict[str, Any],
    what: str,
):
    """(stack, student tensors, teacher tensors, position mask) for each matched layer stack.

    what: "hidden" (hidden_states) or "attentions". Encoder-decoder outputs name them per stack
    (encoder_hidden_states, decoder_attentions, ...); the decoder's mask is its attention mask or the labelled
    positions.
    """
    field = "hidden_states" if what == "hidden" else "attentions"
    for stack in layer_maps:
        if seq2seq:
            name = f"{stack}_{field}"
            if stack == "encoder":
                mask = inputs.get("attention_mask")
            else:
                labels = inputs.get("labels")
                mask = inputs.get("decoder_attention_mask", labels.ne(-100) if labels is not None else None)
        else:
            name, mask = field, inputs.get("attention_mask")
        student_states = getattr(student_outputs, name, None)
        teacher_states = getattr(teacher_outputs, name, None)
        if student_states is None or teacher_states is None:
            weight = "hidden_weight" if what == "hidden" else "attention_weight"
            raise ValueError(
                f"{'hidden-state' if what == 'hidden' else 'attention'} matching is on, but the "
                f"{'student' if student_states is None else 'teacher'} returned no {name}; use a model that "
                f"supports output_{field}=True or set {weight}=0."
            )
        yield stack, student_states, teacher_states, mask.bool() if mask is not None else None


def build_projections(
    layer_maps: dict[str, LayerMap], student_width: int, teacher_width: int, device: Any, sharded: bool
) -> nn.ModuleDict:
    """One `HiddenProjections` per stack, on `device`; parameters only when the widths differ, which a sharded run
    (DeepSpeed, FSDP) refuses: the projections train outside the sharded model and would escape its clipping."""
    projections = nn.ModuleDict(
        {
            stack: HiddenProjections(layer_map, student_width, teacher_width)
            for stack, layer_map in layer_maps.items()
        }
    )
    projections.to(device)
    if any(True for _ in projections.parameters()):
        if sharded:
            raise ValueError(
                f"the student's hidden width ({student_width}) differs from the teacher's ({teacher_width}), which "
                "needs learned projections, and those are not supported under DeepSpeed or FSDP yet (their "
                "gradients would escape the sharded clipping); use a student of the teacher's width "
                "(create_student) or set hidden_weight=0."
            )
        logger.info(
            f"Learning projections from width {student_width} to {teacher_width} for hidden matching."
        )
    return projections


def projection_runners(
    projections: nn.ModuleDict, device: torch.device, world_size: int
) -> dict[str, nn.Module]:
    """What runs each stack's projections: the module itself, or under DDP a DistributedDataParallel wrapper,
    since the projections train outside the student and need their own gradient all-reduce."""
    runners: dict[str, nn.Module] = dict(projections.items())
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        for stack, module in projections.items():
            if any(True for _ in module.parameters()):
                device_ids = [device.index] if device.type == "cuda" else None
                runners[stack] = nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
    return runners


PROJECTIONS_NAME = "distill_projections.safetensors"


def save_projections(projections: nn.Module, output_dir: str) -> None:
    """Write the learned projections into a checkpoint folder (training state, like the optimizer's: never into
    the student's weights)."""
    if any(True for _ in projections.parameters()):
        state = {key: value.detach().cpu().contiguous() for key, value in projections.state_dict().items()}
        save_file(state, os.path.join(output_dir, PROJECTIONS_NAME))


def load_projections(projections: nn.Module, checkpoint: str, device: Any) -> None:
    """Restore the learned projections from a checkpoint folder written by `save_projections`."""
    if not any(True for _ in projections.parameters()):
        return
    path = os.path.join(checkpoint, PROJECTIONS_NAME)
    if not os.path.isfile(path):
        raise ValueError(
            f"{checkpoint} has no {PROJECTIONS_NAME}: it was written by a run without learned hidden projections. "
            "Resume with the same hidden_weight/layer_map as that run, or start a new run."
        )
    projections.load_state_dict(load_file(path, device=str(device)))


class ZeroProjectionGradients(TrainerCallback):
    """The Trainer zeroes only the student's gradients after an optimizer step; the projections are trained
    beside it and need the same, or their gradients would add up across steps."""

    def __init__(self, projections: nn.Module):
        self.projections = projections

    def on_train_begin(self, args, state, control, **kwargs):
        self.projections.zero_grad(set_to_none=True)

    def on_step_end(self, args, state, control, **kwargs):
        self.projections.zero_grad(set_to_none=True)


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
