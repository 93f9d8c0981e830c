"""Causal language modelling: data (raw text packed into blocks, or prompt/completion and chat data where only the
completion is learned), the padding collator, teacher/student/tokenizer loading, LoRA students, sequence-level
KD data, and the generations of the report.

Data layouts (every tokenized row has `input_ids`, `attention_mask` and `labels`):
- text: each text tokenized, all of them concatenated and cut into `block_size` blocks, the remainder of each
  map batch dropped (as transformers' run_clm.py does); labels = input_ids.
- prompt/completion (`prompt`/`completion` columns, or chat `messages` lists whose last message is the
  assistant's answer): one row per example, truncated to `block_size`; labels are -100 on the prompt, so the
  prompt is in no loss. Rows whose prompt fills the whole block are dropped.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, load_dataset, load_from_disk
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging

from hf_distill.logit_cache import (
    INDICES_COLUMN,
    LOGPROBS_COLUMN,
    TAIL_COLUMN,
    atomic_directory,
    model_fingerprint,
    read_manifest,
    tokenizer_description,
    write_manifest,
)
from hf_distill.on_policy import IGNORE_INDEX, generate_completions, prompt_token_lists

from .common import (
    LoadingArguments,
    ModelArguments,
    ReportArguments,
    build_student,
    load_hub_dataset,
    load_pretrained,
)
from .generation_limits import (
    bound_length,
    check_token_ids,
    max_positions,
    min_positions,
    model_vocab_size,
    vocabulary_constraint,
)

logger = logging.get_logger(__name__)

TEXT, PROMPT_COMPLETION, MESSAGES = "text", "prompt_completion", "messages"
DATA_FORMATS = ("auto", TEXT, PROMPT_COMPLETION, MESSAGES)
_FILE_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
)
DEFAULT_BLOCK_SIZE = 1024
SEQ_KD_DATA_DIR = "data"


# --------------------------------------------------------------------------------------------- flags
@dataclass(kw_only=True)
class LMModelArguments(ModelArguments):
    """Teacher and student of a causal-LM distillation run."""

    teacher_tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "The teacher's tokenizer, if not stored with the teacher. It must equal the student's: "
            "different vocabularies are rejected before training."
        },
    )


@dataclass(kw_only=True)
class TeacherArguments(LoadingArguments):
    """The teacher alone (scripts/cache_teacher_logits.py)."""

    teacher_model_name_or_path: str = field(
        metadata={"help": "The teacher: a Hub name or a local directory with config.json."}
    )
    teacher_tokenizer_name: str | None = field(
        default=None, metadata={"help": "The teacher's tokenizer, if not stored with the teacher."}
    )


@dataclass
class DataArguments:
    """Which text to train and evaluate on, and how it becomes model inputs (flags of run_clm.py plus
    prompt/completion data)."""

    dataset_name: str | None = field(default=None, metadata={"help": "A dataset on the Hub (needs network)."})
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration of --dataset_name."}
    )
    train_file: str | None = field(
        default=None,
        metadata={"help": "Training data: .txt (one text per line), .json/.jsonl, .csv or .parquet."},
    )
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation data, same format."})
    data_format: str = field(
        default="auto",
        metadata={
            "help": f"One of {DATA_FORMATS}. auto: a messages column means chat data, prompt and completion "
            "columns mean prompt/completion data, otherwise raw text."
        },
    )
    text_column_name: str | None = field(
        default=None, metadata={"help": "Column of raw text (default 'text')."}
    )
    prompt_column_name: str = field(
        default="prompt", metadata={"help": "Prompt column of prompt/completion data."}
    )
    completion_column_name: str = field(
        default="completion", metadata={"help": "Completion column of prompt/completion data."}
    )
    messages_column_name: str = field(
        default="messages",
        metadata={
            "help": "Column of chat data: lists of {'role', 'content'} whose last message (the assistant's) is "
            "learned; rendered with the tokenizer's chat template when it has one."
        },
    )
    block_size: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per training block (raw text), or the maximum length of a prompt/completion row. "
            f"Default: the tokenizer's maximum length, at most {DEFAULT_BLOCK_SIZE}. Never more than the tokenizer's "
            "maximum length nor the teacher's or student's position limit (max_position_embeddings, n_positions "
            "for GPT-2): a larger value is lowered to them, with a warning, as run_clm.py does."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training examples (blocks for raw text)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N evaluation examples (blocks for raw text)."}
    )
    validation_split_percentage: int = field(
        default=5,
        metadata={
            "help": "Percentage of the training data held out for evaluation when there is no validation split."
        },
    )
    keep_linebreaks: bool = field(default=True, metadata={"help": "Keep line breaks of .txt files."})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenization."}
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute the tokenized datasets."})
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream the data instead of loading it (training then needs --max_steps, and evaluation "
            "--max_eval_samples; not with --teacher_logits_cache or --seq_kd, nor for building a cache)."
        },
    )

    def __post_init__(self):
        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {self.data_format!r}.")
        files = [path for path in (self.train_file, self.validation_file) if path is not None]
        if self.dataset_name is None and not files:
            raise ValueError("No data: pass --dataset_name, or --train_file (and --validation_file).")
        suffixes = {Path(path).suffix.lower() for path in files}
        unknown = suffixes - set(_FILE_BUILDERS)
        if unknown:
            raise ValueError(
                f"Unsupported data file type {sorted(unknown)}; use one of {sorted(_FILE_BUILDERS)}."
            )
        if len({_FILE_BUILDERS[suffix] for suffix in suffixes}) > 1:
            raise ValueError(f"--train_file and --validation_file must share one format, got {files}.")
        if self.block_size is not None and self.block_size < 2:
            raise ValueError(f"block_size must be >= 2 tokens, got {self.block_size}.")
        if not 0 <= self.validation_split_percentage < 100:
            raise ValueError(
                f"validation_split_percentage must be in [0, 100), got {self.validation_split_percentage}."
            )

    @property
    def data_files(self) -> dict[str, str]:
        named = {"train": self.train_file, "validation": self.validation_file}
        return {split: path for split, path in named.items() if path is not None}


@dataclass
class SequenceKDArguments:
    """Sequence-level KD (Kim & Rush, 2016): train on the teacher's own completions."""

    seq_kd: bool = field(
        default=False,
        metadata={
            "help": "Replace the training completions with the teacher's, generated once before training and "
            "cached (prompt/completion or chat data only)."
        },
    )
    seq_kd_num_beams: int = field(default=1, metadata={"help": "Beams of the teacher's search (1 = greedy)."})
    seq_kd_max_new_tokens: int = field(
        default=128,
        metadata={
            "help": "Longest completion the teacher writes. Where a batch's longest prompt plus this exceeds the "
            "teacher's position limit (max_position_embeddings, n_positions for GPT-2), that batch's completions "
            "stop at the limit, with a warning. The teacher only writes ids the student and tokenizer share."
        },
    )
    seq_kd_batch_size: int = field(default=8, metadata={"help": "Prompts per generation batch."})
    seq_kd_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the teacher's completions are cached (default <output_dir>/seq_kd_cache). A cache built "
            "from other prompts, teacher or settings is rebuilt."
        },
    )
    seq_kd_overwrite_cache: bool = field(
        default=False,
        metadata={
            "help": "Regenerate the cache even when its manifest matches this run (e.g. it holds token ids the "
            "student cannot read, which a run refuses)."
        },
    )

    def __post_init__(self):
        if self.seq_kd_num_beams < 1 or self.seq_kd_max_new_tokens < 1 or self.seq_kd_batch_size < 1:
            raise ValueError(
                "seq_kd_num_beams, seq_kd_max_new_tokens and seq_kd_batch_size must be >= 1, got "
                f"{self.seq_kd_num_beams}, {self.seq_kd_max_new_tokens} and {self.seq_kd_batch_size}."
            )


