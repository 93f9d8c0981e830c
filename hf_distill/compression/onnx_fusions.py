"""Fusions of an exported classifier's ONNX graph that ONNX Runtime does not make on its own graphs from torch's
dynamo exporter: the attention core of each layer becomes one com.microsoft `MultiHeadAttention` node.

The exporter writes BERT's eager attention as eleven nodes per layer:

    Reshape -> Transpose (q, k, v: (batch, heads, sequence, head))   MatMul(q, k^T) -> Mul(scale) -> Add(mask)
    -> Softmax -> MatMul(., v) -> Transpose -> Reshape                 (batch, sequence, hidden)

ONNX Runtime runs them one by one, each reading and writing (batch, heads, sequence, sequence) float32 tensors in
memory. `MultiHeadAttention` (CPU kernel: per batch and head, scores by one MLAS GEMM whose accumulator starts from
the padding mask, softmax in place, then the product with v) computes the same from q, k and v of shape (batch,
sequence, hidden) and the padding mask (batch, key sequence) as int32. Masked keys get float32's lowest value added,
as transformers' eager attention adds, so their softmax weight is exactly 0 either way.

A fused graph computes the same function in another order of float32 operations. `fuse_attention` rewrites what it
recognises; `quantization.export_onnx` fuses its float32 export and keeps the fusion only if ONNX Runtime's logits
still match PyTorch's within the export check (the INT8 rewrite then quantizes the Linears around the fused nodes,
whose inputs and names it leaves alone). onnx is imported by the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["fuse_attention", "fuse_checked", "fuse_gelu", "remove_unused_nodes"]

MS_DOMAIN = "com.microsoft"
_FLOAT32_LOWEST = float(np.finfo(np.float32).min)  # what transformers adds for a masked key


def _perm(node) -> list[int] | None:
    for attribute in node.attribute:
        if attribute.name == "perm":
            return list(attribute.ints)
    return None


def _axis(node, default: int) -> int:
    for attribute in node.attribute:
        if attribute.name == "axis":
            return attribute.i
    return default


class _Graph:
    """Producers, consumers and constant values of a graph's tensors."""

    def __init__(self, graph):
        from onnx import numpy_helper

        self.graph = graph
        self.producer = {output: node for node in graph.node for output in node.output}
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.constants: dict[str, np.ndarray] = {
            item.name: numpy_helper.to_array(item) for item in graph.initializer
        }
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def make(self, name: str, op_type: str):
        """The producer of `name` if it is an `op_type` node whose every output only this pattern reads."""
        node = self.producer.get(name)
        if node is None or node.op_type != op_type:
            return None
        if any(len(self.consumers.get(output, [])) != 1 for output in node.output):
            return None
        return node

    def only_consumer(self, name: str, op_type: str):
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None

    def scalar(self, name: str) -> float | None:
        value = self.constants.get(name)
        return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _heads_input(graph: _Graph, name: str, perms: tuple[list[int], ...]) -> tuple[str, list] | None:
    """(the (batch, sequence, hidden) tensor, the nodes between) if `name` is it reshaped to heads and transposed by
    `perms` in turn (one Transpose per perm)."""
    nodes = []
    for perm in reversed(perms):
        transpose = graph.make(name, "Transpose")
        if transpose is None or _perm(transpose) != perm:
            return None
        nodes.append(transpose)
        name = transpose.input[0]
    reshape = graph.make(name, "Reshape")
    if reshape is None:
        return None
    nodes.append(reshape)
    return reshape.input[0], nodes


