"""prune_model: structured pruning into a new, smaller, ordinary Hugging Face model.

Widths (attention heads, FFN neurons, hidden channels) are pruned by removing the lowest-scoring units of an
`Importance` (see `importance.py`, Minitron-style activation scores), depth by keeping a subset of layers with
`create_student`. The result is built the way transformers builds any model: an edited config
(`hidden_size`, `num_attention_heads`, `num_key_value_heads`, `intermediate_size`, `num_hidden_layers`,
`head_dim`), the model class instantiated from it, and every tensor filled from a slice of the original.
No masks or hooks remain, so `save_pretrained` and the `AutoModelFor...` loaders work unchanged.

Rules (also checked up front by `check_pruning`):
- The same number of heads and neurons is removed from every layer (one config describes all layers);
  counts are ``round(ratio * total)`` with halves rounded up; a ratio that rounds to none or to all of a
  layer's heads or neurons is an error.
- Llama-family (GQA) models lose whole key/value groups: a group's score is the sum of its query heads'
  scores, and removing a group removes its key/value head and its query heads, so
  ``num_attention_heads % num_key_value_heads`` stays 0. A ratio that is not a whole number of groups is
  rounded to whole groups (logged). Their `head_dim` is explicit, so heads and hidden width are independent.
- BERT-family models derive the head size as ``hidden_size / num_attention_heads``, so kept heads times the
  original head size must equal the new hidden width: with only `hidden` given the head count follows from
  it (the heads are chosen by importance); `heads` alone, or inconsistent with `hidden`, is an error.
- The pruned config must be one transformers saves and reloads (`saved_config.py`): Llama's config class, unlike
  Mistral's and Qwen's, requires ``hidden_size % num_attention_heads == 0`` although its head_dim is explicit, so
  e.g. 6 heads at hidden 64 is refused up front, naming the head counts and widths that save.
- Hidden channels are sliced everywhere they occur (embeddings, every norm, q/k/v inputs, attention and
  FFN outputs, FFN inputs, pooler, classifier / LM-head inputs; tied embeddings stay tied). LayerNorm and
  RMSNorm statistics change with fewer channels, so hidden pruning is not lossless: recover by distillation.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import logging

from hf_distill.compression.pruning.families import (
    SUPPORTED_MODEL_TYPES,
    _base_prefix,
    _Family,
    _family_for,
    _head_dim,
    _num_kv_heads,
)
from hf_distill.compression.pruning.saved_config import check_config_saves
from hf_distill.students import _PER_LAYER_CONFIG_LISTS, _resolve_indices, create_student

if TYPE_CHECKING:
    from hf_distill.compression.pruning.importance import Importance

logger = logging.get_logger(__name__)

__all__ = ["PruningSpec", "check_pruning", "prune_model", "pruned_config"]


@dataclass
class PruningSpec:
    """What to remove. Ratios are fractions removed per layer; widths and depths are target sizes."""

    heads: float = field(
        default=0.0,
        metadata={"help": "Fraction of attention heads removed per layer, in [0, 1) (GQA: whole KV groups)."},
    )
    ffn: float = field(
        default=0.0, metadata={"help": "Fraction of FFN intermediate neurons removed per layer, in [0, 1)."}
    )
    hidden: int | None = field(
        default=None, metadata={"help": "Target hidden width (embedding channels); None keeps it."}
    )
    layers: int | None = field(
        default=None,
        metadata={"help": "Target number of layers, chosen uniformly (create_student); None keeps all."},
    )
    layer_indices: list[int] | None = field(
        default=None,
        metadata={"help": "Explicit original layer indices to keep (overrides the uniform choice)."},
    )

    def __post_init__(self) -> None:
        for name in ("heads", "ffn"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(
                    f"PruningSpec.{name}={value!r} is invalid: it is the fraction removed per layer and must "
                    "be a number in [0, 1); use e.g. 0.25 to remove a quarter, 0 to keep all."
                )
        for name in ("hidden", "layers"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"PruningSpec.{name}={value!r} is invalid: it is a target size and must be a positive "
                    "integer, or None to keep the current one."
                )
        if self.layer_indices is not None:
            indices = list(self.layer_indices)
            if not indices or any(isinstance(i, bool) or not isinstance(i, int) for i in indices):
                raise ValueError(
                    f"PruningSpec.layer_indices={self.layer_indices!r} is invalid: pass a non-empty list of "
                    "layer indices (integers), or None for the uniform choice."
                )
            self.layer_indices = indices


@dataclass
class _Shape:
    """The pruned model's geometry, derived from the config and the spec."""

    hidden: int
    kv_groups_kept: int  # BERT and other MHA models: one group per head
    heads_per_group: int
    neurons_kept: int
    layer_indices: list[int]


