#!/usr/bin/env python
"""Run a teacher (or several) once over the tokenized training set and cache its top-k log-probabilities (with the
mass of the other tokens), so that distillation runs (--teacher_logits_cache DIR) need no teacher in memory.

    python scripts/cache_teacher_logits.py \
        --teacher_model_name_or_path outputs/teacher --train_file train.txt --block_size 512 \
        --top_k 64 --temperature 2 --cache_output_dir caches/teacher_top64
    python scripts/distill_lm.py --teacher_logits_cache caches/teacher_top64 --temperature 2 \
        --teacher_model_name_or_path outputs/teacher --student_num_layers 4 \
        --train_file train.txt --block_size 512 --do_train --output_dir outputs/student

Variants:
    --teacher_model_name_or_path a b c --teacher_weights 0.5 0.3 0.2 [--teacher_weighting confidence]
        several teachers (one tokenizer): the cache holds their weighted mixture of softened distributions at
        --temperature (hf_distill/logit_cache_mixture.py); confidence weighting reads the data's gold labels now.
    --student_tokenizer_name S [--teacher_tokenizer_name T]
        a student with another tokenizer (distill_lm.py --cross_tokenizer exact|uld|hybrid): rows of raw text cut
        by the student's tokenizer, the teacher's top k at the aligned positions (hf_distill/logit_cache_cross.py).
    --task classification --train_file train.csv [--teacher_model_name_or_path a b c ...]
        sequence classifiers (scripts/distill_glue.py --teacher_logits_cache): every class is kept, so the cache
        is exact; the data flags are distill_glue.py's (--task_name, --max_seq_length, ...).

Use the same data flags as the training run (--train_file/--dataset_name, --block_size, --max_train_samples,
--validation_split_percentage, ...): the cache records a checksum of the training rows and training refuses a
cache built on other rows, with another tokenizer or another block size. Use the training run's --temperature
too: the teacher's mass outside the top k (and a mixture) is stored at it, and training at another temperature
refuses the cache. The layout and the dtype choice are described in hf_distill/logit_cache.py. The cache is built
in a temporary directory beside the target and appears only when complete.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed
from transformers.utils import logging

from hf_distill.args import DistillationTrainingArguments
from hf_distill.caches.cross_tokenizer import build_cross_tokenizer_cache
from hf_distill.caches.format import LOGPROBS_DTYPES, TASK_CAUSAL_LM, TASK_SEQUENCE
from hf_distill.caches.mixture import TEACHER_WEIGHTINGS, build_mixture_cache
from hf_distill.caches.topk import build_logit_cache
from hf_distill.losses.mixture import normalised_weights
from hf_distill.tasks import classification, common, lm
from hf_distill.tasks.common.arguments import CONFIG_FILE_SUFFIXES, LoadingArguments
from hf_distill.tasks.lm.cross_tokenizer import cross_tokenizer_rows
from hf_distill.training.teacher import check_same_tokenizer, freeze

logger = logging.get_logger("cache_teacher_logits")

DEVICES = ("auto", "cpu", "cuda")
TASKS = ("causal_lm", "classification")
DEFAULT_TOP_K = 64
# The training runs' default --temperature, so that a cache built with defaults serves a run with defaults.
DEFAULT_TEMPERATURE = next(
    f.default for f in fields(DistillationTrainingArguments) if f.name == "temperature"
)


@dataclass(kw_only=True)
class CacheTeacherArguments(LoadingArguments):
    """The teacher(s) and their tokenizer; for a cross-tokenizer cache, the student's tokenizer."""

    teacher_model_name_or_path: list[str] = field(
        metadata={
            "help": "The teacher: a Hub name or a local directory with config.json; or several (`a b c`), cached as "
            "their weighted mixture (--teacher_weights). Several teachers must share one tokenizer."
        }
    )
    teacher_tokenizer_name: str | None = field(
        default=None, metadata={"help": "The teacher's tokenizer, if not stored with the (first) teacher."}
    )
    student_tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Causal LMs: the student's tokenizer (e.g. the student's folder) when it differs from the "
            "teacher's: builds a cross-tokenizer cache for distill_lm.py --cross_tokenizer runs (rows of raw text "
            "cut by this tokenizer, the teacher's top k at the aligned positions)."
        },
    )

    def __post_init__(self):
        if isinstance(self.teacher_model_name_or_path, str):  # one path from a YAML/JSON file or Python
            self.teacher_model_name_or_path = [self.teacher_model_name_or_path]
        if not self.teacher_model_name_or_path:
            raise ValueError("--teacher_model_name_or_path needs at least one teacher.")

    def single(self, path: str) -> lm.TeacherArguments:
        """The LM recipe's flags for one of the teachers."""
        loading = {f.name: getattr(self, f.name) for f in fields(LoadingArguments)}
        return lm.TeacherArguments(
            teacher_model_name_or_path=path, teacher_tokenizer_name=self.teacher_tokenizer_name, **loading
        )


