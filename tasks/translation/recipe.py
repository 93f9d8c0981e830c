"""The translation recipe (scripts/distill_translation.py) with encoder-decoder models (Marian/opus-mt, T5,
BART/mBART, NLLB), in one namespace: `translation.<name>`. Its metrics (sacreBLEU/chrF) and train/evaluate/predict
flow live here; the rest in its own modules, whose public names this one gathers:

- translation_args.py     the flags: data (those of run_translation.py), student depth, sequence-level KD
- translation_data.py     loading, language keys, tokenization, batching, translation pairs
- translation_models.py   teacher, tokenizer and student, checked before training; generation latency
- translation_seq_kd.py   sequence-level KD: the teacher's translations, kept in the sequence-KD cache
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from datasets import DatasetDict
from sacrebleu.metrics import BLEU, CHRF
from transformers import EvalPrediction, PreTrainedTokenizerBase

from hf_distill.tasks.common.generation_limits import bound_length
from hf_distill.tasks.translation.args import (
    SEQ_KD_MIXES,
    DataArguments,
    Seq2SeqModelArguments,
    SeqKDArguments,
)
from hf_distill.tasks.translation.data import (
    TRANSLATION_COLUMN,
    LanguagePair,
    check_splits,
    data_collator,
    language_keys,
    load_raw_datasets,
    preprocess_batch,
    project_pairs,
    resolve_languages,
    select_samples,
    seq_kd_pairs,
    tokenize_datasets,
)
from hf_distill.tasks.translation.models import (
    GenerationLatency,
    TranslationModels,
    check_vocabularies,
    is_multilingual_tokenizer,
    load_translation_models,
    resolve_token_id,
)
from hf_distill.tasks.translation.seq_kd import build_seq_kd_train_dataset, translate_with_teacher

METRICS = ("bleu", "chrf", "gen_len")
PRIMARY_METRIC = "bleu"

__all__ = [
    "METRICS",
    "PRIMARY_METRIC",
    "SEQ_KD_MIXES",
    "TRANSLATION_COLUMN",
    "DataArguments",
    "GenerationLatency",
    "LanguagePair",
    "Seq2SeqModelArguments",
    "SeqKDArguments",
    "TranslationModels",
    "bound_lengths",
    "build_seq_kd_train_dataset",
    "check_splits",
    "check_vocabularies",
    "corpus_scores",
    "data_collator",
    "decode_token_ids",
    "is_multilingual_tokenizer",
    "language_keys",
    "load_raw_datasets",
    "load_translation_models",
    "make_compute_metrics",
    "preprocess_batch",
    "project_pairs",
    "resolve_languages",
    "resolve_token_id",
    "select_samples",
    "seq_kd_pairs",
    "set_generation_defaults",
    "tokenize_datasets",
    "train_evaluate_predict",
    "translate_with_teacher",
    "write_predictions",
]


# --------------------------------------------------------------------------------------------- metrics
def corpus_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """sacreBLEU (13a tokenization, exp smoothing) and chrF (character 6-grams, beta 2) on detokenized text,
    one reference per sentence, computed offline with the sacrebleu library."""
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions for {len(references)} references; they must be equal."
        )
    predictions, references = list(predictions), [list(references)]
    return {
        "bleu": float(BLEU().corpus_score(predictions, references).score),
        "chrf": float(CHRF().corpus_score(predictions, references).score),
    }


def decode_token_ids(token_ids: Any, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Token ids (rows padded with -100 or the pad id) -> stripped texts without special tokens."""
    if isinstance(token_ids, tuple):  # (generated ids, ...) from some models
        token_ids = token_ids[0]
    token_ids = np.asarray(token_ids)
    token_ids = np.where(token_ids < 0, tokenizer.pad_token_id, token_ids)
    return [text.strip() for text in tokenizer.batch_decode(token_ids, skip_special_tokens=True)]


