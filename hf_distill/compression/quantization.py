"""Post-training INT8 for CPU deployment: export to ONNX and static INT8 quantization for ONNX Runtime (loading and
running the deployed folder is `hf_distill.compression.deployed`, re-exported here).

Runtime: ONNX Runtime, chosen by measurement (benchmarks/bench_runtime.py and its README section: all-MiniLM-L6-v2
with a 5-label head, 128 tokens, medians of alternating rounds on this project's shared 2-core CPU machine, with the
dynamic INT8 this module deployed before, which runs at the speed of the scheme below). Speed-up over PyTorch fp32:

                              1 thread: batch 1   batch 32   2 threads, one core busy elsewhere: b1   b32   weights
    torchao int8 + torch.compile        2.15x      2.52x                                   0.73x  1.20x   58.7 MB
    ONNX Runtime fp32                   1.19x      1.00x                                     22x  1.46x   91.0 MB
    ONNX Runtime INT8 per-channel       2.62x      2.15x                                     58x  2.92x   23.1 MB

ORT INT8 is the fastest at batch 1 and 15-20% behind torchao + torch.compile at batch 32, and wins on the rest: one
model.onnx 3.9x smaller than fp32 that onnxruntime runs without torch or a compiler, no compile step, dynamic batch
and sequence axes, and a busy machine barely slows it while PyTorch's OpenMP threads stall.

Pipeline (each stage writes its own self-contained folder, atomically)::

    folder = export_onnx(model, tokenizer, "out/onnx")               # model.onnx (float32) + tokenizer + config.json
    folder = quantize_int8(folder, "out/int8", calibration=batches)   # batches: a few hundred tokenized training texts
    classifier = load_deployed(folder)                                # OnnxSequenceClassifier
    logits = classifier.predict_logits(tokenizer(texts, padding=True, return_tensors="np"))

The INT8 scheme (its arithmetic is `int8_scheme`, its graph `onnx_int8`; `qat.py` fake-quantizes the same): every
Linear outside `keep_float` (default: the classifier) gets int8 symmetric weights in [-64, 64], per output channel,
and a uint8 input with a *static* per-tensor range ([min, max] over the unpadded tokens of the calibration batches, or
the range QAT trained with): ONNX QuantizeLinear, then ORT's MatMulIntegerToFloat with the bias folded in. Embedding
tables are uint8 per tensor; attention matmuls, LayerNorm, softmax and GELU stay float32. Why:

- Every x86 CPU computes the same model. Without VNNI (AVX2: Haswell to Comet Lake, Zen 1-3; AVX-512 before Cascade
  Lake) ORT multiplies uint8 x int8 with VPMADDUBSW, which adds pairs of products into a saturating int16: with
  8-bit weights a pair reaches 2 * 255 * 127 = 64770 and clips, so the dynamic scheme used before deployed another
  model there than QAT trained (on an emulated Haswell its logits moved by up to 0.16 on a fine-tuned 3-layer MiniLM).
  With |w| <= 64 a pair stays <= 32640: exact, bit-identical on Haswell and on AVX-512 VNNI
  (tests/test_quantization_avx2.py), and still the fast uint8 x int8 kernels (VPMADDUBSW, VPDPBUSD with VNNI, AMX);
  uint8 weights would also be exact but take AVX2's int16-widening kernel at about half the throughput.
- A prediction does not depend on the other texts in its batch, as a served model answers one request at a time:
  with per-batch ranges 2 of 426 BBC answers changed between batch 1 and batch 64 (MiniLM-L6); now none, and
  the logits are identical. No DynamicQuantizeLinear (a min/max pass over every Linear input) runs per call.
- The cost, measured on 426 BBC test articles with 256 calibration articles: a 3-layer MiniLM kept 96.0% (fp32 95.8%,
  dynamic 95.8%; mean |logit change| 0.019, dynamic 0.018), MiniLM-L6 96.5% (fp32 96.5%, dynamic 96.2%; 0.014 and
  0.014). Per-tensor weights lose more with 7 bits (95.5%, 6-8 answers changed): keep `per_channel`. Speed on
  AVX-512 VNNI: the dynamic scheme's (a 3-layer x 192 BERT, 128 tokens: 3.0 ms at batch 1, 110 ms at batch 32, 1.7x
  ORT fp32). quantization.json records the scheme, the ranges and the CPU (`cpu_features`).

onnx, onnxruntime and onnxscript (the `compress` extra) are imported only when a function here needs them.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from hf_distill.compression.deployed import (  # noqa: F401 - re-exported: the deployment API is importable from here as before
    ONNX_FILE,
    OnnxSequenceClassifier,
    _require_onnx,
    _session,
    load_deployed,
    size_on_disk,
)
from hf_distill.compression.int8_scheme import DEFAULT_KEEP_FLOAT, WEIGHT_QMAX, module_name_matches
from hf_distill.compression.onnx_int8 import _NAME_SCOPES, calibrate, quantizable_nodes, rewrite
from hf_distill.compression.qat import CONFIG_KEY as QAT_CONFIG_KEY
from hf_distill.reporting.machine import describe_cpu
from hf_distill.storage.atomic import atomic_directory
from hf_distill.storage.sizes import external_data_files

logger = logging.get_logger(__name__)

__all__ = [
    "DEFAULT_KEEP_FLOAT",
    "INT8_SCHEME",
    "ONNX_FILE",
    "OnnxSequenceClassifier",
    "export_onnx",
    "load_deployed",
    "module_name_matches",
    "quantize_int8",
    "size_on_disk",
]

# quantization.json's "scheme": what quantize_int8 deploys (int8_scheme), for folders built by an older version.
INT8_SCHEME = "static int8: uint8 inputs with static ranges x int8 weights in [-64, 64]"
EXPORT_INFO_FILE = "onnx_export.json"
QUANTIZATION_INFO_FILE = "quantization.json"
OPSET = 18
# Above this many bytes of weights the ONNX file keeps them in a separate file (protobuf's 2 GiB limit).
_EXTERNAL_DATA_BYTES = 1 << 30
_INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids")


# --------------------------------------------------------------------------------------------- export
class _LogitsOnly(nn.Module):
    """The model with the logits as its only output, whatever the config's output_* flags say."""

    def __init__(self, model: nn.Module, input_names: Sequence[str]):
        super().__init__()
        self.model = model
        self.input_names = tuple(input_names)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return self.model(**{name: given[name] for name in self.input_names}, return_dict=True).logits