@dataclass
class LoraArguments:
    """A LoRA student (peft): only low-rank adapters are trained and saved."""

    use_peft: bool = field(
        default=False, metadata={"help": "Train LoRA adapters on the student instead of all weights."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(
        default=32, metadata={"help": "LoRA scaling numerator (scale = lora_alpha / lora_r)."}
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={
            "help": "Modules that get adapters: comma-separated names (q_proj,v_proj) or 'all-linear'."
        },
    )
    merge_lora: bool = field(
        default=False,
        metadata={
            "help": "After training, merge the adapters into the student and save it in <output_dir>/merged."
        },
    )

    def __post_init__(self):
        if self.merge_lora and not self.use_peft:
            raise ValueError("--merge_lora merges LoRA adapters, so it needs --use_peft.")
        if self.lora_r < 1 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(
                f"lora_r must be >= 1 and lora_dropout in [0, 1), got {self.lora_r} and {self.lora_dropout}."
            )

    @property
    def target_modules(self) -> str | list[str]:
        value = self.lora_target_modules.strip()
        if value == "all-linear":
            return value
        modules = [name.strip() for name in value.split(",") if name.strip()]
        if not modules:
            raise ValueError(
                "lora_target_modules is empty; pass module names such as 'q_proj,v_proj' or 'all-linear'."
            )
        return modules


@dataclass
class LMReportArguments(ReportArguments):
    """The report, plus greedy generations of teacher and student on validation prompts."""

    report_batch_sizes: str = field(
        default="1,8",
        metadata={"help": "Batch sizes at which latency and tokens/s are measured, comma-separated."},
    )
    report_generations: int = field(
        default=3,
        metadata={"help": "Validation prompts that teacher and student complete greedily in the report."},
    )
    report_prompt_tokens: int = field(
        default=16,
        metadata={"help": "Raw-text data: the first N tokens of a validation block make a report prompt."},
    )
    report_max_new_tokens: int = field(
        default=32,
        metadata={
            "help": "Tokens generated per report prompt; fewer, with a warning, where the prompt plus these exceed "
            "the model's position limit (max_position_embeddings, n_positions for GPT-2)."
        },
    )


# --------------------------------------------------------------------------------------------- raw data
def load_raw_datasets(
    data_args: DataArguments, loading_args: LoadingArguments | None = None
) -> DatasetDict | IterableDatasetDict:
    """The train/validation splits. Without a validation split, the first --validation_split_percentage percent
    of the training data becomes it (as run_clm.py does)."""
    cache_dir = loading_args.cache_dir if loading_args else None
    streaming = data_args.streaming
    files = data_args.data_files
    if files:
        for split, path in files.items():
            if not Path(path).is_file():
                raise FileNotFoundError(f"--{split}_file {path!r} does not exist.")
        builder = _FILE_BUILDERS[Path(next(iter(files.values()))).suffix.lower()]
        options: dict[str, Any] = {"cache_dir": cache_dir, "data_files": files, "streaming": streaming}
        if builder == "text":
            options["keep_linebreaks"] = data_args.keep_linebreaks

        def load(split: str) -> Any:
            return load_dataset(builder, split=split, **options)

    else:
        name, config = data_args.dataset_name, data_args.dataset_config_name
        token = loading_args.token if loading_args else None

        def load(split: str) -> Any:
            return load_hub_dataset(
                name,
                config,
                local_files="local files (.txt, .json/.jsonl, .csv or .parquet)",
                split=split,
                cache_dir=cache_dir,
                token=token,
                streaming=streaming,
            )

    raw = IterableDatasetDict() if streaming else DatasetDict()
    has_train = "train" in files or not files
    if has_train:
        raw["train"] = load("train")
    if "validation" in files:
        raw["validation"] = load("validation")
    elif not files:
        try:
            raw["validation"] = load("validation")
        except ValueError:  # the dataset has no validation split
            pass
    if has_train and "validation" not in raw and data_args.validation_split_percentage > 0:
        if streaming:
            logger.warning(
                "No validation split and --streaming: no evaluation data (pass --validation_file)."
            )
        else:
            percent = data_args.validation_split_percentage
            raw["validation"] = load(f"train[:{percent}%]")
            raw["train"] = load(f"train[{percent}%:]")
    return raw


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
    if do_train and "train" not in raw:
        raise ValueError(
            f"training needs a train split, but the loaded splits are {list(raw)}; pass --train_file or a "
            "--dataset_name that has one."
        )
    if do_eval and "validation" not in raw:
        raise ValueError(
            f"--do_eval needs validation data, but the loaded splits are {list(raw)}; pass --validation_file or "
            "a --validation_split_percentage above 0."
        )


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


def position_limit(model_args: LMModelArguments | TeacherArguments) -> int | None:
    """The fewest positions the teacher's and the student's configs allow (max_position_embeddings, n_positions
    for GPT-2); None when neither declares a limit. Read from the configs alone, before any weights load."""
    teacher_path = model_args.teacher_model_name_or_path
    configs = [load_pretrained(AutoConfig, teacher_path, role="teacher", loading_args=model_args)]
    student_path = getattr(model_args, "student_model_name_or_path", None)
    if student_path is not None:
        configs.append(load_pretrained(AutoConfig, student_path, role="student", loading_args=model_args))
    return min_positions(*configs)


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
        map_options.update(
            num_proc=data_args.preprocessing_num_workers,
            load_from_cache_file=not data_args.overwrite_cache,
            desc=f"Tokenizing {split}",
        )

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


# --------------------------------------------------------------------------------------------- models
def _local_dir(name_or_path: str) -> Path | None:
    path = Path(name_or_path).expanduser()
    return path if path.is_dir() else None


def _has_tokenizer(name_or_path: str) -> bool:
    """Whether a tokenizer can be expected at `name_or_path`: a local directory with tokenizer files, or a Hub name."""
    directory = _local_dir(name_or_path)
    if directory is None:
        return True
    return any((directory / name).is_file() for name in _TOKENIZER_FILES)


def _load_tokenizer(name_or_path: str, role: str, loading_args: LoadingArguments) -> PreTrainedTokenizerBase:
    tokenizer = load_pretrained(AutoTokenizer, name_or_path, role=role, loading_args=loading_args)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"the {role} {name_or_path!r} has neither a pad nor an eos token to pad batches with; add a pad "
                "token to it (tokenizer.add_special_tokens) and save it."
            )
        # GPT-2 style: padding is masked everywhere (attention 0, labels -100), so eos can stand in for it.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizers(
    model_args: LMModelArguments | TeacherArguments,
) -> tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase | None]:
    """(the run's tokenizer, the teacher's tokenizer: the same object when both come from one place, None when the
    teacher directory holds none and none was named).

    The run's tokenizer is --tokenizer_name, else the student directory's, else the teacher's. The teacher's is
    --teacher_tokenizer_name, else the teacher directory's. Different vocabularies raise here, before training.
    """
    from hf_distill.teacher import check_same_tokenizer

    teacher_path = model_args.teacher_model_name_or_path
    student_path = getattr(model_args, "student_model_name_or_path", None)
    teacher_source = model_args.teacher_tokenizer_name or (
        teacher_path if _has_tokenizer(teacher_path) else None
    )
    run_source = model_args.tokenizer_name or (
        student_path if student_path is not None and _has_tokenizer(student_path) else teacher_source
    )
    if run_source is None:
        raise ValueError(
            f"no tokenizer found: the teacher directory {teacher_path!r} holds none; pass --tokenizer_name (or "
            "--teacher_tokenizer_name) with the tokenizer teacher and student share."
        )
    tokenizer = _load_tokenizer(run_source, "tokenizer", model_args)
    teacher_tokenizer = tokenizer if teacher_source == run_source else None
    if teacher_source is not None and teacher_source != run_source:
        teacher_tokenizer = _load_tokenizer(teacher_source, "teacher tokenizer", model_args)
        try:
            check_same_tokenizer(tokenizer, teacher_tokenizer)
        except ValueError as error:
            raise ValueError(
                f"{error} (student tokenizer {run_source!r}: {len(tokenizer)} tokens; teacher tokenizer "
                f"{teacher_source!r}: {len(teacher_tokenizer)} tokens)"
            ) from None
    return tokenizer, teacher_tokenizer


