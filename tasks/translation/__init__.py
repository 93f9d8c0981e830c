"""The translation recipe (scripts/distill_translation.py) as one namespace, `translation.<name>`:

- args.py     the flags: models, data, sequence-level KD
- data.py     loading JSON lines or Hub data, language pairs, tokenization, the collator
- models.py   teacher and student loading, vocabularies, generation latency for the report
- seq_kd.py   sequence-level KD: the teacher's beam-search translations, cached
- recipe.py   BLEU/chrF, predictions, the train/evaluate/predict flow, length bounds

May import tasks/common and hf_distill; nothing of the other tasks.
"""

from __future__ import annotations

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
from hf_distill.tasks.translation.recipe import (
    METRICS,
    PRIMARY_METRIC,
    bound_lengths,
    corpus_scores,
    decode_token_ids,
    make_compute_metrics,
    set_generation_defaults,
    train_evaluate_predict,
    write_predictions,
)
from hf_distill.tasks.translation.seq_kd import build_seq_kd_train_dataset, translate_with_teacher

__all__ = [
    "DataArguments",
    "GenerationLatency",
    "LanguagePair",
    "METRICS",
    "PRIMARY_METRIC",
    "SEQ_KD_MIXES",
    "Seq2SeqModelArguments",
    "SeqKDArguments",
    "TRANSLATION_COLUMN",
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
