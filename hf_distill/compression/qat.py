"""Quantization-aware training (QAT) in exactly the scheme that `quantization.quantize_int8` deploys.

`quantize_int8` rewrites every Linear of an exported BERT-like classifier (outside its `keep_float`, default: the
classifier) into ONNX `QuantizeLinear` + ONNX Runtime's `MatMulIntegerToFloat`, and every embedding Gather into a
uint8 table + `DequantizeLinear`; the arithmetic of both sides is `hf_distill.compression.int8_scheme` (read it for the rules):

- weights: int8 symmetric in [-64, 64], scale max|w| / 64 per output channel (`per_channel=True`) or per tensor;
- the Linear's input: uint8 asymmetric per tensor with a *static* range [low, high] (scale (high - low) / 255); a
  value outside the range saturates;
- embedding tables: uint8 asymmetric per tensor with the table's own range.

The integer product, its float32 scale (input scale x weight scale) and the float bias are then what ONNX Runtime
computes. Attention matmuls, LayerNorm, softmax, GELU and the biases stay float32, and so do the modules in `skip`
(pass the `keep_float` you give `quantize_int8`).

Activation ranges. A static range is what makes a deployed prediction independent of the other texts in its batch,
so QAT keeps one per Linear input, as an exponential moving average of each training batch's [min, max]
(`range_momentum`, 0.01 as PyTorch's observers; the first batch initialises it) unless it was calibrated
(`calibration=`, the float model's [min, max] over the unpadded tokens of those batches, as `quantize_int8`
calibrates) or given (`activation_ranges=`, e.g. `quantization.json`'s of a deployed model). `strip_qat` writes the
final ranges into `model.config.int8_qat`; `export_onnx` saves that config and `quantize_int8` deploys those very
ranges, so the INT8 model is the QAT model.

How equal: in eval mode the integer products are the deployed ones; the float ops between them (LayerNorm, softmax,
GELU) are PyTorch's here and ORT's there, ~1e-7 apart, which now and then puts a value on the other side of a rounding
boundary: one quantized value one step off. On the test models the logits agree to ~3e-8 (a rare row to ~1e-4); on a
fine-tuned 3-layer MiniLM over 426 BBC articles of 128 tokens, to 1e-6 for the median article and 1e-5 for 77% of them,
1.9e-2 at worst (INT8 against fp32: up to 0.39), no answer different.

Forward pass in training: fake quantization (quantize, dequantize, float32 `F.linear`) with the straight-through
estimator: identity gradient for the weights (never clipped) and tables, and for inputs inside their range (zero
outside it, where the deployed value saturates). In eval mode the Linear computes what the deployed kernel computes:
the integer product (exact in float32 below 2**24) times input scale x weight scale, plus the bias.

Why not torchao's or PyTorch's QAT: their int8 grids ([-128, 127], or 127 levels with x * (1 / scale)) are not this
one, so they would train against a slightly different model from the one deployed.

Mechanism: `prepare_qat` replaces each `nn.Linear` / `nn.Embedding` by a `QATLinear` / `QATEmbedding` (subclasses)
holding the *same* Parameter objects (the ranges are non-persistent buffers), so the optimizer, tied weights and the
state_dict keys are unchanged while training (a checkpoint saved during QAT loads into the plain model); `strip_qat`
swaps plain modules back. A resumed run re-initialises the ranges from its first batch.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from hf_distill.compression.int8_scheme import (
    ACTIVATION_QMAX,
    DEFAULT_KEEP_FLOAT,
    dequantize_uint8,
    masked_extrema,
    module_name_matches,
    quantize_uint8,
    quantize_weight,
    uint8_parameters,
)

logger = logging.get_logger(__name__)

__all__ = [
    "QATEmbedding",
    "QATLinear",
    "activation_ranges",
    "calibrate_qat",
    "fake_quantize_table_uint8",
    "fake_quantize_uint8",
    "fake_quantize_weight_int8",
    "has_fake_quant",
    "prepare_qat",
    "strip_qat",
]

CONFIG_KEY = "int8_qat"  # what strip_qat records in model.config for quantize_int8


def _straight_through(x: torch.Tensor, dequantized: torch.Tensor) -> torch.Tensor:
    """`dequantized` in the forward pass, identity gradient to `x` in the backward pass."""
    return x + (dequantized - x).detach()


def fake_quantize_weight_int8(weight: torch.Tensor, *, per_channel: bool = True) -> torch.Tensor:
    """Quantize-dequantize of a Linear weight (out_features, in_features) on the deployed grid (int8 in [-64, 64],
    `int8_scheme.quantize_weight`); identity gradient (the grid covers max|w|, nothing is clipped)."""
    quantized, scale = quantize_weight(weight, per_channel=per_channel)
    return _straight_through(weight, (quantized * scale).to(weight.dtype))


def fake_quantize_uint8(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize of an activation to uint8 with the static range [low, high] (`int8_scheme`); x: any shape.
    Gradient: identity where x is inside the representable range, 0 where it saturates."""
    scale, zero_point = uint8_parameters(low, high)
    with torch.no_grad():
        quantized = quantize_uint8(x.detach(), scale, zero_point)
        dequantized = dequantize_uint8(quantized, scale, zero_point).to(x.dtype)
        inside = (x >= -zero_point * scale) & (x <= (ACTIVATION_QMAX - zero_point) * scale)
    return dequantized + (x - x.detach()) * inside


