"""A deployed model folder, run and measured: `load_deployed` opens an INT8/fp32 ONNX folder (from
`quantization.export_onnx` / `quantize_int8`) as an `OnnxSequenceClassifier` run by ONNX Runtime, or a Hugging Face
model folder as that model; `size_on_disk` counts a folder's weight bytes. onnx and onnxruntime (the `compress`
extra) are imported only when a function here needs them."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_distill.storage.sizes import ONNX_FILE, size_on_disk  # noqa: F401 - re-exported

__all__ = [
    "DISABLED_OPTIMIZERS",
    "ONNX_FILE",
    "OnnxSequenceClassifier",
    "describe_graph",
    "load_deployed",
    "probe_u8s8_kernel",
    "size_on_disk",
]


def _require_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise ImportError(
            f"{error.name} is needed for ONNX export and INT8 deployment: pip install 'hf-distill[compress]' "
            "(onnxruntime, onnx, onnxscript)."
        ) from error
    return onnx, onnxruntime


# ONNX Runtime graph optimizations that our sessions turn off, and that onnx_export.json records (as "session") for
# anyone opening model.onnx in a plain InferenceSession: pass InferenceSession(..., disabled_optimizers=[...]).
# SkipLayerNormFusion turns each residual Add + LayerNormalization into SkipLayerNormalization, whose CPU kernel
# (onnxruntime 1.32) was slower than the two nodes it replaces on every x86 kind measured: in the demo's INT8 student
# at batch 32 x 128 tokens, 2 threads, 9.3 against 1.5 ms per call for the LayerNorms and 35.4 against 28.7 ms for
# the model on AVX-512 VNNI (benchmarks/bench_int8_profile.py, docs/INT8_CPUS.md). The outputs differ by float32
# rounding only.
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def _session(
    path: Path,
    num_threads: int | None = None,
    allow_spinning: bool = False,
    providers=None,
    disabled_optimizers: Sequence[str] = DISABLED_OPTIMIZERS,
):
    _, ort = _require_onnx()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if num_threads is not None:
        options.intra_op_num_threads = int(num_threads)
        options.inter_op_num_threads = 1
    if not allow_spinning:
        # Idle worker threads sleep instead of spinning: fairer when timing against another runtime in one process.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(
        str(path),
        options,
        providers=list(providers or ["CPUExecutionProvider"]),
        disabled_optimizers=list(disabled_optimizers),
    )


# --------------------------------------------------------------------------------------------- running
class OnnxSequenceClassifier:
    """A deployed ONNX classifier folder (from `export_onnx` or `quantize_int8`) run with ONNX Runtime.

    `predict_logits(batch)` takes the tokenizer's output (dict of numpy arrays, torch tensors or lists; extra keys
    such as labels are ignored, a missing token_type_ids is zeros) and returns float32 logits (batch, num_labels).
    `num_threads`: ORT intra-op threads (default: ORT's, one per physical core). `allow_spinning`: whether idle worker
    threads spin (ORT's own default) or sleep (ours): on this project's shared 2-core machine spinning made the INT8
    MiniLM 2.9x slower at batch 1 (47 vs 17 ms) and 1.2x at batch 32, and spinning threads would steal the cores
    from a PyTorch model timed next to it; pass True on dedicated cores. `disabled_optimizers`: ONNX Runtime graph
    optimizations left out (default `DISABLED_OPTIMIZERS`, see there; () for ONNX Runtime's own choice).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        num_threads: int | None = None,
        allow_spinning: bool = False,
        providers: Sequence[str] | None = None,
        disabled_optimizers: Sequence[str] = DISABLED_OPTIMIZERS,
    ):
        self.path = Path(path)
        model_file = self.path / ONNX_FILE
        if not model_file.is_file():
            raise ValueError(f"No {ONNX_FILE} in {self.path}; export one with export_onnx.")
        self.session = _session(model_file, num_threads, allow_spinning, providers, disabled_optimizers)
        self.input_names = [node.name for node in self.session.get_inputs()]
        self.output_names = [node.name for node in self.session.get_outputs()]
        self.config = None
        if (self.path / "config.json").is_file():
            from transformers import AutoConfig

            self.config = AutoConfig.from_pretrained(self.path)
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The tokenizer saved with the model (loaded on first use)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        return self._tokenizer

    @property
    def quantization(self) -> dict[str, Any] | None:
        """The folder's quantization.json (the INT8 scheme, its ranges, the CPU it was built on), or None (fp32)."""
        path = self.path / "quantization.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def prepare_inputs(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The session's feed: int64 numpy arrays for the inputs the graph takes."""
        return _feed(self.input_names, batch)

    def predict_logits(self, batch: Mapping[str, Any]) -> np.ndarray:
        return self.session.run(self.output_names[:1], self.prepare_inputs(batch))[0]

    def __call__(self, batch: Mapping[str, Any] | None = None, **inputs: Any) -> np.ndarray:
        return self.predict_logits({**(batch or {}), **inputs})

    def runner(self, batch: Mapping[str, Any]) -> Callable[[], np.ndarray]:
        """A zero-argument call running `batch` (converted once), for timing."""
        feed = self.prepare_inputs(batch)
        names = self.output_names[:1]
        return lambda: self.session.run(names, feed)[0]

    def __repr__(self) -> str:
        return f"OnnxSequenceClassifier({str(self.path)!r}, inputs={self.input_names})"


def _feed(input_names: Sequence[str], batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A session's feed from a tokenizer batch: int64 arrays for `input_names` (token_type_ids defaults to zeros)."""
    if "input_ids" not in batch:
        raise ValueError(f"The batch needs input_ids; it has {sorted(batch)}.")
    feed = {}
    for name in input_names:
        value = batch.get(name)
        if value is None:
            if name != "token_type_ids":
                raise ValueError(f"The ONNX model takes {list(input_names)}; the batch lacks {name!r}.")
            value = np.zeros_like(feed.get("input_ids", _to_numpy(batch["input_ids"])))
        feed[name] = _to_numpy(value)
    return feed


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.int64)


def probe_u8s8_kernel() -> dict[str, Any]:
    """Which family of uint8 x int8 kernel this process's ONNX Runtime runs, observed rather than inferred: a
    MatMulInteger of uint8 255 by int8 127 over 64 terms, whose pairs (2 x 255 x 127 = 64,770) overflow int16.

    {"family": "VPMADDUBSW (pairs summed into saturating int16: AVX2, AVX-512 without VNNI)" or "exact int32
    (VNNI, AMX, or SSE widening)", "saturates": bool, "observed": the product, "exact": 2,072,640}. The deployed
    scheme is exact on both (its weights stay within [-64, 64]); the family says which kernel ran, and so what
    throughput to expect. A few milliseconds."""
    onnx, ort = _require_onnx()
    from onnx import TensorProto, helper, numpy_helper

    weight = np.full((64, 1), 127, np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
        "u8s8_probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 1])],
        [numpy_helper.from_array(weight, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    observed = int(session.run(None, {"a": np.full((1, 64), 255, np.uint8)})[0][0, 0])
    exact = 255 * 127 * 64
    saturates = observed != exact
    family = (
        "VPMADDUBSW (pairs summed into saturating int16: AVX2, AVX-512 without VNNI)"
        if saturates
        else "exact int32 (VNNI, AMX, or SSE widening)"
    )
    return {"family": family, "saturates": saturates, "observed": observed, "exact": exact}


def describe_graph(path: str | os.PathLike) -> str:
    """One line on how a deployed ONNX folder's graph was built, from its onnx_export.json and quantization.json:
    fused operators, which tokens the last layer computes, and the ONNX Runtime optimizations its sessions leave
    out. For reports; "unknown" where a folder does not record it (built before these were recorded)."""
    records = {}
    for name in ("onnx_export.json", "quantization.json"):
        file = Path(path) / name
        records[name] = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    export, quantization = records["onnx_export.json"], records["quantization.json"]
    session = quantization.get("session") or export.get("session") or {}
    return "; ".join(
        [
            f"fused: {export.get('fusions', 'unknown')}",
            f"tokens: {(quantization.get('graph') or {}).get('tokens', 'unknown')}",
            "ONNX Runtime optimizations left out: "
            + (", ".join(session.get("disabled_optimizers", [])) or "none" if session else "unknown"),
        ]
    )


def load_deployed(path: str | os.PathLike, *, num_threads: int | None = None, allow_spinning: bool = False):
    """Load a deployed folder: one with model.onnx gives an `OnnxSequenceClassifier` (`num_threads`,
    `allow_spinning` as there), a Hugging Face model folder gives that model (class from config.json's
    `architectures`, else AutoModelForSequenceClassification) in eval mode."""
    path = Path(path)
    if (path / ONNX_FILE).is_file():
        return OnnxSequenceClassifier(path, num_threads=num_threads, allow_spinning=allow_spinning)
    if not (path / "config.json").is_file():
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else "no such folder"
        raise ValueError(
            f"{path} holds neither {ONNX_FILE} nor a Hugging Face model (config.json); found {found}."
        )
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification

    architectures = AutoConfig.from_pretrained(path).architectures or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    model = (model_class or AutoModelForSequenceClassification).from_pretrained(path)
    return model.eval()
