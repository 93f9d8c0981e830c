"""The arithmetic of the deployed INT8 scheme, in one place: `quantization.quantize_int8` writes the ONNX Runtime graph
with these functions and `qat.py` fake-quantizes with the same ones, so that the model QAT trains is the model that
runs. Tensors in, tensors out (torch, float32 unless said); no ONNX here.

- Weights of every Linear (outside keep_float): int8, symmetric, in [-64, 64] (`WEIGHT_QMAX`, ONNX Runtime's
  "reduce_range"), scale = max|w| / 64 per output channel (or per tensor), zero point 0. Seven bits, not eight: x86
  CPUs without VNNI (AVX2, AVX-512 before Cascade Lake / Zen 4) multiply uint8 x int8 with VPMADDUBSW, which adds
  pairs of products into a saturating int16; with |w| <= 64 a pair is at most 2 * 255 * 64 = 32640 < 32767, so the
  integer product is exact on every x86 CPU (with VNNI or AMX it is exact anyway), and every CPU computes one model.
- Inputs of those Linears: uint8, asymmetric, per tensor, with a *static* range [low, high] fixed before deployment
  (calibrated, or tracked during QAT): scale = (high - low) / 255, zero point = round(-low / scale); values outside the
  range saturate. A static range makes a text's prediction independent of the other texts in its batch.
- Embedding tables: uint8, asymmetric, per tensor, with the table's own range (the same rule as an activation).

Every rounding is half to even (`torch.round`; `nearbyint` in ONNX Runtime's QuantizeLinear); scales are computed in
float64 and stored float32; quantization divides by the float32 scale, as ONNX QuantizeLinear does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "ACTIVATION_QMAX",
    "DEFAULT_KEEP_FLOAT",
    "WEIGHT_QMAX",
    "dequantize_uint8",
    "masked_extrema",
    "module_name_matches",
    "quantize_uint8",
    "quantize_weight",
    "uint8_parameters",
]

WEIGHT_QMAX = 64  # int8 weights in [-WEIGHT_QMAX, WEIGHT_QMAX]: no int16 saturation in VPMADDUBSW (see above)
ACTIVATION_QMAX = 255  # uint8 activations and embedding tables in [0, 255]
DEFAULT_KEEP_FLOAT: tuple[str, ...] = ("classifier",)


def module_name_matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether module `name` (dotted, e.g. "bert.pooler.dense") is named by one of `patterns`: a pattern matches a
    module if it equals the module's name or a dotted suffix of it, or does so for one of its ancestors
    ("classifier" matches "classifier" and "model.classifier"; "pooler" matches "bert.pooler.dense")."""
    parts = name.split(".")
    prefixes = [".".join(parts[:end]) for end in range(1, len(parts) + 1)]
    return any(
        prefix == pattern or prefix.endswith("." + pattern) for prefix in prefixes for pattern in patterns
    )


def quantize_weight(weight: torch.Tensor, *, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) of a Linear weight (out_features, in_features): q = clamp(round(w / scale), -64, 64) as float32
    integers, scale = float32(max|w| / 64) in float64, of shape (out_features, 1) per channel (one per output
    feature) or () per tensor; an all-zero channel gets scale 1. Dequantized: q * scale."""
    values = weight.detach().float()
    absmax = values.abs().amax(dim=1, keepdim=True) if per_channel else values.abs().amax()
    scale = (absmax.double() / WEIGHT_QMAX).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantized = torch.round(values / scale).clamp_(-WEIGHT_QMAX, WEIGHT_QMAX)
    return quantized, scale


def uint8_parameters(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) of the uint8 grid for the range [low, high], widened to contain 0 (so 0 is exact):

        scale = float32((max(high, 0) - min(low, 0)) / 255)   (1 if the range is empty)
        zero_point = clamp(round(-min(low, 0) / scale), 0, 255)   (float32 holding an integer)

    computed in float64 from the float32 ends. low, high: 0-d tensors."""
    low = low.detach().double().clamp(max=0)
    high = high.detach().double().clamp(min=0)
    scale = ((high - low) / ACTIVATION_QMAX).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.round(-low / scale.double()).clamp(0, ACTIVATION_QMAX).float()
    return scale, zero_point


def quantize_uint8(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """ONNX QuantizeLinear to uint8: clamp(round(x / scale) + zero_point, 0, 255), as float32 integers."""
    return (torch.round(x.float() / scale) + zero_point).clamp_(0, ACTIVATION_QMAX)


def dequantize_uint8(quantized: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """ONNX DequantizeLinear: (q - zero_point) * scale in float32."""
    return (quantized - zero_point) * scale


def masked_extrema(values: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of a Linear input over the tokens that are not padding: values (batch, sequence, ...) with mask
    (batch, sequence) (nonzero = a token); a tensor whose leading dimensions are not the mask's (the pooler's
    (batch, hidden) input) or no mask: all of it. The calibration rule of `quantize_int8` and `qat.calibrate_qat`."""
    if mask is not None and values.dim() >= 3 and tuple(values.shape[:2]) == tuple(mask.shape):
        values = values[mask.to(values.device) != 0]
    if values.numel() == 0:
        zero = torch.zeros((), dtype=values.dtype, device=values.device)
        return zero, zero
    return values.min(), values.max()
