#!/usr/bin/env python
"""Run a causal-LM teacher once over the tokenized training set and cache its top-k log-probabilities (with the
mass of the other tokens), so that distillation runs (scripts/distill_lm.py --teacher_logits_cache DIR) need no
teacher in memory.

    python scripts/cache_teacher_logits.py \
        --teacher_model_name_or_path outputs/teacher --train_file train.txt --block_size 512 \
        --top_k 64 --temperature 2 --cache_output_dir caches/teacher_top64
    python scripts/distill_lm.py --teacher_logits_cache caches/teacher_top64 --temperature 2 \
        --teacher_model_name_or_path outputs/teacher --student_num_layers 4 \
        --train_file train.txt --block_size 512 --do_train --output_dir outputs/student

Use the same data flags as the training run (--train_file/--dataset_name, --block_size, --max_train_samples,
--validation_split_percentage, ...): the cache records a checksum of the tokenized training rows and training
refuses a cache built on other rows, with another tokenizer or another block size. Use the training run's
--temperature too: the teacher's mass outside the top k is stored tempered at it, and training at another
temperature refuses the cache. The layout and the dtype choice are described in hf_distill/logit_cache.py. The cache is built in a temporary directory beside the
target and appears only when complete.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed
from transformers.utils import logging

from hf_distill.args import DistillationTrainingArguments
from hf_distill.logit_cache import LOGPROBS_DTYPES, build_logit_cache
from hf_distill.tasks import common
from hf_distill.tasks import language_modeling as lm
from hf_distill.teacher import freeze

logger = logging.get_logger("cache_teacher_logits")

DEVICES = ("auto", "cpu", "cuda")
# The training runs' default --temperature, so that a cache built with defaults serves a run with defaults.
DEFAULT_TEMPERATURE = next(
    f.default for f in fields(DistillationTrainingArguments) if f.name == "temperature"
)


@dataclass
class CacheArguments:
    cache_output_dir: str = field(
        metadata={"help": "Directory the cache is written to (pass it to --teacher_logits_cache)."}
    )
    top_k: int = field(default=64, metadata={"help": "Teacher tokens kept per position."})
    temperature: float = field(
        default=DEFAULT_TEMPERATURE,
        metadata={
            "help": "KD temperature of the training runs this cache is for; it must equal their --temperature "
            f"(default {DEFAULT_TEMPERATURE:g}, as theirs). The teacher's mass outside the top k is stored tempered "
            "at it, which the top-k loss needs, and training at any other temperature refuses the cache."
        },
    )
    logprobs_dtype: str = field(
        default="float32",
        metadata={
            "help": f"Storage of the log-probabilities, one of {LOGPROBS_DTYPES} (float16 saves a quarter of the disk)."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Rows per teacher forward pass."})
    teacher_dtype: str = field(
        default="auto",
        metadata={"help": "dtype the teacher runs in: auto (as stored), float32, bfloat16 or float16."},
    )
    device: str = field(
        default="auto", metadata={"help": f"One of {DEVICES}; auto picks cuda when available."}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Replace an existing cache at --cache_output_dir."}
    )
    seed: int = field(
        default=42, metadata={"help": "Seed (the teacher runs in eval mode; this only fixes ties)."}
    )

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}.")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(
                f"temperature must be a finite number > 0 (the training run's --temperature), got {self.temperature}."
            )
        if self.logprobs_dtype not in LOGPROBS_DTYPES:
            raise ValueError(f"logprobs_dtype must be one of {LOGPROBS_DTYPES}, got {self.logprobs_dtype!r}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}.")
        if self.teacher_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"teacher_dtype must be auto, float32, bfloat16 or float16, got {self.teacher_dtype!r}."
            )


ARGUMENT_TYPES = (lm.TeacherArguments, lm.DataArguments, CacheArguments)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    teacher_args, data_args, cache_args = common.parse_args(ARGUMENT_TYPES, argv)
    logging.set_verbosity_info()
    set_seed(cache_args.seed)
    if data_args.streaming:
        raise ValueError(
            "--streaming cannot be used to build a cache: the cache must cover the whole training set."
        )
    target = Path(cache_args.cache_output_dir)
    if target.exists() and not cache_args.overwrite:
        raise FileExistsError(
            f"{target} already exists; pass --overwrite to rebuild it, or another --cache_output_dir."
        )

    raw = lm.load_raw_datasets(data_args, teacher_args)
    raw.pop("validation", None)  # only the training rows are distilled from the cache
    lm.check_splits(raw, do_train=True, do_eval=False)
    data_format = lm.resolve_data_format(raw, data_args)
    tokenizer, _ = lm.load_tokenizers(teacher_args)
    # As in distill_lm.py: never longer than the teacher's position table (lowered with a warning).
    block_size = lm.resolve_block_size(data_args, tokenizer, lm.position_limit(teacher_args))
    train_dataset = lm.preprocess(raw, data_format, tokenizer, block_size, data_args)["train"]

    teacher = freeze(lm.load_teacher(teacher_args), cache_args.teacher_dtype)
    lm.check_vocabulary(teacher, tokenizer, "teacher")
    device = cache_args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    manifest = build_logit_cache(
        teacher,
        train_dataset,
        target,
        tokenizer=tokenizer,
        teacher_name=teacher_args.teacher_model_name_or_path,
        block_size=block_size,
        temperature=cache_args.temperature,
        top_k=cache_args.top_k,
        batch_size=cache_args.batch_size,
        logprobs_dtype=cache_args.logprobs_dtype,
        overwrite=cache_args.overwrite,
        device=device,
        extra_manifest={"data_format": data_format.kind, "teacher_dtype": cache_args.teacher_dtype},
    )
    logger.info(
        f"Wrote {target}: {manifest['num_rows']} rows, {manifest['num_tokens']} tokens, top {manifest['top_k']}, "
        f"for training at --temperature {manifest['tail_temperature']:g}."
    )
    return manifest


if __name__ == "__main__":
    main()
