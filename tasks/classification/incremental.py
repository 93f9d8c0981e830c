"""Adding classes to a trained classifier (`scripts/distill_glue.py --previous_model_name_or_path`): Learning without
Forgetting, with an optional exemplar memory (`hf_distill.incremental.IncrementalTrainer`).

The previous model is the teacher on its own classes and, grown (`hf_distill.heads.grow_classifier`: old rows kept,
new rows after them), the student's initialisation. The training file holds rows of the new classes (and may hold
rows of old ones); `--exemplar_file` adds a memory of old-class rows (`--exemplars_per_class` of each, drawn with
--seed). The validation and test files may hold every class. `--alpha 0` is plain fine-tuning of the grown model.

Everything is checked before a model is trained: a previous model without label names, a new class that reuses an old
class's name, labels in any file that are neither old nor new, exemplar rows of classes the previous model lacks.

Evaluation adds `accuracy_old_classes` and `accuracy_new_classes` (accuracy over the rows whose true class is old,
resp. new, argmax over every class) and their task-aware forms `accuracy_old_classes_task_aware` and
`accuracy_new_classes_task_aware` (argmax over the old classes alone for old rows, over the new ones for new rows: the
protocol of the LwF paper, where the model is told which group a row belongs to) to the usual metrics.
`incremental.json` in --output_dir records the old and new classes, the rows trained on and any weight-aligning
factor (`--weight_aligning`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from datasets import DatasetDict, concatenate_datasets, load_dataset
from transformers import AutoConfig, AutoModelForSequenceClassification, EvalPrediction, set_seed
from transformers.utils import logging

from hf_distill import DistillationTrainingArguments
from hf_distill.heads import check_new_labels, grow_classifier, label_names
from hf_distill.incremental import IncrementalTrainer, select_exemplars
from hf_distill.tasks.classification.data import (
    DataArguments,
    check_splits,
    data_collator,
    load_raw_datasets,
    resolve_task,
    tokenize_datasets,
)
from hf_distill.tasks.classification.metrics import make_compute_metrics
from hf_distill.tasks.classification.models import load_tokenizer
from hf_distill.tasks.classification.recipe import train_evaluate_predict
from hf_distill.tasks.classification.spec import FILE_SUFFIXES, TaskSpec
from hf_distill.tasks.common.loading import freeze_input_embeddings, load_pretrained
from hf_distill.tasks.common.raw_data import FILE_BUILDERS
from hf_distill.tasks.common.running import resume_checkpoint

logger = logging.get_logger(__name__)

INCREMENTAL_FILE = "incremental.json"


@dataclass
class IncrementalArguments:
    """Adding classes to a trained classifier (--previous_model_name_or_path): the new classes, an exemplar memory."""

    new_labels: list[str] = field(
        default_factory=list,
        metadata={
            "help": "The classes to add, in this order after the previous model's (`politics entertainment`). "
            "Default: the training data's labels that the previous model lacks, sorted."
        },
    )
    exemplar_file: str | None = field(
        default=None,
        metadata={
            "help": "Rows of the old classes kept from their training data (the columns of --train_file), trained on "
            "with their labels beside the new classes: the exemplar memory of iCaRL-style methods."
        },
    )
    weight_aligning: bool = field(
        default=False,
        metadata={
            "help": "When training ends, scale the new classes' head rows to the old rows' mean norm (weight "
            "aligning, Zhao et al. 2020): the argmax over all classes then leans less towards the new ones."
        },
    )
    task_aware_loss: bool = field(
        default=False,
        metadata={
            "help": "Take each row's cross-entropy over its own group of classes (new rows over the new classes, "
            "exemplars over the old): LwF's one-head-per-task setting, for task-aware prediction (the metrics' "
            "accuracy_*_classes_task_aware); the argmax over all classes is then not calibrated between groups."
        },
    )
    exemplars_per_class: int | None = field(
        default=None,
        metadata={
            "help": "Draw at most this many rows of each old class from --exemplar_file, at random with --seed "
            "(default: every row of the file)."
        },
    )

    def __post_init__(self):
        if isinstance(self.new_labels, str):  # one label from a YAML/JSON file or Python
            self.new_labels = [self.new_labels]
        if self.exemplars_per_class is not None and self.exemplars_per_class < 1:
            raise ValueError(
                f"exemplars_per_class must be >= 1, got {self.exemplars_per_class}; drop --exemplar_file to train "
                "without a memory."
            )
        if self.exemplars_per_class is not None and self.exemplar_file is None:
            raise ValueError("--exemplars_per_class draws rows from --exemplar_file: pass the file too.")

    @property
    def is_set(self) -> bool:
        return (
            bool(self.new_labels)
            or self.exemplar_file is not None
            or self.weight_aligning
            or self.task_aware_loss
        )


def check_flags(
    model_args: Any,
    data_args: DataArguments,
    incremental_args: IncrementalArguments,
    training_args: DistillationTrainingArguments,
    *,
    transfer_args: Any,
    report_args: Any,
    qat_args: Any,
) -> None:
    """Flags that cannot go with --previous_model_name_or_path (or that need it) fail here, before anything loads:
    those of the script's other modes (transfer sets and augmentation, QAT, --compare_no_kd, --teacher_weights)."""
    others = {
        "--transfer_file": transfer_args.transfer_file is not None,
        "--transfer_split": transfer_args.transfer_split is not None,
        "--use_unlabelled_rows": transfer_args.use_unlabelled_rows,
        "--augment_copies": transfer_args.augment_copies > 0,
        "--compare_no_kd": report_args.compare_no_kd,
        "--quantization_aware_training": qat_args.quantization_aware_training,
    }
    if model_args.previous_model_name_or_path is None:
        if incremental_args.is_set:
            raise ValueError(
                "--new_labels / --exemplar_file / --weight_aligning / --task_aware_loss add classes to a trained "
                "classifier: pass it as --previous_model_name_or_path."
            )
        return
    if data_args.task_name is not None:
        raise ValueError(
            f"--task_name {data_args.task_name} has a fixed label set; adding classes needs local files: pass "
            "--train_file (rows of the new classes) and --validation_file."
        )
    conflicts = [flag for flag, is_set in others.items() if is_set]
    if training_args.teacher_weights is not None:
        conflicts.append("--teacher_weights")
    if conflicts:
        raise ValueError(
            f"--previous_model_name_or_path adds classes with Learning without Forgetting; {', '.join(conflicts)} "
            "belong to other modes of this script: drop them."
        )