def fake_quantize_table_uint8(weight: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize of an embedding table to uint8 per tensor with the table's own [min, max] (as
    `quantize_int8` stores it); identity gradient."""
    with torch.no_grad():
        values = weight.detach().float()
        scale, zero_point = uint8_parameters(values.min(), values.max())
        dequantized = dequantize_uint8(quantize_uint8(values, scale, zero_point), scale, zero_point)
    return _straight_through(weight, dequantized.to(weight.dtype))


class QATLinear(nn.Linear):
    """nn.Linear that runs as the deployed INT8 Linear: int8 weights, uint8 input with a static range."""

    per_channel: bool = True
    quantize_input: bool = True
    range_momentum: float = 0.01
    enabled: bool = True  # False while calibrating: the float Linear
    input_range: torch.Tensor  # (2,) [low, high], NaN until calibrated or observed

    def observe(self, input: torch.Tensor) -> None:
        """Move the range towards this batch's [min, max] (set it, if it is not known yet)."""
        with torch.no_grad():
            batch = torch.stack(masked_extrema(input.detach().float(), None))
            if torch.isnan(self.input_range).any():
                self.input_range.copy_(batch)
            elif self.range_momentum > 0:
                self.input_range.lerp_(batch, self.range_momentum)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return F.linear(input, self.weight, self.bias)
        weight_q, weight_scale = quantize_weight(self.weight, per_channel=self.per_channel)
        weight = _straight_through(self.weight, (weight_q * weight_scale).to(self.weight.dtype))
        if not self.quantize_input:
            return F.linear(input, weight, self.bias)
        if self.training:
            self.observe(input)
        elif torch.isnan(self.input_range).any():
            raise ValueError(
                "A QATLinear in eval mode has no input range yet: pass calibration= (or activation_ranges=) to "
                "prepare_qat, call hf_distill.compression.qat.calibrate_qat(model, batches), or train a step first."
            )
        low, high = self.input_range[0], self.input_range[1]
        if self.training:
            return F.linear(fake_quantize_uint8(input, low, high), weight, self.bias)
        # What the deployed kernel computes: the exact integer product, one float32 multiplier per output channel
        # (input scale x weight scale, as ORT's MatMulIntegerToFloat), then the bias.
        scale, zero_point = uint8_parameters(low, high)
        with torch.no_grad():
            integer = F.linear(quantize_uint8(input.detach(), scale, zero_point) - zero_point, weight_q)
            exact = integer * (scale * weight_scale.reshape(-1))
            if self.bias is not None:
                exact = exact + self.bias
            exact = exact.to(input.dtype)
        if not torch.is_grad_enabled():
            return exact
        # Gradients in eval mode (rare) are those of the fake-quantized float Linear.
        return _straight_through(F.linear(fake_quantize_uint8(input, low, high), weight, self.bias), exact)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, per_channel={self.per_channel}, quantize_input={self.quantize_input}"


