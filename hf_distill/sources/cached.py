"""KD from a cache of the teacher's (or several teachers' mixture's) top-k log-probabilities: no teacher in memory
(`scripts/cache_teacher_logits.py` writes the cache, `hf_distill.caches` reads it).
"""

from __future__ import annotations

from typing import Any

from hf_distill.args import DistillationTrainingArguments
from hf_distill.caches.format import INDICES_COLUMN, LOGPROBS_COLUMN, TAIL_COLUMN
from hf_distill.losses import (
    sparse_distillation_and_cross_entropy,
    sparse_distillation_loss,
)
from hf_distill.sources.base import StudentStep, Sum, _count, head_loss_sum
from hf_distill.training.task_loss import (
    TaskKind,
)


class CachedTopKKD:
    """KD against the teacher's cached top-k log-probabilities (and its remaining mass, tempered at the cache's
    temperature, which the trainer checked equals `args.temperature`).

    Cached position t holds the teacher's distribution for token t + 1, like the logits at t. For token-level
    tasks with the built-in cross-entropy, one pass over the logits gives both the KD and the hard loss
    (`sparse_distillation_and_cross_entropy`); `task_sum` then returns what that pass computed.
    `target_at_temperature`: the cache holds several teachers' mixture as log-probabilities at the training
    temperature (`logit_cache.is_mixture`), used as the teacher's buckets as they are. Sequence-level heads read
    one cached row per example (every class).
    """

    needs_teacher = False

    def __init__(
        self,
        args: DistillationTrainingArguments,
        task: TaskKind,
        share_cross_entropy: bool,
        target_at_temperature: bool = False,
    ):
        self.args, self.task = args, task
        self.share_cross_entropy = share_cross_entropy and task.token_level
        self.target_at_temperature = target_at_temperature
        # Without a cache directory (columns built by hand) the tail means what the loss's default says: T = 1.
        self.tail_temperature = args.temperature if args.teacher_logits_cache is not None else 1.0

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    def kd_sum(self, step: StudentStep) -> Sum:
        args, inputs = self.args, step.inputs
        options = dict(
            temperature=args.temperature,
            kind=args.kd_loss,
            beta=args.jsd_beta,
            mask=step.mask,
            reduction="sum",
            teacher_tail_logmass=inputs.get(TAIL_COLUMN),
            tail_temperature=self.tail_temperature,
            teacher_at_temperature=self.target_at_temperature,
        )
        logprobs, indices = inputs[LOGPROBS_COLUMN], inputs[INDICES_COLUMN].long()
        logits = step.positions
        if self.share_cross_entropy and step.labels is not None:
            total, ce_sum = sparse_distillation_and_cross_entropy(
                logits, logprobs, indices, step.labels, **options
            )
            step.shared_task_sum = (ce_sum, step.labels.ne(-100).sum())
        else:
            total = sparse_distillation_loss(logits, logprobs, indices, **options)
        return total, _count(step, logits)

    def task_sum(self, step: StudentStep, label_smoothing: float) -> Sum:
        if step.shared_task_sum is not None and label_smoothing == 0:
            return step.shared_task_sum
        return head_loss_sum(self.task, step, label_smoothing)
