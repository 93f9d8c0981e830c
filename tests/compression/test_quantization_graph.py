"""The deployed graph's rewrites compute the same model: attention fused into MultiHeadAttention (checked against
PyTorch in float64) and the last layer computing only the token the head reads (checked against the whole INT8
graph, QAT's PyTorch simulation, and a head that reads every token, which must be left whole); and deployed
sessions leave out ONNX Runtime's SkipLayerNorm fusion (checked on ONNX Runtime's own optimized graph)."""

from __future__ import annotations

import copy
import json
import types

import numpy as np
import pytest
import torch
from conftest import make_bert_tokenizer
from test_quantization_scheme import assert_same_quantized_model, encode_rows
from transformers import BertConfig, BertForSequenceClassification

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from hf_distill.compression.deployed import describe_graph  # noqa: E402
from hf_distill.compression.onnx_fusions import fuse_checked  # noqa: E402
from hf_distill.compression.qat import prepare_qat  # noqa: E402
from hf_distill.compression.quantization import export_onnx, load_deployed, quantize_int8  # noqa: E402


def small_bert(tokenizer, layers: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    return BertForSequenceClassification(config).eval()


def op_types(folder) -> list[str]:
    return [node.op_type for node in onnx.load(str(folder / "model.onnx")).graph.node]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tokenizer = make_bert_tokenizer()
    model = small_bert(tokenizer)
    root = tmp_path_factory.mktemp("graph")
    fused = export_onnx(model, tokenizer, root / "fused", max_length=64)
    plain = export_onnx(model, tokenizer, root / "plain", max_length=64, fuse=False)
    return {"tokenizer": tokenizer, "model": model, "fused": fused, "plain": plain, "root": root}


def test_fused_attention_is_pytorchs_attention(exported):
    """Three MultiHeadAttention nodes replace the eleven-node cores; the logits are PyTorch's in float64, padding
    included (masked keys weigh exactly 0 either way)."""
    ops = op_types(exported["fused"])
    assert ops.count("MultiHeadAttention") == 3 and "Softmax" not in ops
    assert op_types(exported["plain"]).count("Softmax") == 3
    info = json.loads((exported["fused"] / "onnx_export.json").read_text())
    assert info["fusions"] == "MultiHeadAttention x 3, Gelu x 3"
    batch = encode_rows(exported["tokenizer"], 12)
    assert batch["attention_mask"].min() == 0  # padding occurs
    with torch.no_grad():
        reference = (
            copy.deepcopy(exported["model"])
            .double()(**{k: torch.from_numpy(v) for k, v in batch.items()})
            .logits.numpy()
        )
    fused = load_deployed(exported["fused"], num_threads=1).predict_logits(batch)
    np.testing.assert_allclose(fused, reference, atol=2e-5, rtol=0)


def test_a_fusion_that_fails_its_check_is_not_kept(exported, tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes((exported["plain"] / "model.onnx").read_bytes())
    before = target.read_bytes()
    info = fuse_checked(target, 4, lambda path: float("inf"))
    assert info["fusions"] == "none" and target.read_bytes() == before
    assert not (tmp_path / "fused_model.onnx").exists()


@pytest.mark.parametrize("source", ["fused", "plain"])
def test_the_last_layer_on_the_first_token_is_the_whole_int8_model(exported, source, tmp_path):
    """Same ranges, same integers for the token the head reads: the logits of the whole graph and of QAT's
    simulation, at batch 1 and 16; and the last layer's feed-forward Linears now run on one token per row."""
    calibration = [encode_rows(exported["tokenizer"], 8)]
    folder = exported[source]
    whole = quantize_int8(folder, tmp_path / "whole", calibration=calibration, first_token_only=False)
    first = quantize_int8(folder, tmp_path / "first", calibration=calibration)
    info = json.loads((first / "quantization.json").read_text())
    assert info["graph"]["gathers"] == 1, info["graph"]
    assert (
        info["activation_ranges"]
        == json.loads((whole / "quantization.json").read_text())["activation_ranges"]
    )

    batch = encode_rows(exported["tokenizer"], 16)
    whole_logits = load_deployed(whole, num_threads=1).predict_logits(batch)
    deployed = load_deployed(first, num_threads=1)
    assert_same_quantized_model(deployed.predict_logits(batch), whole_logits)
    lengths = batch["attention_mask"].sum(1)
    alone = np.concatenate(
        [
            deployed.predict_logits({k: v[i : i + 1, : lengths[i]] for k, v in batch.items()})
            for i in range(16)
        ]
    )
    assert_same_quantized_model(alone, whole_logits)
    with torch.no_grad():
        simulated = prepare_qat(
            copy.deepcopy(exported["model"]), activation_ranges=info["activation_ranges"]
        )(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
    assert_same_quantized_model(deployed.predict_logits(batch), simulated)

    # What each quantized Linear computes, asked of ONNX Runtime: in the last of the 3 layers the attention output
    # and both feed-forward Linears run on one token per row, and so does the query when the attention is one fused
    # node (unfused, the query is computed for every token); keys and values for every token.
    graph = onnx.load(str(first / "model.onnx"))
    linears = [node.output[0] for node in graph.graph.node if node.op_type == "MatMulIntegerToFloat"]
    for name in linears:
        graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {node.name: batch[node.name] for node in session.get_inputs()}
    shapes = [output.shape for output in session.run(linears, feed)]
    length = batch["input_ids"].shape[1]
    one_token = 4 if source == "fused" else 3
    assert sorted(shape[1] for shape in shapes if len(shape) == 3) == [1] * one_token + [length] * (
        18 - one_token
    )
    assert [shape for shape in shapes if len(shape) == 2] == [(16, 64)]  # the pooler


def test_a_head_that_reads_every_token_keeps_every_token(tmp_path):
    """A pooler that averages all tokens: no single-token read, so the graph computes every token, and the INT8 model
    is still QAT's simulation of it."""
    tokenizer = make_bert_tokenizer()
    model = small_bert(tokenizer, layers=2)

    def mean_pool(self, hidden_states):
        return self.activation(self.dense(hidden_states.mean(dim=1)))

    model.bert.pooler.forward = types.MethodType(mean_pool, model.bert.pooler)
    calibration = [encode_rows(tokenizer, 8)]
    folder = quantize_int8(export_onnx(model, tokenizer, tmp_path / "onnx", max_length=64), tmp_path / "int8",
                           calibration=calibration)  # fmt: skip
    info = json.loads((folder / "quantization.json").read_text())
    assert info["graph"]["tokens"] == "every token through every layer", info["graph"]
    batch = encode_rows(tokenizer, 12)
    with torch.no_grad():
        simulated = prepare_qat(copy.deepcopy(model), activation_ranges=info["activation_ranges"])(
            **{k: torch.from_numpy(v) for k, v in batch.items()}
        ).logits.numpy()
    assert_same_quantized_model(load_deployed(folder, num_threads=1).predict_logits(batch), simulated)


def test_deployed_sessions_leave_out_the_skip_layer_norm_fusion(exported, tmp_path, monkeypatch):
    """ONNX Runtime's own optimized graph: with its defaults it turns every residual Add + LayerNormalization into
    SkipLayerNormalization (so the option matters); with what the folder records and what load_deployed passes, none
    is made, and the logits agree within float32 rounding."""
    calibration = [encode_rows(exported["tokenizer"], 8)]
    folder = quantize_int8(exported["fused"], tmp_path / "int8", calibration=calibration)
    recorded = json.loads((folder / "quantization.json").read_text())["session"]["disabled_optimizers"]
    assert recorded == ["SkipLayerNormFusion"]
    line = describe_graph(folder)  # what the compression report shows
    assert (
        "MultiHeadAttention x 3, Gelu x 3" in line
        and "only the token" in line
        and "SkipLayerNormFusion" in line
    )

    def optimized_ops(disabled: list[str]) -> list[str]:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(tmp_path / f"optimized_{len(disabled)}.onnx")
        ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"],
                             disabled_optimizers=disabled)  # fmt: skip
        return [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]

    assert optimized_ops([]).count("SkipLayerNormalization") >= 3
    assert "SkipLayerNormalization" not in optimized_ops(recorded)

    seen = {}
    original = ort.InferenceSession

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    deployed = load_deployed(folder, num_threads=1)
    assert seen["disabled_optimizers"] == recorded
    monkeypatch.undo()
    plain = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = encode_rows(exported["tokenizer"], 12)
    feed = {node.name: batch[node.name] for node in plain.get_inputs()}
    assert_same_quantized_model(deployed.predict_logits(batch), plain.run(["logits"], feed)[0], atol=1e-4)
