"""Deep Mutual Learning in the classification recipe (`scripts/distill_glue.py --mutual_learning`): no teacher, two or
more peers (`classification_models.load_peers`) trained together by `hf_distill.mutual.MutualLearningTrainer`.

The flow is the recipe's usual one, once per peer where it reports: train (resuming from --resume_from_checkpoint or
the newest checkpoint in --output_dir), then save every peer as an ordinary model in <output_dir>/peer_<k> with the
tokenizer, with `peers.json` saying where each came from; evaluate each peer on each evaluation split (keys
`eval_peer<k>_<metric>` in eval_results.json); predict each test split with each peer
(predict_results_<task>_peer<k>.txt, metrics `test_peer<k>_<metric>`). There is no teacher, hence no distillation
report.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from datasets import DatasetDict
from transformers.utils import logging

from hf_distill import DistillationTrainingArguments
from hf_distill.mutual import PEER_FOLDER, MutualLearningTrainer
from hf_distill.tasks.classification.metrics import predict_and_write, split_suffix
from hf_distill.tasks.classification.models import Peers
from hf_distill.tasks.classification.spec import TaskSpec
from hf_distill.tasks.common.running import evaluate_datasets, save_metrics, train_and_save

logger = logging.get_logger(__name__)

PEERS_FILE = "peers.json"


def check_mutual_learning(
    spec: TaskSpec,
    training_args: DistillationTrainingArguments,
    compare_no_kd: bool = False,
    quantization_aware_training: bool = False,
) -> None:
    """Raise before any model loads on what mutual learning cannot do with these flags and data."""
    if spec.is_regression:
        raise ValueError(
            "--mutual_learning matches the peers' softened class distributions, but the task is regression (one "
            "output); distil regression from a teacher instead."
        )
    if training_args.teacher_weights is not None:
        raise ValueError(
            f"--teacher_weights {training_args.teacher_weights} weights teachers; --mutual_learning has none: drop it."
        )
    if compare_no_kd:
        raise ValueError(
            "--compare_no_kd trains the student without its teacher; --mutual_learning has peers and no teacher: "
            "drop it (benchmarks/bench_mutual.py compares peers trained alone and together)."
        )
    if quantization_aware_training:
        raise ValueError(
            "--quantization_aware_training prepares the one student of a distillation run; with --mutual_learning "
            "train the peers first, then distil the chosen peer with it."
        )


def train_peers(
    peers: Peers,
    tokenized: DatasetDict,
    spec: TaskSpec,
    training_args: DistillationTrainingArguments,
    data_collator: Callable,
    compute_metrics: Callable,
    resume_from_checkpoint: str | bool | None = None,
    train_metrics: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Train, evaluate and predict with every peer (module docstring); returns {"train", "eval", "predict", "peers"}
    for the stages that ran. `train_metrics` (the labelled / KD-only row counts) go into train_results.json."""
    trainer = MutualLearningTrainer(
        peers.models,
        training_args,
        train_dataset=tokenized["train"] if training_args.do_train else None,
        eval_dataset=tokenized[spec.eval_splits[0]] if spec.eval_splits else None,
        processing_class=peers.tokenizer,
        data_collator=data_collator,
        compute_metrics=compute_metrics,
    )
    described = [
        {"folder": PEER_FOLDER.format(index), "source": source}
        for index, source in enumerate(peers.descriptions)
    ]
    for entry in described:
        logger.info(f"Mutual learning: {entry['folder']} is {entry['source']}")
    results: dict[str, Any] = {"peers": described}
    if training_args.do_train:
        results["train"] = train_and_save(trainer, tokenized["train"], resume_from_checkpoint)
        if train_metrics:  # train_results.json written again, with them
            results["train"].update(train_metrics)
            trainer.save_metrics("train", results["train"])
        if trainer.is_world_process_zero():
            path = os.path.join(training_args.output_dir, PEERS_FILE)
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(described, handle, indent=2)
    if training_args.do_eval:
        metrics: dict[str, float] = {}
        for index in range(len(peers.models)):
            trainer.eval_peer = index
            splits = {split_suffix(split): tokenized[split] for split in spec.eval_splits}
            metrics.update(evaluate_datasets(trainer, splits, prefix=f"eval_peer{index}"))
        save_metrics(trainer, "eval", metrics)
        results["eval"] = metrics
    if training_args.do_predict:
        metrics = {}
        for index, model in enumerate(peers.models):
            trainer.eval_peer = index
            metrics.update(
                predict_and_write(
                    trainer,
                    tokenized,
                    spec,
                    training_args.output_dir,
                    model.config.id2label,
                    prefix=f"test_peer{index}",
                    file_suffix=f"_peer{index}",
                )
            )
        if metrics:
            save_metrics(trainer, "predict", metrics)
            results["predict"] = metrics
    trainer.eval_peer = 0
    return results
