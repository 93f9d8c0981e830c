"""Translation with encoder-decoder models (Marian/opus-mt, T5, BART/mBART, NLLB): data in the format of
transformers' run_translation.py, preprocessing, sacreBLEU/chrF, teacher and student loading with the checks
that must pass before training, and the sequence-level KD training set.

Data: a Hub dataset (--dataset_name) or JSON lines files, one `{"translation": {"en": "...", "de": "..."}}`
per line. The data and metric functions are pure so they can be tested without a model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict, Features, Translation, Value, load_dataset
from sacrebleu.metrics import BLEU, CHRF
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    EvalPrediction,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    default_data_collator,
)
from transformers.utils import logging

from . import seq_kd_cache
from .common import (
    LoadingArguments,
    ModelArguments,
    freeze_input_embeddings,
    load_hub_dataset,
    load_pretrained,
)
from .generation_limits import (
    bound_length,
    max_positions,
    min_positions,
    model_vocab_size,
    shared_vocab_size,
)

logger = logging.get_logger(__name__)

TRANSLATION_COLUMN = "translation"
METRICS = ("bleu", "chrf", "gen_len")
PRIMARY_METRIC = "bleu"
_FILE_SUFFIXES = (".json", ".jsonl")
# Tokenizers that need src_lang/tgt_lang set to language codes (en_XX, eng_Latn, ...), as in run_translation.py.
_MULTILINGUAL_TOKENIZERS = (
    "MBartTokenizer",
    "MBartTokenizerFast",
    "MBart50Tokenizer",
    "MBart50TokenizerFast",
    "NllbTokenizer",
    "NllbTokenizerFast",
    "M2M100Tokenizer",
)


# --------------------------------------------------------------------------------------------- flags
@dataclass
class DataArguments:
    """Which data to translate and how to turn it into model inputs (the flags of run_translation.py)."""

    source_lang: str | None = field(
        default=None,
        metadata={
            "help": "Source language: its key in the translation pairs ('en'), or an mBART/NLLB code ('en_XX')."
        },
    )
    target_lang: str | None = field(
        default=None, metadata={"help": "Target language, same format as source_lang."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "A translation dataset on the Hub (e.g. wmt16)."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Its configuration (e.g. de-en)."}
    )
    train_file: str | None = field(
        default=None,
        metadata={
            "help": 'Training data: JSON lines, one {"translation": {"en": "...", "de": "..."}} per line.'
        },
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Evaluation data (BLEU/chrF), same format."}
    )
    test_file: str | None = field(
        default=None, metadata={"help": "Prediction data (--do_predict), same format."}
    )
    source_prefix: str | None = field(
        default=None,
        metadata={"help": "Text put before every source, e.g. 'translate English to German: ' for T5."},
    )
    max_source_length: int = field(
        default=1024,
        metadata={
            "help": "Source tokens per example after tokenization; longer ones are truncated. Lowered, with a "
            "warning, to the teacher's or student's position limit (max_position_embeddings) when above it."
        },
    )
    max_target_length: int = field(
        default=128,
        metadata={
            "help": "Target tokens per training example after tokenization; longer ones are truncated. Lowered, "
            "with a warning, to the teacher's or student's position limit (max_position_embeddings) when above it."
        },
    )
    val_max_target_length: int | None = field(
        default=None,
        metadata={
            "help": "Target tokens per evaluation example; also the default of --generation_max_length. "
            "Default: max_target_length. This and --generation_max_length are lowered, with a warning, to the "
            "teacher's or student's position limit (max_position_embeddings) when above it, so that the default "
            "lengths work with any model."
        },
    )
    pad_to_max_length: bool = field(
        default=False,
        metadata={
            "help": "Pad every example to the maximum lengths (static shapes, e.g. for TPUs). By default batches are "
            "padded to their longest example, which is faster on CPU and GPU."
        },
    )
    num_beams: int | None = field(
        default=None,
        metadata={
            "help": "Beams for evaluation and prediction; overrides --generation_num_beams when given."
        },
    )
    forced_bos_token: str | None = field(
        default=None,
        metadata={
            "help": "Token forced as the first generated token, for multilingual models: the target language code "
            "of mBART-50 (de_DE) or NLLB (deu_Latn)."
        },
    )
    ignore_pad_token_for_loss: bool = field(
        default=True,
        metadata={"help": "Replace padding in the labels by -100 so that neither the loss nor KD counts it."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training examples."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N evaluation examples."}
    )
    max_predict_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N prediction examples."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenization."}
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute the tokenized datasets."})

    def __post_init__(self):
        if not self.source_lang or not self.target_lang:
            raise ValueError(
                f"Pass --source_lang and --target_lang (keys of the translation pairs, e.g. en and de); got "
                f"{self.source_lang!r} and {self.target_lang!r}."
            )
        files = [path for path in (self.train_file, self.validation_file, self.test_file) if path is not None]
        if self.dataset_name is None and not files:
            raise ValueError("No data: pass --dataset_name, or --train_file/--validation_file (JSON lines).")
        for path in files:
            if Path(path).suffix.lower() not in _FILE_SUFFIXES:
                raise ValueError(
                    f"Data file {path!r} must be JSON lines ({', '.join(_FILE_SUFFIXES)}) with one "
                    '{"translation": {...}} object per line.'
                )
        for name in ("max_source_length", "max_target_length", "val_max_target_length", "num_beams"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        if self.val_max_target_length is None:
            self.val_max_target_length = self.max_target_length

    @property
    def data_files(self) -> dict[str, str]:
        named = {"train": self.train_file, "validation": self.validation_file, "test": self.test_file}
        return {split: path for split, path in named.items() if path is not None}


@dataclass(kw_only=True)
class Seq2SeqModelArguments(ModelArguments):
    """`ModelArguments` plus the decoder depth of a student built from an encoder-decoder teacher.

    --student_num_layers shrinks the encoder, --student_num_decoder_layers the decoder. A deep encoder and a
    shallow decoder is the usual speed win: the decoder runs once per generated token.
    """

    student_num_decoder_layers: int | None = field(
        default=None,
        metadata={
            "help": "Decoder layers of a student built from the teacher (evenly spaced). Default: all of the "
            "teacher's decoder layers."
        },
    )
    student_decoder_layers: str | None = field(
        default=None,
        metadata={"help": "Which teacher decoder layers the student copies, e.g. '0,5' (0-based)."},
    )

    def __post_init__(self):
        if self.student_num_decoder_layers is not None and self.student_num_decoder_layers < 1:
            raise ValueError(
                f"student_num_decoder_layers must be >= 1, got {self.student_num_decoder_layers}."
            )
        decoder_layers = self.student_decoder_layer_indices()
        if (
            decoder_layers is not None
            and self.student_num_decoder_layers is not None
            and len(decoder_layers) != self.student_num_decoder_layers
        ):
            raise ValueError(
                f"student_decoder_layers {self.student_decoder_layers!r} lists {len(decoder_layers)} layers but "
                f"student_num_decoder_layers is {self.student_num_decoder_layers}; pass one of the two or make "
                "them agree."
            )
        shrinks_decoder = self.student_num_decoder_layers is not None or decoder_layers is not None
        if shrinks_decoder and self.student_model_name_or_path is not None:
            raise ValueError(
                "Pass either --student_model_name_or_path (a pretrained student) or --student_num_decoder_layers / "
                "--student_decoder_layers (a student built from the teacher), not both."
            )
        if shrinks_decoder and self.student_num_layers is None and self.student_layers is None:
            return  # only the decoder shrinks; the encoder keeps all of the teacher's layers
        super().__post_init__()

    def student_decoder_layer_indices(self) -> list[int] | None:
        """--student_decoder_layers as a list of ints, or None when not given."""
        if self.student_decoder_layers is None or self.student_decoder_layers.strip().lower() in (
            "",
            "uniform",
        ):
            return None
        try:
            return [int(part) for part in self.student_decoder_layers.split(",") if part.strip()]
        except ValueError:
            raise ValueError(
                "student_decoder_layers must be comma-separated layer indices such as '0,5', got "
                f"{self.student_decoder_layers!r}."
            ) from None


# --------------------------------------------------------------------------------------------- data
def load_raw_datasets(data_args: DataArguments, loading_args: LoadingArguments | None = None) -> DatasetDict:
    """The raw splits: local JSON lines files when given, else --dataset_name from the Hub."""
    cache_dir = loading_args.cache_dir if loading_args else None
    files = data_args.data_files
    if files:
        raw = DatasetDict()
        for split, path in files.items():
            if not Path(path).is_file():
                raise FileNotFoundError(f"--{split}_file {path!r} does not exist.")
            raw[split] = load_dataset("json", data_files={split: path}, split=split, cache_dir=cache_dir)
        return raw
    name, config = data_args.dataset_name, data_args.dataset_config_name
    return load_hub_dataset(
        name,
        config,
        local_files="local JSON lines files",
        cache_dir=cache_dir,
        token=loading_args.token if loading_args else None,
    )


def select_samples(raw: DatasetDict, data_args: DataArguments) -> DatasetDict:
    """The first --max_{train,eval,predict}_samples examples of each split."""
    limits = {
        "train": data_args.max_train_samples,
        "validation": data_args.max_eval_samples,
        "test": data_args.max_predict_samples,
    }
    selected = DatasetDict()
    for split, dataset in raw.items():
        limit = limits.get(split)
        selected[split] = dataset.select(range(min(limit, len(dataset)))) if limit is not None else dataset
    return selected


def check_splits(raw: DatasetDict, do_train: bool, do_eval: bool, do_predict: bool) -> None:
    """Fail before any model is loaded when a requested stage has no data."""
    for flag, requested, split in (
        ("--do_train", do_train, "train"),
        ("--do_eval", do_eval, "validation"),
        ("--do_predict", do_predict, "test"),
    ):
        if requested and split not in raw:
            raise ValueError(
                f"{flag} needs {split} data, but the loaded splits are {list(raw)}; pass --{split}_file or drop {flag}."
            )


@dataclass(frozen=True)
class LanguagePair:
    source_lang: str  # as given on the command line (may be an mBART/NLLB code such as en_XX)
    target_lang: str
    source_key: str  # the key in the data's translation dicts
    target_key: str


def language_keys(dataset: Dataset) -> list[str]:
    """The language keys of a dataset's translation pairs (Translation feature or a dict of strings)."""
    feature = dataset.features.get(TRANSLATION_COLUMN)
    if isinstance(feature, Translation):
        return list(feature.languages)
    if isinstance(feature, dict):
        return list(feature)
    return []


