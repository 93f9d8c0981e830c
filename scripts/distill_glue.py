#!/usr/bin/env python
"""Distil a fine-tuned sequence-classification teacher into a smaller student, on GLUE or local files.

    python scripts/distill_glue.py \
        --teacher_model_name_or_path outputs/teacher --student_num_layers 2 \
        --train_file train.csv --validation_file dev.csv --do_train --do_eval \
        --temperature 2 --alpha 0.5 --output_dir outputs/student
    python scripts/distill_glue.py run.yaml          # the same flags, from one YAML or JSON file
    accelerate launch scripts/distill_glue.py run.yaml

Flags: the model flags of tasks/common.py (ModelArguments; --teacher_model_name_or_path takes one teacher or
several, `a b c`, mixed with --teacher_weights), the data flags of tasks/classification.py
(DataArguments, as in transformers' run_glue.py), the unlabelled-data flags of tasks/transfer.py (--transfer_file,
--augment_copies, ...), the report flags (ClassificationReportArguments, e.g. --compare_no_kd) and every
DistillationTrainingArguments flag (all of TrainingArguments plus --temperature, --alpha, --kd_loss,
--hidden_weight, --teacher_weights, ...).

Writes into --output_dir: the student with its tokenizer and model card, train/eval/all_results.json,
trainer_state.json, and, after a run with evaluation, distill_report.{json,md,png} comparing teacher and
student (quality retained, size, latency and speed-up at batch 1 and 32).
"""

from __future__ import annotations

import copy
import os
from typing import Any

from transformers import Trainer, set_seed
from transformers.utils import logging

from hf_distill import DistillationTrainer, DistillationTrainingArguments
from hf_distill.tasks import augmentation, classification, common, transfer

logger = logging.get_logger("distill_glue")

ARGUMENT_TYPES = (
    classification.ClassificationModelArguments,
    classification.DataArguments,
    transfer.TransferArguments,
    classification.ClassificationReportArguments,
    DistillationTrainingArguments,
)


def _train_without_teacher(
    baseline, training_args, tokenized, collator, tokenizer, compute_metrics
) -> Trainer:
    """Train `baseline` (the student's initialisation) on the task labels alone, in <output_dir>/no_kd."""
    baseline_args = copy.deepcopy(training_args)
    baseline_args.output_dir = os.path.join(training_args.output_dir, "no_kd")
    set_seed(training_args.seed)
    trainer = Trainer(
        model=baseline,
        args=baseline_args,
        train_dataset=tokenized["train"],
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=compute_metrics,
    )
    logger.info("Training the no-KD baseline: the same student initialisation on the task labels only")
    train_result = trainer.train(resume_from_checkpoint=common.resume_checkpoint(baseline_args))
    trainer.save_model()
    common.save_metrics(trainer, "train", train_result.metrics)
    return trainer