class QATEmbedding(nn.Embedding):
    """nn.Embedding whose table is fake-quantized uint8 per tensor before the lookup."""

    enabled: bool = True

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = fake_quantize_table_uint8(self.weight) if self.enabled else self.weight
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
    if cls is QATLinear:
        nan = torch.full((2,), float("nan"), device=module.weight.device)
        new.register_buffer("input_range", nan, persistent=False)  # not in the state_dict: keys stay the same
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


def _quantized_inputs(model: nn.Module) -> dict[str, QATLinear]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, QATLinear) and module.quantize_input
    }


def prepare_qat(
    model: nn.Module,
    *,
    per_channel: bool = True,
    activations: bool = True,
    embeddings: bool = True,
    skip: Sequence[str] = DEFAULT_KEEP_FLOAT,
    calibration: Iterable[Mapping[str, Any]] | None = None,
    activation_ranges: Mapping[str, Sequence[float]] | None = None,
    range_momentum: float = 0.01,
) -> nn.Module:
    """Make `model` train against its deployed INT8 model (see the module docstring); in place, returns `model`.

    Every `nn.Linear` fake-quantizes its weight (per output channel if `per_channel`, which must equal the
    `per_channel` later given to `quantize_int8`) and, if `activations`, its input with a static range; with
    `embeddings`, every `nn.Embedding` fake-quantizes its table. Modules named in `skip` (a name, a dotted suffix of a
    name, or an ancestor's: "classifier" matches "model.classifier") stay float: pass `quantize_int8`'s `keep_float`.
    Subclasses of Linear/Embedding (other than ours) are left alone.

    Input ranges: `activation_ranges` ({module name: (low, high)}, e.g. a deployed folder's quantization.json), else
    `calibration` (batches of model inputs with attention_mask: `calibrate_qat`), else the first training batch; then
    an exponential moving average of each training batch's range with weight `range_momentum` (0 keeps them fixed).
    """
    if not 0 <= range_momentum <= 1:
        raise ValueError(f"range_momentum must be in [0, 1], got {range_momentum}.")
    prepared = {"linear": 0, "embedding": 0}
    for name, module in list(model.named_modules()):
        if not name or module_name_matches(name, skip):
            continue
        if type(module) is nn.Linear:
            _check_plain(name, module)
            _replace(model, name, _linear_like(module, QATLinear))
            prepared["linear"] += 1
        elif embeddings and type(module) is nn.Embedding:
            _check_plain(name, module)
            _replace(model, name, _embedding_like(module, QATEmbedding))
            prepared["embedding"] += 1
    for module in model.modules():
        if isinstance(module, QATLinear):
            module.per_channel, module.quantize_input = per_channel, activations
            module.range_momentum = range_momentum
    if not any(prepared.values()) and not has_fake_quant(model):
        raise ValueError(
            f"prepare_qat found no nn.Linear or nn.Embedding outside skip={list(skip)} in {type(model).__name__}; "
            "nothing would be fake-quantized."
        )
    if activation_ranges is not None:
        _set_ranges(model, activation_ranges)
    elif calibration is not None:
        calibrate_qat(model, calibration)
    logger.info(
        f"QAT: fake-quantizing {prepared['linear']} Linear and {prepared['embedding']} Embedding modules "
        f"(per_channel={per_channel}, activations={activations}); float: {list(skip)}"
    )
    return model


def _set_ranges(model: nn.Module, ranges: Mapping[str, Sequence[float]]) -> None:
    modules = _quantized_inputs(model)
    missing = sorted(set(modules) - set(ranges))
    if missing:
        raise ValueError(
            f"activation_ranges has no range for {missing} (it names {sorted(ranges)[:5]}...); give one (low, high) "
            "per fake-quantized Linear, as quantization.json's activation_ranges, or calibrate instead."
        )
    for name, module in modules.items():
        low, high = ranges[name]
        module.input_range.copy_(torch.tensor([float(low), float(high)]))


