"""The KD sources of a causal-LM teacher that tokenizes text its own way.

`CrossTokenizerKD`, a live teacher: the batch carries the teacher's tokenization of the same text and the aligned
position pairs (`cross_tokenizer.CrossTokenizerCollator`); the teacher runs on its own ids (`teacher_inputs`), and
the KD term compares the two next-token distributions at the aligned positions only: those where both models have
read exactly the same characters, whitespace included, and their next tokens cover the same characters
(`cross_tokenizer.prediction_pairs`), with `losses.cross_tokenizer_distillation_loss` (exact divergence over the
shared tokens, ULD, or both).

`CachedCrossTokenizerKD`, no teacher in memory: the batch carries the teacher's cached top k at the aligned
positions (`logit_cache_cross.CachedCrossTokenizerCollator`), and the KD term is
`losses.cached_cross_tokenizer_distillation_loss`, with the same alignment and vocabulary map.

The student's cross-entropy covers all of its own tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from hf_distill.alignment.collator import (
    ALIGNED_COLUMN,
    TEACHER_ATTENTION_MASK,
    TEACHER_INPUT_IDS,
    check_alignable,
)
from hf_distill.alignment.vocabulary import vocabulary_map
from hf_distill.args import DistillationTrainingArguments
from hf_distill.caches.cross_tokenizer import verify_cross_tokenizer_manifest
from hf_distill.caches.format import INDICES_COLUMN, LOGPROBS_COLUMN, MAPPED_TAIL_COLUMN, UNMAPPED_TAIL_COLUMN
from hf_distill.losses import cross_tokenizer_distillation_loss
from hf_distill.losses.cross_tokenizer_cached import cached_cross_tokenizer_distillation_loss
from hf_distill.sources.base import StudentStep, head_loss_sum, logits_of
from hf_distill.training.task_loss import CAUSAL_LM, TaskKind
from hf_distill.training.teacher import unwrap_model

Sum = tuple[torch.Tensor, torch.Tensor]


def check_cross_tokenizer_options(args: DistillationTrainingArguments, task: TaskKind) -> None:
    """What cross-tokenizer KD cannot combine with, refused when the trainer is built."""
    if task.kind != CAUSAL_LM:
        raise ValueError(
            f"cross_tokenizer={args.cross_tokenizer!r} aligns next-token predictions of two causal LMs; the student "
            f"is a {task.kind} model. Unset cross_tokenizer."
        )
    conflicts = {
        "fused_kd_loss": args.fused_kd_loss,
        "hidden_weight": args.hidden_weight > 0,
        "attention_weight": args.attention_weight > 0,
        "lmbda": args.lmbda > 0,
    }
    found = [name for name, on in conflicts.items() if on]
    if found:
        raise ValueError(
            f"cross_tokenizer={args.cross_tokenizer!r} cannot be combined with {', '.join(found)}: the fused loss "
            "and hidden/attention matching compare positions one to one, and on-policy samples are not "
            "re-tokenized for the teacher. Drop them."
        )


def _vocab_rows(model: Any) -> int | None:
    config = getattr(unwrap_model(model), "config", None)
    return None if config is None else getattr(config.get_text_config(), "vocab_size", None)


class CrossTokenizerKD:
    """KD between a student and a teacher with different tokenizers, at the aligned positions of each batch.

    Args:
        args: `cross_tokenizer` (exact | uld | hybrid), `uld_weight`, `kd_loss`, `temperature`, `jsd_beta`,
            `kd_chunk_size`.
        student, teacher: the models (their vocabulary rows bound the map's ids).
        tokenizer, teacher_tokenizer: fast tokenizers with offsets; the vocabulary map is built from them here.
    """

    needs_teacher = True

    def __init__(
        self,
        args: DistillationTrainingArguments,
        task: TaskKind,
        student: Any,
        teacher: Any,
        tokenizer: Any,
        teacher_tokenizer: Any,
    ):
        check_cross_tokenizer_options(args, task)
        check_alignable(tokenizer, teacher_tokenizer)
        self.args, self.task = args, task
        for role, model, tok in (("student", student, tokenizer), ("teacher", teacher, teacher_tokenizer)):
            rows = _vocab_rows(model)
            if rows is not None and rows < len(tok):
                raise ValueError(
                    f"the {role} has {rows} vocabulary rows but its tokenizer {len(tok)} tokens: they do not belong "
                    f"together; pass the {role}'s own tokenizer."
                )
        self.student_ids, self.teacher_ids = vocabulary_map(tokenizer, teacher_tokenizer)
        if args.cross_tokenizer != "uld" and self.student_ids.numel() == 0:
            raise ValueError(
                f"cross_tokenizer={args.cross_tokenizer!r} needs tokens shared by the two vocabularies, and the "
                "tokenizers share none after normalising their conventions; use cross_tokenizer='uld'."
            )

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    def teacher_inputs(self, model_inputs: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
        """The teacher's forward reads its own tokenization of the batch's text."""
        if TEACHER_INPUT_IDS not in inputs or ALIGNED_COLUMN not in inputs:
            raise ValueError(
                "cross-tokenizer KD needs batches with the teacher's tokenization and the aligned positions "
                f"({TEACHER_INPUT_IDS}, {ALIGNED_COLUMN}); use hf_distill.cross_tokenizer.CrossTokenizerCollator "
                f"as the data collator (it reads a 'text' column). Found: {sorted(inputs)}."
            )
        return {"input_ids": inputs[TEACHER_INPUT_IDS], "attention_mask": inputs.get(TEACHER_ATTENTION_MASK)}

    def kd_sum(self, step: StudentStep) -> Sum:
        args = self.args
        student_logits = step.positions  # (B, T_s, V_s); position t predicts token t + 1
        teacher_logits = logits_of(step.teacher_outputs)  # (B, T_t, V_t)
        aligned = step.inputs[ALIGNED_COLUMN].to(student_logits.device)  # (B, T_s), -1 = no teacher position
        counts = aligned.ge(0)
        if step.mask is not None:
            counts = counts & step.mask
        batch_index, student_position = counts.nonzero(as_tuple=True)
        teacher_position = aligned[batch_index, student_position]
        total = cross_tokenizer_distillation_loss(
            student_logits,
            teacher_logits,
            batch_index * student_logits.shape[1] + student_position,
            batch_index * teacher_logits.shape[1] + teacher_position,
            student_ids=self.student_ids,
            teacher_ids=self.teacher_ids,
            mode=args.cross_tokenizer,
            kind=args.kd_loss,
            temperature=args.temperature,
            beta=args.jsd_beta,
            uld_weight=args.uld_weight,
            chunk_size=args.kd_chunk_size,
            reduction="sum",
        )
        return total, counts.sum()

    def task_sum(self, step: StudentStep, label_smoothing: float) -> Sum:
        return head_loss_sum(self.task, step, label_smoothing)


class CachedCrossTokenizerKD:
    """KD between a student and a teacher with another tokenizer, known through a cross-tokenizer teacher logits
    cache (`hf_distill.caches.cross_tokenizer`): at the aligned positions the cache holds, against the teacher's cached
    top k (`losses.cached_cross_tokenizer_distillation_loss`).

    Args: as `CrossTokenizerKD`, without the teacher; `manifest`: the cache's, checked here against both
    tokenizers (the alignment and the vocabulary map are only valid for the tokenizers the cache was built with).
    """

    needs_teacher = False

    def __init__(
        self,
        args: DistillationTrainingArguments,
        task: TaskKind,
        student: Any,
        tokenizer: Any,
        teacher_tokenizer: Any,
        manifest: dict[str, Any],
    ):
        check_cross_tokenizer_options(args, task)
        if args.kd_loss == "mse" and args.cross_tokenizer != "uld":
            raise ValueError(
                f"kd_loss='mse' compares logits, and a teacher logits cache holds log-probabilities; with "
                f"cross_tokenizer={args.cross_tokenizer!r} and a cache use forward_kl, reverse_kl or jsd."
            )
        check_alignable(tokenizer, teacher_tokenizer)
        verify_cross_tokenizer_manifest(
            manifest,
            tokenizer=tokenizer,
            teacher_tokenizer=teacher_tokenizer,
            cache_dir=args.teacher_logits_cache,
        )
        rows = _vocab_rows(student)
        if rows is not None and rows < len(tokenizer):
            raise ValueError(
                f"the student has {rows} vocabulary rows but its tokenizer {len(tokenizer)} tokens: they do not "
                "belong together; pass the student's own tokenizer."
            )
        self.args, self.task = args, task
        self.teacher_vocab_size = int(manifest["cached_vocab_size"])
        self.student_ids, self.teacher_ids = vocabulary_map(tokenizer, teacher_tokenizer)
        if args.cross_tokenizer != "uld" and self.student_ids.numel() == 0:
            raise ValueError(
                f"cross_tokenizer={args.cross_tokenizer!r} needs tokens shared by the two vocabularies, and the "
                "tokenizers share none after normalising their conventions; use cross_tokenizer='uld'."
            )

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    def kd_sum(self, step: StudentStep) -> Sum:
        args, inputs = self.args, step.inputs
        needed = (ALIGNED_COLUMN, LOGPROBS_COLUMN, INDICES_COLUMN, MAPPED_TAIL_COLUMN, UNMAPPED_TAIL_COLUMN)
        if any(name not in inputs for name in needed):
            raise ValueError(
                f"cached cross-tokenizer KD needs batches with the cached columns {list(needed)}; load the cache "
                "with hf_distill.caches.cross_tokenizer.load_cross_tokenizer_cache and batch it with "
                f"CachedCrossTokenizerCollator. Found: {sorted(inputs)}."
            )
        student_logits = step.positions  # (B, T_s, V_s); position t predicts token t + 1
        aligned = inputs[ALIGNED_COLUMN].to(student_logits.device)  # (B, T_s), -1 = nothing cached
        counts = aligned.ge(0)
        if step.mask is not None:
            counts = counts & step.mask
        batch_index, position = counts.nonzero(as_tuple=True)
        total = cached_cross_tokenizer_distillation_loss(
            student_logits,
            batch_index * student_logits.shape[1] + position,
            inputs[LOGPROBS_COLUMN][batch_index, position],
            inputs[INDICES_COLUMN][batch_index, position],
            inputs[MAPPED_TAIL_COLUMN][batch_index, position],
            inputs[UNMAPPED_TAIL_COLUMN][batch_index, position],
            teacher_vocab_size=self.teacher_vocab_size,
            student_ids=self.student_ids,
            teacher_ids=self.teacher_ids,
            mode=args.cross_tokenizer,
            kind=args.kd_loss if args.kd_loss != "mse" else "forward_kl",  # uld ignores the kind
            temperature=args.temperature,
            beta=args.jsd_beta,
            uld_weight=args.uld_weight,
            chunk_size=args.kd_chunk_size,
            reduction="sum",
        )
        return total, counts.sum()

    def task_sum(self, step: StudentStep, label_smoothing: float) -> Sum:
        return head_loss_sum(self.task, step, label_smoothing)
