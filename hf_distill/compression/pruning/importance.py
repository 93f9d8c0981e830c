"""measure_importance: activation-based importance of heads, neurons, channels and layers (Minitron).

Scores follow Muralidharan et al., 2024, "Compact Language Models via Pruning and Knowledge Distillation"
(Minitron, arXiv:2407.14679): a unit matters as much as the activations it produces on calibration data.
Only a forward pass is needed (no gradients). Over all calibration tokens ``t`` that the attention mask
marks as real (padding never counts), with means taken over those tokens:

- head ``h`` of layer ``l``: ``mean_t ||context_{l,t,h}||_2``, the L2 norm of the head's attention output
  (its slice of the concatenated context vectors, before the output projection);
- FFN neuron ``i`` of layer ``l``: ``mean_t |a_{l,t,i}|`` with ``a`` the intermediate activation after the
  activation function (``act(x W_1)`` for BERT, ``act(x W_gate) * (x W_up)`` for gated Llama MLPs), i.e. the
  input of the FFN output projection;
- hidden channel ``c``: ``sum_n mean_t |LN_n(x)_{t,c}|``, summed over every LayerNorm/RMSNorm of the base
  model whose output is hidden-sized (BERT: the embedding LayerNorm and both LayerNorms of each layer;
  Llama: both RMSNorms of each layer and the final norm);
- layer ``l`` (block influence, as in Minitron's depth ranking and ShortGPT): ``mean_t (1 - cos(x_{l,t},
  y_{l,t}))`` between the layer's input and output hidden states; a layer that barely changes its input
  scores near 0.

For GQA models the scores stay per query head; `prune_model` scores a key/value group as the sum of its
query heads. Hooks are registered only for the measurement and always removed (try/finally); the model is
put in eval mode meanwhile and restored to its previous mode afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import logging

from hf_distill.compression.pruning.families import _family_for, _head_dim, _layer_modules

logger = logging.get_logger(__name__)

__all__ = ["Importance", "measure_importance"]

# Only these batch entries are passed to the model; labels and bookkeeping columns are dropped.
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")


@dataclass
class Importance:
    """Activation-based importance scores of one model (higher = more important), float32 on CPU.

    heads: per layer, (num_attention_heads,). neurons: per layer, (intermediate_size,).
    channels: (hidden_size,). layers: (num_hidden_layers,) block influence, or None.
    """

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    channels: torch.Tensor
    layers: torch.Tensor | None = None


def _is_hidden_norm(module: nn.Module, hidden_size: int) -> bool:
    is_norm = isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
    weight = getattr(module, "weight", None)
    return is_norm and isinstance(weight, torch.Tensor) and tuple(weight.shape) == (hidden_size,)


class _Accumulator:
    """Masked sums over tokens of per-unit scores, in float64; the current batch's token mask is shared."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None  # (batch, seq) bool, True = real token
        self.tokens = 0.0
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, name: str, values: torch.Tensor) -> None:
        """values: (batch, seq, units) or (batch, seq); summed over the real tokens of the batch."""
        if self.mask is None or values.shape[:2] != self.mask.shape:
            raise RuntimeError(
                f"activation of shape {tuple(values.shape)} does not line up with the attention mask "
                f"{None if self.mask is None else tuple(self.mask.shape)}; chunked feed-forward "
                "(chunk_size_feed_forward) and packed sequences are not supported during measurement."
            )
        mask = self.mask if values.dim() == 2 else self.mask[..., None]
        # where, not a product: padded positions may hold NaN (fully masked attention rows).
        total = torch.where(mask, values.double(), 0.0).sum(dim=(0, 1))
        self.sums[name] = self.sums[name] + total if name in self.sums else total

    def mean(self, name: str) -> torch.Tensor:
        return (self.sums[name] / self.tokens).float().cpu()


