"""Samples per second of DistillationTrainer on one process against two CPU processes (DDP over gloo), at the same
global batch.

The script launches itself through `accelerate launch` once with one process and once with two
(`ACCELERATE_USE_CPU=1 ... --multi_gpu --num_processes 2`), alternating for `--rounds` rounds. Each process is
given an equal share of the machine's cores, so the comparison asks what the second process buys on the same
hardware. Throughput is measured from step end to step end after warm-up steps. CPU gloo all-reduce is slow, so
expect well under 2x.

    python benchmarks/bench_scaling.py [--steps 20] [--global_batch 32] [--rounds 2] [--output results.json]
    python benchmarks/bench_scaling.py --smoke   # seconds of work (plus the launches): 2 steps, batch 4, 1 round

Writes benchmarks/results/bench_scaling.json (with --smoke: bench_scaling_smoke.json; --output: elsewhere) and a PNG
beside it: samples/s with one and with two processes.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

NAME = "bench_scaling"
WARMUP = 3
PORT = 29561


def worker(output_file: str, steps: int, per_device_batch: int, seq_len: int, warmup: int = WARMUP) -> None:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, TrainerCallback

    from hf_distill import DistillationTrainer, DistillationTrainingArguments

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    torch.manual_seed(0)
    common = dict(
        vocab_size=4000,
        hidden_size=256,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=256,
    )
    teacher = BertForSequenceClassification(BertConfig(num_hidden_layers=4, **common))
    student = BertForSequenceClassification(BertConfig(num_hidden_layers=2, **common))
    generator = torch.Generator().manual_seed(0)
    rows = [
        {
            "input_ids": torch.randint(5, 4000, (seq_len,), generator=generator),
            "attention_mask": torch.ones(seq_len, dtype=torch.long),
            "labels": torch.tensor(i % 2),
        }
        for i in range(steps * per_device_batch * 2)
    ]
    with tempfile.TemporaryDirectory() as output_dir:
        args = DistillationTrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=per_device_batch,
            max_steps=steps,
            save_strategy="no",
            logging_steps=10_000,
            report_to="none",
            disable_tqdm=True,
        )
        timer = StepTimer()
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=rows, callbacks=[timer]
        )
        trainer.train()
    step_seconds = statistics.median(b - a for a, b in zip(timer.ends[warmup:], timer.ends[warmup + 1 :]))
    if trainer.is_world_process_zero():
        global_batch = per_device_batch * trainer.args.world_size
        with open(output_file, "w", encoding="utf-8") as f:
            json.dump(
                {"world_size": trainer.args.world_size, "samples_per_second": global_batch / step_seconds}, f
            )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(num_processes: int, options: argparse.Namespace, output_file: str) -> dict:
    threads = max((os.cpu_count() or 2) // num_processes, 1)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="")
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
    ]
    port = _free_port() if options.smoke else PORT  # a smoke run (CI) must not collide with a full run
    command += ["--dynamo_backend", "no", "--main_process_port", str(port)]
    command += (
        ["--multi_gpu", "--num_processes", "2"] if num_processes == 2 else ["--cpu", "--num_processes", "1"]
    )
    per_device_batch = options.global_batch // num_processes
    command += [__file__, "--worker", output_file, "--steps", str(options.steps)]
    command += ["--per_device_batch", str(per_device_batch), "--seq_len", str(options.seq_len)]
    command += ["--warmup", str(options.warmup)]
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    with open(output_file, encoding="utf-8") as f:
        return json.load(f)


def plot(path: Path, results: dict[int, list[float]], title: str) -> Path:
    import _plot

    stats = [_plot.mean_and_std(results[processes]) for processes in (1, 2)]
    return _plot.bar_chart(
        path,
        title,
        ["1 process", "2 processes (DDP, gloo)"],
        [statistics.median(results[processes]) for processes in (1, 2)],
        "samples/s (median over rounds; bars: std)",
        [spread for _, spread in stats],
    )


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--global_batch", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="seconds of training: 2 steps (no warm-up) of global batch 4 x 16 tokens, one round; checks the script",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="JSON results file (default benchmarks/results/bench_scaling.json, _smoke.json with --smoke); "
        "the PNG goes beside it",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--per_device_batch", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=WARMUP, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.worker:
        worker(options.worker, options.steps, options.per_device_batch, options.seq_len, options.warmup)
        return None
    if options.smoke:
        options.steps, options.global_batch, options.seq_len, options.rounds, options.warmup = 2, 4, 16, 1, 0

    import _evidence

    machine = _evidence.machine()  # with the load average before the run

    results: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as folder:
        for round_index in range(options.rounds):
            for processes in (1, 2):
                outcome = launch(processes, options, os.path.join(folder, f"{round_index}-{processes}.json"))
                assert outcome["world_size"] == processes, outcome
                results[processes].append(outcome["samples_per_second"])
                print(
                    f"round {round_index}: {processes} process(es): {outcome['samples_per_second']:.1f} samples/s"
                )
    one, two = statistics.median(results[1]), statistics.median(results[2])
    print(f"global batch {options.global_batch}, seq {options.seq_len}, {os.cpu_count()} cores")
    print(f"1 process : {one:.1f} samples/s")
    print(f"2 processes: {two:.1f} samples/s")
    print(f"scaling factor: {two / one:.2f}x (ideal on the same cores: 1.00x; on twice the hardware: 2.00x)")

    summary = {
        "question": __doc__.splitlines()[0],
        "command": _evidence.command(),
        "machine": machine,
        "smoke": options.smoke,
        "settings": {
            "steps": options.steps,
            "warmup_steps": options.warmup,
            "global_batch": options.global_batch,
            "seq_len": options.seq_len,
            "rounds": options.rounds,
            "threads_per_process": {str(n): max((os.cpu_count() or 2) // n, 1) for n in (1, 2)},
        },
        "samples_per_second": {str(n): values for n, values in results.items()},
        "median_samples_per_second": {"1": one, "2": two},
        "scaling_factor": two / one,
    }
    json_path = (
        Path(options.output) if options.output else _evidence.results_path(None, NAME, options.smoke, "json")
    )
    json_path.parent.mkdir(parents=True, exist_ok=True)
    _evidence.write_json(json_path, summary)
    title = (
        f"DistillationTrainer on {os.cpu_count()} CPU cores, global batch {options.global_batch}: "
        f"2 processes = {two / one:.2f}x{' [smoke]' if options.smoke else ''}"
    )
    png = plot(json_path.with_suffix(".png"), results, title)
    print(f"JSON: {json_path}\nPNG: {png}")
    return summary


if __name__ == "__main__":
    main()