def _augmented(raw_train, spec, models, transfer_args, data_args, training_args, tokenize):
    """The augmented copies of the training texts (tasks/augmentation.py), tokenized and labelled -100."""
    from datasets import load_dataset

    directory = transfer_args.augment_dir or os.path.join(training_args.output_dir, "augmented")
    rows = raw_train.select_columns(list(spec.text_columns))
    if data_args.max_train_samples is not None:
        rows = rows.select(range(min(data_args.max_train_samples, len(rows))))
    with training_args.main_process_first(desc="augmenting"):
        path = augmentation.augmented_file(
            list(rows),
            spec.text_columns,
            models.tokenizer,
            models.teacher.get_input_embeddings().weight,
            directory,
            copies=transfer_args.augment_copies,
            replace_prob=transfer_args.augment_replace_prob,
            neighbours=transfer_args.augment_neighbours,
            max_tokens=data_args.max_seq_length,
            seed=training_args.seed,
        )
    texts = load_dataset("json", data_files={"train": str(path)}, split="train")
    return transfer.tokenize_unlabelled(texts, tokenize)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, transfer_args, report_args, training_args = common.parse_args(ARGUMENT_TYPES, argv)
    common.setup_logging(training_args)
    set_seed(training_args.seed)

    # Everything that can be wrong with the flags, the data or the models fails here, before training.
    raw = classification.load_raw_datasets(data_args, model_args)
    spec = classification.resolve_task(raw, data_args)
    classification.check_splits(
        spec, raw, training_args.do_train, training_args.do_eval, training_args.do_predict
    )
    if transfer_args.transfer_file is not None:  # its format and columns fail here, before any model loads
        transfer_texts = transfer.load_transfer_texts(
            transfer_args.transfer_file, spec.text_columns, spec.label_column
        )
    models = classification.load_distillation_models(model_args, spec)
    if training_args.teacher_weights is not None and len(training_args.teacher_weights) != len(
        models.teachers
    ):
        raise ValueError(
            f"--teacher_weights has {len(training_args.teacher_weights)} values for {len(models.teachers)} teacher(s) "
            f"{list(models.teachers)}; give one weight per --teacher_model_name_or_path."
        )

    def tokenize(splits):
        return classification.tokenize_datasets(splits, spec, models.tokenizer, models.label_to_id, data_args)

    with training_args.main_process_first(desc="tokenizing"):
        tokenized = tokenize(raw)
        labelled_train = tokenized["train"] if "train" in tokenized else None
        extra = []
        if training_args.do_train and transfer_args.transfer_file is not None:
            extra.append(transfer.tokenize_unlabelled(transfer_texts, tokenize))
        if training_args.do_train and transfer_args.augment_copies > 0:
            extra.append(
                _augmented(raw["train"], spec, models, transfer_args, data_args, training_args, tokenize)
            )
        if extra:
            tokenized["train"] = transfer.mixed_training_set(labelled_train, extra, training_args.seed)
    collator = classification.data_collator(models.tokenizer, data_args, fp16=training_args.fp16)
    compute_metrics = classification.make_compute_metrics(spec)

    set_seed(training_args.seed)
    student = models.make_student()
    # Built now, before the trainer prepares the teacher (which may change its dtype), so that both students
    # start from exactly the same weights.
    compare_no_kd = report_args.compare_no_kd and training_args.do_train
    baseline = models.make_student() if compare_no_kd else None
    trainer = DistillationTrainer(
        model=student,
        teacher_model=models.teacher_argument,
        args=training_args,
        train_dataset=tokenized["train"] if training_args.do_train else None,
        eval_dataset=tokenized[spec.eval_splits[0]] if spec.eval_splits else None,
        processing_class=models.tokenizer,
        data_collator=collator,
        compute_metrics=compute_metrics,
    )
    results: dict[str, Any] = classification.train_evaluate_predict(
        trainer,
        tokenized,
        spec,
        training_args,
        resume_from_checkpoint=common.resume_checkpoint(training_args),
    )
    if training_args.do_train:
        # The card arguments run_glue.py passes; the trainer keeps them for later save_model calls.
        card = {"tasks": "text-classification", "finetuned_from": model_args.teacher_model_name_or_path[0]}
        if data_args.task_name is not None:
            card.update(
                language="en",
                dataset_tags="glue",
                dataset_args=data_args.task_name,
                dataset=f"GLUE {data_args.task_name.upper()}",
            )
        trainer.create_model_card(**card)

    # The report compares on the held-out test split when it has labels, else on the first evaluation split.
    if "predict" in results:
        report_split, prefix = spec.predict_splits[0], "test"
    elif "eval" in results:
        report_split, prefix = spec.eval_splits[0], "eval"
    else:
        return results
    report_dataset = tokenized[report_split]
    student_metrics = common.strip_prefix(
        results["predict" if prefix == "test" else "eval"], prefix, spec.metrics
    )

    evaluator = Trainer(
        model=models.teacher,
        args=training_args,
        processing_class=models.tokenizer,
        data_collator=collator,
        compute_metrics=compute_metrics,
    )
    teacher_metrics = evaluator.evaluate(report_dataset, metric_key_prefix="teacher")
    common.save_metrics(trainer, "teacher", teacher_metrics)
    results["teacher"] = teacher_metrics
    entries = {
        "teacher": {
            "model": models.teacher,
            "name_or_path": classification.teacher_paths(model_args)[0],
            "metrics": common.strip_prefix(teacher_metrics, "teacher", spec.metrics),
        },
        "student": {
            "model": trainer.model,
            "name_or_path": training_args.output_dir,
            "metrics": student_metrics,
        },
    }
    if baseline is not None:
        # The baseline has no teacher to label the transfer rows: it trains on the labelled rows alone.
        baseline_trainer = _train_without_teacher(
            baseline, training_args, {"train": labelled_train}, collator, models.tokenizer, compute_metrics
        )
        baseline_metrics = baseline_trainer.evaluate(report_dataset, metric_key_prefix=prefix)
        common.save_metrics(baseline_trainer, prefix if prefix == "eval" else "predict", baseline_metrics)
        results["no_kd"] = baseline_metrics
        entries["student_no_kd"] = {
            "model": baseline,
            "name_or_path": baseline_trainer.args.output_dir,
            "metrics": common.strip_prefix(baseline_metrics, prefix, spec.metrics),
        }

    student_description = (
        model_args.student_model_name_or_path
        or f"{student.config.num_hidden_layers}-layer student built from the teacher"
    )
    report = common.write_distillation_report(
        trainer,
        entries,
        primary_metric=spec.primary_metric,
        make_inputs=common.batch_maker(report_dataset, collator),
        report_args=report_args,
        metadata={
            "task": spec.name,
            "split": report_split,
            "examples": len(report_dataset),
            "max_seq_length": data_args.max_seq_length,
            "student": student_description,
            "temperature": training_args.temperature,
            "alpha": training_args.alpha,
            "kd_loss": training_args.kd_loss,
            "hidden_weight": training_args.hidden_weight,
            "attention_weight": training_args.attention_weight,
        },
    )
    if report is not None:
        results["report"] = report
        # Saved again so that the model card carries the report table.
        trainer.distillation_report = report
        if training_args.do_train:
            trainer.save_model()
    return results


if __name__ == "__main__":
    main()
