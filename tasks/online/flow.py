"""The stream loop: for each chunk, evaluate (test, then train), refresh the teacher when due, distil the student from
the current teacher, write the chunk's checkpoint.

Per chunk i (counted from 0):
1. the chunk is checked (`stream.check_chunk`): not empty, its text columns there, every label a class of the head;
2. teacher and student are evaluated on its labelled rows before either learns from them (prequential accuracy);
3. when `refresh_every` = N > 0 and (i + 1) % N == 0, the teacher is fine-tuned (cross-entropy) on the labelled
   rows of the newest `refresh_window` chunks;
4. the student is distilled from the current teacher on the chunk (`DistillationTrainer`: KD, plus the task loss on
   labelled rows at `alpha`), starting from where the last chunk left it, with a fresh optimizer;
5. teacher and student are evaluated on `eval_file` when given, and the checkpoint is written (`checkpoints.py`).

Every random draw of chunk i is seeded with `seed + i`, so a run resumed at chunk i trains it exactly as an
uninterrupted run would: the same student at the end.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, concatenate_datasets
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed
from transformers.utils import logging

from hf_distill import DistillationTrainer, DistillationTrainingArguments
from hf_distill.tasks.common.loading import freeze_input_embeddings
from hf_distill.tasks.online import checkpoints
from hf_distill.tasks.online.arguments import OnlineArguments, StreamArguments
from hf_distill.tasks.online.stream import Chunk, check_chunk

logger = logging.get_logger(__name__)


def tokenize_rows(
    rows: Dataset,
    tokenizer: Any,
    stream_args: StreamArguments,
    label_to_id: dict[str, int],
) -> Dataset:
    """input_ids, attention_mask (, token_type_ids) and, when the rows have labels, `labels` (-100 where a row has
    none)."""
    columns = stream_args.text_columns
    label_column = stream_args.label_column_name
    with_labels = label_column in rows.column_names and any(
        value not in (None, "") for value in rows[label_column]
    )

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [["" if text is None else str(text) for text in batch[column]] for column in columns]
        encoded = tokenizer(*texts, truncation=True, max_length=stream_args.max_seq_length)
        if with_labels:
            encoded["labels"] = [
                -100 if value in (None, "") else label_to_id[str(value)] for value in batch[label_column]
            ]
        return encoded

    return rows.map(encode, batched=True, remove_columns=rows.column_names, keep_in_memory=True)


def labelled(tokenized: Dataset) -> Dataset | None:
    if "labels" not in tokenized.column_names:
        return None
    rows = tokenized.filter(lambda row: row["labels"] != -100, keep_in_memory=True)
    return rows if len(rows) else None


@torch.no_grad()
def accuracy(
    model: torch.nn.Module, tokenized: Dataset | None, tokenizer: Any, batch_size: int = 64
) -> float | None:
    """The share of labelled rows whose argmax class is the label (None without labelled rows)."""
    rows = labelled(tokenized) if tokenized is not None else None
    if rows is None:
        return None
    collator = DataCollatorWithPadding(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(rows), batch_size):
        batch = collator([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        labels = batch.pop("labels")
        logits = model(**{key: value.to(device) for key, value in batch.items()}).logits
        correct += int((logits.argmax(-1).cpu() == labels).sum())
    model.train(was_training)
    return correct / len(rows)


def refresh_teacher(
    teacher: torch.nn.Module,
    rows: Dataset,
    tokenizer: Any,
    online_args: OnlineArguments,
    training_args: DistillationTrainingArguments,
    work_dir: Path,
    seed: int,
    freeze_embeddings: bool,
) -> torch.nn.Module:
    """Fine-tune the teacher in place on `rows` (tokenized, labelled) with cross-entropy; returns it frozen again."""
    teacher.requires_grad_(True)
    if freeze_embeddings:
        freeze_input_embeddings(teacher)
    args = TrainingArguments(
        output_dir=str(work_dir),
        per_device_train_batch_size=training_args.per_device_train_batch_size,
        learning_rate=online_args.refresh_learning_rate,
        num_train_epochs=online_args.refresh_epochs,
        weight_decay=training_args.weight_decay,
        seed=seed,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        logging_steps=max(training_args.logging_steps, 1),
        disable_tqdm=training_args.disable_tqdm,
        use_cpu=training_args.use_cpu,
        dataloader_pin_memory=training_args.dataloader_pin_memory,
    )
    set_seed(seed)
    trainer = Trainer(
        model=teacher, args=args, train_dataset=rows, processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )  # fmt: skip
    trainer.train()
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def distil_chunk(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    rows: Dataset,
    tokenizer: Any,
    training_args: DistillationTrainingArguments,
    work_dir: Path,
    seed: int,
) -> dict[str, float]:
    """Distil the student in place from `teacher` on one chunk's tokenized rows; returns the train metrics."""
    args = dataclasses.replace(
        training_args,
        output_dir=str(work_dir),
        seed=seed,
        data_seed=None,
        save_strategy="no",
        eval_strategy="no",
    )
    set_seed(seed)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=rows, processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )  # fmt: skip
    return dict(trainer.train().metrics)