def _match_language(code: str, keys: Sequence[str]) -> str | None:
    if code in keys:
        return code
    short = code.split("_")[0]  # mBART/NLLB codes: en_XX -> en, eng_Latn -> eng
    return short if short in keys else None


def resolve_languages(raw: DatasetDict, data_args: DataArguments) -> LanguagePair:
    """The data keys of --source_lang/--target_lang, checked in every split."""
    keys_by_split: dict[str, list[str]] = {}
    for split, dataset in raw.items():
        if TRANSLATION_COLUMN not in dataset.column_names:
            raise ValueError(
                f"The {split} data has no {TRANSLATION_COLUMN!r} column (columns found: {dataset.column_names}); "
                'each example must look like {"translation": {"'
                + data_args.source_lang
                + '": "...", "'
                + data_args.target_lang
                + '": "..."}}.'
            )
        keys_by_split[split] = language_keys(dataset)
    resolved = {}
    for role, code in (("source", data_args.source_lang), ("target", data_args.target_lang)):
        for split, keys in keys_by_split.items():
            key = _match_language(code, keys)
            if key is None:
                raise ValueError(
                    f"{role} language {code!r} (--{role}_lang) is not in the {split} data's translation pairs; "
                    f"language keys found: {keys}. Pass --{role}_lang with one of them."
                )
            resolved[role] = key
    if resolved["source"] == resolved["target"]:
        raise ValueError(
            f"--source_lang and --target_lang both select {resolved['source']!r}; pick two languages."
        )
    return LanguagePair(data_args.source_lang, data_args.target_lang, resolved["source"], resolved["target"])