def _match(graph: _Graph, softmax) -> dict[str, Any] | None:
    """The attention pattern around one Softmax, or None."""
    if _axis(softmax, -1) not in (-1, 3):
        return None
    add = graph.make(softmax.input[0], "Add")
    if add is None:
        return None
    for scaled_name in add.input:  # the other input is the additive mask, replaced by the padding mask
        scaled = graph.make(scaled_name, "Mul") or graph.make(scaled_name, "Div")
        if scaled is not None:
            break
    else:
        return None
    scores_name, factor = scaled.input[0], graph.scalar(scaled.input[1])
    if factor is None and scaled.op_type == "Mul":
        scores_name, factor = scaled.input[1], graph.scalar(scaled.input[0])
    if factor is None or factor == 0:
        return None
    scale = factor if scaled.op_type == "Mul" else 1.0 / factor
    scores = graph.make(scores_name, "MatMul")
    if scores is None:
        return None
    query = _heads_input(graph, scores.input[0], ([0, 2, 1, 3],))
    key = _heads_input(graph, scores.input[1], ([0, 2, 3, 1],)) or _heads_input(
        graph, scores.input[1], ([0, 2, 1, 3], [0, 1, 3, 2])
    )
    context = graph.only_consumer(softmax.output[0], "MatMul")
    if query is None or key is None or context is None or context.input[0] != softmax.output[0]:
        return None
    value = _heads_input(graph, context.input[1], ([0, 2, 1, 3],))
    back = graph.only_consumer(context.output[0], "Transpose")
    if value is None or back is None or _perm(back) != [0, 2, 1, 3]:
        return None
    merge = graph.only_consumer(back.output[0], "Reshape")
    if merge is None:
        return None
    nodes = [add, scaled, scores, softmax, context, back, merge, *query[1], *key[1], *value[1]]
    return {
        "query": query[0],
        "key": key[0],
        "value": value[0],
        "scale": scale,
        "output": merge.output[0],
        "nodes": nodes,
        "name": merge.name,
        "last": merge,  # the fused node takes its place: every input it reads is made before it
    }


def remove_unused_nodes(graph) -> int:
    """Delete nodes none of whose outputs is read (by a node or as a graph output), until none is left; and the
    initializers no node reads. Returns how many nodes went."""
    removed = 0
    while True:
        read = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
        kept = [node for node in graph.node if any(output in read for output in node.output)]
        if len(kept) == len(graph.node):
            break
        removed += len(graph.node) - len(kept)
        del graph.node[:]
        graph.node.extend(kept)
    read = {name for node in graph.node for name in node.input}
    initializers = [item for item in graph.initializer if item.name in read]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return removed