def _removed_count(ratio: float, total: int, what: str, field_name: str) -> int:
    """round(ratio * total), halves up; an error when that is none (ratio > 0) or all of them."""
    exact = ratio * total
    removed = math.floor(exact + 0.5)
    if ratio > 0 and removed == 0:
        raise ValueError(
            f"{field_name}={ratio} removes {exact:.3g} of {total} {what}, which rounds to none; use "
            f"{field_name}={1 / total:.4g} to remove one, or 0 to keep all."
        )
    if removed >= total:
        raise ValueError(
            f"{field_name}={ratio} would remove all {total} {what} of each layer; use at most "
            f"{field_name}={(total - 1) / total:.4g} (keeps one)."
        )
    if ratio > 0 and abs(exact - removed) > 1e-9:
        logger.warning(
            f"{field_name}={ratio} removes {exact:.3g} of {total} {what}: rounded to {removed} "
            f"(effective {field_name}={removed / total:.4g})."
        )
    return removed


def _bert_kept_heads(config: PretrainedConfig, spec: PruningSpec, head_dim: int) -> tuple[int, int]:
    """(kept heads, hidden) for models whose head size is hidden_size / num_attention_heads."""
    heads, hidden = config.num_attention_heads, config.hidden_size
    target = hidden if spec.hidden is None else spec.hidden
    if target % head_dim:
        lower, upper = (target // head_dim) * head_dim, (target // head_dim + 1) * head_dim
        choices = f"hidden: {lower} or {upper}" if lower else f"hidden: {upper}"
        raise ValueError(
            f"hidden={target} is not a multiple of the head size {head_dim} (= hidden_size {hidden} / "
            f"num_attention_heads {heads}, which {config.model_type} keeps fixed per head); use {choices}."
        )
    if spec.heads == 0:
        return target // head_dim, target
    kept = heads - _removed_count(spec.heads, heads, "attention heads", "heads")
    if target == hidden:
        raise ValueError(
            f"heads={spec.heads} with hidden unchanged ({hidden}) is impossible on {config.model_type}: it "
            f"derives the head size as hidden_size / num_attention_heads, so {kept} kept heads of size "
            f"{head_dim} need a hidden width of {kept * head_dim}; set hidden: {kept * head_dim} together "
            f"with heads: {spec.heads}."
        )
    if kept * head_dim != target:
        raise ValueError(
            f"heads={spec.heads} keeps {kept} heads ({kept * head_dim} channels of size-{head_dim} heads) "
            f"but hidden={target} needs {target // head_dim} heads on {config.model_type} (head size = "
            f"hidden_size / num_attention_heads); set hidden: {kept * head_dim} together with heads: "
            f"{spec.heads}, or leave heads at 0 to derive the head count from hidden."
        )
    return kept, target


def _resolve_shape(config: PretrainedConfig, spec: PruningSpec) -> _Shape:
    family = _family_for(config)
    heads, kv_heads, hidden = config.num_attention_heads, _num_kv_heads(config), config.hidden_size
    head_dim = _head_dim(config, family)
    if spec.hidden is not None and spec.hidden > hidden:
        raise ValueError(
            f"hidden={spec.hidden} is larger than the model's hidden_size {hidden}; pruning only shrinks, "
            f"so pass hidden <= {hidden} (or None to keep it)."
        )
    if family.explicit_head_dim:
        what = "key/value groups (with their query heads)" if kv_heads < heads else "attention heads"
        removed = _removed_count(spec.heads, kv_heads, what, "heads") if spec.heads else 0
        groups_kept, per_group = kv_heads - removed, heads // kv_heads
        new_hidden = hidden if spec.hidden is None else spec.hidden
    else:
        groups_kept, new_hidden = _bert_kept_heads(config, spec, head_dim)
        per_group = 1

    intermediate = config.intermediate_size
    neurons_removed = _removed_count(spec.ffn, intermediate, "FFN neurons", "ffn") if spec.ffn else 0

    # create_student's own validation and uniform choice (first and last layers kept), run up front.
    layers = "uniform" if spec.layer_indices is None else spec.layer_indices
    depth = config.num_hidden_layers
    layer_indices = _resolve_indices("hidden", depth, spec.layers, layers, "layers", "layer_indices")
    return _Shape(new_hidden, groups_kept, per_group, intermediate - neurons_removed, layer_indices)


def check_pruning(config: PretrainedConfig, spec: PruningSpec) -> None:
    """Raise ValueError (naming the value and the fix) if `spec` cannot be applied to a model of `config`.

    Cheap: reads only the config, so call it before measuring importance or loading data.
    """
    _validated_shape(config, spec)


def pruned_config(config: PretrainedConfig, spec: PruningSpec) -> PretrainedConfig:
    """The config `prune_model` gives a model of `config` under `spec` (checked first); reads no weights, so a
    pipeline can check every later stage against it before any work."""
    shape = _validated_shape(config, spec)
    return _pruned_config(config, _family_for(config), shape)


def _validated_shape(config: PretrainedConfig, spec: PruningSpec) -> _Shape:
    if not isinstance(spec, PruningSpec):
        raise TypeError(f"spec must be a PruningSpec, got {type(spec).__name__}.")
    spec.__post_init__()  # the fields may have been edited after construction
    shape = _resolve_shape(config, spec)
    family = _family_for(config)
    given = {name: value for name, value in vars(spec).items() if value not in (None, 0, 0.0)}
    check_config_saves(
        lambda groups_kept, hidden: _pruned_config(
            config, family, replace(shape, kv_groups_kept=groups_kept, hidden=hidden)
        ),
        groups_kept=shape.kv_groups_kept,
        groups=_num_kv_heads(config) if family.explicit_head_dim else config.num_attention_heads,
        heads_per_group=shape.heads_per_group,
        hidden=shape.hidden,
        max_hidden=config.hidden_size,
        what=", ".join(f"{name}={value}" for name, value in given.items()) or "this spec",
    )
    return shape


def _pruned_config(config: PretrainedConfig, family: _Family, shape: _Shape) -> PretrainedConfig:
    """The pruned model's config: the new widths, and the depth set as create_student sets it (per-layer lists
    such as Qwen2's `layer_types` sliced, `max_window_layers` recounted)."""
    new = _new_config(config, family, shape)
    depth = config.num_hidden_layers
    if shape.layer_indices == list(range(depth)):  # prune_model copies no layers then (nor does this)
        return new
    new.num_hidden_layers = len(shape.layer_indices)
    for attribute in _PER_LAYER_CONFIG_LISTS:
        per_layer = getattr(config, attribute, None)
        if isinstance(per_layer, (list, tuple)) and len(per_layer) == depth:
            setattr(new, attribute, [per_layer[i] for i in shape.layer_indices])
    max_window_layers = getattr(config, "max_window_layers", None)
    if isinstance(max_window_layers, int):
        new.max_window_layers = sum(i < max_window_layers for i in shape.layer_indices)
    return new


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` highest scores, in increasing index order (ties: the lower index wins)."""
    order = torch.argsort(scores.detach().double().cpu(), descending=True, stable=True)
    return order[:count].sort().values


def _check_importance(importance: Importance, config: PretrainedConfig, head_count: int) -> None:
    layers, neurons = config.num_hidden_layers, config.intermediate_size
    problems = []
    if len(importance.heads) != layers or any(h.shape != (head_count,) for h in importance.heads):
        problems.append(f"heads must be {layers} tensors of shape ({head_count},)")
    if len(importance.neurons) != layers or any(n.shape != (neurons,) for n in importance.neurons):
        problems.append(f"neurons must be {layers} tensors of shape ({neurons},)")
    if importance.channels.shape != (config.hidden_size,):
        problems.append(f"channels must have shape ({config.hidden_size},)")
    if problems:
        raise ValueError(
            f"importance does not match the model: {'; '.join(problems)}. Measure it on this model with "
            "measure_importance(model, batches)."
        )


@dataclass
class _Kept:
    """Kept indices, each sorted; None means all are kept."""

    channels: torch.Tensor | None
    query_rows: list[torch.Tensor | None]  # per layer, rows of q (= columns of the attention output)
    kv_rows: list[torch.Tensor | None]
    neurons: list[torch.Tensor | None]


def _rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of a (heads * head_dim, ...) projection that belong to `heads`."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def _choose(config: PretrainedConfig, family: _Family, shape: _Shape, importance: Importance | None) -> _Kept:
    heads, kv_heads = config.num_attention_heads, _num_kv_heads(config)
    head_dim, layers = _head_dim(config, family), config.num_hidden_layers
    groups = kv_heads if family.explicit_head_dim else heads
    prune_heads = shape.kv_groups_kept < groups
    prune_neurons = shape.neurons_kept < config.intermediate_size
    prune_channels = shape.hidden < config.hidden_size
    if importance is None:
        if prune_heads or prune_neurons or prune_channels:
            raise ValueError(
                "width pruning (heads, ffn or hidden) chooses units by importance, but importance is None; "
                "pass importance=measure_importance(model, calibration_batches)."
            )
        return _Kept(None, [None] * layers, [None] * layers, [None] * layers)
    _check_importance(importance, config, heads)
    query_rows, kv_rows, neurons = [], [], []
    for layer in range(layers):
        if prune_heads:
            group_scores = importance.heads[layer].reshape(groups, shape.heads_per_group).double().sum(-1)
            kept_groups = _top(group_scores, shape.kv_groups_kept)
            kept_heads = _rows(kept_groups, shape.heads_per_group)  # query heads of the kept groups
            query_rows.append(_rows(kept_heads, head_dim))
            kv_rows.append(_rows(kept_groups if family.explicit_head_dim else kept_heads, head_dim))
        else:
            query_rows.append(None)
            kv_rows.append(None)
        neurons.append(_top(importance.neurons[layer], shape.neurons_kept) if prune_neurons else None)
    channels = _top(importance.channels, shape.hidden) if prune_channels else None
    return _Kept(channels, query_rows, kv_rows, neurons)


def _new_config(config: PretrainedConfig, family: _Family, shape: _Shape) -> PretrainedConfig:
    new = copy.deepcopy(config)
    head_dim = _head_dim(config, family)
    new.hidden_size = shape.hidden
    new.num_attention_heads = shape.kv_groups_kept * shape.heads_per_group
    new.intermediate_size = shape.neurons_kept
    if family.explicit_head_dim:
        new.num_key_value_heads = shape.kv_groups_kept
        new.head_dim = head_dim  # explicit, or it would be re-derived from the new hidden_size
    return new


def _index_plan(
    key: str, prefix: str, family: _Family, kept: _Kept
) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """(output-dim, input-dim) indices of a layer projection's tensor, or None for any other tensor."""
    layers_prefix = f"{prefix}{family.layers}."
    if not key.startswith(layers_prefix):
        return None
    position, _, rest = key[len(layers_prefix) :].partition(".")
    module, _, _ = rest.rpartition(".")
    layer, channels = int(position), kept.channels
    roles = {
        family.query: (kept.query_rows[layer], channels),
        family.key: (kept.kv_rows[layer], channels),
        family.value: (kept.kv_rows[layer], channels),
        family.attention_output: (channels, kept.query_rows[layer]),
        family.ffn_output: (channels, kept.neurons[layer]),
    }
    roles.update({name: (kept.neurons[layer], channels) for name in family.ffn_inputs})
    return roles.get(module)


@torch.no_grad()
def _copy_sliced(
    source: PreTrainedModel, target: PreTrainedModel, family: _Family, kept: _Kept, old_hidden: int
) -> None:
    """Fill every tensor of `target` with the matching slice of `source`; fail on anything unexplained."""
    prefix = _base_prefix(source)
    prefix = f"{prefix}." if prefix else ""
    source_tensors = {**dict(source.named_buffers()), **source.state_dict()}
    target_state = target.state_dict(keep_vars=True)
    for key, tensor in target_state.items():
        original = source_tensors.get(key)
        if original is None:
            raise ValueError(f"pruned model tensor {key} has no counterpart in {type(source).__name__}.")
        plan = _index_plan(key, prefix, family, kept)
        if plan is not None:
            indices = list(plan[: original.dim()])
        else:  # norms, embeddings, pooler, heads: every dimension that shrank is a hidden dimension
            indices = [
                kept.channels if new != old and old == old_hidden else None
                for new, old in zip(tensor.shape, original.shape)
            ]
        sliced = original
        for dim, index in enumerate(indices):
            if index is not None:
                sliced = sliced.index_select(dim, index.to(sliced.device))
        if sliced.shape != tensor.shape:
            raise ValueError(
                f"cannot fill pruned tensor {key} {tuple(tensor.shape)} from {tuple(original.shape)}: the "
                f"{family.name} layout does not explain this tensor. Supported model types: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}."
            )
        if tensor.dtype != sliced.dtype:
            tensor.data = tensor.data.to(sliced.dtype)
        tensor.copy_(sliced)
    # Buffers outside the state dict (rotary frequencies, position ids) come from the config; copy the
    # source's when shapes agree so a cast model keeps computing exactly as before.
    for key, buffer in target.named_buffers():
        if key not in target_state and key in source_tensors and source_tensors[key].shape == buffer.shape:
            buffer.copy_(source_tensors[key])


def prune_model(
    model: PreTrainedModel, spec: PruningSpec, importance: Importance | None = None
) -> PreTrainedModel:
    """A new model of `model`'s class with the heads, neurons, channels and layers of `spec` removed.

    Args:
        model: a BERT-family (bert, roberta) or Llama-family (llama, mistral, qwen2, qwen3) model, any head.
            It is not modified.
        spec: what to remove; validated with `check_pruning` before any work.
        importance: scores from `measure_importance(model, batches)`; the lowest-scoring units are
            removed. Needed for width pruning; may be None for depth-only pruning or a no-op spec.

    Depth: the layers of `spec.layer_indices`, else `spec.layers` spread uniformly (first and last kept),
    are copied with `create_student`; width pruning then uses those layers' scores. The result is on the
    model's device and dtype, in its train/eval mode; the kept layers are recorded as
    `pruned.distilled_from_layers` (as create_student does) and the new sizes are logged.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}.")
    shape = _validated_shape(model.config, spec)  # check_pruning's errors, before any work
    family = _family_for(model.config)
    # Choose widths on the full model (validates importance before the layer copy).
    kept = _choose(model.config, family, shape, importance)

    source = model
    if shape.layer_indices != list(range(model.config.num_hidden_layers)):
        source = create_student(model, layers=shape.layer_indices)
        kept = _Kept(
            kept.channels,
            [kept.query_rows[i] for i in shape.layer_indices],
            [kept.kv_rows[i] for i in shape.layer_indices],
            [kept.neurons[i] for i in shape.layer_indices],
        )
    new_config = _new_config(source.config, family, shape)
    with torch.device(model.device):
        pruned = type(model)._from_config(new_config, dtype=model.dtype)
    _copy_sliced(source, pruned, family, kept, model.config.hidden_size)

    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        pruned.generation_config = copy.deepcopy(model.generation_config)
    pruned.train(model.training)
    # As create_student does: hidden-state matching then pairs each layer with the one it came from.
    pruned.distilled_from_layers = {"layers": shape.layer_indices}
    logger.info(
        f"prune_model: {type(model).__name__} layers {shape.layer_indices}, hidden {model.config.hidden_size}"
        f" -> {shape.hidden}, heads {model.config.num_attention_heads} -> {new_config.num_attention_heads}, "
        f"intermediate {model.config.intermediate_size} -> {shape.neurons_kept}; parameters "
        f"{model.num_parameters():,} -> {pruned.num_parameters():,}"
    )
    return pruned
