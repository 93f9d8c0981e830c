"""The text-classification recipe (scripts/distill_glue.py, train_teacher.py, compress.py's data) as one namespace,
`classification.<name>`, gathered from its modules:

- spec.py          what a task is (TaskSpec: columns, labels, metrics) and the GLUE tasks
- data.py          the data flags, loading GLUE or local files, resolving the task, tokenizing, the split checks
- models.py        the model flags, loading teacher(s) and student, label alignment by name, peers
- metrics.py       metrics from predictions, prediction files
- recipe.py        the flow: train, evaluate, predict; the report flags
- transfer.py      transfer sets (unlabelled rows) and their KD-only training
- augmentation.py  embedding-neighbour and masked-LM augmentation of the transfer set
- mutual.py        the --mutual_learning flow
- quantization_aware.py  --quantization_aware_training

May import tasks/common and hf_distill; nothing of the other tasks.
"""

from __future__ import annotations

from hf_distill.tasks.classification.data import (
    DataArguments,
    check_splits,
    data_collator,
    load_raw_datasets,
    resolve_task,
    tokenize_datasets,
)
from hf_distill.tasks.classification.metrics import (
    compute_task_metrics,
    make_compute_metrics,
    predict_and_write,
    predictions_from_logits,
    split_suffix,
    write_predictions,
)
from hf_distill.tasks.classification.models import (
    ClassificationModelArguments,
    DistillationModels,
    LabelAlignment,
    Peers,
    align_labels,
    has_named_labels,
    load_distillation_models,
    load_model_for_finetuning,
    load_peers,
    load_tokenizer,
    teacher_paths,
)
from hf_distill.tasks.classification.recipe import ClassificationReportArguments, train_evaluate_predict
from hf_distill.tasks.classification.spec import (
    FILE_CLASSIFICATION_METRICS,
    FILE_REGRESSION_METRICS,
    FILE_SUFFIXES,
    GLUE_DATASET,
    GLUE_TASKS,
    GlueTask,
    TaskSpec,
)

__all__ = [
    "ClassificationModelArguments",
    "ClassificationReportArguments",
    "DataArguments",
    "DistillationModels",
    "FILE_CLASSIFICATION_METRICS",
    "FILE_REGRESSION_METRICS",
    "FILE_SUFFIXES",
    "GLUE_DATASET",
    "GLUE_TASKS",
    "GlueTask",
    "LabelAlignment",
    "Peers",
    "TaskSpec",
    "align_labels",
    "check_splits",
    "compute_task_metrics",
    "data_collator",
    "has_named_labels",
    "load_distillation_models",
    "load_model_for_finetuning",
    "load_peers",
    "load_raw_datasets",
    "load_tokenizer",
    "make_compute_metrics",
    "predict_and_write",
    "predictions_from_logits",
    "resolve_task",
    "split_suffix",
    "teacher_paths",
    "tokenize_datasets",
    "train_evaluate_predict",
    "write_predictions",
]
