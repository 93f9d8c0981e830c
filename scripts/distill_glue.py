#!/usr/bin/env python
"""Distil a fine-tuned sequence-classification teacher into a smaller student, on GLUE or local files.

    python scripts/distill_glue.py \
        --teacher_model_name_or_path outputs/teacher --student_num_layers 2 \
        --train_file train.csv --validation_file dev.csv --do_train --do_eval \
        --temperature 2 --alpha 0.5 --output_dir outputs/student
    python scripts/distill_glue.py run.yaml          # the same flags, from one YAML or JSON file
    accelerate launch scripts/distill_glue.py run.yaml

Flags: the model flags of tasks/common.py (ModelArguments), the data flags of tasks/classification.py
(DataArguments, as in transformers' run_glue.py), the report flags (ClassificationReportArguments, e.g.
--compare_no_kd) and every DistillationTrainingArguments flag (all of TrainingArguments plus
--temperature, --alpha, --kd_loss, --hidden_weight, ...).

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
from hf_distill.tasks import classification, common

logger = logging.get_logger("distill_glue")

ARGUMENT_TYPES = (
    common.ModelArguments,
    classification.DataArguments,
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, report_args, training_args = common.parse_args(ARGUMENT_TYPES, argv)
    common.setup_logging(training_args)
    set_seed(training_args.seed)

    # Everything that can be wrong with the flags, the data or the models fails here, before training.
    raw = classification.load_raw_datasets(data_args, model_args)
    spec = classification.resolve_task(raw, data_args)
    classification.check_splits(
        spec, raw, training_args.do_train, training_args.do_eval, training_args.do_predict
    )
    models = classification.load_distillation_models(model_args, spec)
    with training_args.main_process_first(desc="tokenizing"):
        tokenized = classification.tokenize_datasets(
            raw, spec, models.tokenizer, models.label_to_id, data_args
        )
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
        teacher_model=models.teacher,
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
            "name_or_path": model_args.teacher_model_name_or_path,
            "metrics": common.strip_prefix(teacher_metrics, "teacher", spec.metrics),
        },
        "student": {
            "model": trainer.model,
            "name_or_path": training_args.output_dir,
            "metrics": student_metrics,
        },
    }
    if baseline is not None:
        baseline_trainer = _train_without_teacher(
            baseline, training_args, tokenized, collator, models.tokenizer, compute_metrics
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