@dataclass
class CacheArguments:
    cache_output_dir: str = field(
        metadata={"help": "Directory the cache is written to (pass it to --teacher_logits_cache)."}
    )
    task: str = field(
        default="causal_lm",
        metadata={
            "help": f"One of {TASKS}: the data and models of distill_lm.py (default) or of distill_glue.py (sequence "
            "classifiers; give --task first: it decides which data flags are read)."
        },
    )
    top_k: int | None = field(
        default=None,
        metadata={
            "help": f"Teacher tokens kept per position (default {DEFAULT_TOP_K}); classification keeps every class."
        },
    )
    temperature: float = field(
        default=DEFAULT_TEMPERATURE,
        metadata={
            "help": "KD temperature of the training runs this cache is for; it must equal their --temperature "
            f"(default {DEFAULT_TEMPERATURE:g}, as theirs). The teacher's mass outside the top k is stored tempered "
            "at it, which the top-k loss needs, as is several teachers' mixture; training at any other "
            "temperature refuses the cache."
        },
    )
    teacher_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "With several teachers: one weight per teacher, in their order (normalised; equal by default). "
            "Recorded in the cache; a training run's --teacher_weights must then be these or absent."
        },
    )
    teacher_weighting: str = field(
        default="fixed",
        metadata={
            "help": f"With several teachers, one of {TEACHER_WEIGHTINGS}: 'confidence' multiplies each teacher's "
            "weight, per example (per token for LMs), by its probability of the gold label, read from the data's "
            "labels now (renormalised; unlabelled rows keep the fixed weights)."
        },
    )
    logprobs_dtype: str = field(
        default="float32",
        metadata={
            "help": f"Storage of the log-probabilities, one of {LOGPROBS_DTYPES} (float16: 2 bytes per log-probability instead of 4)."
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
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}.")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}.")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(
                f"temperature must be a finite number > 0 (the training run's --temperature), got {self.temperature}."
            )
        if self.teacher_weighting not in TEACHER_WEIGHTINGS:
            raise ValueError(
                f"teacher_weighting must be one of {TEACHER_WEIGHTINGS}, got {self.teacher_weighting!r}."
            )
        if self.teacher_weights is not None:
            normalised_weights(self.teacher_weights, len(self.teacher_weights))
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


ARGUMENT_TYPES = (CacheTeacherArguments, lm.DataArguments, CacheArguments)
CLASSIFICATION_ARGUMENT_TYPES = (CacheTeacherArguments, classification.DataArguments, CacheArguments)


