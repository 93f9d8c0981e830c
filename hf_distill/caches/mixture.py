"""Teacher logits caches of several teachers, and of sequence-level (classification) heads.

Several teachers (`build_mixture_cache`). The KD target of several teachers is their weighted mixture of softened
distributions, q = sum_i w_i softmax(z_i / T) (`hf_distill.sources.ensemble`). It is the softmax of no logits at
temperature 1, so a cache of it cannot hold log-probabilities at T = 1 as a one-teacher cache does: it stores the
target's own log-probabilities at the training temperature T (manifest `target` "mixture", `target_temperature`
T), the top k of log q with log of q's mass outside them, and the loss uses them as the teacher's buckets directly
(`sparse_distillation_loss(..., teacher_at_temperature=True)`). With k = V (all classes of a classifier, or the
whole vocabulary) the cached loss is the live ensemble loss. The manifest records the teachers (names, weight
fingerprints), their normalised weights and the weighting; a run whose `teacher_weights`, `teacher_weighting`
(when not the default) or temperature differ from the cache's is refused (`check_cached_target`).

With `teacher_weighting="confidence"` each position's weights are w_i * p_i(gold) renormalised, p_i the teacher's
probability of the gold label at temperature 1 (`ensemble.confidence_weights`), so the cache needs the gold labels
when it is built: the `labels` column of the tokenized data (a classifier's class, a causal LM's next token; rows
or tokens labelled -100 keep the fixed weights). The cache then holds those labels' weighting for good.

Sequence-level heads (`task` "sequence"): one position per row, holding every class (k = the number of labels), so
the cached target is exact. One teacher is stored at temperature 1 (valid at every temperature), several as a
mixture. Classes are in the first teacher's label order, named in the manifest (`label_names`); training maps them
to the student's order by name (`cached_label_order`), and `CachedColumnsCollator` adds them to padded batches.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from hf_distill.caches.format import (
    INDICES_COLUMN,
    LOGPROBS_COLUMN,
    TAIL_COLUMN,
    TARGET_MIXTURE,
    TARGET_TEACHER,
    TASK_CAUSAL_LM,
    TASK_SEQUENCE,
    token_ids_checksum,
)
from hf_distill.caches.manifest import build_manifest
from hf_distill.caches.topk import (
    cache_features,
    cached_vocab_size,
    check_build_options,
    index_dtype,
    numpy_dtype,
    padded_rows,
    write_cache,
)
from hf_distill.losses import teacher_mixture_logprobs
from hf_distill.losses.mixture import confidence_weights, normalised_weights
from hf_distill.training.teacher import forward_inputs, label_permutation

logger = logging.get_logger(__name__)

TEACHER_WEIGHTINGS = ("fixed", "confidence")
TASKS = (TASK_CAUSAL_LM, TASK_SEQUENCE)


def label_names_of(config: Any) -> list[str]:
    """A classifier's label names in its output order (LABEL_i where it names none)."""
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(config.num_labels)]


# --------------------------------------------------------------------------------------------- the target
def cached_target(
    teacher_logits: Sequence[torch.Tensor],
    weights: torch.Tensor,
    *,
    temperature: float,
    labels: torch.Tensor | None,
    weighting: str,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cached values of K teachers' logits (..., V) at each position: (top-k log-probabilities, their ids, log
    of the mass outside them), (..., k) / (..., k) / (...).

    One teacher: log_softmax(z) at temperature 1 (the tail then still has to be tempered: one-teacher caches of
    LMs are built by `logit_cache.build_logit_cache`; here only with k = V, an empty tail). Several: the mixture
    log q at `temperature` with fixed or confidence weights (labels: (...) gold ids, -100 = none).
    """
    if len(teacher_logits) == 1:
        log_q = torch.log_softmax(teacher_logits[0].float(), dim=-1)
    else:
        if weighting == "confidence" and labels is not None:
            weights = confidence_weights(weights, teacher_logits, labels)
        log_q = teacher_mixture_logprobs(teacher_logits, weights, temperature=temperature)
    values, indices = torch.topk(log_q, top_k, dim=-1)
    tail = log_q.scatter(-1, indices, -math.inf).logsumexp(-1)
    return values, indices, tail


def _shifted_labels(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Causal LMs: the gold token of position t is token t + 1 (-100 at the last position and on padding)."""
    labels = labels.masked_fill(attention_mask == 0, -100)
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)


