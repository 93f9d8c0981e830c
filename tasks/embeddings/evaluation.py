"""Measuring sentence embedders without labels beyond topics: k-NN topic accuracy and retrieval MRR@10 (a query's
relevant texts are those of its topic) against a labelled index, agreement with the teacher (mean cosine, Spearman
correlation of pairwise similarities), throughput at batch 1 and 32 (alternating rounds), parameters and size.

Every model is a `Candidate`: a function from texts to a (n, dim) float array, so a PyTorch embedder, an ONNX
Runtime one and a static (Model2Vec) one are measured the same way, tokenization included in the timing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers.utils import logging

from hf_distill.reporting.latency import time_alternately

logger = logging.get_logger(__name__)

METRICS = ("knn_accuracy", "mrr_at_10", "mean_cosine_to_teacher", "similarity_spearman")


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def cosine_matrix(queries: np.ndarray, corpus: np.ndarray) -> np.ndarray:
    """(n_queries, n_corpus) cosine similarities, in float64."""
    return _unit(queries) @ _unit(corpus).T


def _ranked(similarities: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k most similar corpus texts per query, most similar first (ties: the lower index first)."""
    k = min(k, similarities.shape[1])
    return np.argsort(-similarities, axis=1, kind="stable")[:, :k]


def knn_accuracy(
    queries: np.ndarray,
    query_labels: Sequence[Any],
    index: np.ndarray,
    index_labels: Sequence[Any],
    k: int = 5,
) -> float:
    """Share of queries whose topic is the majority topic of their k nearest index texts by cosine; a tie between
    topics goes to the one whose tied neighbours have the larger summed similarity."""
    similarities = cosine_matrix(queries, index)
    labels = np.asarray(index_labels, dtype=object)
    correct = 0
    for row, neighbours in enumerate(_ranked(similarities, k)):
        votes: dict[Any, list[float]] = {}
        for neighbour in neighbours:
            entry = votes.setdefault(labels[neighbour], [0, 0.0])
            entry[0] += 1
            entry[1] += similarities[row, neighbour]
        predicted = max(votes, key=lambda label: (votes[label][0], votes[label][1]))
        correct += predicted == query_labels[row]
    return correct / max(len(query_labels), 1)


def mrr_at_k(
    queries: np.ndarray,
    query_labels: Sequence[Any],
    corpus: np.ndarray,
    corpus_labels: Sequence[Any],
    k: int = 10,
) -> float:
    """Mean over queries of 1 / rank of the first corpus text of the query's topic among its k most similar
    (0 when none of the k is)."""
    labels = np.asarray(corpus_labels, dtype=object)
    total = 0.0
    for row, ranked in enumerate(_ranked(cosine_matrix(queries, corpus), k)):
        hits = np.flatnonzero(labels[ranked] == query_labels[row])
        total += 1.0 / (hits[0] + 1) if hits.size else 0.0
    return total / max(len(query_labels), 1)


def mean_cosine(embeddings: np.ndarray, teacher_embeddings: np.ndarray) -> float | None:
    """Mean over texts of cos(model, teacher); None when the dimensions differ (not the teacher's space)."""
    if np.shape(embeddings) != np.shape(teacher_embeddings):
        return None
    return float((_unit(embeddings) * _unit(teacher_embeddings)).sum(axis=1).mean())


def similarity_spearman(embeddings: np.ndarray, teacher_embeddings: np.ndarray) -> float:
    """Spearman correlation between the cosine similarities of every pair of texts (i < j) by the model and by the
    teacher: whether the model orders pairs by similarity as the teacher does (any dimension)."""
    from scipy.stats import spearmanr

    upper = np.triu_indices(len(embeddings), k=1)
    model_pairs = cosine_matrix(embeddings, embeddings)[upper]
    teacher_pairs = cosine_matrix(teacher_embeddings, teacher_embeddings)[upper]
    return float(spearmanr(model_pairs, teacher_pairs).statistic)


