"""Quantization-aware training (QAT) in exactly the scheme that `quantization.quantize_int8` deploys.

`quantize_int8` runs ONNX Runtime's dynamic quantization (`quantize_dynamic`, integer-op mode). On an exported
BERT-like classifier it rewrites (checked on the graphs `export_onnx` writes; see tests/test_quantization.py):

- every MatMul with a constant weight, i.e. every `nn.Linear`: the query, key, value, attention output,
  intermediate and output layers of each block, the pooler, and the classifier (ORT first rewrites the pooler's and
  classifier's Gemm nodes to MatMul + Add), into `MatMulInteger` with
    weights:     int8, symmetric, range [-127, 127], zero point 0, scale = max|w| / 127 per output channel
                 (`per_channel=True`) or per tensor;
    activations: the Linear's input, uint8, asymmetric, per tensor, computed at run time from the current tensor
                 (`DynamicQuantizeLinear`): range [min(x, 0), max(x, 0)], scale = range / 255,
                 zero point = round(-min / scale) clamped to [0, 255];
  the bias is added in float after the integer product;
- every Gather from a constant table, i.e. every `nn.Embedding` (word, position and token-type embeddings): the
  table is stored uint8, asymmetric per tensor (scale and zero point from the table's own min and max, as for an
  activation, but fixed), and dequantized after the lookup.

Nothing else is quantized: the two attention matmuls (both operands are activations), LayerNorm, softmax, GELU and
the biases stay float32. `quantize_int8` leaves the modules in its `keep_float` (default: the classifier, a
hidden x num_labels matrix of a few kB whose rounding error would go straight into the logits) in float32, and
`prepare_qat`'s `skip` has the same default, so training sees what deployment runs. Every rounding is half to even
(NumPy's `round` in ORT's weight quantizer, `nearbyint` in its kernels), as `torch.round`.

Fake quantization = quantize then dequantize in the forward pass; the backward pass is the straight-through
estimator (identity). With these ranges nothing is ever clipped (the range always covers the tensor: max|w| for
weights, [min, max] of the batch for activations), so the clipped STE would be the identity everywhere too. Scales
and zero points are statistics of the tensor, treated as constants in the backward pass.

Why not torchao's QAT (`IntxFakeQuantizeConfig`): its symmetric int8 scale is max|w| / 127.5 (range [-128, 127]), not
ORT's max|w| / 127, and it rounds x * (1 / scale) rather than x / scale, so it would train against a slightly different
model from the one deployed; the matching scheme is a few lines here.

Mechanism: `prepare_qat` replaces each `nn.Linear` / `nn.Embedding` by a `QATLinear` / `QATEmbedding` (subclasses)
holding the *same* Parameter objects, so the optimizer, tied weights and the state_dict keys are unchanged while
training (a checkpoint saved during QAT loads into the plain model); `strip_qat` swaps plain modules back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from .quantization import DEFAULT_KEEP_FLOAT, module_name_matches

logger = logging.get_logger(__name__)

__all__ = [
    "QATEmbedding",
    "QATLinear",
    "fake_quantize_dynamic_uint8",
    "fake_quantize_table_uint8",
    "fake_quantize_weight_int8",
    "has_fake_quant",
    "prepare_qat",
    "strip_qat",
]

_INT8_MAX = 127  # symmetric int8 weights: [-127, 127]
_UINT8_MAX = 255


def _straight_through(x: torch.Tensor, dequantized: torch.Tensor) -> torch.Tensor:
    """`dequantized` in the forward pass, identity gradient to `x` in the backward pass."""
    return x + (dequantized - x).detach()


def fake_quantize_weight_int8(weight: torch.Tensor, *, per_channel: bool = True) -> torch.Tensor:
    """Symmetric int8 quantize-dequantize of a Linear weight, as ORT's weight quantizer does it.

    weight: (out_features, in_features). Per channel: one scale per output feature (row), = ORT's axis 1 of the
    transposed (in, out) MatMul weight. scale = max|w| / 127, computed in float64 and stored float32, q =
    clamp(round_half_even(w / scale), -127, 127), zero point 0. An all-zero channel gets scale 1 (as ORT).
    """
    with torch.no_grad():
        if per_channel:
            absmax = weight.detach().abs().amax(dim=1, keepdim=True)  # (out, 1)
        else:
            absmax = weight.detach().abs().amax()
        scale = (absmax.double() * 2 / (2 * _INT8_MAX)).to(weight.dtype)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        quantized = torch.round(weight.detach() / scale).clamp_(-_INT8_MAX, _INT8_MAX)
        dequantized = quantized * scale
    return _straight_through(weight, dequantized)


def _uint8_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    quantized = (torch.round(x / scale) + zero_point).clamp_(0, _UINT8_MAX)
    return (quantized - zero_point) * scale


def fake_quantize_dynamic_uint8(x: torch.Tensor) -> torch.Tensor:
    """Asymmetric uint8 per-tensor quantize-dequantize with parameters from `x` itself, as ONNX
    `DynamicQuantizeLinear` computes them (in float32):

        x_min, x_max = min(min(x), 0), max(max(x), 0);  scale = (x_max - x_min) / 255  (1 if the range is 0)
        zero_point = round_half_even(clamp(-x_min / scale, 0, 255));  q = clamp(round_half_even(x / scale) + zp, 0, 255)
    x: any shape; one scale for the whole tensor (the whole batch, as ORT sees one run).
    """
    with torch.no_grad():
        values = x.detach().float()
        x_min = values.min().clamp(max=0)
        x_max = values.max().clamp(min=0)
        scale = (x_max - x_min) / _UINT8_MAX
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = torch.round((-x_min / scale).clamp(0, _UINT8_MAX))
        dequantized = _uint8_dequantize(values, scale, zero_point).to(x.dtype)
    return _straight_through(x, dequantized)


def fake_quantize_table_uint8(weight: torch.Tensor) -> torch.Tensor:
    """Asymmetric uint8 per-tensor quantize-dequantize of an embedding table, as ORT quantizes a Gather's constant
    table: the same formula as `fake_quantize_dynamic_uint8`, with ORT's weight-side arithmetic (range and scale in
    float64, scale stored float32, zero point = round_half_even(-min / scale) from the float64 scale)."""
    with torch.no_grad():
        values = weight.detach()
        w_min = values.min().double().clamp(max=0)
        w_max = values.max().double().clamp(min=0)
        scale64 = (w_max - w_min) / _UINT8_MAX
        if scale64 <= 0:
            scale64 = torch.ones_like(scale64)
        zero_point = torch.round(-w_min / scale64).clamp(0, _UINT8_MAX).to(values.dtype)
        dequantized = _uint8_dequantize(values, scale64.to(values.dtype), zero_point)
    return _straight_through(weight, dequantized)


class QATLinear(nn.Linear):
    """nn.Linear whose forward fake-quantizes the weight (int8 symmetric) and the input (uint8 dynamic)."""

    per_channel: bool = True
    quantize_input: bool = True

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.quantize_input:
            input = fake_quantize_dynamic_uint8(input)
        weight = fake_quantize_weight_int8(self.weight, per_channel=self.per_channel)
        return F.linear(input, weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, per_channel={self.per_channel}, quantize_input={self.quantize_input}"


class QATEmbedding(nn.Embedding):
    """nn.Embedding whose table is fake-quantized uint8 per tensor before the lookup."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = fake_quantize_table_uint8(self.weight)
        return F.embedding(
            input,
            weight,
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )


