"""Trains a tiny student under however many processes launched it; used by tests/test_distributed.py.

accelerate launch ... tests/distributed/trainer_worker.py OUTPUT_DIR PER_DEVICE_BATCH
"""

from __future__ import annotations

import json
import os
import sys

import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, DataCollatorWithPadding

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from conftest import TEXTS_FOR_TESTS, make_bert_tokenizer  # noqa: E402

from hf_distill import DistillationTrainer, DistillationTrainingArguments  # noqa: E402


def bert(tokenizer, layers, hidden, seed):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def main(output_dir: str, per_device_batch: int) -> None:
    tokenizer = make_bert_tokenizer()
    texts = TEXTS_FOR_TESTS[:16]
    train = Dataset.from_dict({**tokenizer(texts), "labels": [i % 2 for i in range(len(texts))]})
    evaluation = Dataset.from_dict({**tokenizer(texts[:7]), "labels": [i % 2 for i in range(7)]})
    args = DistillationTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=per_device_batch,
        per_device_eval_batch_size=2,
        max_steps=3,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        hidden_weight=1.0,
        save_strategy="steps",
        save_steps=3,
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    seen = []

    def compute_metrics(prediction):
        seen.append(len(prediction.label_ids))
        return {"examples": float(len(prediction.label_ids))}

    trainer = DistillationTrainer(
        model=bert(tokenizer, 1, 32, seed=1),
        teacher_model=bert(tokenizer, 2, 48, seed=2),
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()
    rank = trainer.args.process_index
    report = {
        "world_size": trainer.args.world_size,
        "teacher_wrapped": isinstance(trainer.teacher_model, torch.nn.parallel.DistributedDataParallel),
        "fsdp": trainer.is_fsdp_enabled,
        "teacher_class": type(trainer.teacher_model).__name__,
        "teacher_trainable": sum(p.requires_grad for p in trainer.teacher_model.parameters()),
        "eval_examples": metrics["eval_examples"],
        "weights": {}
        if trainer.is_fsdp_enabled
        else {n: t.tolist() for n, t in trainer.model.state_dict().items()},
        "projections": {name: t.tolist() for name, t in trainer.hidden_projections.state_dict().items()},
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
    }
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