def read_table(path: str, flag: str) -> Any:
    """A local .csv/.tsv/.json/.jsonl/.parquet file as one dataset; raises when it is missing or of another kind."""
    suffix = Path(path).suffix.lower()
    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag} {path!r} does not exist.")
    if suffix not in FILE_SUFFIXES:
        raise ValueError(f"{flag} {path!r}: unknown format {suffix!r}; use one of {list(FILE_SUFFIXES)}.")
    options = {"delimiter": "\t"} if suffix == ".tsv" else {}
    return load_dataset(FILE_BUILDERS[suffix], data_files={"train": path}, split="train", **options)


def _labels_in(dataset: Any, column: str) -> list[str]:
    return sorted({str(value) for value in dataset.unique(column) if value is not None})


def _check_known(split: str, found: list[str], known: list[str], what: str) -> None:
    unknown = [label for label in found if label not in known]
    if unknown:
        raise ValueError(
            f"the {split} data has labels {unknown} that are {what} {known}; fix the file, or name them in "
            "--new_labels to add them as new classes."
        )


def _with_exemplars(
    raw: DatasetDict, old: list[str], args: IncrementalArguments, label_column: str, seed: int
):
    """The training split with the exemplar rows appended, and how many were added."""
    if args.exemplar_file is None:
        return raw["train"], 0
    memory = read_table(args.exemplar_file, "--exemplar_file")
    if len(memory) == 0:
        raise ValueError(f"--exemplar_file {args.exemplar_file!r} holds no rows.")
    missing = [column for column in raw["train"].column_names if column not in memory.column_names]
    if missing:
        raise ValueError(
            f"--exemplar_file lacks the training file's columns {missing} (it has {memory.column_names}): give it "
            "the columns of --train_file."
        )
    _check_known("exemplar", _labels_in(memory, label_column), old, "not old classes of the previous model")
    memory = memory.select_columns(raw["train"].column_names).cast(raw["train"].features)
    if args.exemplars_per_class is not None:
        rows = select_exemplars([str(v) for v in memory[label_column]], args.exemplars_per_class, seed=seed)
        memory = memory.select(rows)
    return concatenate_datasets([raw["train"], memory]), len(memory)


def _old_new_metrics(spec: TaskSpec, old_count: int):
    """compute_metrics: the task's metrics plus the accuracy over the rows of old and of new classes."""
    base = make_compute_metrics(spec)

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        metrics = base(prediction)
        logits = (
            prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        )
        predicted, references = np.argmax(logits, axis=-1), np.asarray(prediction.label_ids)
        # task-aware: argmax within the row's own group of classes (only when the model has both groups)
        groups = (
            {"old": slice(0, old_count), "new": slice(old_count, None)}
            if logits.shape[-1] > old_count
            else {}
        )
        for name, rows in (("old", references < old_count), ("new", references >= old_count)):
            if rows.any():
                metrics[f"accuracy_{name}_classes"] = float((predicted[rows] == references[rows]).mean())
                if name in groups:
                    group = groups[name]
                    within = (group.start or 0) + np.argmax(logits[rows][..., group], axis=-1)
                    metrics[f"accuracy_{name}_classes_task_aware"] = float(
                        (within == references[rows]).mean()
                    )
        return metrics

    return compute_metrics