def _linear_like(module: nn.Linear, cls: type[nn.Linear]) -> nn.Linear:
    # Built on the meta device, then given the original Parameter objects: no copy, optimizer state stays valid.
    new = cls(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    new.weight = module.weight
    new.bias = module.bias
    return new.train(module.training)


def _embedding_like(module: nn.Embedding, cls: type[nn.Embedding]) -> nn.Embedding:
    new = cls(
        module.num_embeddings,
        module.embedding_dim,
        padding_idx=module.padding_idx,
        max_norm=module.max_norm,
        norm_type=module.norm_type,
        scale_grad_by_freq=module.scale_grad_by_freq,
        sparse=module.sparse,
        device="meta",
    )
    new.weight = module.weight
    return new.train(module.training)


def _check_plain(name: str, module: nn.Module) -> None:
    if module._forward_hooks or module._forward_pre_hooks or getattr(module, "parametrizations", None):
        raise ValueError(
            f"{name} ({type(module).__name__}) has hooks or parametrizations; prepare_qat replaces the module and "
            "would drop them. Remove them first, or add the module to skip."
        )


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def prepare_qat(
    model: nn.Module,
    *,
    per_channel: bool = True,
    activations: bool = True,
    embeddings: bool = True,
    skip: Sequence[str] = DEFAULT_KEEP_FLOAT,
) -> nn.Module:
    """Make `model` train against its ORT dynamic INT8 deployment (see the module docstring); in place.

    Every `nn.Linear` fake-quantizes its weight (int8 symmetric, per output channel if `per_channel`, which must
    equal the `per_channel` later passed to `quantize_int8`) and, if `activations`, its input (uint8 asymmetric per
    tensor, dynamic); with `embeddings`, every `nn.Embedding` fake-quantizes its table (uint8 per tensor). Modules
    named in `skip` (a name, a dotted suffix of a name, or an ancestor's: "classifier" matches "classifier" and
    "model.classifier"; "pooler" matches "bert.pooler.dense") stay float: pass the same list as `quantize_int8`'s
    `keep_float`. Subclasses of Linear/Embedding (other than ours) are left alone. Returns `model`.
    """
    prepared = {"linear": 0, "embedding": 0}
    for name, module in list(model.named_modules()):
        if not name or module_name_matches(name, skip):
            continue
        if type(module) is nn.Linear:
            _check_plain(name, module)
            new = _linear_like(module, QATLinear)
            new.per_channel = per_channel
            new.quantize_input = activations
            _replace(model, name, new)
            prepared["linear"] += 1
        elif embeddings and type(module) is nn.Embedding:
            _check_plain(name, module)
            _replace(model, name, _embedding_like(module, QATEmbedding))
            prepared["embedding"] += 1
        elif isinstance(module, QATLinear):
            module.per_channel = per_channel
            module.quantize_input = activations
    if not any(prepared.values()) and not has_fake_quant(model):
        raise ValueError(
            f"prepare_qat found no nn.Linear or nn.Embedding outside skip={list(skip)} in {type(model).__name__}; "
            "nothing would be fake-quantized."
        )
    logger.info(
        f"QAT: fake-quantizing {prepared['linear']} Linear and {prepared['embedding']} Embedding modules "
        f"(per_channel={per_channel}, activations={activations}); float: {list(skip)}"
    )
    return model


def has_fake_quant(model: nn.Module) -> bool:
    """Whether `model` still contains QAT modules."""
    return any(isinstance(module, (QATLinear, QATEmbedding)) for module in model.modules())


def strip_qat(model: nn.Module) -> nn.Module:
    """Replace every QAT module by the plain `nn.Linear` / `nn.Embedding` holding the same trained float Parameters;
    in place. The result has no fake quantization, hooks or parametrizations from QAT and the original state_dict
    keys: export it (`export_onnx`) and quantize it (`quantize_int8`)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QATLinear):
            _replace(model, name, _linear_like(module, nn.Linear))
        elif isinstance(module, QATEmbedding):
            _replace(model, name, _embedding_like(module, nn.Embedding))
    return model
