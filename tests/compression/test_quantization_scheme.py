"""The deployed INT8 scheme's guarantees, on any x86 CPU: worst-case integer products are exact (no int16 saturation
in AVX2's VPMADDUBSW), a text's prediction does not depend on the rest of its batch, and the CPU description.

test_quantization_avx2.py runs the same graphs on an emulated AVX2-only CPU."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import TEXTS_FOR_TESTS, make_bert_tokenizer
from transformers import BertConfig, BertForSequenceClassification, DataCollatorWithPadding

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from hf_distill.compression.qat import prepare_qat  # noqa: E402
from hf_distill.compression.quantization import export_onnx, load_deployed, quantize_int8  # noqa: E402
from hf_distill.reporting.machine import describe_cpu, int8_kernel, read_cpuinfo  # noqa: E402


def assert_same_quantized_model(actual: np.ndarray, expected: np.ndarray, *, atol: float = 1e-5) -> None:
    """Logits (rows, labels) of one quantized model computed twice (ORT and QAT's PyTorch simulation, or two batch
    shapes): equal to `atol`, except on the few rows where float32 rounding upstream (LayerNorm, softmax, GELU are
    computed by different kernels) left a value within ~1e-6 of a rounding boundary, so that one quantized value
    differs by one step: at most 1 row in 16, and by less than 5% of the logits' spread. Another quantization
    (other ranges, other weight grid, per-batch scales) differs in every row by ~1e-3 of the spread or more."""
    assert actual.shape == expected.shape
    difference = np.abs(actual - expected).max(-1)
    rows_off = int((difference > atol).sum())
    assert rows_off <= max(1, len(difference) // 16), (
        f"{rows_off} rows differ by > {atol}: {np.sort(difference)[-5:]}"
    )
    assert difference.max() < 0.05 * (expected.max() - expected.min()), difference.max()


# The worst case for VPMADDUBSW: every uint8 input at 255 times every int8 weight at +-64 (the grid's ends).
WORST_LOW, WORST_HIGH = -1.0, 3.0


def worst_case_linear(folder, in_features: int = 64, seed: int = 0):
    """A float ONNX Linear (MatMul + bias Add) whose quantized weights reach +-64 in every position of columns 0 and
    1, and inputs that quantize to 255 (row 0, and row 3 beyond the range), 0 (row 1) and anything (row 2)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = rng.uniform(-0.5, 0.5, (in_features, 4)).astype(
        np.float32
    )  # (in, out), as the exporter's MatMul
    weight[:, 0], weight[:, 1] = 0.5, -0.5
    weight[:, 2] = np.where(np.arange(in_features) % 2, 0.5, -0.5)
    bias = rng.normal(size=4).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "layer.weight"], ["product"], name="matmul"),
            helper.make_node("Add", ["product", "layer.bias"], ["y"], name="add"),
        ],
        "worst_case",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "layer.weight"), numpy_helper.from_array(bias, "layer.bias")],
    )
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(folder / "model.onnx")
    )
    x = np.stack(
        [
            np.full(in_features, WORST_HIGH),
            np.full(in_features, WORST_LOW),
            rng.uniform(WORST_LOW, WORST_HIGH, in_features),
            np.full(in_features, 2 * WORST_HIGH),
        ]
    ).astype(np.float32)
    return x, weight, bias


