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

__all__ = ["ONNX_FILE", "OnnxSequenceClassifier", "load_deployed", "size_on_disk"]


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


def _session(path: Path, num_threads: int | None = None, allow_spinning: bool = False, providers=None):
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
    return ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))


# --------------------------------------------------------------------------------------------- running
class OnnxSequenceClassifier:
    """A deployed ONNX classifier folder (from `export_onnx` or `quantize_int8`) run with ONNX Runtime.

    `predict_logits(batch)` takes the tokenizer's output (dict of numpy arrays, torch tensors or lists; extra keys
    such as labels are ignored, a missing token_type_ids is zeros) and returns float32 logits (batch, num_labels).
    `num_threads`: ORT intra-op threads (default: ORT's, one per physical core). `allow_spinning`: whether idle worker
    threads spin (ORT's own default) or sleep (ours): on this project's shared 2-core machine spinning made the INT8
    MiniLM 2.9x slower at batch 1 (47 vs 17 ms) and 1.2x at batch 32, and spinning threads would steal the cores
    from a PyTorch model timed next to it; pass True on dedicated cores.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        num_threads: int | None = None,
        allow_spinning: bool = False,
        providers: Sequence[str] | None = None,
    ):
        self.path = Path(path)
        model_file = self.path / ONNX_FILE
        if not model_file.is_file():
            raise ValueError(f"No {ONNX_FILE} in {self.path}; export one with export_onnx.")
        self.session = _session(model_file, num_threads, allow_spinning, providers)
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