# --------------------------------------------------------------------------------------------- building
def build_mixture_cache(
    teachers: Sequence[tuple[str, nn.Module]],
    dataset: Any,
    cache_dir: str | os.PathLike,
    *,
    tokenizer: Any,
    temperature: float,
    teacher_weights: Sequence[float] | None = None,
    teacher_weighting: str = "fixed",
    task: str = TASK_CAUSAL_LM,
    top_k: int | None = None,
    block_size: int | None = None,
    batch_size: int = 8,
    logprobs_dtype: str = "float32",
    overwrite: bool = False,
    device: torch.device | str | None = None,
    collator: Callable[[list[dict]], Mapping[str, torch.Tensor]] | None = None,
    extra_manifest: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Cache the KD target of `teachers` ((name, model) pairs sharing `tokenizer`) over every row of the tokenized
    `dataset`, atomically; returns the manifest.

    task "causal_lm": rows of `input_ids` (and `labels`, the gold tokens for confidence weighting), right-padded
        per batch; `top_k` of the vocabulary per position. With one teacher use `logit_cache.build_logit_cache`.
    task "sequence": a classifier's rows collated by `collator` (e.g. `DataCollatorWithPadding`); every class is
        kept (top_k must be None or the number of labels), in the first teacher's label order: every other
        teacher's logits are reordered into it by label name (`teacher.label_permutation`), and the `labels`
        column (for confidence weighting) must be in it too.
    teacher_weights are normalised (equal when None); `temperature` is the training runs' --temperature.
    """
    check_build_options(temperature, logprobs_dtype, dataset)
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
    if teacher_weighting not in TEACHER_WEIGHTINGS:
        raise ValueError(f"teacher_weighting must be one of {TEACHER_WEIGHTINGS}, got {teacher_weighting!r}.")
    if not teachers:
        raise ValueError("build_mixture_cache needs at least one teacher.")
    names, models = [name for name, _ in teachers], [model for _, model in teachers]
    if len(models) == 1 and task == TASK_CAUSAL_LM:
        raise ValueError(
            "one causal-LM teacher is cached by logit_cache.build_logit_cache (its tail is tempered there)."
        )
    weights = normalised_weights(teacher_weights, len(models))
    weight_tensor = torch.tensor(weights, dtype=torch.float32)
    if teacher_weighting == "confidence" and "labels" not in dataset.column_names:
        raise ValueError(
            "teacher_weighting='confidence' weighs each teacher by its probability of the gold label, which the cache "
            f"needs when it is built, but the data has no labels column (columns {dataset.column_names}). Use "
            "--teacher_weighting fixed, or give labelled training data."
        )
    if task == TASK_SEQUENCE:
        num_labels = models[0].config.num_labels
        if top_k not in (None, num_labels):
            raise ValueError(
                f"a classification cache keeps every class: top_k must be {num_labels} (the number of labels) or "
                f"unset, got {top_k}."
            )
        top_k, vocab_size = num_labels, num_labels
        label_orders = [label_permutation(model.config, models[0].config) for model in models]
        if collator is None:
            raise ValueError("task='sequence' needs the collator that pads the tokenized rows.")
    else:
        vocab_size = min(cached_vocab_size(model, tokenizer) for model in models)
        if top_k is None or not 1 <= top_k <= vocab_size:
            raise ValueError(f"top_k must be in [1, {vocab_size}] (the vocabulary size), got {top_k}.")
    target = TARGET_MIXTURE if len(models) > 1 else TARGET_TEACHER
    device = torch.device(device if device is not None else next(models[0].parameters()).device)
    was_training = [model.training for model in models]
    for model in models:
        model.eval().to(device)
    store = numpy_dtype(logprobs_dtype)
    counted = {"tokens": 0}

    def sequence_batches() -> Iterator[dict[str, list]]:
        view = dataset.with_format(None)
        for start in range(0, len(view), batch_size):
            rows = [view[i] for i in range(start, min(start + batch_size, len(view)))]
            batch = {key: value.to(device) for key, value in collator(rows).items()}
            labels = batch.get("labels")
            with torch.no_grad():
                logits = []
                for model, order in zip(models, label_orders):
                    scores = model(**forward_inputs(model, batch)).logits  # (B, C)
                    logits.append(scores if order is None else scores[:, order.to(device)])
            values, indices, tail = cached_target(
                logits, weight_tensor.to(device), temperature=temperature, labels=labels,
                weighting=teacher_weighting, top_k=top_k,
            )  # fmt: skip
            counted["tokens"] += len(rows)
            yield {
                LOGPROBS_COLUMN: list(values.cpu().numpy().astype(store)),
                INDICES_COLUMN: list(indices.cpu().numpy().astype(index_dtype(vocab_size))),
                TAIL_COLUMN: list(tail.cpu().numpy().astype(np.float32)[:, None]),
            }

    def causal_batches() -> Iterator[dict[str, list]]:
        columns = ["input_ids"] + (["labels"] if "labels" in dataset.column_names else [])
        view = dataset.select_columns(columns).with_format(None)
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        for start in range(0, len(view), batch_size):
            rows = view[start : start + batch_size]
            input_ids, attention_mask, lengths = padded_rows(rows["input_ids"], pad_token_id)
            labels = padded_rows(rows.get("labels", rows["input_ids"]), -100)[0]
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            gold = _shifted_labels(labels.to(device), attention_mask)
            with torch.no_grad():
                logits = [
                    model(input_ids=input_ids, attention_mask=attention_mask).logits[..., :vocab_size]
                    for model in models
                ]  # K x (B, T, V)
            values, indices, tail = cached_target(
                logits, weight_tensor.to(device), temperature=temperature, labels=gold,
                weighting=teacher_weighting, top_k=top_k,
            )  # fmt: skip
            counted["tokens"] += sum(lengths)
            values, indices, tail = values.cpu().numpy(), indices.cpu().numpy(), tail.cpu().numpy()
            yield {
                LOGPROBS_COLUMN: [values[i, :n].astype(store).reshape(-1) for i, n in enumerate(lengths)],
                INDICES_COLUMN: [
                    indices[i, :n].astype(index_dtype(vocab_size)).reshape(-1) for i, n in enumerate(lengths)
                ],
                TAIL_COLUMN: [tail[i, :n].astype(np.float32) for i, n in enumerate(lengths)],
            }

    def manifest() -> dict[str, Any]:
        extra = dict(extra_manifest or {})
        if task == TASK_SEQUENCE:
            extra["label_names"] = label_names_of(models[0].config)
        return build_manifest(
            teachers=list(zip(names, models)),
            tokenizer=tokenizer,
            top_k=top_k,
            block_size=block_size,
            num_rows=len(dataset),
            num_tokens=counted["tokens"],
            data_checksum=token_ids_checksum(dataset),
            logprobs_dtype=logprobs_dtype,
            vocab_size=vocab_size,
            tail_temperature=temperature,
            target=target,
            teacher_weights=weights,
            teacher_weighting=teacher_weighting if len(models) > 1 else "fixed",
            task=task,
            extra=extra,
        )

    start_time = time.perf_counter()
    batches = sequence_batches() if task == TASK_SEQUENCE else causal_batches()
    try:
        result = write_cache(
            cache_dir,
            cache_features(logprobs_dtype, vocab_size=vocab_size),
            batches,
            manifest,
            overwrite=overwrite,
        )
    finally:
        for model, training in zip(models, was_training):
            model.train(training)
    logger.info(
        f"Cached the {'mixture of ' + str(len(models)) + ' teachers' if len(models) > 1 else 'teacher'} "
        f"({', '.join(names)}; weights {[round(w, 4) for w in weights]}, {teacher_weighting}) over "
        f"{len(dataset)} rows in {cache_dir}, top {top_k}, for training at temperature {temperature:g} "
        f"({time.perf_counter() - start_time:.1f}s)."
    )
    return result


# --------------------------------------------------------------------------------------------- training runs
def check_cached_target(manifest: Mapping[str, Any], args: Any, cache_dir: Any = None) -> None:
    """Raise before training when the run asks for other teachers' weights or weighting than the cache holds (the
    temperature is checked by `logit_cache.check_tail_temperature`). `args`: `teacher_weights`,
    `teacher_weighting`."""
    where = f"teacher logits cache {str(cache_dir)!r}" if cache_dir is not None else "teacher logits cache"
    teachers = [
        entry.get("name") for entry in manifest.get("teachers") or [{"name": manifest.get("teacher")}]
    ]
    cached = list(manifest.get("teacher_weights") or [1.0])
    requested = getattr(args, "teacher_weights", None)
    if requested is not None:
        given = normalised_weights(requested, len(requested))
        if len(given) != len(cached) or any(
            not math.isclose(a, b, abs_tol=1e-6) for a, b in zip(given, cached)
        ):
            raise ValueError(
                f"--teacher_weights {list(requested)} (normalised {[round(w, 6) for w in given]}) differ from the "
                f"weights the {where} was built with, {[round(w, 6) for w in cached]} for its teachers {teachers}: "
                "the cache holds the mixture at those weights. Drop --teacher_weights (the cache's apply), or rebuild "
                "the cache with scripts/cache_teacher_logits.py --teacher_weights "
                f"{' '.join(f'{w:g}' for w in requested)}."
            )
    weighting = getattr(args, "teacher_weighting", "fixed")
    cached_weighting = manifest.get("teacher_weighting") or "fixed"
    if weighting != "fixed" and weighting != cached_weighting:
        raise ValueError(
            f"--teacher_weighting {weighting} differs from the {where}'s ({cached_weighting}, teachers {teachers}); "
            f"rebuild the cache with --teacher_weighting {weighting}, or drop the flag."
        )


def cached_label_order(manifest: Mapping[str, Any], label_names: Sequence[str]) -> torch.Tensor | None:
    """Index map from a sequence cache's classes (its first teacher's label order) to the run's (the student's)
    order by name; None when they agree. Raises when the names differ."""
    cached = [str(name) for name in manifest.get("label_names") or []]
    names = [str(name) for name in label_names]
    if cached == names:
        return None
    if sorted(cached) != sorted(names):
        raise ValueError(
            f"the teacher logits cache holds the classes {cached} (its first teacher's labels), the student has "
            f"{names}: they are not the same labels. Rebuild the cache with teachers fine-tuned on this task's labels."
        )
    position = {name: index for index, name in enumerate(names)}
    return torch.tensor([position[name] for name in cached], dtype=torch.long)


@dataclass
class CachedColumnsCollator:
    """Wraps a classifier's collator: the cached columns (one position per row: k log-probabilities, k class ids,
    one tail value) are taken out of each row, the rest collated by `collator`, and the cached columns added as
    (B, k) float32 / (B, k) long / (B,) float32 tensors, class ids mapped to the student's order by `label_order`
    (`cached_label_order`). Rows without cached columns (evaluation) are collated as they are."""

    collator: Callable[[list[dict]], Any]
    label_order: torch.Tensor | None = None

    def __call__(self, features: list[Mapping[str, Any]]) -> Any:
        cached = (LOGPROBS_COLUMN, INDICES_COLUMN, TAIL_COLUMN)
        if not features or LOGPROBS_COLUMN not in features[0]:
            return self.collator([_plain(feature) for feature in features])
        batch = self.collator([_plain(feature, drop=cached) for feature in features])
        logprobs = np.stack([np.asarray(feature[LOGPROBS_COLUMN], dtype=np.float32) for feature in features])
        indices = torch.from_numpy(
            np.stack([np.asarray(feature[INDICES_COLUMN]) for feature in features])
        ).long()
        if self.label_order is not None:
            indices = self.label_order[indices]
        batch[LOGPROBS_COLUMN] = torch.from_numpy(logprobs)
        batch[INDICES_COLUMN] = indices
        if TAIL_COLUMN in features[0]:
            tails = [
                np.asarray(feature[TAIL_COLUMN], dtype=np.float32).reshape(-1)[0] for feature in features
            ]
            batch[TAIL_COLUMN] = torch.tensor(tails, dtype=torch.float32)
        return batch


def _plain(feature: Mapping[str, Any], drop: Sequence[str] = ()) -> dict[str, Any]:
    """A row as the wrapped collator expects it: Python lists, not numpy arrays (the cache loads in numpy format)."""
    return {
        key: value.tolist() if isinstance(value, np.ndarray) else value
        for key, value in feature.items()
        if key not in drop
    }


def load_sequence_cache(
    cache_dir: str | os.PathLike,
    train_dataset: Any,
    collator: Callable[[list[dict]], Any],
    *,
    tokenizer: Any,
    label_names: Sequence[str],
    temperature: float | None = None,
    teacher_names: Sequence[str] | None = None,
) -> tuple[Any, CachedColumnsCollator, dict[str, Any]]:
    """A classifier's training rows with a sequence cache's columns (`logit_cache.load_logit_cache`, task
    "sequence"), the collator that batches them (`collator` wrapped, classes mapped to `label_names`, the
    student's order), and the manifest. `teacher_names`: the run's teachers, compared with the cache's by name
    (a warning: the cache's are used)."""
    from hf_distill.caches.topk import load_logit_cache

    dataset, manifest = load_logit_cache(
        cache_dir,
        train_dataset,
        tokenizer=tokenizer,
        block_size=None,
        temperature=temperature,
        task=TASK_SEQUENCE,
    )
    cached_names = [entry.get("name") for entry in manifest.get("teachers") or []]
    if teacher_names is not None and list(teacher_names) != cached_names:
        logger.warning(
            f"--teacher_model_name_or_path names {list(teacher_names)}, the teacher logits cache {str(cache_dir)!r} "
            f"holds {cached_names}: training follows the cache."
        )
    return dataset, CachedColumnsCollator(collator, cached_label_order(manifest, label_names)), manifest