def _register_hooks(
    model: PreTrainedModel,
    accumulator: _Accumulator,
    with_layers: bool,
    handles: list[torch.utils.hooks.RemovableHandle],
) -> None:
    """Add the measurement hooks to `handles` as they are registered, so the caller can remove them all."""
    config = model.config
    family = _family_for(config)
    heads, head_dim = config.num_attention_heads, _head_dim(config, family)

    def head_hook(index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            context = args[0]  # (batch, seq, heads * head_dim), the input of the output projection
            norms = context.double().unflatten(-1, (heads, head_dim)).norm(dim=-1)  # (batch, seq, heads)
            accumulator.add(f"heads.{index}", norms)

        return hook

    def neuron_hook(index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            accumulator.add(f"neurons.{index}", args[0].double().abs())  # (batch, seq, intermediate)

        return hook

    def channel_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        accumulator.add("channels", output.double().abs())  # (batch, seq, hidden)

    def layer_hook(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            inputs = args[0] if args else kwargs["hidden_states"]
            outputs = output[0] if isinstance(output, tuple) else output
            cosine = nn.functional.cosine_similarity(inputs.double(), outputs.double(), dim=-1)
            accumulator.add(f"layers.{index}", 1.0 - cosine)  # (batch, seq)

        return hook

    for index, layer in enumerate(_layer_modules(model, family)):
        attention_output = layer.get_submodule(family.attention_output)
        handles.append(attention_output.register_forward_pre_hook(head_hook(index)))
        handles.append(layer.get_submodule(family.ffn_output).register_forward_pre_hook(neuron_hook(index)))
        if with_layers:
            handles.append(layer.register_forward_hook(layer_hook(index), with_kwargs=True))
    for module in model.base_model.modules():
        if _is_hidden_norm(module, config.hidden_size):
            handles.append(module.register_forward_hook(channel_hook))


@torch.no_grad()
def measure_importance(
    model: PreTrainedModel,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    max_batches: int | None = None,
    layers: bool = True,
) -> Importance:
    """Activation-based importance of `model`'s heads, FFN neurons, hidden channels and layers.

    Args:
        model: a model `prune_model` supports (BERT-family encoders, Llama-family decoders), any head.
        batches: calibration batches with `input_ids` and usually `attention_mask` (padding is excluded
            from every mean); `token_type_ids` / `position_ids` are passed on, other keys (labels) ignored.
        max_batches: stop after this many batches (None: all).
        layers: also measure block influence per layer (`Importance.layers`); False leaves it None.

    Returns scores as defined in the module docstring: means over all real tokens of all batches.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}.")
    if max_batches is not None and (isinstance(max_batches, bool) or max_batches < 1):
        raise ValueError(f"max_batches={max_batches!r} is invalid; pass a positive integer or None.")
    _family_for(model.config)  # unsupported architectures fail before any forward pass
    if max_batches is not None:
        batches = islice(batches, max_batches)

    accumulator = _Accumulator()
    was_training = model.training
    handles: list[torch.utils.hooks.RemovableHandle] = []
    count = 0
    try:
        _register_hooks(model, accumulator, layers, handles)
        model.eval()
        for batch in batches:
            inputs = {k: v.to(model.device) for k, v in batch.items() if k in _MODEL_INPUTS and v is not None}
            reference = inputs.get("input_ids", inputs.get("inputs_embeds"))
            if reference is None:
                raise ValueError(
                    f"calibration batch has no input_ids or inputs_embeds (keys: {list(batch)})."
                )
            mask = inputs.get("attention_mask")
            if mask is None:
                mask = torch.ones(reference.shape[:2], dtype=torch.bool, device=model.device)
            accumulator.mask = mask.bool()
            accumulator.tokens += float(mask.sum())
            model(**inputs)
            count += 1
    finally:
        for handle in handles:
            handle.remove()
        accumulator.mask = None
        model.train(was_training)
    if count == 0 or accumulator.tokens == 0:
        raise ValueError("measure_importance got no calibration tokens; pass at least one non-empty batch.")

    num_layers = model.config.num_hidden_layers
    logger.info(f"measure_importance: {count} batches, {int(accumulator.tokens)} tokens")
    return Importance(
        heads=[accumulator.mean(f"heads.{i}") for i in range(num_layers)],
        neurons=[accumulator.mean(f"neurons.{i}") for i in range(num_layers)],
        channels=accumulator.mean("channels"),
        layers=torch.stack([accumulator.mean(f"layers.{i}") for i in range(num_layers)]) if layers else None,
    )
