"""Compute only the token a classifier's head reads: an ONNX graph rewrite, exact by construction.

A BERT-like sequence classifier reads the last layer's output at one position (BERT's pooler and RoBERTa's and
ELECTRA's heads: token 0, a `Gather(axis=1)` of a constant index in the exported graph). Everything between the
last attention and that Gather works on each token by itself: the Linears (MatMul, MatMulIntegerToFloat), their
per-tensor QuantizeLinear (static ranges: a token is quantized on its own), LayerNorm over the hidden axis, GELU,
residual Adds. And attention for one query needs that query and every key and value. So the last layer can compute
its query projection, attention, output projection, feed-forward block and norms for that one token, keys and values
for all: about 1 / num_layers of the model's work saved (a 3-layer student: a third of its layers' token-wise work).

`first_token_only(model)` rewrites the graph so: starting at each such Gather, it replaces every token-wise node
above it by one working on `x[:, i:i+1]` (a Slice where a tensor is also needed whole, typically a layer's input;
only the query of `com.microsoft.MultiHeadAttention`), up to the tensors it cannot see through, which it slices.
Nodes that nothing reads any more are removed. The quantization parameters are untouched, so an INT8 graph
computes the same integers for that token as before. `quantization.quantize_int8` applies it after quantizing and
keeps it only if ONNX Runtime gives the whole graph's logits. onnx is imported by the caller.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from transformers.utils import logging

from hf_distill.compression.deployed import _session
from hf_distill.compression.onnx_fusions import remove_unused_nodes

logger = logging.get_logger(__name__)

__all__ = ["check_inputs", "first_token_checked", "first_token_only", "same_logits"]

# Node types whose output token i depends only on token i of their sequence inputs (rank 3, tokens on axis 1), and
# which inputs are such token tensors (None: every input that is not a constant).
_TOKENWISE: dict[str, tuple[int, ...] | None] = {
    "Add": None, "Sub": None, "Mul": None, "Div": None,
    "Erf": None, "Tanh": None, "Relu": None, "Sigmoid": None, "Gelu": None, "FastGelu": None, "Cast": None,
    "Identity": None, "Sqrt": None, "Neg": None,
    "QuantizeLinear": (0,), "DequantizeLinear": (0,),
    "MatMulIntegerToFloat": (0,),  # weights (input 1) and parameters are constants
    "MatMul": (0,),  # with a constant weight only (checked)
    "LayerNormalization": (0,),  # over the last axis only (checked)
    "SkipLayerNormalization": (0, 1),
    "MultiHeadAttention": (0,),  # the query; keys, values and the padding mask stay whole
}  # fmt: skip


class _Graph:
    def __init__(self, graph):
        from onnx import numpy_helper

        self.graph = graph
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            for position, name in enumerate(node.input):
                self.consumers.setdefault(name, []).append((node, position))
        self.outputs = {output.name for output in graph.output}
        self.values = {item.name: numpy_helper.to_array(item) for item in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.taken = {name for node in graph.node for name in (*node.input, *node.output)}
        self.taken |= set(self.values) | {item.name for item in graph.input}

    def fresh(self, base: str) -> str:
        candidate, index = base, 1
        while candidate in self.taken:
            candidate, index = f"{base}_{index}", index + 1
        self.taken.add(candidate)
        return candidate

    def constant(self, base: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.fresh(base)
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        self.values[name] = value
        return name

    def tokenwise_inputs(self, node) -> tuple[int, ...] | None:
        """The positions of the token tensors among `node`'s inputs if it is token-wise, else None."""
        if node.domain not in ("", "ai.onnx", "com.microsoft") or node.op_type not in _TOKENWISE:
            return None
        if len(node.output) != 1:
            return None
        if node.op_type == "MatMul" and not (
            node.input[1] in self.values and self.values[node.input[1]].ndim == 2
        ):
            return None
        if (
            node.op_type == "LayerNormalization"
            and next((a.i for a in node.attribute if a.name == "axis"), -1) != -1
        ):
            return None
        positions = _TOKENWISE[node.op_type]
        if positions is None:
            positions = tuple(i for i, name in enumerate(node.input) if name and name not in self.values)
        return positions

    def token_index(self, node) -> int | None:
        """The constant scalar index of a `Gather(axis=1)` that reads one token, else None."""
        if node.op_type != "Gather" or next((a.i for a in node.attribute if a.name == "axis"), 0) != 1:
            return None
        value = self.values.get(node.input[1])
        if value is None or value.ndim != 0 or int(value) < 0:
            return None
        return int(value)


