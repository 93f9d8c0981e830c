"""KD from a teacher's pooled sentence embeddings (`EmbeddingKD`, task type `sentence_embedding`): the live
teacher's, or its embeddings computed once before training and carried by the batches in the column
`teacher_sentence_embedding` (`TEACHER_EMBEDDING_COLUMN`), so that epochs after the first cost the student alone.

Teacher and student are sentence embedders (`hf_distill.embeddings.SentenceEmbedder`: an encoder, its pooling, a
projection to the teacher's dimension where the widths differ, the teacher's normalisation), whose outputs carry
`sentence_embedding` (batch, dim). The KD term is `losses.embedding_distillation_loss` per text, with the weights of
`embedding_mse_weight`, `embedding_cosine_weight` and `embedding_similarity_weight`. There is no hard-label loss:
the texts need no labels.
"""

from __future__ import annotations

from typing import Any

import torch

from hf_distill.args import DistillationTrainingArguments
from hf_distill.losses import embedding_distillation_loss
from hf_distill.sources.base import StudentStep, Sum
from hf_distill.training.data_checks import LABEL_COLUMNS
from hf_distill.training.teacher import unwrap_model

# A training-set column of the teacher's embedding of each text, (dim,) floats: the teacher is then not run.
TEACHER_EMBEDDING_COLUMN = "teacher_sentence_embedding"


def _embedding_of(outputs: Any, role: str) -> torch.Tensor:
    embedding = getattr(outputs, "sentence_embedding", None)
    if embedding is None:
        raise ValueError(
            f"the {role} returned {type(outputs).__name__} without a sentence_embedding; embedding distillation "
            "needs sentence embedders on both sides (hf_distill.embeddings.SentenceEmbedder, e.g. "
            "load_sentence_embedder(folder))."
        )
    return embedding


class EmbeddingKD:
    """The student's sentence embeddings against the teacher's, per text: the live teacher's, or with `cached`
    those of the batch's `TEACHER_EMBEDDING_COLUMN`."""

    def __init__(self, args: DistillationTrainingArguments, cached: bool = False):
        self.args = args
        self.cached = cached
        self.needs_teacher = not cached

    @classmethod
    def build(cls, trainer: Any, fused: bool, several_teachers: bool) -> EmbeddingKD:
        """The source for `trainer`, refusing what sentence embeddings cannot honour, before any training."""
        args = trainer.args
        refused = {
            "teacher_logits_cache": args.teacher_logits_cache is not None,
            "several teachers": several_teachers,
            "fused_kd_loss": fused,
            "cross_tokenizer": args.cross_tokenizer is not None,
            "lmbda (on-policy steps)": args.lmbda > 0,
        }
        asked = [name for name, given in refused.items() if given]
        if asked:
            raise ValueError(
                f"sentence-embedding distillation learns one live teacher's pooled embeddings; it cannot use "
                f"{', '.join(asked)}. Pass one teacher_model (a SentenceEmbedder) and drop those settings."
            )
        if trainer.teacher_model is None:
            raise ValueError(
                "sentence-embedding distillation needs the teacher itself: pass teacher_model=<a SentenceEmbedder>."
            )
        dimensions = {
            role: getattr(unwrap_model(model), "embedding_dimension", None)
            for role, model in (("student", trainer.model), ("teacher", trainer.teacher_model))
        }
        if None not in dimensions.values() and dimensions["student"] != dimensions["teacher"]:
            raise ValueError(
                f"the student's sentence embeddings have {dimensions['student']} dimensions and the teacher's "
                f"{dimensions['teacher']}: give the student a projection to the teacher's dimension "
                f"(SentenceEmbedder(..., projection_dim={dimensions['teacher']}))."
            )
        dataset = trainer.train_dataset
        columns = getattr(dataset, "column_names", None) or []
        cached = TEACHER_EMBEDDING_COLUMN in columns
        if cached and (args.hidden_weight > 0 or args.attention_weight > 0):
            raise ValueError(
                f"the training set carries the teacher's embeddings ({TEACHER_EMBEDDING_COLUMN}), so the teacher is "
                "not run, but hidden_weight / attention_weight need its hidden states; drop that column (the live "
                "teacher) or set both weights to 0."
            )
        labelled = [column for column in LABEL_COLUMNS if column in columns]
        if labelled:
            raise ValueError(
                f"the training set has the column(s) {labelled}, but a sentence-embedding student has no hard-label "
                "loss: it learns the teacher's embeddings of the text alone. Remove them "
                f"(dataset.remove_columns({labelled!r})) so that nothing is silently ignored."
            )
        return cls(args, cached=cached)

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    def kd_sum(self, step: StudentStep) -> Sum:
        student = _embedding_of(step.outputs, "student")  # (batch, dim), in the teacher's space
        if self.cached:
            teacher = step.inputs[TEACHER_EMBEDDING_COLUMN].to(student.device, torch.float32)  # (batch, dim)
        else:
            teacher = _embedding_of(step.teacher_outputs, "teacher").to(student.device)
        args = self.args
        total = embedding_distillation_loss(
            student,
            teacher,
            mse_weight=args.embedding_mse_weight,
            cosine_weight=args.embedding_cosine_weight,
            similarity_weight=args.embedding_similarity_weight,
            reduction="sum",
        )
        return total, torch.tensor(student.shape[0], device=student.device)

    def task_sum(self, step: StudentStep, label_smoothing: float) -> Sum:
        raise ValueError(
            "a sentence-embedding student has no hard-label loss; train it on unlabelled text (no labels column)."
        )
