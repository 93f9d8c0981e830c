"""Translation data in the format of transformers' run_translation.py: a Hub dataset (--dataset_name) or JSON lines
files, one `{"translation": {"en": "...", "de": "..."}}` per line. Loading, the language keys, tokenization,
batching, and the translation pairs that sequence-level KD reads and writes. Pure functions of datasets, testable
without a model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from datasets import Dataset, DatasetDict, Features, Translation, Value
from transformers import (
    DataCollatorForSeq2Seq,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    default_data_collator,
)

from hf_distill.tasks.common import raw_data
from hf_distill.tasks.common.arguments import LoadingArguments
from hf_distill.tasks.translation.args import DataArguments

TRANSLATION_COLUMN = "translation"


# --------------------------------------------------------------------------------------------- splits
def load_raw_datasets(data_args: DataArguments, loading_args: LoadingArguments | None = None) -> DatasetDict:
    """The raw splits: local JSON lines files when given, else --dataset_name from the Hub."""
    return raw_data.load_raw_datasets(data_args, loading_args, local_files="local JSON lines files")


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
    raw_data.require_splits(raw, raw_data.stage_needs(do_train, do_eval, do_predict))


# --------------------------------------------------------------------------------------------- languages
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


# --------------------------------------------------------------------------------------------- tokens
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
            **data_args.map_options(split),
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


# --------------------------------------------------------------------------------------------- pairs
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
