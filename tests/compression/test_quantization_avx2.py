"""The INT8 scheme on an x86 CPU without VNNI, emulated: `qemu-x86_64 -cpu Haswell-v4` runs Python with CPUID reporting
an AVX2-only Haswell, so ONNX Runtime's MLAS picks its AVX2 uint8 x int8 kernel (VPMADDUBSW, which sums pairs of
products into a saturating int16), as on Haswell-Skylake, Zen 2/3 and AVX-512 CPUs before Cascade Lake.

Checked there, in one emulated process running only numpy and onnxruntime (the graphs are built natively):
- a control: full-range int8 weights (127) times uint8 255 saturate, so the emulated CPU really runs that kernel;
- the scheme's worst case (weights at +-64, inputs at 255) is exact, as test_quantization_scheme.py checks natively;
- a small INT8 BERT gives the logits it gives natively and that QAT simulates.
"""

from __future__ import annotations

import copy
import json
import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_bert_tokenizer
from test_quantization_scheme import (
    WORST_HIGH,
    WORST_LOW,
    assert_same_quantized_model,
    encode_rows,
    exact_reference,
    worst_case_linear,
)
from transformers import BertConfig, BertForSequenceClassification

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from hf_distill.compression.qat import prepare_qat  # noqa: E402
from hf_distill.compression.quantization import export_onnx, load_deployed, quantize_int8  # noqa: E402

QEMU = shutil.which("qemu-x86_64")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        QEMU is None,
        reason="qemu-x86_64 (Debian/Ubuntu package qemu-user) is not installed, so an AVX2-only CPU cannot be emulated",
    ),
    pytest.mark.skipif(platform.machine() != "x86_64", reason="emulates an x86-64 CPU for an x86-64 Python"),
]

# Runs under qemu: every model.onnx named in the job on its inputs, results to an .npz.
EMULATED = """
import json, sys
import numpy as np
import onnxruntime as ort

job = json.load(open(sys.argv[1]))
options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.log_severity_level = 3
results = {}
for name, (model, inputs) in job.items():
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    feed = dict(np.load(inputs))
    results[name] = session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})[0]
np.savez(sys.argv[2], **results)
"""


def saturating_control(folder):
    """MatMulInteger of uint8 255 with full-range int8 127 weights: 2 * 255 * 127 = 64770 overflows int16."""
    from onnx import TensorProto, helper, numpy_helper

    weight = np.full((64, 3), 127, np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
        "control",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, 64])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
        [numpy_helper.from_array(weight, "b")],
    )
    folder.mkdir()
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "model.onnx")
    )
    a = np.full((2, 64), 255, np.uint8)
    np.savez(folder / "inputs.npz", a=a)
    return a.astype(np.int64) @ weight.astype(np.int64)


def test_int8_on_an_emulated_avx2_cpu(tmp_path):
    control_exact = saturating_control(tmp_path / "control")

    x, weight, bias = worst_case_linear(tmp_path / "worst_float")
    worst = quantize_int8(
        tmp_path / "worst_float",
        tmp_path / "worst",
        keep_float=(),
        activation_ranges={"layer": (WORST_LOW, WORST_HIGH)},
    )
    np.savez(worst / "inputs.npz", x=x)

    tokenizer = make_bert_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    model = BertForSequenceClassification(config).eval()
    bert = quantize_int8(
        export_onnx(model, tokenizer, tmp_path / "bert_onnx", max_length=64),
        tmp_path / "bert",
        calibration=[encode_rows(tokenizer, 8)],
    )
    batch = encode_rows(tokenizer, 16)
    np.savez(bert / "inputs.npz", **batch)
    native = load_deployed(bert, num_threads=1).predict_logits(batch)
    ranges = json.loads((bert / "quantization.json").read_text())["activation_ranges"]
    with torch.no_grad():
        simulated = prepare_qat(copy.deepcopy(model), activation_ranges=ranges)(
            **{k: torch.from_numpy(v) for k, v in batch.items()}
        ).logits.numpy()

    job = {name: (str(tmp_path / name / "model.onnx"), str(tmp_path / name / "inputs.npz")) for name in
           ("control", "worst", "bert")}  # fmt: skip
    (tmp_path / "job.json").write_text(json.dumps(job))
    (tmp_path / "emulated.py").write_text(EMULATED)
    completed = subprocess.run(
        [QEMU, "-cpu", "Haswell-v4", sys.executable, str(tmp_path / "emulated.py"), str(tmp_path / "job.json"),
         str(tmp_path / "emulated.npz")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    emulated = np.load(tmp_path / "emulated.npz")

    control_error = np.abs(emulated["control"].astype(np.int64) - control_exact).max()
    assert control_error > 1000, (
        f"full-range int8 weights were exact under qemu Haswell (error {control_error}): the emulated CPU did not run "
        "the saturating AVX2 kernel, so this test checks nothing"
    )
    np.testing.assert_allclose(emulated["worst"], exact_reference(x, weight, bias), rtol=1e-6, atol=1e-6)
    assert_same_quantized_model(emulated["bert"], native)
    assert_same_quantized_model(emulated["bert"], simulated)
