#!/usr/bin/env python
"""Distil a causal language model (GPT-2, Llama, Qwen, Mistral...) into a smaller one that shares its tokenizer.

    python scripts/distill_lm.py \
        --teacher_model_name_or_path outputs/teacher --student_num_layers 4 \
        --train_file train.txt --validation_file valid.txt --block_size 512 \
        --do_train --do_eval --kd_loss forward_kl --temperature 1 --alpha 0.5 --output_dir outputs/student
    python scripts/distill_lm.py run.yaml            # the same flags, from one YAML or JSON file
    accelerate launch scripts/distill_lm.py run.yaml

Data: raw text packed into --block_size blocks (.txt, or a `text` column), or prompt/completion data
(`prompt`/`completion` columns, or chat `messages`) where only the completion is learned.

Variants:
    --teacher_logits_cache DIR    train from the teacher's cached top-k log-probabilities
                                  (scripts/cache_teacher_logits.py); no teacher in memory while training. The
                                  cache may hold several teachers' mixture (--teacher_weights, if given, must
                                  be its weights), or, with --cross_tokenizer, a teacher with another tokenizer
    --seq_kd                      train on the teacher's own completions (generated once, cached)
    --lmbda 0.5                   on-policy (GKD): half of the steps learn on completions the student samples
    --use_peft [--merge_lora]     train LoRA adapters on the student: adapters in <output_dir> (a student built
                                  from the teacher is saved as their base in <output_dir>/base_model), and with
                                  --merge_lora a merged full model in <output_dir>/merged

Flags: the model flags (LMModelArguments: --teacher_model_name_or_path, --student_model_name_or_path or
--student_num_layers, --teacher_tokenizer_name, ...), the data flags of run_clm.py (DataArguments), the
sequence-KD, LoRA and report flags, and every DistillationTrainingArguments flag (--kd_loss, --jsd_beta,
--temperature, --alpha, --fused_kd_loss, --kd_chunk_size, ...).

Writes into --output_dir: the student (or its adapters) with tokenizer and model card, train/eval/all_results.json
(eval_loss and perplexity = exp(eval_loss), the student's own cross-entropy), and after a run with evaluation
distill_report.{json,md,png}: teacher and student perplexity, parameters, latency, tokens/s and greedy
generations on validation prompts.
"""

from __future__ import annotations

import gc
import math
import os
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import Trainer, set_seed
from transformers.utils import logging

from hf_distill import DistillationTrainer, DistillationTrainingArguments
from hf_distill.alignment.collator import CrossTokenizerCollator, check_alignable
from hf_distill.args import SEQ2SEQ_ONLY
from hf_distill.caches.cross_tokenizer import CachedCrossTokenizerCollator, load_cross_tokenizer_cache
from hf_distill.caches.topk import load_logit_cache
from hf_distill.reporting.report import write_report
from hf_distill.tasks import common, lm
from hf_distill.tasks.common.generation_limits import shared_vocab_size
from hf_distill.tasks.lm.cross_tokenizer import cross_tokenizer_rows

logger = logging.get_logger("distill_lm")

ARGUMENT_TYPES = (
    lm.LMModelArguments,
    lm.DataArguments,
    lm.SequenceKDArguments,
    lm.LoraArguments,
    lm.LMReportArguments,
    DistillationTrainingArguments,
)


def check_flags(data_args, seq_kd_args, training_args) -> None:
    """Combinations that cannot work, refused before anything is loaded."""
    cache = training_args.teacher_logits_cache
    if cache and seq_kd_args.seq_kd:
        raise ValueError(
            "--teacher_logits_cache and --seq_kd cannot be combined: the cache holds the teacher's distributions "
            "on the original training rows, which --seq_kd replaces. Drop one of them."
        )
    if data_args.streaming and (cache or seq_kd_args.seq_kd):
        raise ValueError(
            "--streaming cannot be combined with --teacher_logits_cache or --seq_kd, which need the whole "
            "training set; drop --streaming."
        )
    if training_args.cross_tokenizer and (seq_kd_args.seq_kd or data_args.streaming):
        raise ValueError(
            f"--cross_tokenizer {training_args.cross_tokenizer} cannot be combined with --seq_kd or --streaming: "
            "sequence-level KD and streaming are not implemented for two tokenizers. Drop them."
        )
    if cache and training_args.do_train and not Path(cache).is_dir():
        raise FileNotFoundError(
            f"--teacher_logits_cache {cache!r} does not exist; build it with scripts/cache_teacher_logits.py."
        )


