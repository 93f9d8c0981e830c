"""Tiny sentence-transformers teachers for the embedding tests, built offline: a config-built BERT and the word-level
tokenizer of tests/conftest.py, assembled and saved by sentence-transformers itself (the peer library), so that
what our loader reads is what that library writes."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import TEXTS_FOR_TESTS, make_bert_tokenizer
from transformers import BertConfig, BertModel

TEXTS = [
    *TEXTS_FOR_TESTS,
    "the dog was very happy and the cat was sad",
    "market price vote election",
    "team win game sport",
    "phone computer tech song star",
]
# Four topics, for k-NN and retrieval tests on text (labels by the words each text is mostly about).
TOPICS = ["film", "film", "film", "film", "music", "film", "animal", "film", "film", "film", "film", "film", "music",
          "film", "mood", "film", "animal", "politics", "sport", "tech"]  # fmt: skip


def tiny_bert(tokenizer, *, hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(config, add_pooling_layer=False).eval()


def st_teacher_folder(
    root: Path,
    *,
    pooling: str = "mean",
    normalize: bool = True,
    dense_out: int | None = None,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
) -> Path:
    """A sentence-transformers folder written by sentence-transformers: Transformer -> Pooling(pooling) [-> Dense
    (Tanh, to dense_out)] [-> Normalize]."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Dense, Normalize, Pooling, Transformer

    tokenizer = make_bert_tokenizer()
    encoder_dir = root / "encoder"
    tiny_bert(tokenizer, hidden=hidden, layers=layers, seed=seed).save_pretrained(encoder_dir)
    tokenizer.save_pretrained(encoder_dir)
    transformer = Transformer(str(encoder_dir), max_seq_length=32)
    modules = [transformer, Pooling(hidden, pooling_mode=pooling)]
    if dense_out is not None:
        torch.manual_seed(seed + 1)
        modules.append(Dense(hidden, dense_out, activation_function=torch.nn.Tanh()))
    if normalize:
        modules.append(Normalize())
    folder = root / "teacher"
    SentenceTransformer(modules=modules, device="cpu").save(str(folder))
    return folder
