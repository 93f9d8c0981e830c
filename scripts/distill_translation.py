#!/usr/bin/env python
"""Distil an encoder-decoder translation teacher (Marian/opus-mt, T5, BART/mBART, NLLB) into a smaller student.

    python scripts/distill_translation.py \
        --teacher_model_name_or_path Helsinki-NLP/opus-mt-en-de \
        --student_num_layers 6 --student_num_decoder_layers 1 \
        --train_file train.jsonl --validation_file dev.jsonl --source_lang en --target_lang de \
        --do_train --do_eval --predict_with_generate --num_beams 4 \
        --alpha 0.5 --temperature 2 --output_dir outputs/opus-mt-en-de-6-1
    accelerate launch scripts/distill_translation.py run.yaml     # the same flags from one YAML/JSON file

Data as transformers' run_translation.py takes it (--dataset_name, or JSON lines files with one
{"translation": {"en": ..., "de": ...}} per line). Flags (tasks/translation_args.py): the model flags (tasks/common.py ModelArguments plus
--student_num_decoder_layers / --student_decoder_layers), the data flags, the
sequence-level KD flags (--seq_kd, --seq_kd_num_beams, --seq_kd_mix, ...), the report
flags and every Seq2SeqDistillationTrainingArguments flag (--alpha, --temperature, --hidden_weight,
--layer_map for the encoder, --decoder_layer_map for the decoder, --predict_with_generate, ...).

Word-level KD (the teacher's next-token distributions on the reference prefix) is the trainer's; with
--seq_kd the training targets are, in addition, the teacher's own beam-search translations (Kim & Rush, 2016),
generated once and cached under --seq_kd_cache_dir.

Writes into --output_dir: the student with its tokenizer and model card, train/eval/all_results.json
(eval_bleu, eval_chrf, eval_gen_len with --predict_with_generate), trainer_state.json, and after an evaluation
with generation, distill_report.{json,md,png}: teacher against student in BLEU/chrF, parameters, and
generation latency and sentences/s at batch 1 and 32.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import Seq2SeqTrainer, set_seed
from transformers.utils import logging

from hf_distill import Seq2SeqDistillationTrainer, Seq2SeqDistillationTrainingArguments
from hf_distill.args import CAUSAL_LM_ONLY
from hf_distill.tasks import common, translation

logger = logging.get_logger("distill_translation")

ARGUMENT_TYPES = (
    translation.Seq2SeqModelArguments,
    translation.DataArguments,
    translation.SeqKDArguments,
    common.ReportArguments,
    Seq2SeqDistillationTrainingArguments,
)


def _student_description(model_args: translation.Seq2SeqModelArguments, student: Any) -> str:
    if model_args.student_model_name_or_path is not None:
        return model_args.student_model_name_or_path
    config = student.config
    encoder = getattr(config, "encoder_layers", None) or getattr(config, "num_layers", None)
    decoder = getattr(config, "decoder_layers", None) or getattr(config, "num_decoder_layers", None)
    return f"{encoder}-layer encoder, {decoder}-layer decoder built from the teacher"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, seq_kd_args, report_args, training_args = common.parse_args(
        ARGUMENT_TYPES, argv, description=__doc__, hidden=CAUSAL_LM_ONLY
    )
    common.setup_logging(training_args)
    set_seed(training_args.seed)

    # Everything that can be wrong with the flags, the data or the models fails here, before training.
    raw = translation.load_raw_datasets(data_args, model_args)
    translation.check_splits(raw, training_args.do_train, training_args.do_eval, training_args.do_predict)
    languages = translation.resolve_languages(raw, data_args)
    raw = translation.select_samples(raw, data_args)
    models = translation.load_translation_models(model_args, data_args, languages)
    # Lengths past the models' position tables are lowered with a warning (see the flags' help).
    translation.bound_lengths(data_args, models.max_positions)
    translation.set_generation_defaults(training_args, data_args, models.max_positions)
    if training_args.do_eval and not training_args.predict_with_generate:
        logger.warning(
            "--do_eval without --predict_with_generate computes eval_loss only; BLEU, chrF and the distillation "
            "report need --predict_with_generate."
        )

    if seq_kd_args.seq_kd and training_args.do_train:
        cache_dir = seq_kd_args.seq_kd_cache_dir or os.path.join(training_args.output_dir, "seq_kd_cache")
        # One process generates; the others wait, then read the cache (one per node on node-local disks).
        with training_args.main_process_first(
            local=training_args.save_on_each_node, desc="seq-KD translations"
        ):
            raw["train"] = translation.build_seq_kd_train_dataset(
                raw["train"],
                models,
                model_args,
                data_args,
                seq_kd_args,
                languages,
                cache_dir,
                device=training_args.device,
            )
    elif seq_kd_args.seq_kd:
        logger.warning("--seq_kd changes the training data only; it has no effect without --do_train.")

    with training_args.main_process_first(desc="tokenizing"):
        tokenized = translation.tokenize_datasets(raw, models.tokenizer, languages, data_args)

    set_seed(training_args.seed)
    student = models.make_student()
    compute_metrics = (
        translation.make_compute_metrics(models.tokenizer) if training_args.predict_with_generate else None
    )
    trainer = Seq2SeqDistillationTrainer(
        model=student,
        teacher_model=models.teacher,
        args=training_args,
        train_dataset=tokenized["train"] if training_args.do_train else None,
        eval_dataset=tokenized["validation"] if training_args.do_eval else None,
        processing_class=models.tokenizer,
        data_collator=translation.data_collator(
            models.tokenizer, student, data_args, fp16=training_args.fp16
        ),
        compute_metrics=compute_metrics,
        # Teacher and student share the one tokenizer the recipe loaded (a padded vocabulary is then accepted).
        teacher_processing_class=models.tokenizer,
    )
    results: dict[str, Any] = translation.train_evaluate_predict(
        trainer, tokenized, training_args, resume_from_checkpoint=common.resume_checkpoint(training_args)
    )

    # The report compares teacher and student translations on the validation split, else the test split.
    if not training_args.predict_with_generate:
        return results
    if "eval" in results:
        report_split, prefix = "validation", "eval"
    elif "predict" in results:
        report_split, prefix = "test", "predict"
    else:
        return results
    report_dataset = tokenized[report_split]
    evaluator = Seq2SeqTrainer(
        model=models.teacher,
        args=training_args,
        processing_class=models.tokenizer,
        data_collator=translation.data_collator(
            models.tokenizer, models.teacher, data_args, fp16=training_args.fp16
        ),
        compute_metrics=compute_metrics,
    )
    teacher_metrics = evaluator.evaluate(report_dataset, metric_key_prefix="teacher")
    common.save_metrics(trainer, "teacher", teacher_metrics)
    results["teacher"] = teacher_metrics

    generate_kwargs = {
        "num_beams": training_args.generation_num_beams,
        "max_length": training_args.generation_max_length,
    }
    entries = {
        "teacher": {
            "model": translation.GenerationLatency(models.teacher, **generate_kwargs),
            "name_or_path": model_args.teacher_model_name_or_path,
            "metrics": common.strip_prefix(teacher_metrics, "teacher", translation.METRICS),
        },
        "student": {
            "model": translation.GenerationLatency(trainer.model, **generate_kwargs),
            "name_or_path": training_args.output_dir,
            "metrics": common.strip_prefix(results[prefix], prefix, translation.METRICS),
        },
    }
    report = common.write_distillation_report(
        trainer,
        entries,
        primary_metric=translation.PRIMARY_METRIC,
        make_inputs=common.batch_maker(
            report_dataset, translation.data_collator(models.tokenizer, None, data_args), drop=("labels",)
        ),
        report_args=report_args,
        metadata={
            "task": "translation",
            "language_pair": f"{languages.source_lang}-{languages.target_lang}",
            "split": report_split,
            "examples": len(report_dataset),
            "latency_of": "generate() per batch of sources (sentences/s = throughput)",
            "num_beams": training_args.generation_num_beams or models.teacher.generation_config.num_beams,
            "generation_max_length": training_args.generation_max_length,
            "student": _student_description(model_args, trainer.model),
            "temperature": training_args.temperature,
            "alpha": training_args.alpha,
            "kd_loss": training_args.kd_loss,
            "hidden_weight": training_args.hidden_weight,
            "seq_kd": seq_kd_args.seq_kd,
            "seq_kd_mix": seq_kd_args.seq_kd_mix if seq_kd_args.seq_kd else None,
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
    common.finish_processes()
