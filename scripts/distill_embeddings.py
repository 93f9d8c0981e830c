#!/usr/bin/env python
"""Distil a sentence-transformers teacher's embeddings into a smaller student on unlabelled text, and report it
against the teacher (k-NN topic accuracy, MRR@10, cosine and similarity agreement, throughput, size).

    python scripts/distill_embeddings.py --config configs/embeddings/bbc_minilm.yaml --output_dir outputs/emb_bbc
    hf-distill embeddings --config configs/embeddings/bbc_minilm.yaml --output_dir outputs/emb_bbc
    python scripts/distill_embeddings.py --teacher_model_name_or_path my_st_model --student_num_layers 2 \
        --train_file texts.txt --index_file labelled.csv --eval_file queries.csv --output_dir out

The teacher is a sentence-transformers folder (its pooling and normalisation are read from modules.json and
1_Pooling), or a transformers model with --pooling. The student is the teacher cut to fewer layers
(--student_num_layers) and/or pruned narrower (--student_hidden, --student_ffn), with a projection into the
teacher's space where the widths differ; it learns the teacher's embeddings (--embedding_mse_weight,
--embedding_cosine_weight, --embedding_similarity_weight) through DistillationTrainer.

Writes into --output_dir: student/ (a sentence-transformers folder: SentenceTransformer(path) loads it, and
transformers' AutoModel its encoder), student_int8/ (ONNX Runtime INT8, with --int8), embedding_report.{json,md,png},
training/ (checkpoints: a killed run resumes) and run.json.
"""

from __future__ import annotations

from typing import Any

from hf_distill.tasks import common
from hf_distill.tasks.embeddings import flow


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return flow.main(argv, description=__doc__)


if __name__ == "__main__":
    main()
    common.finish_processes()