def exact_reference(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The scheme in int64 / float64, written from its definition (not with the library's functions)."""
    scale_x = np.float64(np.float32((WORST_HIGH - WORST_LOW) / 255))
    zero_x = np.round(-WORST_LOW / scale_x)
    q_x = np.clip(np.round(x.astype(np.float64) / scale_x) + zero_x, 0, 255).astype(np.int64)
    scale_w = (np.abs(weight).max(axis=0) / 64).astype(np.float32).astype(np.float64)  # per output column
    q_w = np.clip(np.round(weight / scale_w), -64, 64).astype(np.int64)
    assert (q_x[0] == 255).all() and (np.abs(q_w[:, :3]) == 64).all()  # the worst case is really reached
    return ((q_x - zero_x.astype(np.int64)) @ q_w) * (scale_x * scale_w) + bias


def test_worst_case_products_are_exact(tmp_path):
    x, weight, bias = worst_case_linear(tmp_path / "float")
    folder = quantize_int8(
        tmp_path / "float",
        tmp_path / "int8",
        keep_float=(),
        activation_ranges={"layer": (WORST_LOW, WORST_HIGH)},
    )
    ops = [node.op_type for node in onnx.load(str(folder / "model.onnx")).graph.node]
    assert ops == ["QuantizeLinear", "MatMulIntegerToFloat"]  # the bias Add is folded in
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    actual = session.run(None, {"x": x})[0]
    # float32 holds the integer sums exactly (|sum| <= 255 * 64 * 64 < 2**24); what remains is the float32 rounding
    # of scale x scale, the product and the bias: a few 1e-7 relative. A saturated pair would be off by >= 1 step.
    np.testing.assert_allclose(actual, exact_reference(x, weight, bias), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------- batch independence
def encode_rows(tokenizer, count: int):
    """`count` rows of different lengths, every third a pair, padded to the longest."""
    texts = [TEXTS_FOR_TESTS[i % len(TEXTS_FOR_TESTS)] for i in range(count)]
    rows = [
        dict(
            tokenizer(text, texts[(i + 5) % count])
            if i % 3 == 0
            else tokenizer(" ".join([text] * (1 + i % 4)))
        )
        for i, text in enumerate(texts)
    ]
    return DataCollatorWithPadding(tokenizer, return_tensors="np")(rows)


@pytest.fixture(scope="module")
def small_int8(tmp_path_factory):
    tokenizer = make_bert_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    model = BertForSequenceClassification(config).eval()
    root = tmp_path_factory.mktemp("small")
    calibration = [encode_rows(tokenizer, 8)]
    folder = quantize_int8(export_onnx(model, tokenizer, root / "onnx", max_length=64), root / "int8",
                           calibration=calibration)  # fmt: skip
    return tokenizer, model, folder


def test_a_prediction_does_not_depend_on_its_batch(small_int8):
    """Batch 64 (padded to its longest row) gives every row the logits it gets alone (batch 1, unpadded)."""
    tokenizer, model, folder = small_int8
    batch = encode_rows(tokenizer, 64)
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max() / 2  # much padding
    classifier = load_deployed(folder, num_threads=1)
    together = classifier.predict_logits(batch)
    alone = np.concatenate(
        [
            classifier.predict_logits({k: v[i : i + 1, : lengths[i]] for k, v in batch.items()})
            for i in range(64)
        ]
    )
    # Static ranges: each token is quantized on its own and integer products are exact; what can differ is float32
    # rounding in attention over other sequence lengths (measured: no difference at all on this CPU).
    assert_same_quantized_model(alone, together)

    # QAT's simulation of the same folder is batch-independent too, and equals it (measured here: 63 rows to 3e-8,
    # one row at 9e-5 after four one-step rounding flips upstream).
    simulated = prepare_qat(
        copy.deepcopy(model), activation_ranges=classifier.quantization["activation_ranges"]
    )
    with torch.no_grad():
        simulated_together = simulated(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
        simulated_alone = np.concatenate(
            [
                simulated(
                    **{k: torch.from_numpy(v[i : i + 1, : lengths[i]]) for k, v in batch.items()}
                ).logits
                for i in range(64)
            ]
        )
    assert_same_quantized_model(simulated_together, together)
    assert_same_quantized_model(simulated_alone, simulated_together)


# --------------------------------------------------------------------------------------------- CPU description
CPUS = {
    "Intel(R) Core(TM) i7-4770 CPU @ 3.40GHz": ("fpu sse4_2 avx avx2 fma", "AVX2 VPMADDUBSW", True),
    "AMD EPYC 7763 64-Core Processor": ("sse4_2 avx avx2 fma", "AVX2 VPMADDUBSW", True),  # Zen 3: no AVX-512
    "Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz": (
        "avx2 avx512f avx512dq avx512cd avx512bw avx512vl",
        "AVX-512 core VPMADDUBSW",
        True,
    ),
    "Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz": (
        "avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni",
        "AVX-512 VNNI VPDPBUSDS",
        False,
    ),
    "12th Gen Intel(R) Core(TM) i7-12700": ("avx2 avx_vnni", "AVX-VNNI VPDPBUSD", False),
    "Intel(R) Xeon(R) Platinum 8480+": (
        "avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni avx_vnni amx_tile amx_int8 amx_bf16",
        "AMX TDPBUSD",
        False,
    ),
}


@pytest.mark.parametrize("model_name", list(CPUS))
def test_cpu_description_names_the_int8_kernel(tmp_path, model_name):
    flags, kernel, saturates = CPUS[model_name]
    text = (
        f"processor\t: 0\nmodel name\t: {model_name}\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: sse\n"
    )
    (tmp_path / "cpuinfo").write_text(text)
    name, read_flags = read_cpuinfo(tmp_path / "cpuinfo")
    assert name == model_name and read_flags == set(flags.split())  # the first processor's block
    assert int8_kernel(read_flags) == {"u8s8_kernel": kernel, "u8s8_saturates_int16": saturates}
    description = describe_cpu(tmp_path / "cpuinfo")
    assert description["flags"]["avx2"] and description["model"] == model_name


def test_cpu_description_without_cpuinfo(tmp_path):
    assert read_cpuinfo(tmp_path / "missing") == ("unknown", set())
    assert describe_cpu(tmp_path / "missing")["flags"]["avx2"] is False
