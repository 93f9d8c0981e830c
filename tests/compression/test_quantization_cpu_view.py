"""The INT8 deployment on the kernels of CPUs without VNNI, run natively: benchmarks/_cpu_view.py hides AVX-512, VNNI
and AMX from CPUID (CPUID faulting), so ONNX Runtime's MLAS picks the kernels of an AVX2-only CPU (VPMADDUBSW on
ymm, FMA3 SGEMM on ymm) or of AVX-512 without VNNI (VPMADDUBSW on zmm), and they run on this core at full speed.
test_quantization_avx2.py checks the same under qemu's Haswell (slower, and where CPUID faulting is missing).

Checked in a child process that sees each view:
- a control: full-range int8 weights times uint8 255 saturate, so the view's kernel really ran (and
  `probe_u8s8_kernel` says so, and `describe_cpu` names the kernel from what CPUID tells the process);
- the scheme's worst case (weights at +-64, inputs at 255) is exact (a float64 reference written in the test module);
- a small BERT's deployed graph (fused attention, the last layer on the first token only) gives the logits it gives
  natively, which QAT's PyTorch simulation gives too.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_bert_tokenizer
from test_quantization_avx2 import saturating_control
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
from hf_distill.reporting.cpuid import cpuid_flags  # noqa: E402
from hf_distill.reporting.machine import INT8_FLAGS, describe_cpu, read_cpuinfo  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import _cpu_view  # noqa: E402

UNAVAILABLE = _cpu_view.unavailable()

# Runs in the child: every model.onnx of the job on its inputs, and the CPU as the child sees it.
CHILD = """
import json, sys
import numpy as np
import onnxruntime as ort
sys.path.insert(0, sys.argv[3])
from hf_distill.compression.deployed import probe_u8s8_kernel
from hf_distill.reporting.machine import describe_cpu

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
print(json.dumps({"cpu": describe_cpu(), "probe": probe_u8s8_kernel()}))
"""


def test_cpuid_flags_agree_with_the_kernel_on_a_plain_machine():
    """Without an emulator or a CPUID filter, what CPUID tells this process is what the kernel lists."""
    flags = cpuid_flags()
    if flags is None:
        pytest.skip("CPUID cannot be asked here (not x86-64, or no executable mapping)")
    _, kernel_flags = read_cpuinfo()
    if not kernel_flags:
        pytest.skip("no /proc/cpuinfo")
    for flag in INT8_FLAGS:
        assert (flag in flags) == (flag in kernel_flags), flag
    assert describe_cpu()["flags_source"] == "cpuid"


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """The control, the worst case and a small BERT (deployed graph), built natively once, with native results."""
    root = tmp_path_factory.mktemp("cpu_view")
    control_exact = saturating_control(root / "control")
    x, weight, bias = worst_case_linear(root / "worst_float")
    worst = quantize_int8(
        root / "worst_float",
        root / "worst",
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
        export_onnx(model, tokenizer, root / "bert_onnx", max_length=64),
        root / "bert",
        calibration=[encode_rows(tokenizer, 8)],
    )
    graph = json.loads((bert / "quantization.json").read_text())["graph"]
    assert graph["gathers"] == 1, graph  # the deployed graph computes only the first token in its last layer
    batch = encode_rows(tokenizer, 16)
    np.savez(bert / "inputs.npz", **batch)
    ranges = json.loads((bert / "quantization.json").read_text())["activation_ranges"]
    with torch.no_grad():
        simulated = prepare_qat(copy.deepcopy(model), activation_ranges=ranges)(
            **{k: torch.from_numpy(v) for k, v in batch.items()}
        ).logits.numpy()
    job = {
        name: (str(root / name / "model.onnx"), str(root / name / "inputs.npz"))
        for name in ("control", "worst", "bert")
    }
    (root / "job.json").write_text(json.dumps(job))
    (root / "child.py").write_text(CHILD)
    return {
        "root": root,
        "control_exact": control_exact,
        "worst_exact": exact_reference(x, weight, bias),
        "native": load_deployed(bert, num_threads=1).predict_logits(batch),
        "simulated": simulated,
    }


@pytest.mark.skipif(UNAVAILABLE is not None, reason=f"no CPU view here: {UNAVAILABLE}")
@pytest.mark.parametrize(
    "view, kernel", [("avx2", "AVX2 VPMADDUBSW"), ("avx512_no_vnni", "AVX-512 core VPMADDUBSW")]
)
def test_int8_on_the_kernels_of_cpus_without_vnni(graphs, view, kernel):
    root = graphs["root"]
    completed = subprocess.run(
        [sys.executable, str(root / "child.py"), str(root / "job.json"), str(root / f"{view}.npz"), str(REPO)],
        env=_cpu_view.cpu_view_env(view), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    seen = json.loads(completed.stdout.strip().splitlines()[-1])
    results = np.load(root / f"{view}.npz")

    control_error = np.abs(results["control"].astype(np.int64) - graphs["control_exact"]).max()
    assert control_error > 1000, f"{view}: full-range weights were exact, so the view's kernel did not run"
    assert seen["probe"]["saturates"] is True
    assert seen["cpu"]["u8s8_kernel"] == kernel and seen["cpu"]["flags_source"] == "cpuid"
    assert seen["cpu"]["flags"]["avx512_vnni"] is False and seen["cpu"]["flags"]["avx2"] is True
    np.testing.assert_allclose(results["worst"], graphs["worst_exact"], rtol=1e-6, atol=1e-6)
    assert_same_quantized_model(results["bert"], graphs["native"])
    assert_same_quantized_model(results["bert"], graphs["simulated"])


def test_the_report_names_the_cpu_its_extensions_and_kernels(tmp_path):
    """The compression report's Machine section, from a CPU description read from a cpuinfo file (an AVX2-only Zen 3)
    as a CPUID filter would show it, and the observed kernel family."""
    from hf_distill.compression.report import compression_report_markdown

    (tmp_path / "cpuinfo").write_text(
        "model name\t: AMD EPYC 7763 64-Core Processor\nflags\t\t: sse4_2 avx avx2 fma\n"
    )
    cpu = describe_cpu(tmp_path / "cpuinfo")
    cpu["cpuinfo_disagrees"] = {"avx512f": True, "avx512_vnni": True}
    probe = {
        "family": "VPMADDUBSW (pairs summed into saturating int16: AVX2, AVX-512 without VNNI)",
        "saturates": True,
    }
    markdown = compression_report_markdown(
        {
            "metric": "accuracy",
            "stages": [],
            "targets": {},
            "metadata": {
                "cpu": cpu,
                "u8s8_probe": probe,
                "load_average": [1.5, 1.0, 0.5],
                "cpu_view": "avx2",
            },
        }
    )
    section = markdown.split("## Machine")[1]
    assert "AMD EPYC 7763 64-Core Processor" in section and ": fma, avx2" in section
    assert "AVX2 VPMADDUBSW by these extensions; observed: VPMADDUBSW" in section
    assert "AVX2 + FMA3 (ymm, 8 floats)" in section
    assert "CPU view: avx2: /proc/cpuinfo also lists avx512f, avx512_vnni" in section
    assert "1.50, 1.00, 0.50" in section and "{'model'" not in markdown  # readable lines, not a dict
