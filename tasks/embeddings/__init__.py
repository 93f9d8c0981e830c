"""The embedding recipe (scripts/distill_embeddings.py, `hf-distill embeddings`): a sentence-transformers teacher's
pooled embeddings distilled into a cut or pruned student on unlabelled text, as one namespace, `embeddings.<name>`:

- arguments.py   the flags (teacher and student shape, data, report and targets) and `--config FILE` parsing
- data.py        training text cut into windows, the labelled index and query texts, tokenization
- evaluation.py  k-NN topic accuracy, MRR@10, agreement with the teacher, throughput: every model measured alike
- flow.py        teacher -> student -> DistillationTrainer -> sentence-transformers folder -> INT8 -> report
- report.py      embedding_report.{json,md,png}

May import tasks/common, the BBC News split of tasks/classification (bbc.py) and hf_distill; nothing else of the
other tasks.
"""

from __future__ import annotations

from hf_distill.tasks.embeddings.arguments import (
    ARGUMENT_TYPES,
    EmbeddingDataArguments,
    EmbeddingModelArguments,
    EmbeddingReportArguments,
    resolve_model_path,
)
from hf_distill.tasks.embeddings.data import EmbeddingTexts, load_texts, passages
from hf_distill.tasks.embeddings.evaluation import (
    Candidate,
    knn_accuracy,
    mean_cosine,
    measure,
    mrr_at_k,
    similarity_spearman,
)

__all__ = [
    "ARGUMENT_TYPES",
    "Candidate",
    "EmbeddingDataArguments",
    "EmbeddingModelArguments",
    "EmbeddingReportArguments",
    "EmbeddingTexts",
    "knn_accuracy",
    "load_texts",
    "mean_cosine",
    "measure",
    "mrr_at_k",
    "passages",
    "resolve_model_path",
    "similarity_spearman",
]
