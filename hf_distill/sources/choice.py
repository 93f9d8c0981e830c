"""Which KD source a configuration gets, decided once when `DistillationTrainer` is built (see `kd_sources.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hf_distill.args import SENTENCE_EMBEDDING
from hf_distill.caches.format import is_mixture, read_manifest
from hf_distill.caches.mixture import check_cached_target
from hf_distill.sources.base import KDSource
from hf_distill.sources.cached import CachedTopKKD
from hf_distill.sources.cross_tokenizer import CachedCrossTokenizerKD, CrossTokenizerKD
from hf_distill.sources.embeddings import EmbeddingKD
from hf_distill.sources.ensemble import TeacherSet, build_ensemble_source, check_ensemble_options
from hf_distill.sources.logits import FusedLMHeadKD, LogitsKD, SpanKD
from hf_distill.training.task_loss import QUESTION_ANSWERING
from hf_distill.training.teacher import unwrap_model


def choose_kd_source(
    trainer: Any, fused: bool, teachers: TeacherSet | None, teacher_tokenizers: Any
) -> KDSource:
    """In order: sentence embedders (a live teacher's pooled embeddings), several teachers (their mixture), a
    teacher with another tokenizer (aligned positions; live, or from a cross-tokenizer cache), no teacher in memory
    (the cache: one teacher's or several teachers' mixture), the fused LM head, extractive QA's spans, else the
    teacher's logits."""
    args, task, pairing = trainer.args, trainer._task, trainer._pairing
    if task.kind == SENTENCE_EMBEDDING:
        return EmbeddingKD.build(trainer, fused, several_teachers=teachers is not None)
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
    cache = args.teacher_logits_cache
    if args.cross_tokenizer is not None:  # refuses the fused loss and feature matching itself
        if cache is None:
            return CrossTokenizerKD(
                args,
                task,
                trainer.model,
                trainer.teacher_model,
                trainer.processing_class,
                trainer._teacher_tokenizer,
            )
        if trainer.teacher_model is not None:
            raise ValueError(
                f"cross_tokenizer={args.cross_tokenizer!r} was given both a teacher model and teacher_logits_cache: "
                "train from the cache with teacher_model=None (pass the teacher's tokenizer as "
                "teacher_processing_class), or drop teacher_logits_cache."
            )
        manifest = read_manifest(cache)
        check_cached_target(manifest, args, cache)
        return CachedCrossTokenizerKD(
            args, task, trainer.model, trainer.processing_class, trainer._teacher_tokenizer, manifest
        )
    if trainer.teacher_model is None:
        # Without a cache directory (columns built by hand) the columns hold one teacher at temperature 1.
        manifest = read_manifest(cache) if cache is not None and Path(cache).is_dir() else None
        if manifest is not None:
            if manifest.get("cross_tokenizer"):
                raise ValueError(
                    f"teacher_logits_cache {cache!r} is a cross-tokenizer cache (the teacher's top k at positions "
                    "aligned with its own tokenizer); train from it with cross_tokenizer='exact', 'uld' or 'hybrid'."
                )
            check_cached_target(manifest, args, cache)
        own_task_loss = trainer.compute_loss_func is None and args.label_smoothing_factor == 0
        return CachedTopKKD(
            args, task, share_cross_entropy=own_task_loss, target_at_temperature=is_mixture(manifest)
        )
    if fused:
        return FusedLMHeadKD(args, pairing, trainer.teacher_model, trainer.accelerator)
    if task.kind == QUESTION_ANSWERING:
        return SpanKD(args)
    return LogitsKD(args, task, pairing)