def _region(graph: _Graph, nodes: list, gather) -> list:
    """The token-wise nodes above `gather` whose outputs only the region (or the Gather) reads, at token positions:
    in graph order, so each comes after the nodes it reads."""
    wanted = {gather.input[0]}  # tensors of which only one token is needed
    region: list = []
    members: set[int] = {id(gather)}
    token_positions = {id(gather): (0,)}
    for node in reversed(nodes):
        output = node.output[0] if len(node.output) == 1 else None
        if output not in wanted or output in graph.outputs:
            continue
        positions = graph.tokenwise_inputs(node)
        users = graph.consumers.get(output, [])
        if positions is None or not all(
            id(user) in members and position in token_positions[id(user)] for user, position in users
        ):
            continue
        region.append(node)
        members.add(id(node))
        token_positions[id(node)] = positions
        wanted.update(node.input[position] for position in positions)
    return region[::-1]


def _one_token_nodes(graph: _Graph, region: list, gather, index: int) -> list:
    """New nodes computing `region` for token `index` only, and `gather` (changed) reading their result."""
    from onnx import helper

    nodes: list = []
    renamed: dict[str, str] = {}  # region tensor -> its one-token version
    sliced: dict[str, str] = {}  # tensor needed whole elsewhere -> a Slice of its token

    def one_token(name: str) -> str:
        if name in renamed:
            return renamed[name]
        if name not in sliced:
            starts = graph.constant(f"{name}_token_start", np.array([index], np.int64))
            ends = graph.constant(f"{name}_token_end", np.array([index + 1], np.int64))
            axes = graph.constant(f"{name}_token_axis", np.array([1], np.int64))
            sliced[name] = graph.fresh(f"{name}_token{index}")
            nodes.append(
                helper.make_node("Slice", [name, starts, ends, axes], [sliced[name]], name=sliced[name])
            )
        return sliced[name]

    for member in region:
        inputs = list(member.input)
        for position in graph.tokenwise_inputs(member):
            inputs[position] = one_token(inputs[position])
        output = graph.fresh(f"{member.output[0]}_token{index}")
        new = helper.make_node(member.op_type, inputs, [output], name=output, domain=member.domain)
        new.attribute.extend(member.attribute)
        nodes.append(new)
        renamed[member.output[0]] = output
    gather.input[0] = renamed[gather.input[0]]
    gather.input[1] = graph.constant(f"{gather.name}_first", np.array(0, np.int64))  # the one token left
    return [*nodes, gather]


def first_token_only(model) -> dict[str, Any]:
    """Rewrite `model` (a ModelProto, in place) so that the token-wise work above each single-token Gather(axis=1)
    is done for that token only. Returns {"gathers": how many were rewritten, "nodes_rewritten", "nodes_removed"};
    nothing changes where no Linear lies between a Gather and the tensors it cannot see through."""
    graph = _Graph(model.graph)
    nodes = list(model.graph.node)
    rebuilt: list = []
    gathers = rewritten = 0
    for order, node in enumerate(nodes):
        index = graph.token_index(node)
        region = _region(graph, nodes[:order], node) if index is not None else []
        if not any(member.op_type in ("MatMul", "MatMulIntegerToFloat") for member in region):
            rebuilt.append(node)
            continue
        rebuilt.extend(_one_token_nodes(graph, region, node, index))
        gathers += 1
        rewritten += len(region)
    if gathers == 0:
        return {"gathers": 0, "nodes_rewritten": 0, "nodes_removed": 0}
    del model.graph.node[:]
    model.graph.node.extend(rebuilt)
    removed = remove_unused_nodes(model.graph)
    return {"gathers": gathers, "nodes_rewritten": rewritten, "nodes_removed": removed}


