"""The distillation flow of the classification recipe (scripts/distill_glue.py): flags, teacher(s) and student,
transfer sets and augmentation, mutual learning, QAT, training, evaluation, predictions and the report."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, Trainer, set_seed
from transformers.utils import logging

from hf_distill import DistillationTrainer, DistillationTrainingArguments
from hf_distill.args import CAUSAL_LM_ONLY, SEQ2SEQ_ONLY
from hf_distill.caches.mixture import label_names_of, load_sequence_cache
from hf_distill.reporting.base_model import display_name
from hf_distill.tasks import classification, common
from hf_distill.tasks.classification import augmentation, incremental, quantization_aware, transfer
from hf_distill.tasks.classification import mutual as mutual_recipe

logger = logging.get_logger("distill_glue")


@dataclass
class ModelCardArguments:
    """What the model card (README.md) calls the student and its teacher, when the defaults would mislead."""

    model_card_name: str | None = field(
        default=None,
        metadata={"help": "The card's title and model_name (default: the name of --output_dir's folder)."},
    )
    model_card_teacher: str | None = field(
        default=None,
        metadata={
            "help": "The teacher the card names, with its parameter count, when the --teacher_model_name_or_path "
            "trained from stands in for it (scripts/compress.py distils from a vocabulary-pruned view of its "
            "teacher): a Hub id or a local folder of a sequence classifier (default: the teacher)."
        },
    )


ARGUMENT_TYPES = (
    classification.ClassificationModelArguments,
    classification.DataArguments,
    incremental.IncrementalArguments,
    transfer.TransferArguments,
    classification.ClassificationReportArguments,
    quantization_aware.QuantizationAwareArguments,
    ModelCardArguments,
    DistillationTrainingArguments,
)


def _parameter_count(model_name_or_path: str) -> int:
    """Parameters of the sequence classifier in `model_name_or_path`, from its config alone (built on the meta
    device: no weights are read); tied weights count once, as `hf_distill.reporting.report.count_parameters` counts them."""
    from hf_distill.reporting.report import count_parameters

    config = AutoConfig.from_pretrained(model_name_or_path)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    return count_parameters(model)


def _card_arguments(model_args, card_args: ModelCardArguments, data_args) -> dict[str, Any]:
    """The model card's arguments, as run_glue.py passes them, naming the student's real origin: the model it was
    initialised from (--student_model_name_or_path, e.g. a pruned stage), else the teacher whose layers built it."""
    card: dict[str, Any] = {
        "tasks": "text-classification",
        "finetuned_from": model_args.student_model_name_or_path or model_args.teacher_model_name_or_path[0],
    }
    if card_args.model_card_name is not None:
        card["model_name"] = card_args.model_card_name
    if card_args.model_card_teacher is not None:
        card["teacher_name"] = card_args.model_card_teacher
        card["teacher_parameters"] = _parameter_count(card_args.model_card_teacher)
    if data_args.task_name is not None:
        card.update(
            language="en",
            dataset_tags="glue",
            dataset_args=data_args.task_name,
            dataset=f"GLUE {data_args.task_name.upper()}",
        )
    return card


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


def _augmented(
    raw_train, spec, tokenizer, embeddings, transfer_args, data_args, training_args, loading_args, tokenize
):
    """The augmented copies of the training texts (tasks/augmentation.py), tokenized and labelled -100: words
    replaced by their neighbours in `embeddings`, or by a masked LM's predictions (--augment_model_name_or_path)."""
    from datasets import load_dataset

    directory = transfer_args.augment_dir or os.path.join(training_args.output_dir, "augmented")
    rows = raw_train.select_columns(list(spec.text_columns))
    if data_args.max_train_samples is not None:
        rows = rows.select(range(min(data_args.max_train_samples, len(rows))))
    if transfer_args.augment_model_name_or_path is not None:
        mlm, mlm_tokenizer = augmentation.load_masked_lm(
            transfer_args.augment_model_name_or_path, loading_args
        )
        replacer = augmentation.MaskedLMPredictions(
            mlm.to(training_args.device), mlm_tokenizer, top_k=transfer_args.augment_neighbours
        )
    else:
        replacer = augmentation.EmbeddingNeighbours(tokenizer, embeddings, transfer_args.augment_neighbours)
    with training_args.main_process_first(desc="augmenting"):
        path = augmentation.write_augmented(
            list(rows),
            spec.text_columns,
            replacer,
            directory,
            copies=transfer_args.augment_copies,
            replace_prob=transfer_args.augment_replace_prob,
            max_tokens=data_args.max_seq_length,
            seed=training_args.seed,
        )
    texts = load_dataset("json", data_files={"train": str(path)}, split="train")
    return transfer.tokenize_unlabelled(texts, tokenize)