@contextlib.contextmanager
def _float_forward(model: nn.Module) -> Iterator[None]:
    modules = [module for module in model.modules() if isinstance(module, (QATLinear, QATEmbedding))]
    try:
        for module in modules:
            module.enabled = False
        yield
    finally:
        for module in modules:
            module.enabled = True


@torch.no_grad()
def calibrate_qat(model: nn.Module, batches: Iterable[Mapping[str, Any]]) -> dict[str, tuple[float, float]]:
    """Set every fake-quantized Linear input's range to its [min, max] over the tokens of `batches` that are not
    padding (`attention_mask` 1; all rows of a 2-D input such as the pooler's), computed by the float model, as
    `quantize_int8(calibration=...)` does with the exported graph. `batches`: tokenizer outputs (tensors or arrays).
    Returns `activation_ranges(model)`; the model's train/eval mode is restored."""
    modules = _quantized_inputs(model)
    if not modules:
        raise ValueError("calibrate_qat: the model has no fake-quantized Linear inputs (prepare_qat first).")
    extrema: dict[str, list[torch.Tensor]] = {}
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(name):
        def record(module, args):
            low, high = masked_extrema(args[0].detach().float(), state["mask"])
            if name in extrema:
                low, high = torch.minimum(low, extrema[name][0]), torch.maximum(high, extrema[name][1])
            extrema[name] = [low, high]

        return record

    accepted = set(inspect.signature(model.forward).parameters)
    device = next(model.parameters()).device
    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    was_training = model.training
    model.eval()
    count = 0
    try:
        with _float_forward(model):
            for batch in batches:
                inputs = {
                    key: torch.as_tensor(value).to(device) for key, value in batch.items() if key in accepted
                }
                state["mask"] = inputs.get("attention_mask")
                model(**inputs)
                count += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if count == 0:
        raise ValueError("calibrate_qat got no batches; pass an iterable of tokenized batches.")
    for name, module in modules.items():
        module.input_range.copy_(torch.stack(extrema[name]))
    return activation_ranges(model)


def activation_ranges(model: nn.Module) -> dict[str, tuple[float, float]]:
    """{module name: (low, high)} of every fake-quantized Linear input whose range is known (what `quantize_int8`
    takes as `activation_ranges`)."""
    return {
        name: (float(module.input_range[0]), float(module.input_range[1]))
        for name, module in _quantized_inputs(model).items()
        if not torch.isnan(module.input_range).any()
    }


def has_fake_quant(model: nn.Module) -> bool:
    """Whether `model` still contains QAT modules."""
    return any(isinstance(module, (QATLinear, QATEmbedding)) for module in model.modules())


def strip_qat(model: nn.Module) -> nn.Module:
    """Replace every QAT module by the plain `nn.Linear` / `nn.Embedding` holding the same trained float Parameters;
    in place. The result has no fake quantization, hooks or parametrizations from QAT and the original state_dict
    keys: export it (`export_onnx`) and quantize it (`quantize_int8`). The QAT settings and input ranges are recorded
    in `model.config.int8_qat` (if the model has a config), which `quantize_int8` deploys."""
    linears = [module for module in model.modules() if isinstance(module, QATLinear)]
    ranges = activation_ranges(model)
    if linears and hasattr(model, "config"):
        setattr(
            model.config,
            CONFIG_KEY,
            {
                "per_channel": linears[0].per_channel,
                "embeddings": any(isinstance(module, QATEmbedding) for module in model.modules()),
                "activation_ranges": {name: list(value) for name, value in ranges.items()},
            },
        )
    for name, module in list(model.named_modules()):
        if isinstance(module, QATLinear):
            _replace(model, name, _linear_like(module, nn.Linear))
        elif isinstance(module, QATEmbedding):
            _replace(model, name, _embedding_like(module, nn.Embedding))
    return model
