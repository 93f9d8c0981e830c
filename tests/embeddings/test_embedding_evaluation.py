"""The recipe's label-free metrics against independent references: scikit-learn's k-NN classifier, MRR@10 and the
Spearman correlation written out here in float64, and the windows the training text is cut into against the
tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_bert_tokenizer
from embedding_helpers import TEXTS

from hf_distill.tasks.embeddings import knn_accuracy, mean_cosine, mrr_at_k, passages, similarity_spearman


def _clusters(seed: int = 0, per_class: int = 30, dim: int = 6) -> tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(seed)
    centres = generator.normal(size=(2, dim)) * 2
    points = np.concatenate([centres[c] + generator.normal(size=(per_class, dim)) for c in (0, 1)])
    return points.astype(np.float32), np.repeat(np.array(["a", "b"]), per_class)


def test_knn_accuracy_equals_scikit_learn():
    from sklearn.neighbors import KNeighborsClassifier

    index, index_labels = _clusters(seed=0)
    queries, query_labels = _clusters(seed=1, per_class=20)
    for k in (1, 3, 5):  # two classes and an odd k: no ties, so the vote is scikit-learn's
        classifier = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(
            index, index_labels
        )
        expected = float((classifier.predict(queries) == query_labels).mean())
        assert knn_accuracy(queries, list(query_labels), index, list(index_labels), k) == pytest.approx(
            expected
        )


def test_a_tied_vote_goes_to_the_closer_topic():
    index = np.array([[1.0, 0.0], [0.0, 1.0]])
    query = np.array([[1.0, 0.2]])  # nearer "x"; k=2 sees one of each
    assert knn_accuracy(query, ["x"], index, ["x", "y"], k=2) == 1.0
    assert knn_accuracy(query, ["y"], index, ["x", "y"], k=2) == 0.0


def test_mrr_at_10_equals_the_formula():
    corpus, corpus_labels = _clusters(seed=2, per_class=15)
    queries, query_labels = _clusters(seed=3, per_class=10)
    total = 0.0
    for query, label in zip(queries.astype(np.float64), query_labels):
        scores = [
            float(query @ c / (np.linalg.norm(query) * np.linalg.norm(c))) for c in corpus.astype(np.float64)
        ]
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[:10]
        ranks = [rank for rank, i in enumerate(order, start=1) if corpus_labels[i] == label]
        total += 1.0 / ranks[0] if ranks else 0.0
    expected = total / len(queries)
    assert mrr_at_k(queries, list(query_labels), corpus, list(corpus_labels), 10) == pytest.approx(expected)
    # a query none of whose topic is in the corpus scores 0
    assert mrr_at_k(queries[:1], ["z"], corpus, list(corpus_labels), 10) == 0.0


def test_teacher_agreement_metrics():
    generator = np.random.default_rng(4)
    teacher = generator.normal(size=(12, 5))
    assert mean_cosine(teacher * 3.0, teacher) == pytest.approx(1.0)  # the length does not count
    assert mean_cosine(teacher[:, :4], teacher) is None  # another space: no cosine to the teacher
    assert similarity_spearman(teacher * 2.0, teacher) == pytest.approx(1.0)
    student = teacher + 0.3 * generator.normal(size=teacher.shape)
    upper = np.triu_indices(12, k=1)

    def pairs(rows):
        unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        return (unit @ unit.T)[upper]

    def ranks(values):
        return np.argsort(np.argsort(values)).astype(np.float64)

    d = ranks(pairs(student)) - ranks(pairs(teacher))
    n = len(d)
    expected = 1.0 - 6.0 * float((d**2).sum()) / (n * (n**2 - 1))  # no ties among random cosines
    assert similarity_spearman(student, teacher) == pytest.approx(expected, abs=1e-9)


def test_passages_cover_the_text_in_windows_the_model_reads_whole():
    tokenizer = make_bert_tokenizer()
    article = " ".join(TEXTS)
    windows = passages([article], tokenizer, max_length=12, per_text=100)
    assert len(windows) > 3
    for window in windows:
        assert len(tokenizer(window)["input_ids"]) <= 12  # with [CLS] and [SEP]
    assert " ".join(windows).split() == article.split()
    assert passages([article], tokenizer, max_length=12, per_text=2) == windows[:2]
