"""Fine-tuning a sequence-classification teacher (scripts/train_teacher.py): a plain `Trainer` run on the
recipe's data flags, so that `distill_glue.py` has a teacher to distil."""

from __future__ import annotations

from typing import Any

from transformers import Trainer, TrainingArguments, set_seed
from transformers.utils import logging

from hf_distill.tasks import classification, common

logger = logging.get_logger("train_teacher")

ARGUMENT_TYPES = (common.PretrainedModelArguments, classification.DataArguments, TrainingArguments)


def run(argv: list[str] | None = None, *, description: str | None = None) -> dict[str, Any]:
    """Fine-tune the teacher: parse the flags (`description` opens --help), train, evaluate, save."""
    model_args, data_args, training_args = common.parse_args(ARGUMENT_TYPES, argv, description=description)
    common.setup_logging(training_args)
    set_seed(training_args.seed)

    raw = classification.load_raw_datasets(data_args, model_args)
    spec = classification.resolve_task(raw, data_args)
    classification.check_splits(
        spec, raw, training_args.do_train, training_args.do_eval, training_args.do_predict
    )
    model, tokenizer, label_to_id = classification.load_model_for_finetuning(
        model_args.model_name_or_path, spec, model_args
    )
    if model_args.freeze_embeddings:
        logger.info(f"Froze {common.freeze_input_embeddings(model):,} input-embedding parameters.")
    with training_args.main_process_first(desc="tokenizing"):
        tokenized = classification.tokenize_datasets(raw, spec, tokenizer, label_to_id, data_args)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=tokenized["train"] if training_args.do_train else None,
        eval_dataset=tokenized[spec.eval_splits[0]] if spec.eval_splits else None,
        processing_class=tokenizer,
        data_collator=classification.data_collator(tokenizer, data_args, fp16=training_args.fp16),
        compute_metrics=classification.make_compute_metrics(spec),
    )
    return classification.train_evaluate_predict(
        trainer,
        tokenized,
        spec,
        training_args,
        resume_from_checkpoint=common.resume_checkpoint(training_args),
    )
