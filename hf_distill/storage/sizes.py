"""Bytes of a model folder's weights on disk, whatever runtime holds them: model.onnx and its external data, or
model.safetensors / pytorch_model.bin and their shards (not the tokenizer, configs or reports)."""

from __future__ import annotations

import os
from pathlib import Path

ONNX_FILE = "model.onnx"
_TORCH_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def external_data_files(onnx_path: Path) -> list[Path]:
    """Files holding an ONNX model's external tensor data."""
    import onnx  # the `compress` extra: only folders holding an ONNX model get here

    model = onnx.load(str(onnx_path), load_external_data=False)
    locations = set()
    for initializer in model.graph.initializer:
        if initializer.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(entry.value for entry in initializer.external_data if entry.key == "location")
    return [onnx_path.parent / location for location in sorted(locations)]


def _is_torch_weight_file(name: str) -> bool:
    """model.safetensors, pytorch_model.bin, or a shard of either (model-00001-of-00002.safetensors)."""
    if name in _TORCH_WEIGHT_FILES:
        return True
    return (name.startswith("model-") and name.endswith(".safetensors")) or (
        name.startswith("pytorch_model-") and name.endswith(".bin")
    )


def size_on_disk(path: str | os.PathLike) -> int:
    """Bytes of a model folder's weight files: model.onnx and its external data, or model.safetensors /
    pytorch_model.bin (and their shards); not the tokenizer, configs or reports."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    onnx_path = path / ONNX_FILE
    if onnx_path.is_file():
        files = [onnx_path, *external_data_files(onnx_path)]
    else:
        files = (
            [p for p in path.iterdir() if p.is_file() and _is_torch_weight_file(p.name)]
            if path.is_dir()
            else []
        )
    if not files:
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else "no such folder"
        raise ValueError(
            f"No weight files ({ONNX_FILE}, {', '.join(_TORCH_WEIGHT_FILES)} or their shards) in {path}; found {found}."
        )
    return sum(p.stat().st_size for p in files)