def check_inputs(config: dict[str, Any], input_names: list[str], length: int = 24, seed: int = 0) -> dict:
    """Token ids for comparing two graphs of one classifier: 4 rows of `length` tokens (from config.json's
    vocab_size), the last two padded from a third and half of the way on, both token types where the model has
    them."""
    rng = np.random.default_rng(seed)
    vocab = int(config.get("vocab_size", 100))
    ids = rng.integers(0, vocab, (4, length), dtype=np.int64)
    mask = np.ones((4, length), np.int64)
    mask[2, length // 3 :] = 0
    mask[3, length // 2 :] = 0
    types = np.zeros((4, length), np.int64)
    if int(config.get("type_vocab_size", 1)) > 1:
        types[:, length // 2 :] = 1
    values = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {name: values[name] for name in input_names}


def same_logits(reference, candidate, batches: list[dict]) -> float:
    """The largest |logit difference| between two ONNX Runtime sessions on `batches`, or inf if more than a quarter of
    the rows differ by over 1e-4 or any by over 5% of the logits' spread. (Two graphs of one INT8 model: float32
    rounding in another order can move a value across a quantization step now and then, changing a row slightly.)"""
    largest, rows, off = 0.0, 0, 0
    for feed in batches:
        expected = reference.run(None, feed)[0]
        actual = candidate.run(None, feed)[0]
        if actual.shape != expected.shape:
            return float("inf")
        difference = np.abs(actual - expected).max(-1)
        if difference.max() > 0.05 * max(float(expected.max() - expected.min()), 1e-6):
            return float("inf")
        rows, off = rows + len(difference), off + int((difference > 1e-4).sum())
        largest = max(largest, float(difference.max()))
    return float("inf") if off > rows / 4 else largest


def first_token_checked(model, onnx_dir: Path, folder: Path) -> dict[str, Any]:
    """Apply `onnx_first_token.first_token_only` to the quantized `model` (in place) if ONNX Runtime then gives the
    whole graph's logits on synthetic batches with padding (`onnx_first_token.same_logits`); what was done."""
    import onnx

    candidate = onnx.ModelProto()
    candidate.CopyFrom(model)
    info = first_token_only(candidate)
    if info["gathers"] == 0:
        return {"tokens": "every token through every layer", "reason": "no single-token read after a Linear"}
    config_path = onnx_dir / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    paths = {"whole": folder / "whole_check.onnx", "first": folder / "first_token_check.onnx"}
    onnx.save(model, str(paths["whole"]))
    onnx.save(candidate, str(paths["first"]))
    try:
        whole, first = _session(paths["whole"]), _session(paths["first"])
        names = [node.name for node in whole.get_inputs()]
        longest = max(
            2, min(24, int(config.get("max_position_embeddings", 512)) - 2)
        )  # RoBERTa's offset of 2
        batches = [check_inputs(config, names, longest, seed=0), check_inputs(config, names, 7, seed=1)]
        difference = same_logits(whole, first, batches)
    except Exception as error:  # an operator ONNX Runtime refuses in this form: keep the whole graph
        difference = float("inf")
        logger.warning(f"Computing only the first token failed ({type(error).__name__}: {error}); not used.")
    finally:
        for path in paths.values():
            path.unlink(missing_ok=True)
    if difference == float("inf"):
        return {"tokens": "every token through every layer", "reason": "the one-token graph's logits differ"}
    model.CopyFrom(candidate)
    return {
        "tokens": "the last layer computes only the token the head reads (onnx_first_token)",
        **info,
        "max_abs_logit_change": difference,
    }
