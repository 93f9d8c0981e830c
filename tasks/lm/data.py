"""Causal-LM data: loading, the layouts (raw text, prompt/completion, chat messages), tokenization and packing,
and the collator that pads rows into batches.

Every tokenized row has `input_ids`, `attention_mask` and `labels`:
- text: each text tokenized, all of them concatenated and cut into `block_size` blocks, the remainder of each
  map batch dropped (as transformers' run_clm.py does); labels = input_ids.
- prompt/completion (`prompt`/`completion` columns, or chat `messages` lists whose last message is the
  assistant's answer): one row per example, truncated to `block_size`; labels are -100 on the prompt, so the
  prompt is in no loss. Rows whose prompt fills the whole block are dropped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging

from hf_distill.caches.format import INDICES_COLUMN, LOGPROBS_COLUMN, TAIL_COLUMN
from hf_distill.tasks.common import raw_data
from hf_distill.tasks.common.arguments import LoadingArguments
from hf_distill.tasks.common.generation_limits import bound_length
from hf_distill.tasks.lm.args import DEFAULT_BLOCK_SIZE, MESSAGES, PROMPT_COMPLETION, TEXT, DataArguments
from hf_distill.training.on_policy import IGNORE_INDEX

logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------------- raw data
def load_raw_datasets(
    data_args: DataArguments, loading_args: LoadingArguments | None = None
) -> DatasetDict | IterableDatasetDict:
    """The train/validation splits. Without a validation split, the first --validation_split_percentage percent
    of the training data becomes it (as run_clm.py does)."""
    return raw_data.load_raw_datasets(
        data_args,
        loading_args,
        local_files="local files (.txt, .json/.jsonl, .csv or .parquet)",
        hub_splits=("train", "validation"),
        streaming=data_args.streaming,
        validation_split_percentage=data_args.validation_split_percentage,
        keep_linebreaks=data_args.keep_linebreaks,
    )


@dataclass(frozen=True)
class DataFormat:
    kind: str  # TEXT, PROMPT_COMPLETION or MESSAGES
    columns: tuple[str, ...]  # (text,), (prompt, completion) or (messages,)

    @property
    def has_prompts(self) -> bool:
        return self.kind != TEXT


def _column_names(dataset: Any) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names is None:  # a streamed dataset whose features are unknown until read
        names = list(next(iter(dataset)).keys())
    return list(names)


def resolve_data_format(raw: Mapping[str, Any], data_args: DataArguments) -> DataFormat:
    """Which layout the data has and which columns hold it; raises naming the columns found when one is missing."""
    if not raw:
        raise ValueError("No data splits were loaded.")
    columns = {split: _column_names(dataset) for split, dataset in raw.items()}
    reference = columns.get("train", next(iter(columns.values())))
    kind = data_args.data_format
    if kind == "auto":
        if data_args.messages_column_name in reference:
            kind = MESSAGES
        elif data_args.prompt_column_name in reference and data_args.completion_column_name in reference:
            kind = PROMPT_COMPLETION
        else:
            kind = TEXT
    if kind == MESSAGES:
        needed = (data_args.messages_column_name,)
        hint = "--messages_column_name"
    elif kind == PROMPT_COMPLETION:
        needed = (data_args.prompt_column_name, data_args.completion_column_name)
        hint = "--prompt_column_name/--completion_column_name"
    else:
        needed = (data_args.text_column_name or "text",)
        hint = "--text_column_name (raw text), or give prompt/completion or messages columns"
    for split, names in columns.items():
        missing = [column for column in needed if column not in names]
        if missing:
            raise ValueError(
                f"Column(s) {missing} not found in the {split} data ({kind} format); columns found: {names}. "
                f"Pass {hint}."
            )
    return DataFormat(kind, needed)


def check_splits(raw: Mapping[str, Any], do_train: bool, do_eval: bool) -> None:
    """Fail before any model is loaded when a requested stage has no data."""
    needs = []
    if do_train:
        needs.append(
            ("training", ("train",), "a train split", "pass --train_file or a --dataset_name that has one")
        )
    if do_eval:
        needs.append(
            (
                "--do_eval",
                ("validation",),
                "validation data",
                "pass --validation_file or a --validation_split_percentage above 0",
            )
        )
    raw_data.require_splits(raw, needs)


# --------------------------------------------------------------------------------------------- tokenization
def resolve_block_size(
    data_args: DataArguments, tokenizer: PreTrainedTokenizerBase, max_positions: int | None = None
) -> int:
    """--block_size, or the tokenizer's maximum length capped at 1024; never more than the tokenizer's maximum,
    nor than `max_positions` (the models' position limit, `position_limit`), each with a warning."""
    model_max = tokenizer.model_max_length
    if data_args.block_size is None:
        if model_max > DEFAULT_BLOCK_SIZE:
            logger.warning(
                f"The tokenizer allows {model_max} tokens; using a block size of {DEFAULT_BLOCK_SIZE}. Pass "
                "--block_size for another value."
            )
        block_size = min(DEFAULT_BLOCK_SIZE, model_max)
    elif data_args.block_size > model_max:
        logger.warning(
            f"--block_size {data_args.block_size} exceeds the tokenizer's maximum length ({model_max}); using {model_max}."
        )
        block_size = model_max
    else:
        block_size = data_args.block_size
    return bound_length(block_size, max_positions, "--block_size", "the teacher or student")


def pack_into_blocks(token_lists: Iterable[Sequence[int]], block_size: int) -> list[list[int]]:
    """Concatenate the token lists and cut them into blocks of `block_size`; the remainder is dropped."""
    concatenated = list(chain.from_iterable(token_lists))
    usable = (len(concatenated) // block_size) * block_size
    return [concatenated[start : start + block_size] for start in range(0, usable, block_size)]


def encode_prompt_completion(
    prompt_ids: Sequence[int], completion_ids: Sequence[int], max_length: int
) -> dict[str, list[int]] | None:
    """One training row: prompt then completion, cut to `max_length`; labels -100 on the prompt. None when the
    prompt leaves no completion token inside `max_length`."""
    input_ids = (list(prompt_ids) + list(completion_ids))[:max_length]
    if len(prompt_ids) >= len(input_ids):
        return None
    labels = [IGNORE_INDEX] * len(prompt_ids) + input_ids[len(prompt_ids) :]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def render_messages(
    messages: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase
) -> tuple[str, str]:
    """(prompt text, completion text) of a conversation whose last message is the assistant's answer.

    With a chat template: the prompt is the conversation before the answer rendered with the generation prompt,
    the completion what rendering the whole conversation adds to it. Without one: "role: content" lines and an
    "assistant:" cue (a warning is logged once).
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(
            f"a messages entry must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}."
        )
    for message in messages:
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"each message needs 'role' and 'content' keys, got {message!r}.")
    if messages[-1]["role"] != "assistant":
        raise ValueError(
            f"the last message of a conversation is the completion to learn and must have role 'assistant', got "
            f"{messages[-1]['role']!r}."
        )
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(
            list(messages[:-1]), tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(list(messages), tokenize=False)
        if not full.startswith(prompt):
            raise ValueError(
                "the tokenizer's chat template renders the conversation without its answer (plus the generation "
                "prompt) differently from the start of the whole conversation, so prompt and answer cannot be "
                "separated; convert the data to prompt/completion columns."
            )
        return prompt, full[len(prompt) :]
    _warn_no_chat_template()
    prompt = "".join(f"{message['role']}: {message['content']}\n" for message in messages[:-1]) + "assistant:"
    return prompt, " " + str(messages[-1]["content"])


_warned_about_template = False


def _warn_no_chat_template() -> None:
    global _warned_about_template
    if not _warned_about_template:
        logger.warning("The tokenizer has no chat template: rendering messages as 'role: content' lines.")
        _warned_about_template = True


def _tokenize_pair(
    prompt: str, completion: str, tokenizer: PreTrainedTokenizerBase, templated: bool
) -> tuple[list[int], list[int]]:
    # A rendered chat template usually carries its own bos; plain prompts get the tokenizer's special tokens.
    bos = tokenizer.bos_token
    add_special = not (templated and bos is not None and prompt.startswith(bos))
    prompt_ids = tokenizer(prompt, add_special_tokens=add_special)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    # The answer must end with eos for the student to learn to stop; templates often add an end-of-turn token
    # (the eos of chat tokenizers), possibly followed by a newline, which is kept as rendered.
    if eos is not None and eos not in completion_ids:
        completion_ids = completion_ids + [eos]
    return prompt_ids, completion_ids


def tokenize_split(
    dataset: Any,
    data_format: DataFormat,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    data_args: DataArguments,
    split: str,
) -> Any:
    """input_ids / attention_mask / labels rows of one raw split (see the module docstring for the layouts)."""
    streaming = isinstance(dataset, IterableDataset)
    map_options: dict[str, Any] = {"batched": True, "remove_columns": _column_names(dataset)}
    if not streaming:
        map_options.update(data_args.map_options(split))

    if data_format.kind == TEXT:
        (column,) = data_format.columns

        def tokenize_and_pack(batch: dict[str, list]) -> dict[str, list]:
            texts = [text for text in batch[column] if isinstance(text, str) and text.strip()]
            token_lists = tokenizer(texts)["input_ids"] if texts else []
            blocks = pack_into_blocks(token_lists, block_size)
            return {
                "input_ids": blocks,
                "attention_mask": [[1] * block_size for _ in blocks],
                "labels": [list(b) for b in blocks],
            }

        # Long texts are split into blocks, so the tokenizer's length warning does not apply.
        with _quiet_length_warning():
            return dataset.map(tokenize_and_pack, **map_options)

    templated = data_format.kind == MESSAGES and bool(getattr(tokenizer, "chat_template", None))

    def encode(batch: dict[str, list]) -> dict[str, list]:
        rows: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        if data_format.kind == MESSAGES:
            pairs = [render_messages(messages, tokenizer) for messages in batch[data_format.columns[0]]]
        else:
            prompts, completions = (batch[column] for column in data_format.columns)
            pairs = [
                ("" if p is None else str(p), "" if c is None else str(c))
                for p, c in zip(prompts, completions)
            ]
        for prompt, completion in pairs:
            row = encode_prompt_completion(
                *_tokenize_pair(prompt, completion, tokenizer, templated), block_size
            )
            if row is not None:
                for key, value in row.items():
                    rows[key].append(value)
        return rows

    encoded = dataset.map(encode, **map_options)
    if not streaming and len(encoded) < len(dataset):
        logger.warning(
            f"{len(dataset) - len(encoded)} of {len(dataset)} {split} examples were dropped: their prompt fills the "
            f"whole block of {block_size} tokens, leaving no completion token to learn (raise --block_size)."
        )
    return encoded


@contextlib.contextmanager
def _quiet_length_warning() -> Iterator[None]:
    """Silence 'Token indices sequence length is longer than the specified maximum' while packing."""
    tokenizer_logger = logging.get_logger("transformers.tokenization_utils_base")
    level = tokenizer_logger.level
    tokenizer_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        tokenizer_logger.setLevel(level)


def preprocess(
    raw: Mapping[str, Any],
    data_format: DataFormat,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    data_args: DataArguments,
) -> dict[str, Any]:
    """Tokenized splits. --max_train_samples / --max_eval_samples count rows after tokenization (blocks for raw
    text, as in run_clm.py). Raises when a split ends up empty."""
    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples}
    tokenized: dict[str, Any] = {}
    for split, dataset in raw.items():
        rows = tokenize_split(dataset, data_format, tokenizer, block_size, data_args, split)
        limit = limits.get(split)
        if isinstance(rows, IterableDataset):
            if limit is not None:
                rows = rows.take(limit)
            if split == "validation":
                # Evaluation and the report need a sized dataset; the evaluation set is small.
                if limit is None:
                    raise ValueError(
                        "--streaming with --do_eval needs --max_eval_samples (rows to evaluate on)."
                    )
                rows = Dataset.from_list(list(rows))
        elif limit is not None:
            rows = rows.select(range(min(limit, len(rows))))
        if not isinstance(rows, IterableDataset) and len(rows) == 0:
            what = (
                f"blocks of {block_size} tokens" if data_format.kind == TEXT else "examples with a completion"
            )
            raise ValueError(f"The {split} data yields no {what}; give more data or a smaller --block_size.")
        tokenized[split] = rows
    return tokenized


def prompt_ids_of(row: Mapping[str, Any]) -> list[int]:
    """The prompt of a tokenized prompt/completion row: its tokens before the first labelled one."""
    labels = list(row["labels"])
    start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    return [int(token) for token in list(row["input_ids"])[:start]]


# --------------------------------------------------------------------------------------------- batches
@dataclass
class CausalLMCollator:
    """Right-pads rows into a batch: input_ids with the pad id, attention_mask with 0, labels with -100.

    Rows may be lists, arrays or tensors. Cached teacher columns (`teacher_topk_logprobs`, `teacher_topk_indices`,
    stored flat as T * k values per row) become (B, T, k) float32 / long tensors padded with 0.0 / 0, and
    `teacher_tail_logmass` (T values) a (B, T) float32 tensor padded with 0.0; padded positions have labels -100
    and count in no loss. Rows without labels learn every token.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [np.asarray(feature["input_ids"], dtype=np.int64) for feature in features]
        lengths = [row.size for row in rows]
        length = max(lengths)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_size = len(rows)
        input_ids = np.full((batch_size, length), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((batch_size, length), dtype=np.int64)
        labels = np.full((batch_size, length), IGNORE_INDEX, dtype=np.int64)
        for i, (feature, row) in enumerate(zip(features, rows)):
            input_ids[i, : row.size] = row
            mask = feature.get("attention_mask")
            attention_mask[i, : row.size] = 1 if mask is None else np.asarray(mask)
            row_labels = feature.get("labels")
            labels[i, : row.size] = row if row_labels is None else np.asarray(row_labels)
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels),
        }
        if LOGPROBS_COLUMN in features[0]:
            k = np.asarray(features[0][INDICES_COLUMN]).size // max(lengths[0], 1)
            logprobs = np.zeros((batch_size, length, k), dtype=np.float32)
            indices = np.zeros((batch_size, length, k), dtype=np.int64)
            for i, (feature, size) in enumerate(zip(features, lengths)):
                logprobs[i, :size] = np.asarray(feature[LOGPROBS_COLUMN]).reshape(size, k)
                indices[i, :size] = np.asarray(feature[INDICES_COLUMN]).reshape(size, k)
            batch[LOGPROBS_COLUMN] = torch.from_numpy(logprobs)
            batch[INDICES_COLUMN] = torch.from_numpy(indices)
        if TAIL_COLUMN in features[0]:
            tails = np.zeros((batch_size, length), dtype=np.float32)
            for i, (feature, size) in enumerate(zip(features, lengths)):
                tails[i, :size] = np.asarray(feature[TAIL_COLUMN])
            batch[TAIL_COLUMN] = torch.from_numpy(tails)
        return batch