def fuse_attention(model, num_heads: int, mask_input: str | None = "attention_mask") -> dict[str, Any]:
    """Replace every recognised attention core of `model` (a ModelProto, changed in place) by `MultiHeadAttention`
    with `num_heads` heads. The padding mask is the graph input `mask_input` (1 = a token, 0 = padding), cast to
    int32 once; a graph without that input is fused without a mask only if no attention adds one. Returns
    {"fused": count, "layers": [output names], "removed_nodes": count}."""
    from onnx import TensorProto, helper

    graph = _Graph(model.graph)
    inputs = {item.name for item in model.graph.input}
    matches = [
        match for node in model.graph.node if node.op_type == "Softmax" for match in [_match(graph, node)]
    ]
    matches = [match for match in matches if match is not None]
    if not matches or (mask_input is not None and mask_input not in inputs):
        return {"fused": 0, "layers": [], "removed_nodes": 0}
    mask_int32 = f"{mask_input}_int32"
    replaced: dict[int, Any] = {}
    for match in matches:
        for node in match["nodes"]:
            replaced[id(node)] = None
        replaced[id(match["last"])] = helper.make_node(
            "MultiHeadAttention",
            [match["query"], match["key"], match["value"], "", mask_int32],
            [match["output"]],
            name=f"{match['name']}_attention",
            domain=MS_DOMAIN,
            num_heads=int(num_heads),
            scale=float(match["scale"]),
            mask_filter_value=_FLOAT32_LOWEST,
        )
    rebuilt = [
        helper.make_node(
            "Cast", [mask_input], [mask_int32], name=f"{mask_input}_to_int32", to=TensorProto.INT32
        )
    ]
    for node in model.graph.node:
        new = replaced.get(id(node), node)
        if new is not None:
            rebuilt.append(new)
    del model.graph.node[:]
    model.graph.node.extend(rebuilt)
    removed = remove_unused_nodes(model.graph)
    if not any(opset.domain == MS_DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return {"fused": len(matches), "layers": [match["output"] for match in matches], "removed_nodes": removed}


def _near(value: float | None, target: float) -> bool:
    return value is not None and abs(value - target) <= 1e-6 * abs(target)


def _match_gelu(graph: _Graph, erf) -> tuple[str, str, list] | None:
    """(x, the output, the nodes) if `erf` is the middle of x * 0.5 * (1 + erf(x / sqrt(2))) in any of the orders
    exporters write: [x / sqrt2 | x * (1 / sqrt2)] -> Erf -> Add 1 -> then x and 0.5 multiplied in either order."""
    scaled = graph.make(erf.input[0], "Div") or graph.make(erf.input[0], "Mul")
    if scaled is None:
        return None
    x, factor = scaled.input[0], graph.scalar(scaled.input[1])
    if scaled.op_type == "Mul" and factor is None:
        x, factor = scaled.input[1], graph.scalar(scaled.input[0])
    if not _near(factor, 2**0.5 if scaled.op_type == "Div" else 2**-0.5):
        return None
    add = graph.only_consumer(erf.output[0], "Add")
    if add is None or not _near(graph.scalar(next(n for n in add.input if n != erf.output[0])), 1.0):
        return None
    first = graph.only_consumer(add.output[0], "Mul")
    if first is None:
        return None
    other = next(name for name in first.input if name != add.output[0])
    second = graph.only_consumer(first.output[0], "Mul")
    if second is None:
        return None
    last = next(name for name in second.input if name != first.output[0])
    # (1 + erf) * 0.5, then * x; or (1 + erf) * x, then * 0.5.
    if (_near(graph.scalar(other), 0.5) and last == x) or (other == x and _near(graph.scalar(last), 0.5)):
        return x, second.output[0], [scaled, erf, add, first, second]
    return None


def fuse_gelu(model) -> int:
    """Replace every erf-form GELU chain of `model` (in place) by one com.microsoft `Gelu` node (the same formula,
    0.5 x (1 + erf(x / sqrt 2)), in one pass over the tensor instead of five). Returns how many."""
    from onnx import helper

    graph = _Graph(model.graph)
    replaced: dict[int, Any] = {}
    for node in model.graph.node:
        if node.op_type != "Erf":
            continue
        match = _match_gelu(graph, node)
        if match is None:
            continue
        x, output, nodes = match
        for member in nodes:
            replaced[id(member)] = None
        replaced[id(nodes[-1])] = helper.make_node(
            "Gelu", [x], [output], name=f"{nodes[-1].name}_gelu", domain=MS_DOMAIN
        )
    if not replaced:
        return 0
    rebuilt = [replaced.get(id(node), node) for node in model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(node for node in rebuilt if node is not None)
    remove_unused_nodes(model.graph)
    if not any(opset.domain == MS_DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return sum(1 for node in model.graph.node if node.op_type == "Gelu" and node.domain == MS_DOMAIN)


def fuse_checked(onnx_path: Path, num_heads: int | None, check: Callable[[Path], float]) -> dict[str, Any]:
    """Fuse attention (`fuse_attention`, if `num_heads`) and GELU (`fuse_gelu`) in the model file `onnx_path`, in
    place, if `check(fused_path)` (the largest |logit difference| from the reference, computed by the caller; inf to
    refuse) accepts the result; else leave the file as it was. Returns what was done, for onnx_export.json."""
    import onnx

    model = onnx.load(str(onnx_path))
    attention = fuse_attention(model, num_heads) if num_heads else {"fused": 0}
    gelu = fuse_gelu(model)
    if attention["fused"] == 0 and gelu == 0:
        return {"fusions": "none", "reason": "no attention core or GELU of the expected form"}
    fused_path = onnx_path.with_name(f"fused_{onnx_path.name}")
    onnx.save(model, str(fused_path))
    error = None
    try:
        difference = check(fused_path)
    except (
        Exception
    ) as failure:  # an ONNX Runtime without these ops, or a shape it refuses: keep the plain graph
        difference, error = float("inf"), f"{type(failure).__name__}: {str(failure).splitlines()[0][:200]}"
    if difference == float("inf"):
        fused_path.unlink()
        return {"fusions": "none", "reason": error or "the fused graph's logits differ"}
    fused_path.replace(onnx_path)
    return {
        "fusions": f"MultiHeadAttention x {attention['fused']}, Gelu x {gelu}",
        "max_abs_logit_change_by_fusion": difference,
    }
