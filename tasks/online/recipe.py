"""`scripts/distill_online.py`: parse the flags, check them, load (or resume) teacher and student, run the stream,
write the summary and the final student."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging

from hf_distill import DistillationTrainingArguments
from hf_distill.args import CAUSAL_LM_ONLY, SEQ2SEQ_ONLY
from hf_distill.heads import label_names as head_label_names
from hf_distill.storage.atomic import atomic_directory, atomic_write_text
from hf_distill.tasks import common
from hf_distill.tasks.common.arguments import ModelArguments
from hf_distill.tasks.common.loading import build_student, freeze_input_embeddings, load_pretrained
from hf_distill.tasks.online import checkpoints
from hf_distill.tasks.online.arguments import OnlineArguments, StreamArguments
from hf_distill.tasks.online.flow import run_stream
from hf_distill.tasks.online.stream import Chunk, FolderChunks, check_chunk, read_chunk_file

logger = logging.get_logger(__name__)

ARGUMENT_TYPES = (ModelArguments, StreamArguments, OnlineArguments, DistillationTrainingArguments)
SUMMARY_FILE = "stream_summary.json"
# Settings a resumed run must share with the run it continues: they decide what every chunk trains.
_TRAINING_SETTINGS = (
    "seed", "num_train_epochs", "max_steps", "learning_rate", "per_device_train_batch_size", "temperature", "alpha",
    "kd_loss", "weight_decay",
)  # fmt: skip


def run_settings(model_args: ModelArguments, stream_args: StreamArguments, online_args: OnlineArguments,
                 training_args: DistillationTrainingArguments, label_names: list[str]) -> dict[str, Any]:  # fmt: skip
    """What the run was started with, recorded in every checkpoint and compared on resume."""
    return {
        "teacher": model_args.teacher_model_name_or_path,
        "student": model_args.student_model_name_or_path
        or {"num_layers": model_args.student_num_layers, "layers": model_args.student_layers},
        "labels": label_names,
        "text_columns": list(stream_args.text_columns),
        "label_column": stream_args.label_column_name,
        "max_seq_length": stream_args.max_seq_length,
        "refresh_every": online_args.refresh_every,
        "refresh_window": online_args.refresh_window,
        "refresh_epochs": online_args.refresh_epochs,
        "refresh_learning_rate": online_args.refresh_learning_rate,
        "freeze_embeddings": model_args.freeze_embeddings,
        **{name: getattr(training_args, name) for name in _TRAINING_SETTINGS},
    }


def _check_same_settings(recorded: dict[str, Any], current: dict[str, Any], folder: Path) -> None:
    changed = {
        key: (recorded.get(key), value) for key, value in current.items() if recorded.get(key) != value
    }
    if changed:
        described = "; ".join(f"{key}: {old!r} then, {new!r} now" for key, (old, new) in changed.items())
        raise ValueError(
            f"{folder} holds a stream run with other settings ({described}); resuming would train the remaining "
            "chunks differently from the first ones. Pass the same flags, or another --output_dir to start over."
        )


def _load_classifier(path: str, model_args: ModelArguments, role: str) -> Any:
    model, info = load_pretrained(
        AutoModelForSequenceClassification, path, role=role, loading_args=model_args, output_loading_info=True
    )
    if info.get("missing_keys"):
        raise ValueError(
            f"the {role} {path!r} has no trained weights for {sorted(info['missing_keys'])}: start the stream from a "
            "teacher fine-tuned on its classes (scripts/train_teacher.py)."
        )
    # Loaded weights can sit at another memory alignment than allocated ones, and the CPU kernels round differently
    # with it (measured: 1e-9 after one chunk). In freshly allocated memory, a run resumed from a checkpoint computes
    # bit for bit what the uninterrupted run computed with the models it kept in memory.
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            tensor.data = tensor.data.clone()
    return model


def run(argv: list[str] | None = None, *, description: str | None = None) -> dict[str, Any]:
    model_args, stream_args, online_args, training_args = common.parse_args(
        ARGUMENT_TYPES, argv, description=description, hidden=(*CAUSAL_LM_ONLY, *SEQ2SEQ_ONLY)
    )
    common.setup_logging(training_args)
    teacher_path = model_args.teacher_model_name_or_path
    config = load_pretrained(AutoConfig, teacher_path, role="teacher", loading_args=model_args)
    label_names = head_label_names(config, "teacher")
    if getattr(config, "problem_type", None) not in (None, "single_label_classification"):
        raise ValueError(
            f"the teacher is a {config.problem_type} model; the stream recipe distils single-label classifiers."
        )
    settings = run_settings(model_args, stream_args, online_args, training_args, label_names)
    source = FolderChunks(
        stream_args.stream_dir,
        stream_args.chunk_glob,
        poll_seconds=stream_args.poll_seconds,
        idle_timeout_seconds=stream_args.idle_timeout_seconds,
    )
    eval_rows = None
    if stream_args.eval_file is not None:
        eval_rows = read_chunk_file(Path(stream_args.eval_file))
        check_chunk(Chunk(Path(stream_args.eval_file).name, eval_rows, ""), stream_args.text_columns,
                    stream_args.label_column_name, label_names)  # fmt: skip
    tokenizer = load_pretrained(
        AutoTokenizer, model_args.tokenizer_name or teacher_path, role="tokenizer", loading_args=model_args
    )
    resumed = checkpoints.latest_checkpoint(training_args.output_dir)
    if resumed is not None:
        _check_same_settings(resumed.state["settings"], settings, resumed.folder)
        logger.info(
            f"Resuming the stream after chunk {resumed.index} ({resumed.state['chunks'][-1]['name']})"
        )
        teacher = _load_classifier(resumed.teacher_dir(training_args.output_dir), model_args, "teacher")
        student = _load_classifier(str(resumed.student_dir), model_args, "student")
    else:
        teacher = _load_classifier(teacher_path, model_args, "teacher")

        def load_student(path: str) -> Any:
            student = _load_classifier(path, model_args, "student")
            if head_label_names(student.config, "student") != label_names:
                raise ValueError(
                    f"the student's classes {head_label_names(student.config, 'student')} are not the teacher's "
                    f"{label_names} in the same order; give it the teacher's id2label."
                )
            return student

        student = build_student(model_args, teacher, load_student)
    if model_args.freeze_embeddings:
        freeze_input_embeddings(student)
    state = run_stream(
        source, teacher=teacher, student=student, tokenizer=tokenizer, label_names=label_names,
        stream_args=stream_args, online_args=online_args, training_args=training_args, settings=settings,
        resumed=resumed, eval_rows=eval_rows, freeze_embeddings=model_args.freeze_embeddings,
    )  # fmt: skip
    output_dir = Path(training_args.output_dir)
    if training_args.should_save and state["chunks"]:
        last = checkpoints.latest_checkpoint(output_dir)
        with atomic_directory(output_dir / "student", overwrite=True) as building:
            shutil.copytree(last.student_dir, building, dirs_exist_ok=True)
        summary = {
            "chunks": state["chunks"],
            "metrics": state["metrics"],
            "teacher": last.teacher_dir(output_dir),
            "student": str(output_dir / "student"),
            "settings": state["settings"],
        }
        atomic_write_text(output_dir / SUMMARY_FILE, json.dumps(summary, indent=2, default=str) + "\n")
    return state
