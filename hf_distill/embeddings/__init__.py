"""Sentence embedders as students and teachers: one pooled embedding per text, in the sentence-transformers format.

- pooling.py     pooling modes (mean, cls, max, mean_sqrt_len_tokens, lasttoken) and sentence-transformers' Pooling
                 config in both of its forms
- model.py       `SentenceEmbedder`: encoder -> pooling -> Dense layers -> normalisation, one nn.Module that
                 DistillationTrainer trains (task type sentence_embedding; the KD source is sources/embeddings.py)
- folder.py      reading and writing sentence-transformers folders (modules.json, 1_Pooling, k_Dense, Normalize)
- students.py    cut and pruned students with a projection into the teacher's space (least-squares start)
- deployment.py  the whole embedder exported to ONNX and quantized with the project's INT8 scheme; its runtime

May import compression/ (pruning, quantization, the deployed runtime), training/, storage/, students.py and the
standard libraries; nothing in the library imports it but the recipes above it.
"""

from __future__ import annotations

from hf_distill.embeddings.folder import embedder_weight_bytes, load_sentence_embedder, save_sentence_embedder
from hf_distill.embeddings.model import DenseLayer, FolderFormat, SentenceEmbedder, SentenceEmbeddingOutput
from hf_distill.embeddings.pooling import POOLING_MODES, pool
from hf_distill.embeddings.students import embedding_student, fit_projection

__all__ = [
    "POOLING_MODES",
    "DenseLayer",
    "FolderFormat",
    "SentenceEmbedder",
    "SentenceEmbeddingOutput",
    "embedder_weight_bytes",
    "embedding_student",
    "fit_projection",
    "load_sentence_embedder",
    "pool",
    "save_sentence_embedder",
]
