"""The INT8-deployed student: the whole embedder exported to ONNX gives, run by a bare onnxruntime session, the
embeddings sentence-transformers computes from the saved folder; quantized with the project's INT8 scheme it stays
close to them, and its projection stays float."""

from __future__ import annotations

import json

import numpy as np
import pytest
from embedding_helpers import TEXTS, st_teacher_folder

from hf_distill.embeddings import embedding_student, load_sentence_embedder, save_sentence_embedder

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def test_onnx_and_int8_embeddings_match_sentence_transformers(tmp_path):
    import onnxruntime
    from sentence_transformers import SentenceTransformer

    from hf_distill.embeddings.deployment import (
        OnnxSentenceEmbedder,
        export_embedder_onnx,
        quantize_embedder_int8,
    )

    teacher, tokenizer = load_sentence_embedder(st_teacher_folder(tmp_path))
    batch = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    student = embedding_student(teacher, num_layers=1, hidden=16, calibration=[batch])
    folder = save_sentence_embedder(student, tokenizer, tmp_path / "student")
    reference = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_numpy=True)

    onnx_dir = export_embedder_onnx(student, tokenizer, tmp_path / "onnx", max_length=16)
    session = onnxruntime.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {node.name: batch[node.name].numpy() for node in session.get_inputs()}
    exported = session.run(["sentence_embedding"], feed)[0]
    np.testing.assert_allclose(exported, reference, atol=1e-5, rtol=1e-4)

    int8_dir = quantize_embedder_int8(onnx_dir, tmp_path / "int8", calibration=[batch])
    deployed = OnnxSentenceEmbedder(int8_dir).encode(TEXTS)
    assert deployed.shape == reference.shape
    cosines = (deployed * reference).sum(1) / (
        np.linalg.norm(deployed, axis=1) * np.linalg.norm(reference, axis=1)
    )
    assert cosines.min() > 0.9, cosines
    info = json.loads((int8_dir / "quantization.json").read_text())
    assert any(name.startswith("dense_layers") for name in info["float_modules"])
    assert any(name.startswith("encoder.encoder.layer") for name in info["quantized_modules"])