def preprocess_batch(
    examples: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    languages: LanguagePair,
    *,
    source_prefix: str | None,
    max_source_length: int,
    max_target_length: int,
    pad_to_max_length: bool = False,
    ignore_pad_token_for_loss: bool = True,
) -> dict[str, list[list[int]]]:
    """Tokenize a batch of translation pairs: input_ids/attention_mask from the prefixed sources, labels from
    the targets. With padding to max length, label padding becomes -100 when ignore_pad_token_for_loss."""
    prefix = source_prefix or ""
    sources, targets = [], []
    for pair in examples[TRANSLATION_COLUMN]:
        source, target = pair.get(languages.source_key), pair.get(languages.target_key)
        if source is None or target is None:
            missing = languages.source_key if source is None else languages.target_key
            present = [key for key, value in pair.items() if value is not None]
            raise ValueError(f"A translation pair has no {missing!r} text (it has {present}): {dict(pair)}.")
        sources.append(prefix + source)
        targets.append(target)
    padding = "max_length" if pad_to_max_length else False
    model_inputs = tokenizer(
        sources, max_length=max_source_length, padding=padding, truncation=True, return_token_type_ids=False
    )
    labels = tokenizer(
        text_target=targets,
        max_length=max_target_length,
        padding=padding,
        truncation=True,
        return_token_type_ids=False,
    )["input_ids"]
    if pad_to_max_length and ignore_pad_token_for_loss:
        pad = tokenizer.pad_token_id
        labels = [[token if token != pad else -100 for token in sequence] for sequence in labels]
    model_inputs["labels"] = labels
    return dict(model_inputs)


