"""hf_distill: knowledge distillation for Hugging Face transformers.

The public names below are imported when first used, so `import hf_distill` (and the `hf-distill` command's help)
does not load torch and transformers. The subpackages are the parts of the library:

    trainer.py, args.py  DistillationTrainer (+ Seq2Seq) and DistillationTrainingArguments: what users import
    mutual.py            MutualLearningTrainer (Deep Mutual Learning: peers teach each other)
    incremental.py       IncrementalTrainer (new classes without forgetting the old: LwF, exemplars)
    heads.py             grow_classifier: a classifier's head widened by new classes, old rows kept
    multitask/           MultiTaskModel (one encoder, a head per task) and the rules that mix the tasks' batches
    multitask_trainer.py MultiTaskDistillationTrainer: each task taught by its own teacher
    students.py          create_student: a smaller model of the teacher's class from some of its layers
    training/            what a step needs: the teacher's handling, pairing, task losses, matching, accumulation
    sources/             where the KD signal comes from: live logits, fused LM head, caches, several teachers
    losses/              pure loss functions: tensors in, a float32 scalar out
    caches/              teacher-logit caches: format, manifests, one teacher, mixtures, cross-tokenizer
    alignment/           cross-tokenizer positions, vocabulary maps, the collator
    compression/         pruning, INT8 quantization and QAT, deployed runtimes, the compression recipe and report
    reporting/           the distillation report, latency, the machine, model cards
    storage/             atomic writes and fingerprints
    cli.py               the `hf-distill` command; the recipes are hf_distill.tasks and hf_distill.scripts
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hf_distill._moved import install as _install_moved_paths
from hf_distill.version import __version__

_install_moved_paths()  # old module paths (hf_distill.quantization, ...) keep working

_PUBLIC = {
    "CrossTokenizerCollator": "hf_distill.alignment.collator",
    "DistillationTrainer": "hf_distill.trainer",
    "DistillationTask": "hf_distill.multitask_trainer",
    "DistillationTrainingArguments": "hf_distill.args",
    "IncrementalTrainer": "hf_distill.incremental",
    "MultiTaskDistillationTrainer": "hf_distill.multitask_trainer",
    "MultiTaskModel": "hf_distill.multitask.model",
    "MutualLearningTrainer": "hf_distill.mutual",
    "Seq2SeqDistillationTrainer": "hf_distill.trainer",
    "Seq2SeqDistillationTrainingArguments": "hf_distill.args",
    "TaskHead": "hf_distill.multitask.model",
    "create_student": "hf_distill.students",
    "grow_classifier": "hf_distill.heads",
}

__all__ = [
    "CrossTokenizerCollator",
    "DistillationTrainer",
    "DistillationTask",
    "DistillationTrainingArguments",
    "IncrementalTrainer",
    "MultiTaskDistillationTrainer",
    "MultiTaskModel",
    "MutualLearningTrainer",
    "Seq2SeqDistillationTrainer",
    "Seq2SeqDistillationTrainingArguments",
    "TaskHead",
    "__version__",
    "create_student",
    "grow_classifier",
]

if TYPE_CHECKING:
    from hf_distill.alignment.collator import CrossTokenizerCollator
    from hf_distill.args import DistillationTrainingArguments, Seq2SeqDistillationTrainingArguments
    from hf_distill.heads import grow_classifier
    from hf_distill.incremental import IncrementalTrainer
    from hf_distill.multitask.model import MultiTaskModel, TaskHead
    from hf_distill.multitask_trainer import DistillationTask, MultiTaskDistillationTrainer
    from hf_distill.mutual import MutualLearningTrainer
    from hf_distill.students import create_student
    from hf_distill.trainer import DistillationTrainer, Seq2SeqDistillationTrainer


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_distill' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