def make_compute_metrics(tokenizer: PreTrainedTokenizerBase) -> Callable[[EvalPrediction], dict[str, float]]:
    """`compute_metrics` for `Seq2SeqTrainer(predict_with_generate=True)`: bleu, chrf and gen_len, the mean
    number of generated tokens that are not padding."""

    def compute_metrics(eval_prediction: EvalPrediction) -> dict[str, float]:
        generated = eval_prediction.predictions
        generated = np.asarray(generated[0] if isinstance(generated, tuple) else generated)
        predictions = decode_token_ids(generated, tokenizer)
        references = decode_token_ids(eval_prediction.label_ids, tokenizer)
        scores = corpus_scores(predictions, references)
        lengths = np.count_nonzero((generated != tokenizer.pad_token_id) & (generated >= 0), axis=-1)
        scores["gen_len"] = float(np.mean(lengths)) if len(lengths) else 0.0
        return {name: round(value, 4) for name, value in scores.items()}

    return compute_metrics


# --------------------------------------------------------------------------------------------- running
def write_predictions(path: str | Path, predictions: Sequence[str]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(predictions) + ("\n" if predictions else ""))


def train_evaluate_predict(
    trainer: Any,
    tokenized: DatasetDict,
    args: Any,
    resume_from_checkpoint: Any = None,
) -> dict[str, dict[str, float]]:
    """The run_translation flow for one trainer: train (then save the model, metrics and state), evaluate on the
    validation split, predict the test split (writing generated_predictions.txt with generation).

    Returns {"train": ..., "eval": ..., "predict": ...} for the stages that ran.
    """
    from hf_distill.tasks.common.running import save_metrics, train_and_save

    results: dict[str, dict[str, float]] = {}
    if args.do_train:
        results["train"] = train_and_save(trainer, tokenized["train"], resume_from_checkpoint)
    if args.do_eval:
        metrics = trainer.evaluate(eval_dataset=tokenized["validation"], metric_key_prefix="eval")
        metrics["eval_samples"] = len(tokenized["validation"])
        save_metrics(trainer, "eval", metrics)
        results["eval"] = metrics
    if args.do_predict:
        output = trainer.predict(tokenized["test"], metric_key_prefix="predict")
        metrics = dict(output.metrics, predict_samples=len(tokenized["test"]))
        save_metrics(trainer, "predict", metrics)
        results["predict"] = metrics
        if args.predict_with_generate and trainer.is_world_process_zero():
            predictions = decode_token_ids(output.predictions, trainer.processing_class)
            write_predictions(Path(args.output_dir) / "generated_predictions.txt", predictions)
    return results


def bound_lengths(data_args: DataArguments, limit: int | None) -> None:
    """Lower --max_source_length, --max_target_length and --val_max_target_length to `limit` (the models'
    position limit, `TranslationModels.max_positions`), with a warning naming each flag lowered.

    Longer sequences would index past the position embeddings (IndexError in the middle of training or
    evaluation). Lowering rather than failing keeps run_translation.py's defaults (1024 / 128) usable with any
    model, as run_clm.py does for --block_size."""
    for flag in ("max_source_length", "max_target_length", "val_max_target_length"):
        value = getattr(data_args, flag)
        if value is not None:
            setattr(data_args, flag, bound_length(value, limit, f"--{flag}", "the teacher or student"))


def set_generation_defaults(training_args: Any, data_args: DataArguments, limit: int | None = None) -> None:
    """As run_translation.py: evaluation generates up to --val_max_target_length tokens unless
    --generation_max_length says otherwise, and --num_beams overrides --generation_num_beams. A
    --generation_max_length above `limit` (the models' position limit) is lowered to it, with a warning."""
    if training_args.generation_max_length is None:
        training_args.generation_max_length = data_args.val_max_target_length
    training_args.generation_max_length = bound_length(
        training_args.generation_max_length, limit, "--generation_max_length", "the teacher or student"
    )
    if data_args.num_beams is not None:
        training_args.generation_num_beams = data_args.num_beams