def tokenize_datasets(
    raw: DatasetDict, tokenizer: PreTrainedTokenizerBase, languages: LanguagePair, data_args: DataArguments
) -> DatasetDict:
    """Every split tokenized; training targets are cut at max_target_length, the others at val_max_target_length."""
    tokenized = DatasetDict()
    for split, dataset in raw.items():
        max_target_length = (
            data_args.max_target_length if split == "train" else data_args.val_max_target_length
        )
        tokenized[split] = dataset.map(
            preprocess_batch,
            batched=True,
            fn_kwargs={
                "tokenizer": tokenizer,
                "languages": languages,
                "source_prefix": data_args.source_prefix,
                "max_source_length": data_args.max_source_length,
                "max_target_length": max_target_length,
                "pad_to_max_length": data_args.pad_to_max_length,
                "ignore_pad_token_for_loss": data_args.ignore_pad_token_for_loss,
            },
            remove_columns=dataset.column_names,
            num_proc=data_args.preprocessing_num_workers,
            load_from_cache_file=not data_args.overwrite_cache,
            desc=f"Tokenizing {split}",
        )
    return tokenized


def data_collator(
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel | None,
    data_args: DataArguments,
    fp16: bool = False,
) -> Callable:
    """Pads sources, and labels with -100 (or the pad id without ignore_pad_token_for_loss); with `model`, also
    builds decoder_input_ids from the labels."""
    if data_args.pad_to_max_length:
        return default_data_collator
    return DataCollatorForSeq2Seq(
        tokenizer,
        model=model,
        label_pad_token_id=-100 if data_args.ignore_pad_token_for_loss else tokenizer.pad_token_id,
        pad_to_multiple_of=8 if fp16 else None,
    )


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


# --------------------------------------------------------------------------------------------- models
def is_multilingual_tokenizer(tokenizer: Any) -> bool:
    return type(tokenizer).__name__ in _MULTILINGUAL_TOKENIZERS