def _check_same_chunk(index: int, chunk: Chunk, recorded: dict[str, str]) -> None:
    if (chunk.name, chunk.fingerprint) != (recorded["name"], recorded["fingerprint"]):
        raise ValueError(
            f"chunk {index} of the stream is {chunk.name} ({chunk.fingerprint[:12]}), but this run consumed "
            f"{recorded['name']} ({recorded['fingerprint'][:12]}) there: the stream changed since. Restore it, or "
            "start over in another --output_dir."
        )


def run_stream(
    source: Iterable[Chunk],
    *,
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    tokenizer: Any,
    label_names: Sequence[str],
    stream_args: StreamArguments,
    online_args: OnlineArguments,
    training_args: DistillationTrainingArguments,
    settings: dict[str, Any],
    resumed: checkpoints.ChunkCheckpoint | None = None,
    eval_rows: Dataset | None = None,
    freeze_embeddings: bool = False,
) -> dict[str, Any]:
    """Process the chunks of `source` after those `resumed` recorded (module docstring); returns the state of the
    last chunk: its consumed chunks, the current teacher and every chunk's metrics."""
    output_dir = Path(training_args.output_dir)
    label_to_id = {name: index for index, name in enumerate(label_names)}
    if resumed is not None:
        state = resumed.state
    else:
        initial_teacher = {"path": settings["teacher"], "checkpoint": None}
        state = {"settings": settings, "chunks": [], "metrics": [], "teacher": initial_teacher}
    consumed = state["chunks"]
    recent: deque[Dataset] = deque(maxlen=online_args.refresh_window)  # the newest chunks' labelled rows
    eval_tokenized = (
        tokenize_rows(eval_rows, tokenizer, stream_args, label_to_id) if eval_rows is not None else None
    )
    for index, chunk in enumerate(source):
        if stream_args.max_chunks is not None and index >= stream_args.max_chunks:
            break
        if index < len(consumed):  # done before the resume: the same chunk? kept for the refresh windows
            _check_same_chunk(index, chunk, consumed[index])
            recent.append(labelled(tokenize_rows(chunk.rows, tokenizer, stream_args, label_to_id)))
            continue
        started = time.perf_counter()
        labelled_count = check_chunk(
            chunk, stream_args.text_columns, stream_args.label_column_name, label_names
        )
        tokenized = tokenize_rows(chunk.rows, tokenizer, stream_args, label_to_id)
        metrics: dict[str, Any] = {
            "chunk": index,
            "name": chunk.name,
            "rows": len(chunk.rows),
            "labelled": labelled_count,
        }
        metrics["prequential"] = {
            "teacher": accuracy(teacher, tokenized, tokenizer),
            "student": accuracy(student, tokenized, tokenizer),
        }
        recent.append(labelled(tokenized))
        seed = training_args.seed + index
        refreshed = online_args.refresh_every > 0 and (index + 1) % online_args.refresh_every == 0
        window = [rows for rows in recent if rows is not None]
        if refreshed and window:
            logger.info(
                f"chunk {index} ({chunk.name}): refreshing the teacher on {sum(map(len, window))} labelled rows"
            )
            teacher = refresh_teacher(
                teacher, concatenate_datasets(window), tokenizer, online_args, training_args,
                output_dir / "work" / "refresh", seed, freeze_embeddings,
            )  # fmt: skip
        refreshed = refreshed and bool(window)
        logger.info(f"chunk {index} ({chunk.name}): distilling the student on {len(tokenized)} rows")
        metrics["train"] = distil_chunk(
            student, teacher, tokenized, tokenizer, training_args, output_dir / "work" / "student", seed
        )
        metrics["teacher_refreshed"] = refreshed
        if eval_tokenized is not None:
            metrics["eval"] = {
                "teacher": accuracy(teacher, eval_tokenized, tokenizer),
                "student": accuracy(student, eval_tokenized, tokenizer),
            }
        metrics["seconds"] = round(time.perf_counter() - started, 2)
        name = checkpoints.checkpoint_name(index)
        state = {
            **state,
            "chunks": [*consumed, {"name": chunk.name, "fingerprint": chunk.fingerprint}],
            "metrics": [*state["metrics"], metrics],
            "teacher": {"path": None, "checkpoint": name} if refreshed else state["teacher"],
        }
        consumed = state["chunks"]
        if training_args.should_save:
            checkpoints.write_checkpoint(
                output_dir, index, state, student, tokenizer, teacher if refreshed else None
            )
            checkpoints.prune_checkpoints(
                output_dir, online_args.keep_checkpoints, state["teacher"]["checkpoint"]
            )
        logger.info(f"chunk {index} ({chunk.name}) done: {metrics}")
    shutil.rmtree(output_dir / "work", ignore_errors=True)
    return state