def requested_task(argv: Sequence[str]) -> str:
    """--task from the command line or the one config file, before the flags are parsed (it decides which data
    flags exist)."""
    if len(argv) == 1 and argv[0].lower().endswith(CONFIG_FILE_SUFFIXES) and Path(argv[0]).is_file():
        text = Path(argv[0]).read_text(encoding="utf-8")
        if argv[0].lower().endswith(".json"):
            config = json.loads(text)
        else:
            import yaml

            config = yaml.safe_load(text)
        return str((config or {}).get("task", "causal_lm"))
    for index, argument in enumerate(argv):
        if argument == "--task" and index + 1 < len(argv):
            return argv[index + 1]
        if argument.startswith("--task="):
            return argument.split("=", 1)[1]
    return "causal_lm"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    task = requested_task(argv)
    types = CLASSIFICATION_ARGUMENT_TYPES if task == "classification" else ARGUMENT_TYPES
    teacher_args, data_args, cache_args = common.parse_args(types, argv, description=__doc__)
    logging.set_verbosity_info()
    set_seed(cache_args.seed)
    teachers = teacher_args.teacher_model_name_or_path
    if cache_args.teacher_weights is not None:
        normalised_weights(cache_args.teacher_weights, len(teachers))  # one weight per teacher
    if getattr(data_args, "streaming", False):
        raise ValueError(
            "--streaming cannot be used to build a cache: the cache must cover the whole training set."
        )
    target = Path(cache_args.cache_output_dir)
    if target.exists() and not cache_args.overwrite:
        raise FileExistsError(
            f"{target} already exists; pass --overwrite to rebuild it, or another --cache_output_dir."
        )
    device = cache_args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    options = dict(
        temperature=cache_args.temperature,
        batch_size=cache_args.batch_size,
        logprobs_dtype=cache_args.logprobs_dtype,
        overwrite=cache_args.overwrite,
        device=device,
    )
    if task == "classification":
        manifest = cache_classification(teacher_args, data_args, cache_args, options)
    else:
        manifest = cache_causal_lm(teacher_args, data_args, cache_args, options)
    logger.info(
        f"Wrote {target}: {manifest['num_rows']} rows, {manifest['num_tokens']} positions, top {manifest['top_k']}, "
        f"of {manifest['teacher']!r}, for training at --temperature {manifest['tail_temperature']:g}."
    )
    return manifest


def cache_causal_lm(
    teacher_args: CacheTeacherArguments, data_args: Any, cache_args: CacheArguments, options: dict[str, Any]
) -> dict[str, Any]:
    paths = teacher_args.teacher_model_name_or_path
    first = teacher_args.single(paths[0])
    raw = lm.load_raw_datasets(data_args, first)
    raw.pop("validation", None)  # only the training rows are distilled from the cache
    lm.check_splits(raw, do_train=True, do_eval=False)
    data_format = lm.resolve_data_format(raw, data_args)
    tokenizer, _ = lm.load_tokenizers(first)
    # As in distill_lm.py: never longer than the teacher's position table (lowered with a warning).
    max_positions = lm.position_limit(first)
    top_k = cache_args.top_k or DEFAULT_TOP_K
    extra = {"data_format": data_format.kind, "teacher_dtype": cache_args.teacher_dtype}
    cross = teacher_args.student_tokenizer_name is not None
    if cross and len(paths) > 1:
        raise ValueError(
            "--student_tokenizer_name (a cross-tokenizer cache) takes one teacher; several teachers share the "
            "student's tokenizer."
        )
    if cross:
        if data_format.kind != lm.TEXT:
            raise ValueError(
                f"a cross-tokenizer cache is built from raw text, as --cross_tokenizer trains on; got "
                f"{data_format.kind} data."
            )
        # As distill_lm.py --cross_tokenizer loads them: the run's (student's) tokenizer, and the teacher's from
        # --teacher_tokenizer_name or the teacher's folder.
        with_student = teacher_args.single(paths[0])
        with_student.tokenizer_name = teacher_args.student_tokenizer_name
        student_tokenizer, tokenizer = lm.load_tokenizers(with_student, cross_tokenizer=True)
        if tokenizer is None:
            raise ValueError(
                f"the teacher folder {paths[0]!r} holds no tokenizer; pass the teacher's as --teacher_tokenizer_name."
            )
        # The student's tokenizer cuts the rows, as in distill_lm.py --cross_tokenizer.
        block_size = lm.resolve_block_size(data_args, student_tokenizer, max_positions)
        (column,) = data_format.columns
        rows = cross_tokenizer_rows(raw, column, data_args, student_tokenizer, block_size)["train"]
        teacher = freeze(lm.load_teacher(first), cache_args.teacher_dtype)
        lm.check_vocabulary(teacher, tokenizer, "teacher")
        return build_cross_tokenizer_cache(
            teacher, rows, cache_args.cache_output_dir, tokenizer=student_tokenizer, teacher_tokenizer=tokenizer,
            teacher_name=paths[0], block_size=block_size, top_k=top_k, teacher_max_length=max_positions,
            extra_manifest=extra, **options,
        )  # fmt: skip
    block_size = lm.resolve_block_size(data_args, tokenizer, max_positions)
    train_dataset = lm.preprocess(raw, data_format, tokenizer, block_size, data_args)["train"]
    if len(paths) == 1:
        teacher = freeze(lm.load_teacher(first), cache_args.teacher_dtype)
        lm.check_vocabulary(teacher, tokenizer, "teacher")
        return build_logit_cache(
            teacher, train_dataset, cache_args.cache_output_dir, tokenizer=tokenizer, teacher_name=paths[0],
            block_size=block_size, top_k=top_k, extra_manifest=extra, **options,
        )  # fmt: skip
    models = []
    for path in paths:
        single = teacher_args.single(path)
        if path != paths[0] and teacher_args.teacher_tokenizer_name is None:
            # every teacher reads the same input ids: each folder's tokenizer must be the first's
            check_same_tokenizer(tokenizer, lm.load_tokenizers(single)[0])
        model = freeze(lm.load_teacher(single), cache_args.teacher_dtype)
        lm.check_vocabulary(model, tokenizer, f"teacher {path!r}")
        models.append((path, model))
    return build_mixture_cache(
        models, train_dataset, cache_args.cache_output_dir, tokenizer=tokenizer,
        teacher_weights=cache_args.teacher_weights, teacher_weighting=cache_args.teacher_weighting,
        task=TASK_CAUSAL_LM, top_k=top_k, block_size=block_size, extra_manifest=extra, **options,
    )  # fmt: skip


