"""How much time does DistillationTrainer add over a bare PyTorch loop doing the same work?

Both run the same student/teacher pair on the same batches: teacher forward under no_grad, student
forward/backward on (1 - alpha) * CE + alpha * KD, gradient clipping, an AdamW step and a linear schedule.
They alternate in one process (trainer, loop, loop, trainer, ...) so machine noise and warm-up hit both alike.

Two figures per side:
- steady state: time per optimizer step from step end to step end after warm-up steps. Target: trainer
  <= 1.05x the loop's (median over rounds of per-round medians).
- start-up: everything before the first optimizer step begins (the trainer: building DistillationTrainer and
  train()'s set-up; the loop: optimizer, schedule and data loader), reported on its own, no target.

    python benchmarks/bench_trainer_overhead.py [--steps 30] [--rounds 3] [--json out.json] [--smoke]

With --json, a PNG goes beside the JSON: the steady-state step time of the trainer and of the loop per round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    TrainerCallback,
    get_linear_schedule_with_warmup,
)

from hf_distill import DistillationTrainer, DistillationTrainingArguments
from hf_distill.losses import logit_distillation_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _evidence  # noqa: E402
import _plot  # noqa: E402

WARMUP = 3


def build_models(seed: int = 0):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=4000,
        hidden_size=256,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=256,
    )
    teacher = BertForSequenceClassification(BertConfig(num_hidden_layers=4, **common)).eval()
    student = BertForSequenceClassification(BertConfig(num_hidden_layers=2, **common))
    return student, teacher


def make_batches(steps: int, batch_size: int, seq_len: int):
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(5, 4000, (seq_len,), generator=generator),
            "attention_mask": torch.ones(seq_len, dtype=torch.long),
            "labels": torch.tensor(i % 2),
        }
        for i in range(steps * batch_size)
    ]


class StepTimer(TrainerCallback):
    def __init__(self):
        self.ends: list[float] = []
        self.first_begin: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.first_begin is None:
            self.first_begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def step_times(ends: list[float]) -> list[float]:
    return [b - a for a, b in zip(ends[WARMUP:], ends[WARMUP + 1 :])]


def run_trainer(student, teacher, rows, steps, batch_size, alpha, temperature) -> tuple[list[float], float]:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as output_dir:
        args = DistillationTrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=batch_size,
            max_steps=steps,
            learning_rate=5e-5,
            max_grad_norm=1.0,
            alpha=alpha,
            temperature=temperature,
            save_strategy="no",
            logging_steps=10_000,
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            dataloader_num_workers=0,
        )
        timer = StepTimer()
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=rows, callbacks=[timer]
        )
        trainer.train()
    return step_times(timer.ends), timer.first_begin - started


def run_loop(student, teacher, rows, steps, batch_size, alpha, temperature) -> tuple[list[float], float]:
    started = time.perf_counter()
    student.train()
    # The same implementation as the Trainer's default optimizer (adamw_torch_fused).
    optimizer = torch.optim.AdamW(student.parameters(), lr=5e-5, weight_decay=0.0, fused=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, steps)
    loader = torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=True)
    ends = []
    first_begin = None
    for batch in loader:
        first_begin = first_begin or time.perf_counter()
        labels = batch.pop("labels")
        with torch.no_grad():
            teacher_logits = teacher(**batch).logits
        student_logits = student(**batch).logits
        ce = F.cross_entropy(student_logits, labels)
        kd = logit_distillation_loss(student_logits, teacher_logits, temperature=temperature)
        loss = (1 - alpha) * ce + alpha * kd
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    return step_times(ends), first_begin - started


def plot(path: Path, results: list[dict], title: str) -> Path:
    """Per round, the median steady-state step time of the trainer and of the loop."""
    return _plot.grouped_bar_chart(
        path,
        title,
        [f"round {row['round']} ({row['first']} first)" for row in results],
        {
            "DistillationTrainer": [row["trainer_step_s"] for row in results],
            "bare PyTorch loop": [row["loop_step_s"] for row in results],
        },
        "seconds per step (median after warm-up)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument(
        "--json", default=None, help="Write the figures to this JSON file, and a PNG of them beside it."
    )
    parser.add_argument("--smoke", action="store_true", help="Seconds-long run that checks the script works.")
    options = parser.parse_args()
    if options.smoke:
        options.steps, options.rounds, options.batch_size, options.seq_len = WARMUP + 3, 1, 2, 16
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    machine = _evidence.machine()  # with the load average before the run
    rows = make_batches(options.steps, options.batch_size, options.seq_len)
    results = []
    print(
        f"{'round':>5} {'first':>7} {'trainer s/step':>15} {'loop s/step':>12} {'ratio':>7} {'start-up s (t/l)':>17}"
    )
    for round_index in range(options.rounds):
        # Which side goes first alternates by round, so warm caches and machine drift favour neither.
        order = ("trainer", "loop") if round_index % 2 == 0 else ("loop", "trainer")
        figures = {}
        for side in order:
            student, teacher = build_models(seed=round_index)
            run = run_trainer if side == "trainer" else run_loop
            times, startup = run(student, teacher, rows, options.steps, options.batch_size, 0.5, 2.0)
            figures[side] = (statistics.median(times), startup)
        (trainer_time, trainer_startup), (loop_time, loop_startup) = figures["trainer"], figures["loop"]
        results.append(
            {
                "round": round_index,
                "first": order[0],
                "trainer_step_s": trainer_time,
                "loop_step_s": loop_time,
                "ratio": trainer_time / loop_time,
                "trainer_startup_s": trainer_startup,
                "loop_startup_s": loop_startup,
            }
        )
        print(
            f"{round_index:>5} {order[0]:>7} {trainer_time:>15.4f} {loop_time:>12.4f} "
            f"{trainer_time / loop_time:>7.3f} {trainer_startup:>8.2f}/{loop_startup:.2f}"
        )
    ratios = [row["ratio"] for row in results]
    ratio = statistics.median(ratios)
    verdict = "PASS" if ratio <= 1.05 else "MISS"
    spread = f"{min(ratios):.3f}-{max(ratios):.3f}"
    startup = statistics.median(row["trainer_startup_s"] - row["loop_startup_s"] for row in results)
    print(
        f"median trainer/loop steady-state step-time ratio: {ratio:.3f} (rounds {spread}; target <= 1.05): {verdict}"
    )
    print(f"median start-up the trainer adds before its first step: {startup:.2f} s")
    if options.json:
        summary = {
            "ratio": ratio,
            "target": 1.05,
            "verdict": verdict,
            "startup_extra_s": startup,
            "rounds": results,
            "settings": {key: getattr(options, key) for key in ("steps", "rounds", "batch_size", "seq_len")}
            | {"warmup_steps": WARMUP},
            "smoke": options.smoke,
            "command": _evidence.command(),
            "machine": machine | {"load_average_at_end": list(os.getloadavg())},
        }
        with open(options.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        title = (
            f"DistillationTrainer vs a bare loop: {ratio:.3f}x step time (target <= 1.05, {verdict})"
            f"{' [smoke]' if options.smoke else ''}"
        )
        print(f"JSON: {options.json}\nPNG: {plot(Path(options.json).with_suffix('.png'), results, title)}")


if __name__ == "__main__":
    main()
