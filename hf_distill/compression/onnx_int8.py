"""The deployed INT8 graph (used by `quantization.quantize_int8`): find the Linears and embedding tables of an exported
float32 ONNX classifier, calibrate the Linears' input ranges with ONNX Runtime, and rewrite the graph into the scheme of
`int8_scheme` (the same functions `qat.py` fake-quantizes with). onnx and onnxruntime are imported by the caller.

Each quantized Linear becomes

    x (float32) -> QuantizeLinear(x, scale_x, zero_point_x)        uint8, static range (one node per input and range)
               -> MatMulInteger(x_q, W_q) * (scale_x * scale_w) + b  as ORT's fused MatMulIntegerToFloat (com.microsoft)

with W_q int8 in [-64, 64] (in, out) and scale_w per output channel (or per tensor); the MatMul's bias Add (or the
Gemm's C) is folded in. Each embedding Gather becomes Gather(uint8 table) -> DequantizeLinear. Everything else is
untouched.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_distill.compression.deployed import _feed, _session
from hf_distill.compression.int8_scheme import (
    masked_extrema,
    quantize_uint8,
    quantize_weight,
    uint8_parameters,
)

MS_DOMAIN = "com.microsoft"
# Node types holding a constant weight that the scheme quantizes, and which input holds that weight.
_WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Gather": 0}
_NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # per-node metadata of the dynamo exporter: the module path


def node_module(node, weight_name: str, wrapper_prefix: str = "model.") -> str:
    """The PyTorch module a node came from: the dynamo exporter's name scopes, else the weight's name."""
    for prop in node.metadata_props:
        if prop.key == _NAME_SCOPES:
            scopes = [scope for scope in ast.literal_eval(prop.value) if scope]
            if len(scopes) >= 2:  # [..., "bert.pooler.dense", "linear_12"]: the last is the op
                return scopes[-2].removeprefix(wrapper_prefix)
    return weight_name.removesuffix(".weight").removeprefix(wrapper_prefix)


def quantizable_nodes(graph) -> list[tuple[Any, str]]:
    """(node, module name) for each Linear (MatMul / Gemm with a constant 2-D float weight) and embedding (Gather from a
    constant 2-D float table) of the graph."""
    onnx_float = 1  # onnx.TensorProto.FLOAT
    weights = {
        initializer.name
        for initializer in graph.initializer
        if initializer.data_type == onnx_float and len(initializer.dims) == 2
    }
    nodes = []
    for node in graph.node:
        index = _WEIGHT_INPUT.get(node.op_type)
        if index is None or len(node.input) <= index or node.input[index] not in weights:
            continue
        if node.op_type == "Gather" and _attribute(node, "axis", 0) != 0:
            continue
        nodes.append((node, node_module(node, node.input[index])))
    return nodes


def _attribute(node, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return attribute.f if attribute.type == attribute.FLOAT else attribute.i
    return default


# --------------------------------------------------------------------------------------------- calibration
def calibrate(
    model, tensors: list[str], batches: Iterable[Mapping[str, Any]], folder: Path
) -> dict[str, Any]:
    """[min, max] of each float tensor in `tensors` over the unpadded tokens of `batches` (int8_scheme.masked_extrema),
    run by ONNX Runtime on the float32 `model` (a ModelProto, unchanged), written temporarily to `folder`.
    Returns {"ranges": {tensor: (low, high)}, "batches": n, "tokens": unpadded tokens seen}."""
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {output.name for output in probe.graph.output}
    for name in tensors:
        if name not in present:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    path = folder / "calibration.onnx"
    large = sum(len(item.raw_data) for item in probe.graph.initializer) > (1 << 30)
    onnx.save(probe, str(path), save_as_external_data=large, location="calibration.onnx.data")
    del probe
    session = _session(path)
    input_names = [node.name for node in session.get_inputs()]
    low: dict[str, float] = {}
    high: dict[str, float] = {}
    count = tokens = 0
    for batch in batches:
        feed = _feed(input_names, batch)
        mask = feed.get("attention_mask")
        mask = None if mask is None else torch.from_numpy(mask)
        tokens += int(mask.sum()) if mask is not None else int(feed["input_ids"].size)
        for name, value in zip(tensors, session.run(tensors, feed)):
            minimum, maximum = (float(v) for v in masked_extrema(torch.from_numpy(np.asarray(value)), mask))
            low[name] = min(low.get(name, minimum), minimum)
            high[name] = max(high.get(name, maximum), maximum)
        count += 1
    del session
    for item in folder.glob("calibration.onnx*"):
        item.unlink()
    if count == 0:
        raise ValueError(
            "quantize_int8 got an empty calibration iterable; pass at least one tokenized batch."
        )
    return {"ranges": {name: (low[name], high[name]) for name in tensors}, "batches": count, "tokens": tokens}


# --------------------------------------------------------------------------------------------- rewriting
class _Builder:
    """New initializers and nodes, named after the tensors they quantize."""

    def __init__(self, graph):
        self.graph = graph
        self.taken = {item.name for item in graph.initializer} | {o for n in graph.node for o in n.output}
        self.taken |= {item.name for item in graph.input}

    def name(self, base: str) -> str:
        candidate, index = base, 1
        while candidate in self.taken:
            candidate, index = f"{base}_{index}", index + 1
        self.taken.add(candidate)
        return candidate

    def constant(self, base: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(base)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
        return name


def _linear_weight(node, constants: Mapping[str, np.ndarray]) -> tuple[np.ndarray, str | None] | None:
    """(weight (out, in), bias initializer name or None) of a MatMul / Gemm, or None if its form is not a Linear's."""
    weight = constants[node.input[1]]
    if node.op_type == "MatMul":
        return weight.T, None
    if _attribute(node, "transA", 0) or _attribute(node, "alpha", 1.0) != 1.0:
        return None
    weight = weight if _attribute(node, "transB", 0) else weight.T
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None and (
        bias not in constants
        or constants[bias].shape != (weight.shape[0],)
        or _attribute(node, "beta", 1.0) != 1.0
    ):
        return None
    return weight, bias