@dataclass
class Candidate:
    """A model to measure: `encode(texts) -> (n, dim)` float array (tokenization included), its parameter count,
    the bytes of its weights on disk, its runtime and where it lives."""

    name: str
    encode: Callable[[Sequence[str]], np.ndarray]
    params: int
    size_bytes: int
    runtime: str
    path: str | None = None


def quality(candidate: Candidate, texts: Any, teacher_eval: np.ndarray | None, k: int) -> dict[str, Any]:
    """The quality metrics of one model on the recipe's texts (`data.EmbeddingTexts`), against the teacher's
    embeddings of the queries (None: this model is the teacher)."""
    index = np.asarray(candidate.encode(texts.index_texts), dtype=np.float32)
    queries = np.asarray(candidate.encode(texts.eval_texts), dtype=np.float32)
    reference = queries if teacher_eval is None else teacher_eval
    return {
        "dimension": int(queries.shape[1]),
        "knn_accuracy": knn_accuracy(queries, texts.eval_labels, index, texts.index_labels, k),
        "mrr_at_10": mrr_at_k(queries, texts.eval_labels, index, texts.index_labels, 10),
        "mean_cosine_to_teacher": mean_cosine(queries, reference),
        "similarity_spearman": similarity_spearman(queries, reference),
        "_queries": queries,
    }


def throughput(
    candidates: Sequence[Candidate],
    texts: Sequence[str],
    batch_sizes: Sequence[int],
    *,
    warmup: int,
    repeats: int,
) -> dict[int, dict[str, Any]]:
    """batch size -> model -> Timing of encoding the first `batch size` texts (one call), every model once per
    round (`time_alternately`)."""
    timings = {}
    for batch_size in batch_sizes:
        batch = [texts[i % len(texts)] for i in range(batch_size)]
        runners = {
            candidate.name: (lambda encode=candidate.encode, batch=batch: encode(batch))
            for candidate in candidates
        }
        timings[batch_size] = time_alternately(runners, warmup=warmup, repeats=repeats)
        logger.info(
            f"batch {batch_size}: "
            + ", ".join(f"{name} {timing.median_ms:.1f} ms" for name, timing in timings[batch_size].items())
        )
    return timings


def measure(
    candidates: Sequence[Candidate],
    texts: Any,
    *,
    k: int = 5,
    batch_sizes: Sequence[int] = (1, 32),
    warmup: int = 2,
    repeats: int = 10,
) -> dict[str, dict[str, Any]]:
    """name -> metrics, throughput (texts/s), latency and speed-up at each batch size, params and size, for every
    candidate; the first candidate is the teacher the others are compared with."""
    teacher = candidates[0]
    rows: dict[str, dict[str, Any]] = {}
    teacher_eval = None
    for candidate in candidates:
        logger.info(f"Evaluating {candidate.name}")
        metrics = quality(candidate, texts, teacher_eval, k)
        queries = metrics.pop("_queries")
        if teacher_eval is None:
            teacher_eval = queries
        rows[candidate.name] = {
            "runtime": candidate.runtime,
            "path": candidate.path,
            "params": candidate.params,
            "size_bytes": candidate.size_bytes,
            **metrics,
        }
    timings = throughput(candidates, texts.eval_texts, batch_sizes, warmup=warmup, repeats=repeats)
    for candidate in candidates:
        row = rows[candidate.name]
        for batch_size, by_model in timings.items():
            timing = by_model[candidate.name]
            row[f"latency_b{batch_size}"] = timing.to_dict()
            row[f"throughput_b{batch_size}"] = batch_size * 1000.0 / timing.median_ms
            row[f"speedup_b{batch_size}"] = by_model[teacher.name].median_ms / timing.median_ms
    for candidate in candidates:
        row = rows[candidate.name]
        base = rows[teacher.name]
        row["size_pct_of_teacher"] = 100.0 * row["size_bytes"] / base["size_bytes"]
        row["knn_retained_pct"] = 100.0 * row["knn_accuracy"] / max(base["knn_accuracy"], 1e-12)
    return rows
