"""Several tasks in one student: one shared encoder with a head per task, and the rule that mixes the tasks' batches.

- model.py     TaskHead (what a head predicts: classes or a sentence embedding, and its pooling) and MultiTaskModel
               (the encoder and its named heads; saved as one folder that loads back, a per-task view that is an
               ordinary sequence classifier for the trainers and evaluators of one task)
- sampling.py  the sampling rules (proportional, temperature-scaled, round-robin), the batch sampler that makes
               one-task batches by them, and the dataset that puts the tasks' rows side by side

The trainer that distils every task from its own teacher is `hf_distill.multitask_trainer`. May import storage/ and
losses/ (nothing here trains); torch, transformers and safetensors.
"""

from __future__ import annotations

from hf_distill.multitask.model import TASK_KINDS, MultiTaskModel, MultiTaskOutput, TaskHead, TaskModel
from hf_distill.multitask.sampling import (
    SAMPLING_RULES,
    MultiTaskDataset,
    TaskBatchSampler,
    task_probabilities,
)

__all__ = [
    "SAMPLING_RULES",
    "TASK_KINDS",
    "MultiTaskDataset",
    "MultiTaskModel",
    "MultiTaskOutput",
    "TaskBatchSampler",
    "TaskHead",
    "TaskModel",
    "task_probabilities",
]