def run(
    model_args: Any,
    data_args: DataArguments,
    incremental_args: IncrementalArguments,
    training_args: DistillationTrainingArguments,
) -> dict[str, Any]:
    """Load and check everything, grow the previous model's head, train with LwF, evaluate and predict."""
    previous_path = model_args.previous_model_name_or_path
    previous_config = load_pretrained(
        AutoConfig, previous_path, role="previous model", loading_args=model_args
    )
    old = label_names(previous_config, "previous model")
    raw = load_raw_datasets(data_args, model_args)
    if "train" not in raw and training_args.do_train:
        raise ValueError("--do_train needs --train_file: rows of the classes to add.")
    spec = resolve_task(DatasetDict({"train": raw["train"]}) if "train" in raw else raw, data_args)
    if spec.is_regression:
        raise ValueError(
            "--previous_model_name_or_path adds classes; the label column holds numbers (regression)."
        )
    column = spec.label_column
    trained = _labels_in(raw["train"], column) if "train" in raw else []
    new = incremental_args.new_labels or sorted(label for label in trained if label not in old)
    new = check_new_labels(old, new)
    known = [*old, *new]
    for split, dataset in raw.items():
        if column in dataset.column_names:
            _check_known(split, _labels_in(dataset, column), known, "neither old nor new classes")
    eval_splits = tuple(s for s in ("validation",) if s in raw)
    predict_splits = tuple(s for s in ("test",) if s in raw)
    spec = replace(
        spec, label_values=known, label_names=known, eval_splits=eval_splits, predict_splits=predict_splits
    )
    check_splits(spec, raw, training_args.do_train, training_args.do_eval, training_args.do_predict)
    exemplars = 0
    if "train" in raw:
        raw["train"], exemplars = _with_exemplars(raw, old, incremental_args, column, training_args.seed)

    tokenizer = load_tokenizer(previous_path, model_args)
    previous_config.problem_type = "single_label_classification"
    previous, info = load_pretrained(
        AutoModelForSequenceClassification,
        previous_path,
        role="previous model",
        loading_args=model_args,
        config=previous_config,
        output_loading_info=True,
    )
    if info.get("missing_keys"):
        raise ValueError(
            f"the previous model {previous_path!r} has no trained weights for {sorted(info['missing_keys'])}: pass "
            "a classifier trained on the old classes (scripts/train_teacher.py)."
        )
    set_seed(training_args.seed)
    student = grow_classifier(previous, new, seed=training_args.seed)
    if model_args.freeze_embeddings:
        freeze_input_embeddings(student)
    label_to_id = {label: index for index, label in enumerate(known)}
    with training_args.main_process_first(desc="tokenizing"):
        tokenized = tokenize_datasets(raw, spec, tokenizer, label_to_id, data_args)
    trainer = IncrementalTrainer(
        student,
        previous,
        training_args,
        train_dataset=tokenized["train"] if training_args.do_train else None,
        eval_dataset=tokenized[eval_splits[0]] if eval_splits else None,
        processing_class=tokenizer,
        data_collator=data_collator(tokenizer, data_args, fp16=training_args.fp16),
        compute_metrics=_old_new_metrics(spec, len(old)),
        weight_aligning=incremental_args.weight_aligning,
        task_aware_loss=incremental_args.task_aware_loss,
    )
    summary = {
        "previous_model": previous_path,
        "old_classes": old,
        "new_classes": new,
        "training_rows": len(raw["train"]) if "train" in raw else 0,
        "exemplar_rows": exemplars,
        "alpha": training_args.alpha,
        "temperature": training_args.temperature,
        "weight_aligning": incremental_args.weight_aligning,
        "task_aware_loss": incremental_args.task_aware_loss,
    }
    logger.info(f"Adding classes {new} to {old}; {exemplars} exemplar rows of old classes")
    results: dict[str, Any] = train_evaluate_predict(
        trainer, tokenized, spec, training_args, resume_from_checkpoint=resume_checkpoint(training_args)
    )
    if trainer.weight_aligning_factor is not None:
        summary["weight_aligning_factor"] = trainer.weight_aligning_factor
    if trainer.is_world_process_zero():
        from hf_distill.storage.atomic import atomic_write_text

        atomic_write_text(
            os.path.join(training_args.output_dir, INCREMENTAL_FILE), json.dumps(summary, indent=2) + "\n"
        )
    results["incremental"] = summary
    return results