def check_vocabularies(
    teacher_config: PretrainedConfig,
    student_config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase | None = None,
) -> None:
    """Word-level KD compares the decoders' logits token by token, so teacher and student must share a
    vocabulary. Embedding matrices padded past the tokenizer (to a multiple of 8 or 64) are fine."""
    fix = (
        "Build the student from the teacher (--student_num_layers / --student_num_decoder_layers), or use a "
        "student trained with the teacher's tokenizer."
    )
    if student_tokenizer is not None and student_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"The student's tokenizer ({type(student_tokenizer).__name__}, {len(student_tokenizer)} tokens) and the "
            f"teacher's ({type(tokenizer).__name__}, {len(tokenizer)} tokens) have different vocabularies, so their "
            f"logits are over different tokens and cannot be distilled word by word. {fix}"
        )
    teacher_vocab = teacher_config.get_text_config().vocab_size
    student_vocab = student_config.get_text_config().vocab_size
    if teacher_vocab != student_vocab and min(teacher_vocab, student_vocab) < len(tokenizer):
        raise ValueError(
            f"The teacher's vocabulary has {teacher_vocab} tokens and the student's {student_vocab}, and the smaller "
            f"does not cover the teacher's tokenizer ({len(tokenizer)} tokens): the models do not share a tokenizer, "
            f"which word-level KD needs. {fix}"
        )


def _load_student_tokenizer(path: str, loading_args: LoadingArguments) -> PreTrainedTokenizerBase | None:
    """The tokenizer stored with a pretrained student, or None when it has none."""
    if Path(path).is_dir() and not (Path(path) / "tokenizer_config.json").is_file():
        return None  # save_pretrained of any tokenizer writes tokenizer_config.json
    try:
        return load_pretrained(AutoTokenizer, path, role="student tokenizer", loading_args=loading_args)
    except (OSError, ValueError, TypeError):
        return None