def load_causal_lm(
    name_or_path: str, role: str, loading_args: LoadingArguments, **kwargs: Any
) -> PreTrainedModel:
    config = load_pretrained(AutoConfig, name_or_path, role=role, loading_args=loading_args)
    if config.is_encoder_decoder:
        raise ValueError(
            f"the {role} {name_or_path!r} is an encoder-decoder model ({config.model_type}); this recipe distils "
            "causal (decoder-only) language models."
        )
    return load_pretrained(
        AutoModelForCausalLM, name_or_path, role=role, loading_args=loading_args, config=config, **kwargs
    )


def load_teacher(model_args: LMModelArguments | TeacherArguments) -> PreTrainedModel:
    # dtype="auto" keeps the checkpoint's dtype (a bf16 teacher stays bf16); --teacher_dtype can cast it.
    return load_causal_lm(model_args.teacher_model_name_or_path, "teacher", model_args, dtype="auto")


def check_vocabulary(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, role: str) -> None:
    vocab = model.config.get_text_config().vocab_size
    if vocab < len(tokenizer):
        raise ValueError(
            f"the {role} has {vocab} vocabulary rows but the tokenizer has {len(tokenizer)} tokens: they do not "
            "belong together. Teacher and student must share one tokenizer."
        )


def student_vocab_size(model_args: LMModelArguments, teacher: PreTrainedModel) -> int:
    """The student's vocabulary rows, known before it is built: its config's, or the teacher's when the student
    is built from the teacher's layers."""
    if model_args.student_model_name_or_path is None:
        return model_vocab_size(teacher)
    config = load_pretrained(
        AutoConfig, model_args.student_model_name_or_path, role="student", loading_args=model_args
    )
    return model_vocab_size(config)


