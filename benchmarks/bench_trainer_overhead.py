"""How much time does DistillationTrainer add over a bare PyTorch loop doing the same work?

Both run the same student/teacher pair on the same batches: teacher forward under no_grad, student
forward/backward on (1 - alpha) * CE + alpha * KD, gradient clipping, an AdamW step and a linear schedule.
They alternate in one process (trainer, loop, loop, trainer, ...) so machine noise and warm-up hit both alike. Time per
optimizer step is taken from step end to step end after warm-up steps, so set-up work is not counted for
either side. Target: trainer step time <= 1.10x the loop's.

    python benchmarks/bench_trainer_overhead.py [--steps 30] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

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

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def step_times(ends: list[float]) -> list[float]:
    return [b - a for a, b in zip(ends[WARMUP:], ends[WARMUP + 1 :])]


def run_trainer(student, teacher, rows, steps, batch_size, alpha, temperature) -> list[float]:
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
    return step_times(timer.ends)


def run_loop(student, teacher, rows, steps, batch_size, alpha, temperature) -> list[float]:
    student.train()
    # The same implementation as the Trainer's default optimizer (adamw_torch_fused).
    optimizer = torch.optim.AdamW(student.parameters(), lr=5e-5, weight_decay=0.0, fused=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, steps)
    loader = torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=True)
    ends = []
    for batch in loader:
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
    return step_times(ends)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=128)
    options = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    rows = make_batches(options.steps, options.batch_size, options.seq_len)
    trainer_medians, loop_medians = [], []
    print(f"{'round':>5} {'trainer s/step':>15} {'loop s/step':>12} {'ratio':>7}")
    for round_index in range(options.rounds):
        student, teacher = build_models(seed=round_index)
        trainer_time = statistics.median(
            run_trainer(student, teacher, rows, options.steps, options.batch_size, 0.5, 2.0)
        )
        student, teacher = build_models(seed=round_index)
        loop_time = statistics.median(
            run_loop(student, teacher, rows, options.steps, options.batch_size, 0.5, 2.0)
        )
        trainer_medians.append(trainer_time)
        loop_medians.append(loop_time)
        print(f"{round_index:>5} {trainer_time:>15.4f} {loop_time:>12.4f} {trainer_time / loop_time:>7.3f}")
    ratio = statistics.median(trainer_medians) / statistics.median(loop_medians)
    verdict = "PASS" if ratio <= 1.10 else "MISS"
    print(f"median trainer/loop step-time ratio: {ratio:.3f} (target <= 1.10): {verdict}")


if __name__ == "__main__":
    main()
