"""Post-training INT8 for CPU deployment: export to ONNX and dynamic INT8 quantization with ONNX Runtime (loading
and running the deployed folder is `hf_distill.deployed`, re-exported here).

Runtime: ONNX Runtime, dynamic INT8 with per-channel weights (`onnxruntime.quantization.quantize_dynamic`), chosen
by measurement (benchmarks/bench_runtime.py and its README section: all-MiniLM-L6-v2 with a 5-label head, 128 tokens,
medians of alternating rounds on this project's shared 2-core CPU machine). Speed-up over PyTorch fp32 eager:

                              1 thread: batch 1   batch 32   2 threads, one core busy elsewhere: b1   b32   weights
    torchao int8 eager                  1.26x      1.24x                                   0.17x  0.36x   58.7 MB
    torchao int8 + torch.compile        2.15x      2.52x                                   0.73x  1.20x   58.7 MB
    ONNX Runtime fp32                   1.19x      1.00x                                     22x  1.46x   91.0 MB
    ONNX Runtime INT8 per-channel       2.62x      2.15x                                     58x  2.92x   23.1 MB
    (PyTorch fp32: 40 ms / 1.2 s with one thread; 90.9 MB)

ORT INT8 is the fastest at batch 1 and 15-20% behind torchao + torch.compile at batch 32, and wins on the rest: a
single model.onnx 3.9x smaller than fp32 (torchao keeps the embeddings in fp32) that onnxruntime runs without torch
or a C++ compiler, no compile step (14-92 s for torch.compile here, again for new shapes), dynamic batch and sequence
axes, and a busy machine barely slows it while PyTorch's two OpenMP threads stall (the 2-thread columns). On a
fine-tuned 3-layer BBC classifier, per-channel INT8 kept 94.0% accuracy against 94.5% in fp32 (per-tensor: 93.5%, at
the same speed), and `qat.py` simulates exactly this model, so a QAT student can win the difference back.

Pipeline (each stage writes its own self-contained folder, atomically)::

    folder = export_onnx(model, tokenizer, "out/onnx")       # model.onnx (float32) + tokenizer + config.json
    folder = quantize_int8(folder, "out/int8")                # model.onnx (INT8 weights) + the same files
    classifier = load_deployed(folder)                        # OnnxSequenceClassifier
    logits = classifier.predict_logits(tokenizer(texts, padding=True, return_tensors="np"))

The INT8 scheme (what ORT's dynamic quantization does to a BERT-like graph; `qat.py` fake-quantizes the same):
int8 symmetric weights (per output channel by default) and uint8 activations quantized per tensor at run time for
every Linear (MatMul/Gemm with a constant weight), uint8 per-tensor tables for the embeddings (Gather); attention
matmuls, LayerNorm, softmax, GELU and biases stay float32. The modules in `keep_float` (default: the classifier)
stay float32 too. CPUs without VNNI (before Cascade Lake / Zen 4) may saturate the u8 x s8 products; measure
accuracy there.

onnx, onnxruntime and onnxscript (the `compress` extra) are imported only when a function here needs them.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import inspect
import json
import logging as std_logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from .atomic import atomic_directory
from .deployed import (  # noqa: F401 - re-exported: the deployment API is importable from here as before
    ONNX_FILE,
    OnnxSequenceClassifier,
    _external_files,
    _require_onnx,
    _session,
    load_deployed,
    size_on_disk,
)

logger = logging.get_logger(__name__)

__all__ = [
    "DEFAULT_KEEP_FLOAT",
    "ONNX_FILE",
    "OnnxSequenceClassifier",
    "export_onnx",
    "load_deployed",
    "module_name_matches",
    "quantize_int8",
    "size_on_disk",
]

EXPORT_INFO_FILE = "onnx_export.json"
QUANTIZATION_INFO_FILE = "quantization.json"
DEFAULT_KEEP_FLOAT: tuple[str, ...] = ("classifier",)
OPSET = 18
# Above this many bytes of weights the ONNX file keeps them in a separate file (protobuf's 2 GiB limit).
_EXTERNAL_DATA_BYTES = 1 << 30
_INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids")
# Node types whose constant weight ORT's dynamic quantization quantizes, and which input holds that weight.
_WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Gather": 0}
_NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # per-node metadata of the dynamo exporter: the module path


def module_name_matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether module `name` (dotted, e.g. "bert.pooler.dense") is named by one of `patterns`: a pattern matches a
    module if it equals the module's name or a dotted suffix of it, or does so for one of its ancestors
    ("classifier" matches "classifier" and "model.classifier"; "pooler" matches "bert.pooler.dense")."""
    parts = name.split(".")
    prefixes = [".".join(parts[:end]) for end in range(1, len(parts) + 1)]
    return any(
        prefix == pattern or prefix.endswith("." + pattern) for prefix in prefixes for pattern in patterns
    )


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
    from .qat import has_fake_quant

    _require_onnx()
    if has_fake_quant(model):
        raise ValueError(
            "The model still has QAT fake-quantization modules; call hf_distill.qat.strip_qat(model) before "
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
def _node_module(node, weight_name: str, wrapper_prefix: str = "model.") -> str:
    """The PyTorch module a node came from: the dynamo exporter's name scopes, else the weight's name."""
    for prop in node.metadata_props:
        if prop.key == _NAME_SCOPES:
            scopes = [scope for scope in ast.literal_eval(prop.value) if scope]
            if len(scopes) >= 2:  # [..., "bert.pooler.dense", "linear_12"]: the last is the op
                return scopes[-2].removeprefix(wrapper_prefix)
    return weight_name.removesuffix(".weight").removeprefix(wrapper_prefix)


def _quantizable_nodes(graph) -> list[tuple[Any, str]]:
    """(node, module name) for each node ORT's dynamic quantization would quantize: MatMul / Gemm with a constant
    weight, Gather from a constant table."""
    initializers = {initializer.name for initializer in graph.initializer}
    nodes = []
    for node in graph.node:
        index = _WEIGHT_INPUT.get(node.op_type)
        if index is None or len(node.input) <= index or node.input[index] not in initializers:
            continue
        nodes.append((node, _node_module(node, node.input[index])))
    return nodes


class _DropMessages(std_logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: std_logging.LogRecord) -> bool:
        return not any(fragment in record.getMessage() for fragment in self.fragments)


def quantize_int8(
    onnx_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    per_channel: bool = True,
    keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT,
    overwrite: bool = False,
) -> Path:
    """Dynamic INT8 quantization of `onnx_dir/model.onnx` into `output_dir/model.onnx`; returns `output_dir`.

    ONNX Runtime's `quantize_dynamic`: weights int8 symmetric (per output channel if `per_channel`), activations
    uint8 quantized at run time per tensor, embedding tables uint8 per tensor (see the module docstring and qat.py).
    Nodes from the modules in `keep_float` (matched as in `module_name_matches`) stay float32. The other files of
    `onnx_dir` (tokenizer, config.json, onnx_export.json) are copied; quantization.json records the scheme and which
    modules were quantized. Written atomically; an existing folder needs `overwrite`.
    """
    onnx, _ = _require_onnx()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx_dir = Path(onnx_dir)
    source = onnx_dir / ONNX_FILE
    if not source.is_file():
        found = sorted(p.name for p in onnx_dir.iterdir()) if onnx_dir.is_dir() else "no such folder"
        raise ValueError(f"quantize_int8 needs {source} (from export_onnx); found {found}.")
    graph = onnx.load(str(source), load_external_data=False).graph
    nodes = _quantizable_nodes(graph)
    excluded = [node for node, module in nodes if module_name_matches(module, keep_float)]
    quantized_modules = sorted({module for node, module in nodes if node not in excluded})
    kept_modules = sorted({module for node, module in nodes if node in excluded})
    missing = [
        pattern for pattern in keep_float if not any(module_name_matches(m, [pattern]) for _, m in nodes)
    ]
    if missing:
        logger.warning(f"keep_float names {missing}, which match no quantizable module of {source}.")
    # ORT rewrites Gemm into MatMul (+ Add) named "<gemm>_MatMul" before it checks nodes_to_exclude.
    exclude_names = [node.name for node in excluded] + [f"{node.name}_MatMul" for node in excluded]
    large = (
        source.stat().st_size + sum(p.stat().st_size for p in _external_files(source)) > _EXTERNAL_DATA_BYTES
    )

    with atomic_directory(output_dir, overwrite=overwrite) as temporary:
        drop = _DropMessages("pre-processing before quantization")
        std_logging.getLogger().addFilter(drop)
        try:
            quantize_dynamic(
                source,
                temporary / ONNX_FILE,
                per_channel=per_channel,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude_names,
                use_external_data_format=large,
                extra_options={"MatMulConstBOnly": True},
            )
        finally:
            std_logging.getLogger().removeFilter(drop)
        weight_files = {ONNX_FILE, *(p.name for p in _external_files(source))}
        for item in onnx_dir.iterdir():
            if item.name in weight_files or item.name.startswith("."):
                continue
            if item.is_dir():
                shutil.copytree(item, temporary / item.name)
            else:
                shutil.copy2(item, temporary / item.name)
        info = {
            "runtime": "onnxruntime",
            "method": "quantize_dynamic",
            "weights": "int8 symmetric [-127, 127], "
            + ("per output channel" if per_channel else "per tensor"),
            "activations": "uint8 asymmetric per tensor, computed at run time (DynamicQuantizeLinear)",
            "embeddings": "uint8 asymmetric per tensor",
            "per_channel": per_channel,
            "keep_float": list(keep_float),
            "float_modules": kept_modules,
            "quantized_modules": quantized_modules,
            "onnxruntime_version": _require_onnx()[1].__version__,
        }
        (temporary / QUANTIZATION_INFO_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
    logger.info(
        f"Quantized {len(quantized_modules)} modules of {source} to INT8 in {output_dir} "
        f"({size_on_disk(source.parent) / 1e6:.1f} MB -> {size_on_disk(output_dir) / 1e6:.1f} MB); "
        f"float: {kept_modules}"
    )
    return Path(output_dir)