def run(argv: list[str] | None = None, *, description: str | None = None) -> dict[str, Any]:
    """The recipe: parse the flags (`description` opens --help), check everything, train, evaluate, report."""
    parsed = common.parse_args(
        ARGUMENT_TYPES, argv, description=description, hidden=(*CAUSAL_LM_ONLY, *SEQ2SEQ_ONLY)
    )
    model_args, data_args, incremental_args, *modes, card_args, training_args = parsed
    transfer_args, report_args, qat_args = modes
    common.setup_logging(training_args)
    set_seed(training_args.seed)
    others = {"transfer_args": transfer_args, "report_args": report_args, "qat_args": qat_args}
    incremental.check_flags(model_args, data_args, incremental_args, training_args, **others)
    if model_args.previous_model_name_or_path is not None:  # adding classes to a trained classifier
        return incremental.run(model_args, data_args, incremental_args, training_args)

    # Everything that can be wrong with the flags, the data or the models fails here, before training.
    raw = classification.load_raw_datasets(data_args, model_args)
    # Rows trained on KD only: a --transfer_split, and training rows without a label (--use_unlabelled_rows).
    raw, kd_only_rows = transfer.set_aside_kd_only_rows(
        raw, data_args.label_column_name, transfer_args, data_args.max_train_samples
    )
    spec = classification.resolve_task(raw, data_args)
    classification.check_splits(
        spec, raw, training_args.do_train, training_args.do_eval, training_args.do_predict
    )
    # With the --transfer_file, whose format and columns fail here, before any model loads.
    kd_only_texts = transfer.kd_only_texts(
        kd_only_rows, spec.text_columns, spec.label_column, transfer_args, spec.is_regression
    )
    if model_args.mutual_learning:
        mutual_recipe.check_mutual_learning(
            spec, training_args, report_args.compare_no_kd, qat_args.quantization_aware_training
        )
        models = classification.load_peers(model_args, spec)
        embeddings = models.models[0].get_input_embeddings().weight  # for augmentation
    else:
        models = classification.load_distillation_models(model_args, spec)
        embeddings = models.teacher.get_input_embeddings().weight
        card = _card_arguments(model_args, card_args, data_args)  # a wrong --model_card_teacher fails here
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
        extra = {}
        if training_args.do_train:
            extra = {
                source: transfer.tokenize_unlabelled(texts, tokenize)
                for source, texts in kd_only_texts.items()
            }
            if transfer_args.augment_copies > 0:
                extra["augmentation"] = _augmented(
                    raw["train"], spec, models.tokenizer, embeddings, transfer_args, data_args, training_args,
                    model_args, tokenize,
                )  # fmt: skip
        if extra:
            tokenized["train"] = transfer.mixed_training_set(
                labelled_train, list(extra.values()), training_args.seed
            )
    row_counts = (
        transfer.describe_training_rows(
            len(labelled_train), {source: len(rows) for source, rows in extra.items()}
        )
        if training_args.do_train
        else None
    )
    collator = classification.data_collator(models.tokenizer, data_args, fp16=training_args.fp16)
    compute_metrics = classification.make_compute_metrics(spec)
    if model_args.mutual_learning:
        return mutual_recipe.train_peers(
            models,
            tokenized,
            spec,
            training_args,
            collator,
            compute_metrics,
            resume_from_checkpoint=common.resume_checkpoint(training_args),
            train_metrics=row_counts,
        )

    set_seed(training_args.seed)
    student = quantization_aware.prepare(models.make_student(), qat_args)
    # Built now, before the trainer prepares the teacher (which may change its dtype), so that both students
    # start from exactly the same weights.
    compare_no_kd = report_args.compare_no_kd and training_args.do_train
    baseline = models.make_student() if compare_no_kd else None
    cache = training_args.teacher_logits_cache if training_args.do_train else None
    if cache:
        # Train from the cache (one teacher's classes, or several teachers' mixture): no teacher in the loss. The
        # teachers stay loaded for the report; the student was built from the first.
        if extra:
            raise ValueError(
                f"--teacher_logits_cache holds the teachers' outputs on the labelled training rows only, not on the "
                f"{', '.join(extra)} rows; drop those flags, or train from the live teachers."
            )
        tokenized["train"], collator, _ = load_sequence_cache(
            cache,
            tokenized["train"],
            collator,
            tokenizer=models.tokenizer,
            label_names=label_names_of(student.config),
            temperature=training_args.temperature,
            teacher_names=list(models.teachers),
        )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=None if cache else models.teacher_argument,
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
        train_metrics=row_counts,
    )
    if training_args.do_train:
        quantization_aware.finish(trainer, qat_args)
        # The trainer keeps the card's arguments for later save_model calls.
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

    # Shown in the report and in the model card: a folder's name, never a path on this machine.
    student_description = (
        display_name(model_args.student_model_name_or_path)
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