def bound_on_policy_length(
    train_dataset: Any,
    block_size: int,
    max_positions: int | None,
    training_args: DistillationTrainingArguments,
) -> None:
    """Lower --on_policy_max_new_tokens (with a warning) so that the longest training prompt plus the sampled
    completion fits the position limit of teacher and student (streamed data: a prompt shorter than a block)."""
    if max_positions is None or block_size - 1 + training_args.on_policy_max_new_tokens <= max_positions:
        return  # even a prompt of a whole block but one token leaves room: no need to read the data
    if isinstance(train_dataset, Dataset):
        prompts = train_dataset.select_columns(["input_ids", "labels"]).with_format(None)
        longest_prompt = max((len(lm.prompt_ids_of(row)) for row in prompts), default=0)
    else:
        longest_prompt = block_size - 1
    fits = max(1, max_positions - longest_prompt)
    if training_args.on_policy_max_new_tokens > fits:
        logger.warning(
            f"--on_policy_max_new_tokens {training_args.on_policy_max_new_tokens}: the longest training prompt "
            f"({longest_prompt} tokens) plus that many sampled tokens exceeds the {max_positions} positions of the "
            f"teacher or student (max_position_embeddings); using {fits}."
        )
        training_args.on_policy_max_new_tokens = fits


def cross_tokenizer_data(
    raw: Any,
    data_format: lm.DataFormat,
    data_args: Any,
    tokenizer: Any,
    teacher_tokenizer: Any,
    block_size: int,
    max_positions: int | None,
    cached: bool = False,
) -> tuple[dict[str, Any], Any]:
    """--cross_tokenizer: each split as rows of raw text of at most `block_size` student tokens (documents cut at
    token ends, never joined), and the collator that tokenizes them for both models (`cached`: for the student
    only, the teacher's side coming from the cache); the alignment is checked on the first row before any
    training."""
    if teacher_tokenizer is None:
        raise ValueError(
            "--cross_tokenizer needs the teacher's tokenizer: the teacher folder holds none; pass "
            "--teacher_tokenizer_name."
        )
    (column,) = data_format.columns
    tokenized = cross_tokenizer_rows(raw, column, data_args, tokenizer, block_size)
    sample = next(iter(tokenized.values()))[0]["text"]
    check_alignable(tokenizer, teacher_tokenizer, sample_text=sample)
    if cached:
        return tokenized, CachedCrossTokenizerCollator(tokenizer, max_length=block_size)
    collator = CrossTokenizerCollator(
        tokenizer, teacher_tokenizer, max_length=block_size, teacher_max_length=max_positions
    )
    return tokenized, collator


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def write_lm_report(
    trainer: DistillationTrainer,
    teacher: Any,
    student: Any,
    eval_dataset: Any,
    data_format: lm.DataFormat,
    tokenizer: Any,
    collator: lm.CausalLMCollator,
    student_metrics: dict[str, float],
    model_args: lm.LMModelArguments,
    report_args: lm.LMReportArguments,
    training_args: DistillationTrainingArguments,
    metadata: dict[str, Any],
) -> dict[str, Any] | None:
    """Teacher vs student: perplexity, size, latency, tokens/s, and greedy generations on validation prompts."""
    evaluator = Trainer(model=teacher, args=training_args, processing_class=tokenizer, data_collator=collator)
    teacher_metrics = evaluator.evaluate(eval_dataset, metric_key_prefix="teacher")
    teacher_metrics["teacher_perplexity"] = perplexity(teacher_metrics["teacher_loss"])
    common.save_metrics(trainer, "teacher", teacher_metrics)

    make_inputs = common.batch_maker(eval_dataset, collator)
    entries = {
        "teacher": {
            "model": teacher,
            "name_or_path": model_args.teacher_model_name_or_path,
            "metrics": {
                "perplexity": teacher_metrics["teacher_perplexity"],
                "loss": teacher_metrics["teacher_loss"],
            },
        },
        "student": {
            "model": student,
            "name_or_path": training_args.output_dir,
            "metrics": {"perplexity": student_metrics["perplexity"], "loss": student_metrics["eval_loss"]},
        },
    }
    report = common.write_distillation_report(
        trainer,
        entries,
        primary_metric="perplexity",
        greater_is_better=False,
        make_inputs=make_inputs,
        report_args=report_args,
        metadata=metadata,
    )
    if report is None:  # not the main process
        return None
    for entry in report["models"].values():
        entry["tokens_per_second"] = lm.tokens_per_second(entry["latency_ms"], make_inputs)
    prompts = lm.report_prompts(
        eval_dataset, data_format, report_args.report_generations, report_args.report_prompt_tokens
    )
    generations = [{"prompt": tokenizer.decode(prompt, skip_special_tokens=True)} for prompt in prompts]
    for name, model in (("teacher", teacher), ("student", student)):
        for entry, text in zip(
            generations, lm.greedy_generations(model, prompts, tokenizer, report_args.report_max_new_tokens)
        ):
            entry[name] = text
    report["generations"] = generations
    rates = "\n".join(
        f"- {name}: "
        + ", ".join(f"{rate:,.0f} tokens/s at batch {bs}" for bs, rate in entry["tokens_per_second"].items())
        for name, entry in report["models"].items()
    )
    extra_markdown = "\n## Forward throughput\n\n" + rates + "\n" + lm.generations_markdown(generations)
    write_report(report, training_args.output_dir, extra_markdown=extra_markdown)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, seq_kd_args, lora_args, report_args, training_args = common.parse_args(
        ARGUMENT_TYPES, argv, description=__doc__, hidden=SEQ2SEQ_ONLY
    )
    common.setup_logging(training_args)
    set_seed(training_args.seed)
    check_flags(data_args, seq_kd_args, training_args)

    # Everything that can be wrong with the flags, the data or the models fails here, before training.
    raw = lm.load_raw_datasets(data_args, model_args)
    if not training_args.do_train:
        raw.pop("train", None)
    lm.check_splits(raw, training_args.do_train, training_args.do_eval)
    data_format = lm.resolve_data_format(raw, data_args)
    if not data_format.has_prompts and (seq_kd_args.seq_kd or training_args.lmbda > 0):
        raise ValueError(
            f"--seq_kd and --lmbda need prompts to complete, but the data is raw text (columns {list(data_format.columns)}); "
            "give prompt/completion or messages data."
        )
    cross = training_args.cross_tokenizer is not None
    if cross and (data_format.kind != lm.TEXT or model_args.student_model_name_or_path is None):
        raise ValueError(
            f"--cross_tokenizer distils into a student with its own tokenizer from raw text: it needs "
            f"--student_model_name_or_path (a student built from the teacher shares the teacher's tokenizer) and "
            f"raw-text data (got {data_format.kind} data); prompt/completion and chat data are not supported yet."
        )
    tokenizer, teacher_tokenizer = lm.load_tokenizers(model_args, cross_tokenizer=cross)
    # Lengths never exceed the models' position tables (lowered with a warning, as run_clm.py does).
    max_positions = lm.position_limit(model_args)
    block_size = lm.resolve_block_size(data_args, tokenizer, max_positions)
    if cross:
        # Rows of raw text; both tokenizers read them in the collator (hf_distill/cross_tokenizer.py).
        tokenized, collator = cross_tokenizer_data(
            raw,
            data_format,
            data_args,
            tokenizer,
            teacher_tokenizer,
            block_size,
            max_positions,
            cached=bool(training_args.teacher_logits_cache),
        )
    else:
        with training_args.main_process_first(desc="tokenizing"):
            tokenized = lm.preprocess(raw, data_format, tokenizer, block_size, data_args)
        collator = lm.CausalLMCollator(
            tokenizer.pad_token_id,
            pad_to_multiple_of=8 if (training_args.fp16 or training_args.bf16) else None,
        )
    train_dataset = tokenized.get("train") if training_args.do_train else None
    eval_dataset = tokenized.get("validation") if training_args.do_eval else None

    cache = training_args.teacher_logits_cache
    cache_manifest = None
    if cache and train_dataset is not None and cross:
        # the cache holds the teacher's top k at the positions aligned with its own tokenization
        train_dataset, cache_manifest = load_cross_tokenizer_cache(
            cache,
            train_dataset,
            tokenizer=tokenizer,
            teacher_tokenizer=teacher_tokenizer,
            block_size=block_size,
            temperature=training_args.temperature,
        )
    elif cache and train_dataset is not None:
        train_dataset, cache_manifest = load_logit_cache(
            cache,
            train_dataset,
            tokenizer=tokenizer,
            block_size=block_size,
            temperature=training_args.temperature,
        )

    # With a logit cache the teacher is loaded only to build the student from its layers, then released.
    teacher = None
    if not cache or model_args.student_model_name_or_path is None:
        teacher = lm.load_teacher(model_args)
        lm.check_vocabulary(teacher, teacher_tokenizer if cross else tokenizer, "teacher")
    if seq_kd_args.seq_kd and train_dataset is not None:
        seq_kd_dir = seq_kd_args.seq_kd_cache_dir or os.path.join(training_args.output_dir, "seq_kd_cache")
        with training_args.main_process_first(desc="sequence-KD completions"):
            train_dataset = lm.sequence_kd_dataset(
                teacher.to(training_args.device),
                train_dataset,
                seq_kd_dir,
                tokenizer=tokenizer,
                teacher_name=model_args.teacher_model_name_or_path,
                block_size=block_size,
                num_beams=seq_kd_args.seq_kd_num_beams,
                max_new_tokens=seq_kd_args.seq_kd_max_new_tokens,
                batch_size=seq_kd_args.seq_kd_batch_size,
                vocab_size=shared_vocab_size(tokenizer, lm.student_vocab_size(model_args, teacher)),
                overwrite=seq_kd_args.seq_kd_overwrite_cache,
            )
    if training_args.lmbda > 0 and train_dataset is not None:
        bound_on_policy_length(train_dataset, block_size, max_positions, training_args)

    set_seed(training_args.seed)
    student = lm.make_student(model_args, teacher, tokenizer)
    if cache_manifest is not None:
        vocab = student.config.get_text_config().vocab_size
        if not cross and cache_manifest["top_k"] > vocab:
            raise ValueError(
                f"the cache holds the top {cache_manifest['top_k']} tokens, more than the student's vocabulary ({vocab})."
            )
        teacher = None
        gc.collect()
    if lora_args.use_peft:
        base_model_dir = None
        if model_args.student_model_name_or_path is None:
            # A student built from the teacher exists nowhere else: save it as the adapters' base model.
            base_model_dir = os.path.join(training_args.output_dir, "base_model")
            if training_args.should_save:
                student.save_pretrained(base_model_dir)
                tokenizer.save_pretrained(base_model_dir)
        student = lm.apply_lora(student, lora_args, base_model_dir)

    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=collator,
        teacher_processing_class=teacher_tokenizer,
    )

    results: dict[str, Any] = {}
    if training_args.do_train:
        results["train"] = common.train_and_save(
            trainer, train_dataset, common.resume_checkpoint(training_args)
        )

    merged = None
    if lora_args.merge_lora:
        merged = lm.merge_lora(trainer.model)
        if trainer.is_world_process_zero():
            merged_dir = os.path.join(training_args.output_dir, "merged")
            merged.save_pretrained(merged_dir)
            tokenizer.save_pretrained(merged_dir)
            logger.info(f"Saved the student with merged LoRA weights in {merged_dir}")

    if not training_args.do_eval:
        return results
    metrics = trainer.evaluate()
    metrics["perplexity"] = perplexity(metrics["eval_loss"])
    metrics["eval_samples"] = len(eval_dataset)
    common.save_metrics(trainer, "eval", metrics)
    results["eval"] = metrics

    if cross:
        logger.info(
            "--cross_tokenizer: no teacher-vs-student report; the teacher's perplexity is over its own tokens and "
            "not comparable with the student's (eval_results.json has the student's)."
        )
        return results
    if teacher is None:
        teacher = lm.load_teacher(model_args).to(training_args.device).eval()
    # A LoRA student is measured merged: that is the model one deploys (and its size is not the adapters').
    student_for_report = merged if merged is not None else trainer.model
    if lora_args.use_peft and merged is None:
        student_for_report = lm.merge_lora(trainer.model)
    report = write_lm_report(
        trainer,
        teacher,
        student_for_report,
        eval_dataset,
        data_format,
        tokenizer,
        collator,
        metrics,
        model_args,
        report_args,
        training_args,
        metadata={
            "task": "causal_lm",
            "data_format": data_format.kind,
            "block_size": block_size,
            "examples": len(eval_dataset),
            "student": model_args.student_model_name_or_path
            or f"{student.config.get_text_config().num_hidden_layers}-layer student built from the teacher",
            "kd_loss": training_args.kd_loss,
            "temperature": training_args.temperature,
            "alpha": training_args.alpha,
            "teacher_logits_cache": cache,
            "seq_kd": seq_kd_args.seq_kd,
            "lmbda": training_args.lmbda,
            "lora": lora_args.use_peft,
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
