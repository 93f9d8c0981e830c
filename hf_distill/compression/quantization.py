"""Post-training INT8 for CPU deployment: export to ONNX and static INT8 quantization for ONNX Runtime (loading and
running the deployed folder is `hf_distill.compression.deployed`, re-exported here).

    folder = export_onnx(model, tokenizer, "out/onnx")               # model.onnx (float32) + tokenizer + config.json
    folder = quantize_int8(folder, "out/int8", calibration=batches)   # batches: a few hundred tokenized training texts
    classifier = load_deployed(folder)                                # OnnxSequenceClassifier
    logits = classifier.predict_logits(tokenizer(texts, padding=True, return_tensors="np"))

Runtime: ONNX Runtime, chosen by measurement over torchao (benchmarks/bench_runtime.py): one model.onnx that
onnxruntime runs without torch or a compile step, with dynamic batch and sequence axes.

The INT8 scheme (its arithmetic is `int8_scheme`, its graph `onnx_int8`; `qat.py` fake-quantizes the same): every
Linear outside `keep_float` (default: the classifier) gets int8 symmetric weights in [-64, 64], per output channel,
and a uint8 input with a *static* per-tensor range ([min, max] over the unpadded tokens of the calibration batches, or
the range QAT trained with): ONNX QuantizeLinear, then ORT's MatMulIntegerToFloat with the bias folded in. Embedding
tables are uint8 per tensor; attention, LayerNorm, softmax and GELU stay float32. Why:

- Every x86 CPU computes the same model. Without VNNI (AVX2, AVX-512 before Cascade Lake) ORT multiplies uint8 x int8
  with VPMADDUBSW, which adds pairs of products into a saturating int16: with |w| <= 64 a pair stays <= 32,640, so
  the product is exact there too (tests/compression/test_quantization_cpu_view.py runs those kernels natively,
  test_quantization_avx2.py under an emulated Haswell), and the fast u8 x s8 kernels are kept.
- A prediction does not depend on the other texts in its batch (static ranges): batch 1 and batch 64 give the same
  logits, as a served model answers one request at a time.

The graph around the scheme is made fast on every x86 CPU, one file for all (docs/INT8_CPUS.md: 2.1x and 1.95x
faster at batch 32 with the AVX-512 VNNI and the AVX-512-without-VNNI kernels; AVX2 predicted, not measured):
`export_onnx` fuses each layer's attention into one MultiHeadAttention node and each GELU into one Gelu node
(`onnx_fusions`), `quantize_int8` makes the last layer compute only the token the classifier reads
(`onnx_first_token`), and `deployed` sessions leave out ONNX Runtime's SkipLayerNorm fusion
(`deployed.DISABLED_OPTIMIZERS`). Each rewrite is kept only if ONNX Runtime still gives the
reference's logits; onnx_export.json and quantization.json record what was done and the CPU.

onnx, onnxruntime and onnxscript (the `compress` extra) are imported only when a function here needs them.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from hf_distill.compression.deployed import (  # noqa: F401 - re-exported: the deployment API is importable from here as before
    DISABLED_OPTIMIZERS,
    ONNX_FILE,
    OnnxSequenceClassifier,
    _require_onnx,
    _session,
    load_deployed,
    size_on_disk,
)
from hf_distill.compression.int8_scheme import DEFAULT_KEEP_FLOAT, WEIGHT_QMAX, module_name_matches
from hf_distill.compression.onnx_export import (
    _dummy_inputs,
    _input_names,
    _LogitsOnly,
    _quiet_exporter,
    _strip_export_metadata,
    _weight_bytes,
)
from hf_distill.compression.onnx_first_token import first_token_checked
from hf_distill.compression.onnx_fusions import fuse_checked
from hf_distill.compression.onnx_int8 import calibrate, quantizable_nodes, rewrite
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


# --------------------------------------------------------------------------------------------- export
def export_onnx(
    model: nn.Module,
    tokenizer,
    output_dir: str | os.PathLike,
    *,
    max_length: int = 128,
    opset: int = OPSET,
    atol: float = 1e-4,
    overwrite: bool = False,
    fuse: bool = True,
) -> Path:
    """Export a sequence classifier to `output_dir/model.onnx` (float32) and return `output_dir`.

    The graph takes `input_ids`, `attention_mask` and `token_type_ids` (those the model's forward and the tokenizer
    both have), int64 of shape (batch, sequence), both axes dynamic, and returns `logits` (batch, num_labels). The
    folder also gets the tokenizer, config.json and onnx_export.json (inputs, opset, the check below), so it is
    self-contained. Exported with the dynamo exporter (`torch.onnx.export(dynamo=True)`): with transformers 5 BERT it
    matches PyTorch to ~1e-8, where the TorchScript exporter was off by up to 2e-2 on padded rows. Attention is
    exported in its eager form (the model's attention implementation is restored afterwards). With `fuse`
    (default), each layer's attention core becomes one ONNX Runtime MultiHeadAttention node and each GELU one Gelu
    node (`onnx_fusions`), kept only if the fused graph passes the check below; onnx_export.json says which.

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
            with torch.no_grad():
                expected_logits = [wrapper(**inputs).numpy() for inputs in check_inputs]

            def difference_from_torch(path: Path, *, strict: bool) -> float:
                session = _session(path)
                largest = 0.0
                for inputs, expected in zip(check_inputs, expected_logits):
                    actual = session.run(
                        ["logits"], {name: tensor.numpy() for name, tensor in inputs.items()}
                    )[0]
                    same = actual.shape == expected.shape and np.allclose(
                        actual, expected, atol=atol, rtol=1e-3
                    )
                    largest = max(largest, float(np.abs(actual - expected).max()) if same else float("inf"))
                    if not same and strict:
                        raise RuntimeError(
                            f"The ONNX export of {type(model).__name__} disagrees with PyTorch on a batch of shape "
                            f"{tuple(inputs['input_ids'].shape)}: logits {actual.shape} vs {expected.shape}, max "
                            f"abs difference above atol {atol}. Try another opset (now {opset})."
                        )
                return largest

            fusion = {"fusions": "none", "reason": "fuse=False"}
            if fuse and not _weight_bytes(model) > _EXTERNAL_DATA_BYTES:
                fusion = fuse_checked(
                    onnx_path,
                    getattr(model.config, "num_attention_heads", None),
                    lambda path: difference_from_torch(path, strict=False),
                )
            max_abs_diff = difference_from_torch(onnx_path, strict=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(temporary)
            model.config.save_pretrained(temporary)
            info = {
                "inputs": input_names,
                "output": "logits",
                "opset": opset,
                "max_length": max_length,
                "max_abs_diff_vs_torch": max_abs_diff,
                **fusion,
                # What load_deployed's sessions turn off (deployed.DISABLED_OPTIMIZERS); a plain InferenceSession
                # should too, for the measured speed.
                "session": {"disabled_optimizers": list(DISABLED_OPTIMIZERS)},
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
    first_token_only: bool = True,
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
        graph = {"tokens": "every token through every layer", "reason": "first_token_only=False"}
        if first_token_only and not large:
            graph = first_token_checked(model, onnx_dir, temporary)
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
            "graph": graph,
            # What load_deployed's sessions turn off; a plain InferenceSession should pass the same for that speed.
            "session": {"disabled_optimizers": list(DISABLED_OPTIMIZERS)},
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