def resolve_token_id(tokenizer: PreTrainedTokenizerBase, token: str, flag: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(
            f"{flag} {token!r} is not a token of the teacher's tokenizer ({type(tokenizer).__name__}); pass one of "
            "its language codes (mBART-50: de_DE, NLLB: deu_Latn)."
        )
    return int(token_id)


@dataclass
class TranslationModels:
    teacher: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    make_student: Callable[
        [], PreTrainedModel
    ]  # a fresh student each call (same initialisation under a seed)
    forced_bos_token_id: int | None = None
    # The fewest positions teacher and student hold (max_position_embeddings); None when neither has a limit (T5).
    max_positions: int | None = None
    # Ids the student and the tokenizer share: min(len(tokenizer), the student's vocab_size).
    vocab_size: int | None = None


def load_translation_models(
    model_args: Seq2SeqModelArguments, data_args: DataArguments, languages: LanguagePair
) -> TranslationModels:
    """Teacher, tokenizer and student factory, checked before anything trains.

    Errors: the teacher is not an encoder-decoder model; teacher and student vocabularies differ; an unknown
    --forced_bos_token; a model that cannot be found offline. Warns for T5 without --source_prefix.
    """
    teacher_path = model_args.teacher_model_name_or_path
    teacher_config = load_pretrained(AutoConfig, teacher_path, role="teacher", loading_args=model_args)
    if not getattr(teacher_config, "is_encoder_decoder", False):
        raise ValueError(
            f"The teacher {teacher_path!r} ({teacher_config.model_type}) is not an encoder-decoder model; this recipe "
            "distils translation models such as Marian (opus-mt), T5, BART/mBART or NLLB."
        )
    tokenizer = load_pretrained(
        AutoTokenizer, model_args.tokenizer_name or teacher_path, role="tokenizer", loading_args=model_args
    )
    if teacher_config.model_type == "t5" and data_args.source_prefix is None:
        logger.warning(
            "You're running a t5 model but didn't provide a source prefix, which is expected, e.g. with "
            "`--source_prefix 'translate English to German: '`"
        )
    if is_multilingual_tokenizer(tokenizer):
        tokenizer.src_lang, tokenizer.tgt_lang = languages.source_lang, languages.target_lang

    student_config = None
    if model_args.student_model_name_or_path is not None:
        student_path = model_args.student_model_name_or_path
        student_config = load_pretrained(AutoConfig, student_path, role="student", loading_args=model_args)
        if not getattr(student_config, "is_encoder_decoder", False):
            raise ValueError(
                f"The student {student_path!r} ({student_config.model_type}) is not an encoder-decoder model."
            )
        student_tokenizer = (
            None if model_args.tokenizer_name else _load_student_tokenizer(student_path, model_args)
        )
        check_vocabularies(teacher_config, student_config, tokenizer, student_tokenizer)

    teacher = load_pretrained(
        AutoModelForSeq2SeqLM, teacher_path, role="teacher", loading_args=model_args, config=teacher_config
    )
    forced_bos_token_id = None
    if data_args.forced_bos_token is not None:
        forced_bos_token_id = resolve_token_id(tokenizer, data_args.forced_bos_token, "--forced_bos_token")
    _configure_generation(teacher, tokenizer, languages, forced_bos_token_id)

    def make_student() -> PreTrainedModel:
        if student_config is not None:
            student = load_pretrained(
                AutoModelForSeq2SeqLM,
                model_args.student_model_name_or_path,
                role="student",
                loading_args=model_args,
                config=copy.deepcopy(student_config),
            )
        else:
            from hf_distill import create_student

            layers = model_args.student_layer_indices()
            decoder_layers = model_args.student_decoder_layer_indices()
            student = create_student(
                teacher,
                num_hidden_layers=model_args.student_num_layers,
                layers="uniform" if layers is None else layers,
                num_decoder_layers=model_args.student_num_decoder_layers,
                decoder_layers="uniform" if decoder_layers is None else decoder_layers,
            )
        _configure_generation(student, tokenizer, languages, forced_bos_token_id)
        if model_args.freeze_embeddings:
            logger.info(
                f"Froze {freeze_input_embeddings(student):,} input-embedding parameters of the student."
            )
        return student

    # A student built from the teacher keeps the teacher's vocabulary and position table.
    student_or_teacher = student_config if student_config is not None else teacher_config
    return TranslationModels(
        teacher,
        tokenizer,
        make_student,
        forced_bos_token_id,
        max_positions=min_positions(teacher_config, student_config),
        vocab_size=shared_vocab_size(tokenizer, model_vocab_size(student_or_teacher)),
    )


def _configure_generation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    languages: LanguagePair,
    forced_bos_token_id: int | None,
) -> None:
    """mBART starts decoding with the target language code; mBART-50/NLLB force it as the first token."""
    if getattr(model.config, "decoder_start_token_id", None) is None and is_multilingual_tokenizer(tokenizer):
        model.config.decoder_start_token_id = resolve_token_id(
            tokenizer, languages.target_lang, "--target_lang"
        )
    if getattr(model.config, "decoder_start_token_id", None) is None:
        raise ValueError(
            f"{type(model).__name__} has no decoder_start_token_id in its config.json; set it (the pad id for T5 "
            "and Marian, the bos or eos id for BART, the target language code for mBART)."
        )
    if forced_bos_token_id is not None:
        model.generation_config.forced_bos_token_id = forced_bos_token_id


class GenerationLatency(nn.Module):
    """A seq2seq model whose forward pass is `generate`, so that `report.measure_latency` times translation
    (what a user of the model waits for) rather than one teacher-forced forward pass. `count_parameters` and
    `size_on_disk_mb` see the wrapped model unchanged."""

    def __init__(self, model: PreTrainedModel, **generate_kwargs: Any):
        super().__init__()
        self.model = model
        self.generate_kwargs = {key: value for key, value in generate_kwargs.items() if value is not None}

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model.generate(**inputs, **self.generate_kwargs)

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
        self.model.save_pretrained(*args, **kwargs)