def _input_names(model: nn.Module, tokenizer) -> list[str]:
    accepted = set(inspect.signature(model.forward).parameters)
    wanted = set(getattr(tokenizer, "model_input_names", None) or _INPUT_ORDER)
    names = [name for name in _INPUT_ORDER if name in accepted and name in wanted]
    if "input_ids" not in names:
        raise ValueError(
            f"export_onnx exports models that take input_ids; {type(model).__name__}.forward takes "
            f"{sorted(accepted)} and the tokenizer gives {sorted(wanted)}."
        )
    return names


def _dummy_inputs(config, input_names: Sequence[str], batch_size: int, length: int, seed: int) -> dict:
    """Random token ids with a padded last row (so masking is exercised) and both token types."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(0, config.vocab_size, (batch_size, length), generator=generator)}
    if "attention_mask" in input_names:
        mask = torch.ones(batch_size, length, dtype=torch.long)
        mask[-1, max(1, length // 2) :] = 0
        inputs["attention_mask"] = mask
    if "token_type_ids" in input_names:
        token_types = torch.zeros(batch_size, length, dtype=torch.long)
        if getattr(config, "type_vocab_size", 1) > 1:
            token_types[:, length // 3 :] = 1
        inputs["token_type_ids"] = token_types
    return inputs


def _weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def export_onnx(
    model: nn.Module,
    tokenizer,
    output_dir: str | os.PathLike,
    *,
    max_length: int = 128,
    opset: int = OPSET,
    atol: float = 1e-4,
    overwrite: bool = False,
) -> Path:
    """Export a sequence classifier to `output_dir/model.onnx` (float32) and return `output_dir`.

    The graph takes `input_ids`, `attention_mask` and `token_type_ids` (those the model's forward and the tokenizer
    both have), int64 of shape (batch, sequence), both axes dynamic, and returns `logits` (batch, num_labels). The
    folder also gets the tokenizer, config.json and onnx_export.json (inputs, opset, the check below), so it is
    self-contained. Exported with the dynamo exporter (`torch.onnx.export(dynamo=True)`): with transformers 5 BERT it
    matches PyTorch to ~1e-8, where the TorchScript exporter was off by up to 2e-2 on padded rows. Attention is
    exported in its eager form (the model's attention implementation is restored afterwards).

    Checked before the folder appears: ONNX Runtime's logits equal PyTorch's within `atol` (absolute, plus 1e-3
    relative) on a (2, max_length) batch with a padded row and on a (3, max_length // 2 + 1) batch; otherwise
    RuntimeError. The model is exported from a float32 CPU copy if it is elsewhere; its train/eval mode is restored.
    Written atomically (temporary folder, then rename); an existing folder needs `overwrite`.
    """
    from hf_distill.compression.qat import has_fake_quant

    _require_onnx()
    if has_fake_quant(model):
        raise ValueError(
            "The model still has QAT fake-quantization modules; call hf_distill.compression.qat.strip_qat(model) before "
            "export_onnx, then quantize_int8 the exported folder."
        )
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (dynamic axes need a length above 1), got {max_length}.")
    parameter = next(model.parameters())
    if parameter.device.type != "cpu" or parameter.dtype != torch.float32:
        model = copy.deepcopy(model).to("cpu", torch.float32)
    input_names = _input_names(model, tokenizer)
    was_training = model.training
    model.eval()
    attention = getattr(model.config, "_attn_implementation", None)
    if attention not in (None, "eager") and hasattr(model, "set_attn_implementation"):
        # matmul-softmax-matmul exports to a smaller graph than SDPA's decomposition (no NaN guards for fully
        # masked rows), which ORT ran 9-11% faster on MiniLM (fp32 and INT8, batch 1 and 32).
        model.set_attn_implementation("eager")
    wrapper = _LogitsOnly(model, input_names)
    export_inputs = _dummy_inputs(model.config, input_names, 2, max_length, seed=0)
    check_inputs = [export_inputs, _dummy_inputs(model.config, input_names, 3, max_length // 2 + 1, seed=1)]
    try:
        with atomic_directory(output_dir, overwrite=overwrite) as temporary:
            onnx_path = temporary / ONNX_FILE
            with torch.no_grad(), _quiet_exporter():
                torch.onnx.export(
                    wrapper,
                    (),
                    str(onnx_path),
                    kwargs=export_inputs,
                    input_names=input_names,
                    output_names=["logits"],
                    dynamic_shapes={name: {0: "batch", 1: "sequence"} for name in input_names},
                    opset_version=opset,
                    dynamo=True,
                    external_data=_weight_bytes(model) > _EXTERNAL_DATA_BYTES,
                )
            _strip_export_metadata(onnx_path)
            session = _session(onnx_path)
            max_abs_diff = 0.0
            for inputs in check_inputs:
                with torch.no_grad():
                    expected = wrapper(**inputs).numpy()
                actual = session.run(["logits"], {name: tensor.numpy() for name, tensor in inputs.items()})[0]
                max_abs_diff = max(max_abs_diff, float(np.abs(actual - expected).max()))
                if actual.shape != expected.shape or not np.allclose(actual, expected, atol=atol, rtol=1e-3):
                    raise RuntimeError(
                        f"The ONNX export of {type(model).__name__} disagrees with PyTorch on a batch of shape "
                        f"{tuple(inputs['input_ids'].shape)}: logits {actual.shape} vs {expected.shape}, max abs "
                        f"difference {max_abs_diff:.3g} > atol {atol}. Try another opset (now {opset})."
                    )
            del session
            if tokenizer is not None:
                tokenizer.save_pretrained(temporary)
            model.config.save_pretrained(temporary)
            info = {
                "inputs": input_names,
                "output": "logits",
                "opset": opset,
                "max_length": max_length,
                "max_abs_diff_vs_torch": max_abs_diff,
                "torch_version": torch.__version__,
            }
            (temporary / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
    finally:
        model.train(was_training)
        if attention not in (None, "eager") and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(attention)
    logger.info(
        f"Exported {type(model).__name__} to {output_dir} (max |ONNX - PyTorch| = {max_abs_diff:.2e})"
    )
    return Path(output_dir)


def _strip_export_metadata(onnx_path: Path) -> None:
    """Drop the exporter's per-node debug metadata (stack traces with local paths, FX nodes: about half of a small
    model's file) but keep the module name scopes, which `quantize_int8` reads to find the modules in keep_float."""
    onnx, _ = _require_onnx()
    model = onnx.load(str(onnx_path), load_external_data=False)  # external tensors keep their references
    for node in model.graph.node:
        kept = [(prop.key, prop.value) for prop in node.metadata_props if prop.key == _NAME_SCOPES]
        del node.metadata_props[:]
        for key, value in kept:
            node.metadata_props.add(key=key, value=value)
    onnx.save(model, str(onnx_path))


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The dynamo exporter prints progress lines and warns about unused axis names; keep the log readable."""
    import warnings

    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------------------------- quantization
def _qat_record(onnx_dir: Path) -> dict[str, Any] | None:
    """What `qat.strip_qat` recorded in the model's config (exported with it): QAT settings and input ranges."""
    path = onnx_dir / "config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get(QAT_CONFIG_KEY)


def _missing_ranges_error(source: Path) -> ValueError:
    return ValueError(
        f"quantize_int8 needs static input ranges for the Linears of {source}: pass calibration= (an iterable of "
        "tokenized batches with attention_mask, e.g. a few hundred training texts; see tasks/compression_stages.py "
        "_calibration_batches) or activation_ranges= ({module: (low, high)}, e.g. hf_distill.compression.qat.activation_ranges "
        "of a QAT model). A model stripped with hf_distill.compression.qat.strip_qat carries its ranges in config.json."
    )


def quantize_int8(
    onnx_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    per_channel: bool = True,
    keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT,
    calibration: Iterable[Mapping[str, Any]] | None = None,
    activation_ranges: Mapping[str, Sequence[float]] | None = None,
    overwrite: bool = False,
) -> Path:
    """Static INT8 quantization of `onnx_dir/model.onnx` into `output_dir/model.onnx`; returns `output_dir`.

    The scheme (module docstring, `int8_scheme`): int8 weights in [-64, 64] (per output channel if `per_channel`),
    uint8 Linear inputs with static per-tensor ranges, uint8 embedding tables. The ranges come from, in this order:
    `activation_ranges` ({module name: (low, high)}), `calibration` (tokenized batches: [min, max] of each Linear input
    over their unpadded tokens, run by ONNX Runtime on the float graph), or the ranges a QAT model recorded in its
    config.json (`qat.strip_qat`); with none of them, ValueError. Nodes from the modules in `keep_float` (matched as
    in `module_name_matches`) stay float32. The other files of `onnx_dir` (tokenizer, config.json, onnx_export.json)
    are copied; quantization.json records the scheme, the ranges (loadable by `qat.prepare_qat(activation_ranges=)`),
    which modules were quantized and the CPU (`cpu_features.describe_cpu`). Written atomically; an existing folder needs
    `overwrite`.
    """
    onnx, ort = _require_onnx()
    onnx_dir = Path(onnx_dir)
    source = onnx_dir / ONNX_FILE
    if not source.is_file():
        found = sorted(p.name for p in onnx_dir.iterdir()) if onnx_dir.is_dir() else "no such folder"
        raise ValueError(f"quantize_int8 needs {source} (from export_onnx); found {found}.")
    qat = _qat_record(onnx_dir)
    if qat is not None and bool(qat.get("per_channel", per_channel)) != per_channel:
        logger.warning(
            f"{onnx_dir} was trained with QAT per_channel={qat['per_channel']}; quantizing with per_channel="
            f"{per_channel} deploys another model than the one trained."
        )
    model = onnx.load(str(source))
    nodes = quantizable_nodes(model.graph)
    kept = [(node, module) for node, module in nodes if module_name_matches(module, keep_float)]
    chosen = [(node, module) for node, module in nodes if not module_name_matches(module, keep_float)]
    missing = [p for p in keep_float if not any(module_name_matches(m, [p]) for _, m in nodes)]
    if missing:
        logger.warning(f"keep_float names {missing}, which match no quantizable module of {source}.")
    linears = [(node, module) for node, module in chosen if node.op_type != "Gather"]
    range_source = "activation_ranges"
    if activation_ranges is None and calibration is None:
        if qat and qat.get("activation_ranges"):
            activation_ranges, range_source = qat["activation_ranges"], "qat (config.json int8_qat)"
        elif linears:
            raise _missing_ranges_error(source)
        else:
            activation_ranges = {}
    elif activation_ranges is None:
        range_source = "calibration"
        if qat and qat.get("activation_ranges"):
            logger.info("Calibrating; the input ranges QAT recorded in config.json are not used.")
    if activation_ranges is not None:
        absent = sorted({module for _, module in linears} - set(activation_ranges))
        if absent:
            raise ValueError(
                f"activation_ranges has no (low, high) for {absent}; it names {sorted(activation_ranges)[:6]}... "
                "Give one per quantized Linear module (quantization.json's activation_ranges), or calibrate instead."
            )
    large = (
        source.stat().st_size + sum(p.stat().st_size for p in external_data_files(source))
        > _EXTERNAL_DATA_BYTES
    )

    with atomic_directory(output_dir, overwrite=overwrite) as temporary:
        calibrated: dict[str, Any] = {}
        if activation_ranges is None:
            calibrated = calibrate(
                model, sorted({node.input[0] for node, _ in linears}), calibration, temporary
            )
            ranges = {node.output[0]: calibrated["ranges"][node.input[0]] for node, _ in linears}
        else:
            ranges = {
                node.output[0]: tuple(map(float, activation_ranges[module])) for node, module in linears
            }
        left_float = rewrite(model, chosen, ranges, per_channel)
        if left_float:
            logger.warning(f"Left float (not in a Linear's form): {left_float}")
        onnx.save(
            model, str(temporary / ONNX_FILE), save_as_external_data=large, location=f"{ONNX_FILE}.data"
        )
        weight_files = {ONNX_FILE, *(p.name for p in external_data_files(source))}
        for item in onnx_dir.iterdir():
            if item.name in weight_files or item.name.startswith("."):
                continue
            if item.is_dir():
                shutil.copytree(item, temporary / item.name)
            else:
                shutil.copy2(item, temporary / item.name)
        quantized_modules = sorted({m for node, m in chosen if node.name not in left_float})
        info = {
            "runtime": "onnxruntime",
            "scheme": INT8_SCHEME,
            "weights": f"int8 symmetric [-{WEIGHT_QMAX}, {WEIGHT_QMAX}], "
            + ("per output channel" if per_channel else "per tensor"),
            "activations": "uint8 asymmetric per tensor, static range (QuantizeLinear + MatMulIntegerToFloat)",
            "embeddings": "uint8 asymmetric per tensor",
            "integer_product": "exact on every x86 CPU: |uint8 x int8 pair| <= 2 * 255 * 64 = 32640 < 2**15",
            "per_channel": per_channel,
            "keep_float": list(keep_float),
            "float_modules": sorted({m for _, m in kept} | {m for n, m in chosen if n.name in left_float}),
            "quantized_modules": quantized_modules,
            "activation_range_source": range_source,
            "calibration": {k: v for k, v in calibrated.items() if k != "ranges"} or None,
            "activation_ranges": {
                module: list(ranges[node.output[0]])
                for node, module in linears
                if node.name not in left_float
            },
            "onnxruntime_version": ort.__version__,
            "cpu": describe_cpu(),
        }
        (temporary / QUANTIZATION_INFO_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
    logger.info(
        f"Quantized {len(quantized_modules)} modules of {source} to INT8 in {output_dir} "
        f"({size_on_disk(source.parent) / 1e6:.1f} MB -> {size_on_disk(output_dir) / 1e6:.1f} MB), input ranges from "
        f"{range_source}; float: {info['float_modules']}"
    )
    return Path(output_dir)
