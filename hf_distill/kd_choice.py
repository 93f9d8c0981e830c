"""Which KD source a configuration gets, decided once when `DistillationTrainer` is built (see `kd_sources.py`)."""

from __future__ import annotations

from typing import Any

from .cross_tokenizer_kd import CrossTokenizerKD
from .ensemble import TeacherSet, build_ensemble_source, check_ensemble_options
from .kd_sources import CachedTopKKD, FusedLMHeadKD, KDSource, LogitsKD, SpanKD
from .task_loss import QUESTION_ANSWERING
from .teacher import unwrap_model


def choose_kd_source(
    trainer: Any, fused: bool, teachers: TeacherSet | None, teacher_tokenizers: Any
) -> KDSource:
    """In order: several teachers (their mixture), a teacher with another tokenizer (aligned positions), no teacher
    in memory (the cache), the fused LM head, extractive QA's spans, else the teacher's logits."""
    args, task, pairing = trainer.args, trainer._task, trainer._pairing
    if teachers is not None:
        check_ensemble_options(args, task, fused)
        return build_ensemble_source(
            teachers,
            args=args,
            task=task,
            student=unwrap_model(trainer.model),
            matching_pairing=pairing,
            prepared_matching=trainer.teacher_model,
            tokenizer=trainer.processing_class,
            teacher_tokenizers=teacher_tokenizers,
            accelerator=trainer.accelerator,
        )
    if args.cross_tokenizer is not None:  # refuses a cache, the fused loss and feature matching itself
        return CrossTokenizerKD(
            args,
            task,
            trainer.model,
            trainer.teacher_model,
            trainer.processing_class,
            trainer._teacher_tokenizer,
        )
    if trainer.teacher_model is None:
        own_task_loss = trainer.compute_loss_func is None and args.label_smoothing_factor == 0
        return CachedTopKKD(args, task, share_cross_entropy=own_task_loss)
    if fused:
        return FusedLMHeadKD(args, pairing, trainer.teacher_model, trainer.accelerator)
    if task.kind == QUESTION_ANSWERING:
        return SpanKD(args)
    return LogitsKD(args, task, pairing)