def make_student(
    model_args: LMModelArguments, teacher: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase
) -> PreTrainedModel:
    """The student: loaded from --student_model_name_or_path, or built from the teacher's layers."""
    if model_args.student_model_name_or_path is None and teacher is None:
        raise ValueError(
            "building the student from the teacher (--student_num_layers) needs the teacher loaded."
        )

    def load_student(path: str) -> PreTrainedModel:
        return load_causal_lm(path, "student", model_args)

    student = build_student(model_args, teacher, load_student)
    check_vocabulary(student, tokenizer, "student")
    return student


def apply_lora(student: PreTrainedModel, lora_args: LoraArguments, base_model_dir: str | None = None) -> Any:
    """The student wrapped in LoRA adapters (peft); only the adapters train.

    base_model_dir: where the student's own weights are saved (for a student built from the teacher, which exists
    nowhere else); the adapters then name it as their base model, so `PeftModel.from_pretrained` finds it.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    if base_model_dir is not None:
        student.name_or_path = base_model_dir
        student.config._name_or_path = base_model_dir

    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=lora_args.target_modules,
    )
    try:
        model = get_peft_model(student, config)
    except ValueError as error:
        raise ValueError(f"{error} (--lora_target_modules {lora_args.lora_target_modules!r})") from error
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(f"LoRA student: {trainable:,} trainable parameters of {total:,}.")
    return model


def merge_lora(model: Any) -> PreTrainedModel:
    """A plain model with the adapters merged into its weights; `model` itself is left as it is."""
    from hf_distill.teacher import unwrap_model

    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if not hasattr(model, "merge_and_unload"):
        raise ValueError(f"--merge_lora needs a peft model, got {type(unwrap_model(model)).__name__}.")
    return copy.deepcopy(model).merge_and_unload()


# --------------------------------------------------------------------------------------------- sequence-level KD
def _prompts_checksum(dataset: Dataset) -> str:
    digest = hashlib.sha256()
    for row in dataset.select_columns(["input_ids", "labels"]).with_format(None):
        prompt = np.asarray(prompt_ids_of(row), dtype=np.int64)
        digest.update(np.int64(prompt.size).tobytes())
        digest.update(prompt.tobytes())
    return digest.hexdigest()


def sequence_kd_dataset(
    teacher: PreTrainedModel,
    train_dataset: Dataset,
    cache_dir: str | os.PathLike,
    *,
    tokenizer: PreTrainedTokenizerBase,
    teacher_name: str,
    block_size: int,
    num_beams: int = 1,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    vocab_size: int | None = None,
    overwrite: bool = False,
) -> Dataset:
    """The training rows with their completions replaced by the teacher's (greedy, or beam search), cut to
    `block_size`; labels -100 on the prompt as before.

    vocab_size: the ids the student and tokenizer share (`generation_limits.shared_vocab_size`; default
    len(tokenizer)). The teacher never writes an id at or past it (a teacher whose embedding is padded past the
    tokenizer could otherwise), and a cache holding one is refused. A batch whose longest prompt plus
    `max_new_tokens` exceeds the teacher's position limit gets only as many new tokens as fit, with a warning.

    Generated once and cached in `cache_dir` with a manifest (teacher, tokenizer, prompts, settings); the cache
    is used only when complete and built from the same inputs, and is rebuilt otherwise (always with
    `overwrite`).
    """
    from hf_distill import __version__

    if vocab_size is None:
        vocab_size = len(tokenizer)
    expected = {
        "kind": "seq_kd_completions",
        "hf_distill_version": __version__,
        "teacher": teacher_name,
        "teacher_fingerprint": model_fingerprint(teacher),
        "tokenizer": tokenizer_description(tokenizer),
        "prompts_checksum": _prompts_checksum(train_dataset),
        "num_prompts": len(train_dataset),
        "num_beams": num_beams,
        "max_new_tokens": max_new_tokens,
        "block_size": block_size,
        "vocab_size": vocab_size,
    }
    cache_dir = Path(cache_dir)
    if cache_dir.exists() and overwrite:
        logger.warning(f"--seq_kd_overwrite_cache is set: rebuilding the sequence-KD cache {cache_dir}.")
    elif cache_dir.exists():
        try:
            manifest = read_manifest(cache_dir, what="sequence-KD cache")
            stale = {key: value for key, value in expected.items() if manifest.get(key) != value}
        except (ValueError, OSError) as error:
            stale = {"complete": str(error)}
        if not stale:
            logger.info(f"Using the teacher's completions cached in {cache_dir}.")
            return _checked_seq_kd_data(cache_dir, vocab_size)
        logger.warning(
            f"Rebuilding the sequence-KD cache {cache_dir}: it differs from this run in {sorted(stale)}."
        )

    collator = CausalLMCollator(tokenizer.pad_token_id)
    device = next(teacher.parameters()).device
    # Ids the student cannot read are never chosen; lengths stay inside the teacher's position table.
    constraint = vocabulary_constraint(teacher, vocab_size)
    teacher_positions = max_positions(teacher.config)
    cut_for_positions = False
    rows: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    source = train_dataset.select_columns(["input_ids", "attention_mask", "labels"]).with_format(None)
    for start in range(0, len(source), batch_size):
        batch = collator([source[i] for i in range(start, min(start + batch_size, len(source)))])
        batch = {key: value.to(device) for key, value in batch.items()}
        batch_new_tokens = max_new_tokens
        if teacher_positions is not None:
            longest_prompt = max(prompt.numel() for prompt in prompt_token_lists(batch))
            # Prompts shorter than block_size <= the limit (tokenization drops the others): at least 1 new token.
            batch_new_tokens = max(1, min(max_new_tokens, teacher_positions - longest_prompt))
            if batch_new_tokens < max_new_tokens and not cut_for_positions:
                cut_for_positions = True
                logger.warning(
                    f"--seq_kd_max_new_tokens {max_new_tokens}: prompts of {longest_prompt} tokens plus that many "
                    f"new tokens exceed the teacher's {teacher_positions} positions (max_position_embeddings); "
                    f"the completions of such batches stop at the limit ({batch_new_tokens} new tokens here)."
                )
        generated = generate_completions(
            teacher,
            batch,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            max_new_tokens=batch_new_tokens,
            do_sample=False,
            num_beams=num_beams,
            **constraint,
        )
        for input_ids, mask, labels in zip(
            *(generated[key].cpu() for key in ("input_ids", "attention_mask", "labels"))
        ):
            length = min(int(mask.sum()), block_size)
            row_labels = labels[:length].tolist()
            if all(label == IGNORE_INDEX for label in row_labels):
                continue  # the prompt fills the block
            rows["input_ids"].append(input_ids[:length].tolist())
            rows["attention_mask"].append([1] * length)
            rows["labels"].append(row_labels)
    if not rows["input_ids"]:
        raise ValueError(f"the teacher's completions left no trainable row within --block_size {block_size}.")
    dataset = Dataset.from_dict(rows)
    with atomic_directory(cache_dir, overwrite=True) as temporary:
        dataset.save_to_disk(str(temporary / SEQ_KD_DATA_DIR))
        write_manifest(temporary, {**expected, "num_rows": len(dataset)})
    logger.info(f"Cached {len(dataset)} teacher completions in {cache_dir}.")
    return _checked_seq_kd_data(cache_dir, vocab_size)


def _checked_seq_kd_data(cache_dir: Path, vocab_size: int) -> Dataset:
    """The cached rows, refused (ValueError) when one holds a token id the student cannot read."""
    import pyarrow.compute as pc

    dataset = load_from_disk(str(cache_dir / SEQ_KD_DATA_DIR))
    bounds = pc.min_max(pc.list_flatten(dataset.data.column("input_ids"))).as_py()  # one pass, in Arrow
    if bounds["min"] is not None and (bounds["min"] < 0 or bounds["max"] >= vocab_size):
        check_token_ids(
            dataset.with_format(None)["input_ids"],
            vocab_size,
            what=f"the sequence-KD cache {cache_dir}",
            fix="It was written by a teacher whose generation was not restricted to that vocabulary; rebuild it "
            "with --seq_kd_overwrite_cache (or delete the directory).",
        )
    return dataset


# --------------------------------------------------------------------------------------------- report
def report_prompts(
    dataset: Dataset, data_format: DataFormat, count: int, prompt_tokens: int
) -> list[list[int]]:
    """Prompts for the report's generations: the prompts of prompt/completion rows, or the first `prompt_tokens`
    tokens of raw-text blocks."""
    prompts = []
    for row in islice(dataset.with_format(None), count):
        ids = (
            prompt_ids_of(row)
            if data_format.has_prompts
            else [int(t) for t in row["input_ids"][:prompt_tokens]]
        )
        if ids:
            prompts.append(ids)
    return prompts


def greedy_generations(
    model: Any, prompts: Sequence[Sequence[int]], tokenizer: PreTrainedTokenizerBase, max_new_tokens: int
) -> list[str]:
    """The greedy continuation of each prompt, decoded without special tokens (one prompt at a time: no padding).

    Only ids the tokenizer can decode are generated (a model padded past the tokenizer could pick others), and a
    prompt plus its continuation stays inside the model's position limit (fewer new tokens, with a warning)."""
    device = next(model.parameters()).device
    constraint = vocabulary_constraint(model, len(tokenizer))
    positions = max_positions(getattr(model, "config", None))
    was_training = model.training
    model.eval()
    texts = []
    warned = False
    try:
        with torch.no_grad():
            for prompt in prompts:
                new_tokens = max_new_tokens
                if positions is not None and len(prompt) + max_new_tokens > positions:
                    new_tokens = positions - len(prompt)
                    if not warned:
                        warned = True
                        logger.warning(
                            f"--report_max_new_tokens {max_new_tokens}: a report prompt of {len(prompt)} tokens "
                            f"plus that many tokens exceeds the model's {positions} positions; generating "
                            f"{max(new_tokens, 0)} tokens for it."
                        )
                    if new_tokens < 1:
                        texts.append("")
                        continue
                input_ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    do_sample=False,
                    num_beams=1,
                    max_new_tokens=new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    **constraint,
                )
                texts.append(tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return texts


def tokens_per_second(
    latency_ms: Mapping[Any, float], make_inputs: Callable[[int], Mapping[str, torch.Tensor]]
) -> dict[str, float]:
    """Real (unpadded) tokens per second of a forward pass, per batch size, from the measured latencies."""
    rates = {}
    for batch_size, milliseconds in latency_ms.items():
        inputs = make_inputs(int(batch_size))
        mask = inputs.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        if milliseconds > 0:
            rates[str(int(batch_size))] = tokens * 1000.0 / milliseconds
    return rates


def generations_markdown(generations: Sequence[Mapping[str, str]]) -> str:
    lines = ["", "## Greedy generations on validation prompts", ""]
    for index, entry in enumerate(generations, start=1):
        lines.append(f"**Prompt {index}:** {entry['prompt']!r}")
        lines.append("")
        for name, text in entry.items():
            if name != "prompt":
                lines.append(f"- {name}: {text!r}")
        lines.append("")
    return "\n".join(lines)