def cache_classification(
    teacher_args: CacheTeacherArguments, data_args: Any, cache_args: CacheArguments, options: dict[str, Any]
) -> dict[str, Any]:
    if teacher_args.student_tokenizer_name is not None:
        raise ValueError("--student_tokenizer_name (a cross-tokenizer cache) is for causal LMs only.")
    paths = teacher_args.teacher_model_name_or_path
    loading = {f.name: getattr(teacher_args, f.name) for f in fields(LoadingArguments)}
    if teacher_args.teacher_tokenizer_name is not None:
        loading["tokenizer_name"] = teacher_args.teacher_tokenizer_name
    # The student plays no part in a cache; distill_glue.py's model flags want one, which is never built here.
    model_args = classification.ClassificationModelArguments(
        teacher_model_name_or_path=paths, student_num_layers=1, **loading
    )
    raw = classification.load_raw_datasets(data_args, model_args)
    spec = classification.resolve_task(raw, data_args)
    classification.check_splits(spec, raw, do_train=True, do_eval=False, do_predict=False)
    if spec.is_regression:
        raise ValueError(
            "a teacher logits cache holds class probabilities; a regression head has none. Distil regression "
            "tasks from the live teacher(s)."
        )
    models = classification.load_distillation_models(model_args, spec)
    # Class ids in the first teacher's label order (no student: its alignment is the teacher's).
    train = classification.tokenize_datasets(
        {"train": raw["train"]}, spec, models.tokenizer, models.label_to_id, data_args
    )["train"]
    teachers = [(path, freeze(model, cache_args.teacher_dtype)) for path, model in models.teachers.items()]
    return build_mixture_cache(
        teachers, train, cache_args.cache_output_dir, tokenizer=models.tokenizer,
        teacher_weights=cache_args.teacher_weights, teacher_weighting=cache_args.teacher_weighting,
        task=TASK_SEQUENCE, top_k=cache_args.top_k, collator=classification.data_collator(models.tokenizer, data_args),
        extra_manifest={"task_name": spec.name, "max_seq_length": data_args.max_seq_length,
                        "teacher_dtype": cache_args.teacher_dtype},
        **options,
    )  # fmt: skip


if __name__ == "__main__":
    main()
    common.finish_processes()