def _bias_add(node, consumers, constants, graph_outputs, out_features: int):
    """The Add that only adds a constant (out_features,) bias to this MatMul's output, if there is one."""
    users = consumers.get(node.output[0], [])
    if len(users) != 1 or users[0].op_type != "Add" or node.output[0] in graph_outputs:
        return None, None
    add = users[0]
    other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
    if (
        other in constants
        and constants[other].shape == (out_features,)
        and constants[other].dtype == np.float32
    ):
        return add, other
    return None, None


def rewrite(
    model, nodes: list[tuple[Any, str]], input_ranges: Mapping[str, tuple[float, float]], per_channel: bool
):
    """Quantize `nodes` (from `quantizable_nodes`) of `model` in place; `input_ranges`: a Linear node's output name ->
    (low, high) of its input. Returns the names of the Linear nodes left float because their form is not a Linear's."""
    from onnx import helper, numpy_helper

    graph = model.graph
    constants = {item.name: numpy_helper.to_array(item) for item in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {output.name for output in graph.output}
    build = _Builder(graph)
    quantized_inputs: dict[tuple[str, float, float], tuple[str, str, str]] = {}
    replaced: dict[int, list] = {}  # id(original node) -> new nodes ([] removes it)
    left_float = []
    for node, _ in nodes:
        if node.op_type == "Gather":
            table = torch.from_numpy(np.array(constants[node.input[0]]))
            scale, zero_point = uint8_parameters(table.min(), table.max())
            quantized = quantize_uint8(table, scale, zero_point).numpy().astype(np.uint8)
            table_q = build.constant(f"{node.input[0]}_quantized", quantized)
            scale_name = build.constant(f"{node.input[0]}_scale", scale.numpy().astype(np.float32))
            zero_name = build.constant(f"{node.input[0]}_zero_point", zero_point.numpy().astype(np.uint8))
            gathered = build.name(f"{node.output[0]}_quantized")
            replaced[id(node)] = [
                helper.make_node("Gather", [table_q, node.input[1]], [gathered], name=node.name, axis=0),
                helper.make_node(
                    "DequantizeLinear",
                    [gathered, scale_name, zero_name],
                    [node.output[0]],
                    name=f"{node.name}_dq",
                ),
            ]
            continue
        parts = _linear_weight(node, constants)
        if parts is None:
            left_float.append(node.name)
            continue
        weight, bias = parts
        output = node.output[0]
        if node.op_type == "MatMul":
            add, bias = _bias_add(node, consumers, constants, graph_outputs, weight.shape[0])
            if add is not None:
                replaced[id(add)] = []
                output = add.output[0]
        low, high = input_ranges[node.output[0]]
        x = node.input[0]
        key = (x, float(low), float(high))
        if key not in quantized_inputs:
            scale, zero_point = uint8_parameters(torch.tensor(low), torch.tensor(high))
            scale_name = build.constant(f"{x}_scale", scale.numpy().astype(np.float32))
            zero_name = build.constant(f"{x}_zero_point", zero_point.numpy().astype(np.uint8))
            quantized_inputs[key] = (build.name(f"{x}_quantized"), scale_name, zero_name)
            quantize = helper.make_node(
                "QuantizeLinear",
                [x, scale_name, zero_name],
                [quantized_inputs[key][0]],
                name=build.name(f"{x}_q"),
            )
            new_nodes = [quantize]
        else:
            new_nodes = []
        x_q, x_scale, x_zero = quantized_inputs[key]
        weight_q, weight_scale = quantize_weight(torch.from_numpy(np.array(weight)), per_channel=per_channel)
        base = node.input[1]
        weight_name = build.constant(f"{base}_quantized", weight_q.numpy().T.astype(np.int8))  # (in, out)
        scale_name = build.constant(f"{base}_scale", weight_scale.reshape(-1).numpy().astype(np.float32))
        inputs = [x_q, weight_name, x_scale, scale_name, x_zero, ""] + ([bias] if bias is not None else [])
        new_nodes.append(
            helper.make_node("MatMulIntegerToFloat", inputs, [output], name=node.name, domain=MS_DOMAIN)
        )
        replaced[id(node)] = new_nodes
    rebuilt = []
    for node in graph.node:
        rebuilt.extend(replaced.get(id(node), [node]))
    del graph.node[:]
    graph.node.extend(rebuilt)
    used = {name for node in graph.node for name in node.input} | graph_outputs
    kept = [item for item in graph.initializer if item.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(opset.domain == MS_DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return left_float
