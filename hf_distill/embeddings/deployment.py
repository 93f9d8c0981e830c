"""A sentence embedder deployed on ONNX Runtime: exported whole (encoder, pooling, Dense layers, normalisation) to
one `model.onnx` whose output is `sentence_embedding` (batch, dim), then quantized with the project's INT8 scheme
(`hf_distill.compression.quantization.quantize_int8`: int8 weights in [-64, 64] per output channel, uint8 inputs
with static calibrated ranges, uint8 embedding tables; the Dense projection stays float32).

    export_embedder_onnx(model, tokenizer, "out/onnx")                          model.onnx (float32) + tokenizer
    quantize_embedder_int8("out/onnx", "out/int8", calibration=batches)        model.onnx (INT8)
    OnnxSentenceEmbedder("out/int8").encode(texts)                              (n, dim) numpy float32

`quantization.export_onnx` exports classifiers (their logits); this exports the feature extractor. onnx,
onnxruntime and onnxscript (the `compress` extra) are imported only when a function here runs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from hf_distill.compression.deployed import ONNX_FILE, OnnxSequenceClassifier
from hf_distill.compression.quantization import OPSET, quantize_int8
from hf_distill.embeddings.model import SentenceEmbedder
from hf_distill.storage.atomic import atomic_directory

logger = logging.get_logger(__name__)

EMBEDDING_INFO_FILE = "sentence_embedding.json"
OUTPUT_NAME = "sentence_embedding"
# The module names the quantizer leaves in float32: the Dense layers after pooling (a small projection).
KEEP_FLOAT = ("dense_layers",)
_INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids")
_NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # the exporter's per-node module path, read by quantize_int8


class _EmbeddingGraph(nn.Module):
    """The embedder with positional inputs and the sentence embedding as its only output. Its attribute is named
    `model`, the prefix the quantizer strips from module names."""

    def __init__(self, model: SentenceEmbedder, input_names: Sequence[str]):
        super().__init__()
        self.model = model
        self.input_names = tuple(input_names)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return self.model(**{name: given[name] for name in self.input_names}).sentence_embedding


def _require_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise ImportError(
            f"{error.name} is needed to deploy a sentence embedder on ONNX Runtime: pip install "
            "'hf-distill[compress]' (onnxruntime, onnx, onnxscript)."
        ) from error
    return onnx, onnxruntime


def _input_names(model: SentenceEmbedder, tokenizer: Any) -> list[str]:
    import inspect

    accepted = set(inspect.signature(model.encoder.forward).parameters)
    wanted = set(getattr(tokenizer, "model_input_names", None) or _INPUT_ORDER)
    # attention_mask always: pooling reads it even where the encoder does not
    return [
        name for name in _INPUT_ORDER if name == "attention_mask" or (name in accepted and name in wanted)
    ]


def _dummy_inputs(vocab_size: int, names: Sequence[str], batch: int, length: int, seed: int) -> dict:
    """Random ids with a padded last row (masking is exercised) and a second token type where there is one."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(0, vocab_size, (batch, length), generator=generator)}
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, max(1, length // 2) :] = 0
    inputs["attention_mask"] = mask
    if "token_type_ids" in names:
        inputs["token_type_ids"] = torch.zeros(batch, length, dtype=torch.long)
    return {name: inputs[name] for name in names}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _keep_name_scopes_only(onnx_path: Path) -> None:
    """Drop the exporter's per-node debug metadata (stack traces naming local paths) but keep the module scopes."""
    import onnx

    graph_model = onnx.load(str(onnx_path))
    for node in graph_model.graph.node:
        kept = [(prop.key, prop.value) for prop in node.metadata_props if prop.key == _NAME_SCOPES]
        del node.metadata_props[:]
        for key, value in kept:
            node.metadata_props.add(key=key, value=value)
    onnx.save(graph_model, str(onnx_path))


def export_embedder_onnx(
    model: SentenceEmbedder,
    tokenizer: Any,
    output_dir: str | os.PathLike,
    *,
    max_length: int = 128,
    atol: float = 1e-4,
    overwrite: bool = False,
) -> Path:
    """Export `model` to `output_dir/model.onnx` (float32): inputs input_ids, attention_mask (and token_type_ids
    where the encoder and tokenizer have them), int64 (batch, sequence), both axes dynamic; output
    `sentence_embedding` (batch, dim). The encoder runs its eager attention in the graph (restored afterwards).

    Checked before the folder appears: ONNX Runtime's embeddings equal PyTorch's within `atol` (plus 1e-3 relative)
    on a (2, max_length) batch with a padded row and a (3, max_length // 2 + 1) batch, else RuntimeError. The
    folder also gets the tokenizer, the encoder's config.json and sentence_embedding.json (pooling, normalisation,
    dimension, max_seq_length). Written atomically; an existing folder needs `overwrite`."""
    onnx, ort = _require_onnx()
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (dynamic axes need a length above 1), got {max_length}.")
    model = copy.deepcopy(model).to("cpu", torch.float32).eval()
    if hasattr(model.encoder, "set_attn_implementation"):
        model.encoder.set_attn_implementation("eager")  # a smaller graph than SDPA's; ORT runs it faster
    names = _input_names(model, tokenizer)
    graph = _EmbeddingGraph(model, names)
    vocab_size = model.encoder.config.vocab_size
    export_inputs = _dummy_inputs(vocab_size, names, 2, max_length, seed=0)
    checks = [export_inputs, _dummy_inputs(vocab_size, names, 3, max_length // 2 + 1, seed=1)]
    with atomic_directory(output_dir, overwrite=overwrite) as temporary:
        onnx_path = temporary / ONNX_FILE
        with torch.no_grad(), _quiet():
            torch.onnx.export(
                graph,
                (),
                str(onnx_path),
                kwargs=export_inputs,
                input_names=names,
                output_names=[OUTPUT_NAME],
                dynamic_shapes={name: {0: "batch", 1: "sequence"} for name in names},
                opset_version=OPSET,
                dynamo=True,
            )
        _keep_name_scopes_only(onnx_path)
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        worst = 0.0
        for inputs in checks:
            with torch.no_grad():
                expected = graph(**inputs).numpy()
            actual = session.run([OUTPUT_NAME], {k: v.numpy() for k, v in inputs.items()})[0]
            worst = max(worst, float(np.abs(actual - expected).max()))
            if actual.shape != expected.shape or not np.allclose(actual, expected, atol=atol, rtol=1e-3):
                raise RuntimeError(
                    f"the ONNX export disagrees with PyTorch on a batch of shape {tuple(inputs['input_ids'].shape)}: "
                    f"{actual.shape} vs {expected.shape}, max abs difference {worst:.3g} > atol {atol}."
                )
        del session
        if tokenizer is not None:
            tokenizer.save_pretrained(temporary)
        model.encoder.config.save_pretrained(temporary)
        info = {
            "inputs": names,
            "output": OUTPUT_NAME,
            "pooling": model.pooling,
            "normalize": model.normalize,
            "dimension": model.embedding_dimension,
            "max_seq_length": model.max_seq_length,
            "opset": OPSET,
            "max_abs_diff_vs_torch": worst,
            "torch_version": torch.__version__,
            "onnx_version": onnx.__version__,
        }
        (temporary / EMBEDDING_INFO_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
    logger.info(f"Exported the sentence embedder to {output_dir} (max |ONNX - PyTorch| = {worst:.2e})")
    return Path(output_dir)


def quantize_embedder_int8(
    onnx_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    calibration: Iterable[Mapping[str, Any]],
    keep_float: Sequence[str] = KEEP_FLOAT,
    overwrite: bool = False,
) -> Path:
    """INT8 of an exported embedder folder with the project's scheme (`quantization.quantize_int8`), calibrated on
    `calibration` (tokenized batches with attention_mask: a few hundred training texts). Returns `output_dir`."""
    return quantize_int8(
        onnx_dir, output_dir, calibration=calibration, keep_float=keep_float, overwrite=overwrite
    )


class OnnxSentenceEmbedder(OnnxSequenceClassifier):
    """A deployed embedder folder (from `export_embedder_onnx` or `quantize_embedder_int8`) run by ONNX Runtime, with
    the session settings of the project's deployed runtime (`compression.deployed`: threads, no spinning)."""

    @property
    def info(self) -> dict[str, Any]:
        path = self.path / EMBEDDING_INFO_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def embed(self, batch: Mapping[str, Any]) -> np.ndarray:
        """(batch, dim) float32 embeddings of a tokenized batch."""
        return self.session.run([OUTPUT_NAME], self.prepare_inputs(batch))[0]

    def encode(
        self, texts: Sequence[str], *, batch_size: int = 32, max_length: int | None = None
    ) -> np.ndarray:
        """(len(texts), dim) float32 embeddings, batches of similar length, in the order of `texts`."""
        limit = max_length or self.info.get("max_seq_length")
        order = sorted(range(len(texts)), key=lambda index: -len(texts[index]))
        result: np.ndarray | None = None
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            batch = self.tokenizer(
                [texts[index] for index in chosen],
                padding=True,
                truncation=True,
                max_length=limit,
                return_tensors="np",
            )
            embeddings = self.embed(batch)
            if result is None:
                result = np.zeros((len(texts), embeddings.shape[1]), dtype=np.float32)
            result[chosen] = embeddings
        return result if result is not None else np.zeros((0, int(self.info.get("dimension", 0))), np.float32)