# --------------------------------------------------------------------------------------------- sequence-level KD
def project_pairs(dataset: Dataset, languages: LanguagePair) -> Dataset:
    """Only the translation column, with only the source and target languages (string features)."""
    source_key, target_key = languages.source_key, languages.target_key
    features = Features({TRANSLATION_COLUMN: {source_key: Value("string"), target_key: Value("string")}})
    return dataset.map(
        lambda pair: {TRANSLATION_COLUMN: {source_key: pair[source_key], target_key: pair[target_key]}},
        input_columns=TRANSLATION_COLUMN,
        remove_columns=dataset.column_names,
        features=features,
        desc="Selecting the language pair",
    )


def seq_kd_pairs(cached: Dataset, languages: LanguagePair) -> Dataset:
    """The cache's (source, teacher translation) rows as translation pairs."""
    source_key, target_key = languages.source_key, languages.target_key
    features = Features({TRANSLATION_COLUMN: {source_key: Value("string"), target_key: Value("string")}})
    return Dataset.from_dict(
        {
            TRANSLATION_COLUMN: [
                {source_key: source, target_key: target}
                for source, target in zip(cached["source"], cached["target"])
            ]
        },
        features=features,
    )


def build_seq_kd_train_dataset(
    train: Dataset,
    models: TranslationModels,
    model_args: Seq2SeqModelArguments,
    data_args: DataArguments,
    seq_kd_args: seq_kd_cache.SeqKDArguments,
    languages: LanguagePair,
    cache_dir: str,
    device: torch.device | str | None = None,
) -> Dataset:
    """The raw training set of sequence-level KD: the teacher's beam-search translations of the training
    sources (from the cache, generated if needed), alone (seq_kd_mix=none) or after the reference pairs
    (seq_kd_mix=concat)."""
    pairs = project_pairs(train, languages)
    sources = [pair[languages.source_key] for pair in pairs[TRANSLATION_COLUMN]]
    # The teacher writes at most as many tokens as its position table holds (lowered with a warning).
    max_length = bound_length(
        seq_kd_args.seq_kd_max_length or data_args.max_target_length,
        max_positions(models.teacher.config),
        "--seq_kd_max_length",
        "the teacher",
    )
    identity = seq_kd_cache.cache_identity(
        teacher=model_args.teacher_model_name_or_path,
        teacher_fingerprint=seq_kd_cache.model_fingerprint(models.teacher),
        tokenizer=model_args.tokenizer_name or model_args.teacher_model_name_or_path,
        source_lang=languages.source_lang,
        target_lang=languages.target_lang,
        source_prefix=data_args.source_prefix,
        max_source_length=data_args.max_source_length,
        num_beams=seq_kd_args.seq_kd_num_beams,
        max_length=max_length,
        forced_bos_token=data_args.forced_bos_token,
        sources=sources,
        vocab_size=models.vocab_size,
    )

    def translate(texts: Sequence[str]) -> list[str]:
        teacher = models.teacher
        original_device = next(teacher.parameters()).device
        teacher.to(device or original_device)
        try:
            return seq_kd_cache.translate_with_teacher(
                teacher,
                models.tokenizer,
                texts,
                source_prefix=data_args.source_prefix,
                max_source_length=data_args.max_source_length,
                num_beams=seq_kd_args.seq_kd_num_beams,
                max_length=max_length,
                batch_size=seq_kd_args.seq_kd_batch_size,
                forced_bos_token_id=models.forced_bos_token_id,
                vocab_size=models.vocab_size,
            )
        finally:
            teacher.to(original_device)

    cached = seq_kd_cache.load_or_build(
        cache_dir, identity, sources, translate, overwrite=seq_kd_args.seq_kd_overwrite_cache
    )
    distilled = seq_kd_pairs(cached, languages)
    if seq_kd_args.seq_kd_mix == "none":
        return distilled
    from datasets import concatenate_datasets

    return concatenate_datasets([pairs, distilled])


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
    from .common import save_metrics, train_and_save

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
