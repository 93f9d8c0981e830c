"""The architecture families structured pruning knows: where each keeps the layers, the attention projections and
the FFN, and how it derives the head size. Shared by `importance.py` (what to score) and `structured.py` (what to
slice)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

__all__ = ["SUPPORTED_MODEL_TYPES"]


@dataclass(frozen=True)
class _Family:
    """Where one architecture family keeps the pieces that structured pruning slices."""

    name: str
    model_types: tuple[str, ...]
    layers: str  # path of the nn.ModuleList of layers inside the base model
    query: str  # paths inside one layer
    key: str
    value: str
    attention_output: str  # its input is the concatenated per-head context, (batch, seq, heads * head_dim)
    ffn_inputs: tuple[str, ...]
    ffn_output: str  # its input is the FFN intermediate activation, (batch, seq, intermediate_size)
    explicit_head_dim: bool  # config.head_dim exists, so heads and hidden width are independent


_FAMILIES = (
    _Family(
        name="BERT-family encoders",
        model_types=("bert", "roberta"),
        layers="encoder.layer",
        query="attention.self.query",
        key="attention.self.key",
        value="attention.self.value",
        attention_output="attention.output.dense",
        ffn_inputs=("intermediate.dense",),
        ffn_output="output.dense",
        explicit_head_dim=False,
    ),
    _Family(
        name="Llama-family decoders",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        layers="layers",
        query="self_attn.q_proj",
        key="self_attn.k_proj",
        value="self_attn.v_proj",
        attention_output="self_attn.o_proj",
        ffn_inputs=("mlp.gate_proj", "mlp.up_proj"),
        ffn_output="mlp.down_proj",
        explicit_head_dim=True,
    ),
)
SUPPORTED_MODEL_TYPES = tuple(t for family in _FAMILIES for t in family.model_types)


def _family_for(config: PretrainedConfig) -> _Family:
    model_type = getattr(config, "model_type", None)
    for family in _FAMILIES:
        if model_type in family.model_types:
            if getattr(config, "add_cross_attention", False) or getattr(config, "is_encoder_decoder", False):
                raise ValueError(
                    f"structured pruning does not support {model_type} models with cross-attention; prune an "
                    "encoder-only or decoder-only model."
                )
            return family
    raise ValueError(
        f"structured pruning does not support model_type={model_type!r}; supported: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)} (BERT-family encoders and Llama-family decoders)."
    )


def _head_dim(config: PretrainedConfig, family: _Family) -> int:
    if family.explicit_head_dim and getattr(config, "head_dim", None):
        return int(config.head_dim)
    return config.hidden_size // config.num_attention_heads


def _num_kv_heads(config: PretrainedConfig) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _base_prefix(model: PreTrainedModel) -> str:
    """State-dict prefix of the base model inside `model` ("" when `model` is the base model)."""
    base = model.base_model
    return next(name for name, module in model.named_modules() if module is base)


def _layer_modules(model: PreTrainedModel, family: _Family) -> nn.ModuleList:
    return model.base_model.get_submodule(family.layers)
