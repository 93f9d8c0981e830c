"""Side by side with the toolkits people use: DistillationTrainer, TextBrewer and torchdistill on the same work.

The compression demo's teacher (all-MiniLM-L6-v2 fine-tuned on the demo's BBC News split; reused from
--teacher_dir, else fine-tuned there with the demo's flags as bench_classification.py does) and two students:

    cut2     create_student(teacher, 2): 2 of its 6 layers, hidden 384
    pruned   the demo's `pruned` stage: prune_model(teacher, PruningSpec(heads=0.5, ffn=0.5, hidden=192, layers=3),
             measure_importance on 256 training articles); the vocabulary is kept whole (the demo also trims it)

Each student is trained by every toolkit from the same saved weights with the same work: the same batches in the
same order (--steps of --batch_size, --max_seq_length tokens, padded per batch), AdamW (fused, weight decay 0.01
except biases and LayerNorm, none on the projections), linear schedule with 10% warm-up, clipping at 1.0, logit KD
at T = 2 with alpha = 0.5 and hidden-state matching (MSE, weight 1) over the same layer pairs through learned
student -> teacher projections that start from the same weights; word embeddings frozen. The conventions differ and
are converted (benchmarks/_toolkits.py): TextBrewer's KD term is a cross-entropy without T^2, so it gets
kd_loss_weight = alpha * T^2 and its loss exceeds ours by alpha * T^2 * H(teacher); torchdistill's alpha weights the
labels. Rounds = seeds; in each round every toolkit trains each student once, the toolkit that goes first rotating.
Every run is a forked child: peak memory is its resident-set high-water mark above its RSS right before the
toolkit's objects are built (optimizer state, activations and projections count alike); step time runs from one
optimizer step's end to the next after --warmup steps. Printed per toolkit and student: the first step's loss (as
the toolkit reports it, and converted to ours), step time median [p10-p90] and against ours, peak memory, test
accuracy over the seeds, lines of user code; then what each toolkit can and cannot do. A toolkit that does not
install or run beside the project's torch and transformers gets a row with its error, verbatim.

    python benchmarks/bench_toolkits.py --teacher_dir outputs/compress_bbc/stages/teacher \\
        --data_dir outputs/compress_bbc/data --steps 50 --max_seq_length 64 --threads 1
        # the figures in docs/BENCHMARKS.md: 3 seeds x 2 students x 2 toolkits, 15 min at load average ~7;
        # the defaults (one epoch, 128 tokens, 2 threads) do roughly 4x the work
    python benchmarks/bench_toolkits.py --smoke    # about a minute: tiny config-built BERT, checks the script

TextBrewer comes with the `peers` extra (pip install -e ".[peers]"). torchdistill pins a newer torch and needs
torchvision; it is looked for in a separate environment (--torchdistill_python, default /tmp/td_venv/bin/python).
Writes benchmarks/results/bench_toolkits.json and .png (--results_dir to change; --smoke: bench_toolkits_smoke.*).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import os
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import _bbc  # noqa: E402  (sets the offline environment before transformers is imported)
import _evidence  # noqa: E402
import _toolkits  # noqa: E402
import bench_classification  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

NAME = "bench_toolkits"
DATA_SEED = 42
STUDENTS = ("cut2", "pruned")
PRUNED = {
    "heads": 0.5,
    "ffn": 0.5,
    "hidden": 192,
    "layers": 3,
}  # configs/compress/bbc_minilm.yaml, stage `pruned`
DEFAULT_TORCHDISTILL_PYTHON = "/tmp/td_venv/bin/python"

# What each toolkit offers beyond a training loop, read from its installed source and documentation (not measured
# here): multi-GPU, mixed precision, checkpoints that a run resumes from, a model card for the Hub.
CAPABILITIES = {
    "hf_distill": {
        "multi-GPU": "yes: Trainer + Accelerate (DDP, FSDP, DeepSpeed); the teacher is placed and sharded",
        "mixed precision": "yes: Trainer's bf16/fp16 (autocast), teacher_dtype for the teacher",
        "checkpoints and resume": "yes: optimizer, scheduler, RNG and projections; resume_from_checkpoint=True "
        "picks the newest complete checkpoint",
        "Hub model card": "yes: README.md describing the distillation, push_to_hub",
    },
    "textbrewer": {
        "multi-GPU": "DataParallel, or DDP with local_rank set by the user",
        "mixed precision": "fp16 through NVIDIA apex (TrainingConfig(fp16=True)); no torch.amp",
        "checkpoints and resume": "no resume: saves the student's state_dict (gs<step>.pkl) only; no optimizer, "
        "scheduler or projection state",
        "Hub model card": "no",
    },
    "torchdistill": {
        "multi-GPU": "DataParallel, DDP and FSDP wrappers (core/util.py), and Accelerate",
        "mixed precision": "through Accelerate (with fp16 the frozen teacher is cast to half)",
        "checkpoints and resume": "save_ckpt / load_ckpt store model, optimizer and scheduler; its example scripts "
        "resume from them",
        "Hub model card": "no",
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny config-built BERT, seconds: checks the script"
    )
    parser.add_argument(
        "--seeds", type=int, default=3, help="rounds; each trains every student with every toolkit"
    )
    parser.add_argument("--steps", type=int, default=93, help="optimizer steps per run (93 x 16 = one epoch)")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the step-time figures")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=2e-4, help="the demo's distillation rate")
    parser.add_argument("--max_seq_length", type=int, default=128, help="the demo's")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument(
        "--alpha", type=float, default=0.5, help="weight of KD (ours); the labels get 1 - alpha"
    )
    parser.add_argument("--hidden_weight", type=float, default=1.0)
    parser.add_argument("--hidden_loss", default="mse", choices=sorted(_toolkits.TEXTBREWER_HIDDEN_LOSS))
    parser.add_argument("--toolkits", default=",".join(_toolkits.TOOLKITS), help="comma-separated")
    parser.add_argument("--students", default=",".join(STUDENTS), help="comma-separated: cut2, pruned")
    parser.add_argument("--data_dir", default="outputs/compress_bbc/data", help="the demo's split (seed 42)")
    parser.add_argument(
        "--teacher_dir",
        default=None,
        help="fine-tuned teacher, reused when it holds a model, else fine-tuned there (default "
        "outputs/compress_bbc/stages/teacher; --smoke: a temporary folder)",
    )
    parser.add_argument("--work_dir", default=None, help="students and runs (default outputs/bench_toolkits)")
    parser.add_argument(
        "--results_dir", default=None, help="where the JSON and PNG go (default benchmarks/results)"
    )
    parser.add_argument("--torchdistill_python", default=DEFAULT_TORCHDISTILL_PYTHON)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads in every run")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile every run and print where each spends its time"
    )
    args = parser.parse_args(argv)
    scratch = tempfile.mkdtemp(prefix="bench_toolkits_") if args.smoke else None
    default_teacher = f"{scratch}/teacher" if args.smoke else "outputs/compress_bbc/stages/teacher"
    args.teacher_dir = args.teacher_dir or default_teacher
    args.work_dir = args.work_dir or (f"{scratch}/runs" if args.smoke else "outputs/bench_toolkits")
    if args.smoke:
        args.seeds, args.steps, args.warmup, args.batch_size, args.max_seq_length = 1, 4, 1, 8, 32
    if args.warmup >= args.steps - 1:
        raise ValueError(
            f"--warmup {args.warmup} leaves no timed step of --steps {args.steps}; lower --warmup."
        )
    return args


# ---------------------------------------------------------------------------------------------------------------
# Preparation (a child: the parent runs no torch computation before forking)
# ---------------------------------------------------------------------------------------------------------------


def prepare_students(teacher_dir: str, train_texts: list[str], work: Path, args: argparse.Namespace) -> dict:
    """Save the two students and measure the teacher; returns their folders, widths and layer counts."""
    from hf_distill import create_student
    from hf_distill.compression.pruning import PruningSpec, measure_importance, prune_model

    torch.set_num_threads(args.threads)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    calibration = train_texts[:256]
    batches = [
        dict(tokenizer(calibration[i : i + 16], truncation=True, max_length=args.max_seq_length, padding=True,
                       return_tensors="pt"))
        for i in range(0, len(calibration), 16)
    ]  # fmt: skip
    hidden = PRUNED["hidden"] if not args.smoke else bench_classification.SMOKE_HIDDEN // 2
    spec = PruningSpec(heads=PRUNED["heads"], ffn=PRUNED["ffn"], hidden=hidden, layers=PRUNED["layers"])
    students = {
        "cut2": create_student(teacher, num_hidden_layers=2),
        "pruned": prune_model(teacher, spec, measure_importance(teacher, batches)),
    }
    described = {}
    for name, student in students.items():
        folder = work / "students" / name
        student.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        described[name] = {
            "path": str(folder),
            "layers": student.config.num_hidden_layers,
            "hidden": student.config.hidden_size,
            "heads": student.config.num_attention_heads,
            "intermediate": student.config.intermediate_size,
            "params": sum(p.numel() for p in student.parameters()),
        }
    return {"students": described, "teacher_layers": teacher.config.num_hidden_layers,
            "teacher_hidden": teacher.config.hidden_size}  # fmt: skip


def teacher_accuracy(teacher_dir: str, test, labels: list[int], threads: int) -> float:
    torch.set_num_threads(threads)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    return _bbc.accuracy(_bbc.predict_logits(teacher, test, tokenizer), labels)


def ordered_rows(encoded, steps: int, batch_size: int, seed: int):
    """The training rows in this round's order: shuffled epochs (random.Random(seed)), cut to steps x batch."""
    order, rng, needed = [], random.Random(seed), steps * batch_size
    while len(order) < needed:
        epoch = list(range(len(encoded)))
        rng.shuffle(epoch)
        order += epoch
    return encoded.select(order[:needed])


# ---------------------------------------------------------------------------------------------------------------
# One run (a forked child)
# ---------------------------------------------------------------------------------------------------------------


def run_one(
    toolkit: str, student_dir: str, setting: _toolkits.Setting, data: dict, paths: dict, args
) -> dict:
    """Train one student with one toolkit, then test it. Returns the figures of the run."""
    from transformers import TrainerCallback

    class StepEnds(TrainerCallback):
        def on_step_end(self, *_, **__):
            probe.step_end()

    torch.set_num_threads(args.threads)
    teacher = AutoModelForSequenceClassification.from_pretrained(paths["teacher"]).eval()
    student = AutoModelForSequenceClassification.from_pretrained(student_dir)
    student.get_input_embeddings().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(paths["teacher"])
    probe = _toolkits.Probe(teacher, setting.seed)
    gc.collect()
    exact = _evidence._reset_peak_rss()
    base = _evidence._status_mib("VmRSS")
    if toolkit == "hf_distill":
        trainer = _toolkits.build_hf_distill(
            teacher, student, data["train"], tokenizer, setting, paths["output"], callbacks=[StepEnds()]
        )
        _toolkits.set_projections(_linears(trainer.hidden_projections), setting.seed)
        trainer.compute_loss = probe.wrap_loss(trainer.compute_loss)
        with profiled(args.profile) as profile:
            trainer.train()
    elif toolkit == "textbrewer":
        distiller, train_kwargs = _toolkits.build_textbrewer(
            teacher, student, data["train"], tokenizer, setting, paths["output"]
        )
        _toolkits.set_projections([p for p in distiller.projs if p is not None], setting.seed)
        train_kwargs["optimizer"].register_step_post_hook(probe.step_end)
        distiller.train_on_batch = probe.wrap_loss(distiller.train_on_batch)
        with distiller, profiled(args.profile) as profile:
            distiller.train(**train_kwargs)
    else:
        raise ValueError(f"unknown toolkit {toolkit!r}")
    peak = _evidence.peak_rss_mib()
    probe.close()
    accuracy = _bbc.accuracy(_bbc.predict_logits(student, data["test"], tokenizer), data["test_labels"])
    offset = _toolkits.textbrewer_offset(probe.first_teacher_logits, setting)
    ends = probe.step_ends[args.warmup - 1 :]
    return {
        "first_loss": probe.first_loss,
        "first_loss_ours_convention": probe.first_loss - offset
        if toolkit == "textbrewer"
        else probe.first_loss,
        "teacher_entropy_term": offset,
        "step_ms": [1000 * (later - earlier) for earlier, later in zip(ends, ends[1:])],
        "page_faults_per_step": _per_step(probe.step_faults[args.warmup - 1 :]),
        "steps_seen": len(probe.step_ends),
        "peak_above_start_mib": peak - base if exact else None,
        "peak_rss_mib": peak,
        "test_accuracy": accuracy,
        **({"profile": profile} if args.profile else {}),
    }


def _per_step(counts: list[int]) -> float | None:
    """Minor page faults per step after the warm-up: memory the allocator took back from the OS and touched again."""
    return (counts[-1] - counts[0]) / (len(counts) - 1) if len(counts) > 1 else None


@contextlib.contextmanager
def profiled(enabled: bool):
    """--profile: cProfile around training; yields a list that receives the 30 functions with the most own time
    (function, calls, own s, cumulative s). For finding out why, not for the timings (profiling slows Python)."""
    found: list = []
    if not enabled:
        yield found
        return
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield found
    finally:
        profiler.disable()
        stats = pstats.Stats(profiler).sort_stats("tottime")
        for (file, line, name), (_, calls, own, cumulative, _) in list(stats.stats.items()):
            found.append((f"{Path(file).name}:{line}:{name}", calls, own, cumulative))
        found.sort(key=lambda row: -row[2])
        del found[30:]


def _linears(module: torch.nn.Module) -> list[torch.nn.Linear]:
    return [child for child in module.modules() if isinstance(child, torch.nn.Linear)]


def toolkit_unavailable(toolkit: str, python: str) -> str | None:
    """Why a toolkit cannot run here (its error, verbatim), or None."""
    if toolkit == "hf_distill":
        return None
    if toolkit == "textbrewer":
        try:
            import textbrewer  # noqa: F401
        except Exception as error:  # noqa: BLE001 - any failure is the row's text
            return f"{type(error).__name__}: {error} (pip install -e '.[peers]')"
        return None
    if not Path(python).is_file():
        return (
            f"not installed: torchdistill pins a newer torch (and torchvision), so it is looked for in its own "
            f"environment; {python} does not exist (see docs/BENCHMARKS.md for how it was tried)"
        )
    versions = subprocess.run(
        [python, "-c", "from importlib.metadata import version as v; "
         "print(', '.join(f'{p} {v(p)}' for p in ('torch', 'torchvision', 'torchdistill')))"],
        capture_output=True, text=True, timeout=120,
    ).stdout.strip()  # fmt: skip
    check = "import torchdistill; from torchdistill.core.distillation import get_distillation_box"
    completed = subprocess.run([python, "-c", check], capture_output=True, text=True, timeout=300)
    if completed.returncode != 0:
        lines = [line for line in completed.stderr.strip().splitlines() if line.strip()]
        return f"{lines[-1] if lines else completed.returncode} (import torchdistill.core with {versions})"
    return "imports, but this benchmark has no torchdistill runner for this environment yet"


def user_code_lines() -> dict[str, dict[str, int]]:
    """Lines of each toolkit's user code (benchmarks/_toolkits.py), with the lines that start the run."""
    counts = {}
    for toolkit, function, run_lines in (
        ("hf_distill", _toolkits.build_hf_distill, 1),  # trainer.train()
        ("textbrewer", _toolkits.build_textbrewer, 2),  # with distiller: distiller.train(**train_kwargs)
    ):
        counts[toolkit] = {
            "all": _toolkits.user_code_lines(function) + run_lines,
            "without_benchmark_only": _toolkits.user_code_lines(function, skip_marked=True) + run_lines,
        }
    return counts


# ---------------------------------------------------------------------------------------------------------------
# Tables, plot, main
# ---------------------------------------------------------------------------------------------------------------


def summarise(runs: list[dict]) -> dict:
    from hf_distill.reporting.latency import summarize

    good = [run for run in runs if "error" not in run]
    if not good:
        return {"error": next((run["error"] for run in runs), "no run")}
    accuracies = [run["test_accuracy"] for run in good]
    peaks = [run["peak_above_start_mib"] for run in good if run["peak_above_start_mib"] is not None]
    return {
        "step": summarize([ms for run in good for ms in run["step_ms"]]).to_dict(),
        "round_median_step_ms": [statistics.median(run["step_ms"]) for run in good],
        "peak_above_start_mib": statistics.median(peaks) if peaks else None,
        "peak_rss_mib": statistics.median(run["peak_rss_mib"] for run in good),
        "accuracy_mean": statistics.mean(accuracies),
        "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "accuracy_per_seed": accuracies,
        "first_loss": good[0]["first_loss"],
        "first_loss_ours_convention": good[0]["first_loss_ours_convention"],
        "errors": [run["error"] for run in runs if "error" in run],
    }


def print_tables(results: dict, header: str) -> None:
    print("\n" + header)
    print(
        "\n| student | toolkit | first-step loss: reported / ours' convention | step ms median [p10-p90] | vs ours "
        "| peak MiB above start | vs ours | test acc mean ± std | per seed | user code lines (without "
        "bench-only) |\n|---|---|---|---:|---:|---:|---:|---:|---|---:|"
    )
    lines = results["user_code_lines"]
    for student, by_toolkit in results["summary"].items():
        ours = by_toolkit.get("hf_distill", {})
        for toolkit, summary in by_toolkit.items():
            if "error" in summary:
                print(f"| {student} | {toolkit} | could not run: {summary['error']} | | | | | | | |")
                continue
            step, peak = summary["step"], summary["peak_above_start_mib"]
            step_ratio = step["median_ms"] / ours["step"]["median_ms"] if "step" in ours else float("nan")
            peak_ratio = (
                peak / ours["peak_above_start_mib"]
                if peak and ours.get("peak_above_start_mib")
                else float("nan")
            )
            count = lines.get(toolkit, {})
            print(
                f"| {student} | {toolkit} | {summary['first_loss']:.6f} / {summary['first_loss_ours_convention']:.6f} "
                f"| {step['median_ms']:.1f} [{step['low_ms']:.1f}-{step['high_ms']:.1f}]{'!' if step['wide'] else ''} "
                f"| {step_ratio:.2f}x | {peak if peak is None else f'{peak:.0f}'} | {peak_ratio:.2f}x "
                f"| {summary['accuracy_mean']:.4f} ± {summary['accuracy_std']:.4f} "
                f"| {', '.join(f'{value:.4f}' for value in summary['accuracy_per_seed'])} "
                f"| {count.get('all', '')} ({count.get('without_benchmark_only', '')}) |"
            )
    print("\n| toolkit | " + " | ".join(next(iter(CAPABILITIES.values()))) + " |")
    print("|---|" + "---|" * len(next(iter(CAPABILITIES.values()))))
    for toolkit, capabilities in CAPABILITIES.items():
        print(f"| {toolkit} | " + " | ".join(capabilities.values()) + " |")


def print_profiles(runs: dict) -> None:
    for student, by_toolkit in runs.items():
        for toolkit, outcomes in by_toolkit.items():
            for outcome in outcomes[:1]:
                if "profile" not in outcome:
                    continue
                print(f"\n{student} / {toolkit}: own time, s (calls; cumulative s)")
                for name, calls, own, cumulative in outcome["profile"][:15]:
                    print(f"  {own:8.3f}  {name} ({calls}; {cumulative:.3f})")


def plot(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    titles = (
        "step time, ms (median, p10-p90)",
        "peak memory above start, MiB (median)",
        "test accuracy per seed",
    )
    for axis, title in zip(axes, titles):
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3, axis="y")
    labels, position = [], 0
    for student, by_toolkit in results["summary"].items():
        for index, (toolkit, summary) in enumerate(by_toolkit.items()):
            if "error" in summary:
                continue
            color, step = f"C{index}", summary["step"]
            axes[0].bar(
                position,
                step["median_ms"],
                color=color,
                yerr=[[step["median_ms"] - step["low_ms"]], [step["high_ms"] - step["median_ms"]]],
                capsize=3,
            )
            axes[1].bar(position, summary["peak_above_start_mib"] or 0, color=color)
            axes[2].scatter(
                [position] * len(summary["accuracy_per_seed"]), summary["accuracy_per_seed"], color=color
            )
            axes[2].errorbar(
                position, summary["accuracy_mean"], yerr=summary["accuracy_std"], fmt="_", color="black"
            )
            labels.append((position, f"{student}\n{toolkit}"))
            position += 1
        position += 0.5
    for axis in axes:
        axis.set_xticks([p for p, _ in labels], [label for _, label in labels], fontsize=7)
    missing = ", ".join(sorted(results.get("unavailable", {})))
    figure.suptitle(
        "BBC News, MiniLM teacher: the same distillation through each toolkit (CPU)"
        + (f"; could not run here: {missing}" if missing else "")
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from hf_distill.reporting.machine import describe_cpu
    from hf_distill.training.matching import resolve_layer_map

    clock = _bbc.Clock()
    machine = {**_evidence.machine(), "cpu_flags": describe_cpu()}
    work = Path(args.work_dir)
    logs = work / "logs"
    toolkits = [name.strip() for name in args.toolkits.split(",") if name.strip()]
    students = [name.strip() for name in args.students.split(",") if name.strip()]
    unknown = sorted(set(toolkits) - set(_toolkits.TOOLKITS)) + sorted(set(students) - set(STUDENTS))
    if unknown:
        raise ValueError(
            f"unknown toolkit(s)/student(s) {unknown}; toolkits {_toolkits.TOOLKITS}, students {STUDENTS}"
        )
    if args.smoke:
        data = bench_classification._smoke_data(work / "data")
    else:
        from hf_distill.tasks.classification.bbc import prepare_bbc_splits

        data = prepare_bbc_splits(Path(args.data_dir), DATA_SEED)
    preload = [
        "transformers:AutoModelForSequenceClassification",
        "transformers:Trainer",
        "hf_distill",
        "datasets",
    ]
    unavailable = {toolkit: toolkit_unavailable(toolkit, args.torchdistill_python) for toolkit in toolkits}
    if "textbrewer" in toolkits and unavailable["textbrewer"] is None:
        preload.append("textbrewer")
    _evidence.preload(*preload)
    teacher = _evidence.run_in_child(
        "teacher", bench_classification.teacher_folder, args, data, work, log_dir=logs
    )["result"]
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    label2id = {str(k): int(v) for k, v in AutoConfig.from_pretrained(teacher).label2id.items()}
    splits = {split: bench_classification.read_split(data[split], label2id) for split in ("train", "test")}
    train = _bbc.encode(tokenizer, *splits["train"], args.max_seq_length)
    test = _bbc.encode(tokenizer, *splits["test"], args.max_seq_length)
    prepared = _evidence.run_in_child(
        "prepare", prepare_students, str(teacher), splits["train"][0], work, args, log_dir=logs
    )["result"]
    teacher_acc = _evidence.run_in_child(
        "teacher_accuracy",
        teacher_accuracy,
        str(teacher),
        test,
        splits["test"][1],
        args.threads,
        log_dir=logs,
    )["result"]

    settings = {}
    for student in students:
        shape = prepared["students"][student]
        pairs = resolve_layer_map("uniform", shape["layers"], prepared["teacher_layers"])
        settings[student] = dict(
            temperature=args.temperature, alpha=args.alpha, hidden_weight=args.hidden_weight,
            hidden_loss=args.hidden_loss, layer_pairs=tuple(tuple(pair) for pair in pairs),
            student_width=shape["hidden"], teacher_width=prepared["teacher_hidden"], steps=args.steps,
            batch_size=args.batch_size, learning_rate=args.learning_rate,
        )  # fmt: skip
    runnable = [toolkit for toolkit in toolkits if unavailable[toolkit] is None]
    runs: dict[str, dict[str, list[dict]]] = {s: {t: [] for t in toolkits} for s in students}
    for seed in range(args.seeds):
        rows = {"train": ordered_rows(train, args.steps, args.batch_size, seed), "test": test,
                "test_labels": splits["test"][1]}  # fmt: skip
        start = seed % max(len(runnable), 1)
        for student in students:
            setting = _toolkits.Setting(**settings[student], seed=seed)
            for toolkit in runnable[start:] + runnable[:start]:
                name = f"{student}_{toolkit}_{seed}"
                paths = {"teacher": str(teacher), "output": str(work / "runs" / name)}
                print(f"round {seed}: {student} with {toolkit}", flush=True)
                try:
                    outcome = _evidence.run_in_child(
                        name, run_one, toolkit, prepared["students"][student]["path"], setting, rows, paths, args,
                        log_dir=logs,
                    )["result"]  # fmt: skip
                except RuntimeError as error:
                    outcome = {"error": str(error).splitlines()[-1]}
                runs[student][toolkit].append(outcome)
    summary = {
        student: {
            toolkit: summarise(runs[student][toolkit])
            if unavailable[toolkit] is None
            else {"error": unavailable[toolkit]}
            for toolkit in toolkits
        }
        for student in students
    }
    results = {
        "question": __doc__.splitlines()[0],
        "command": _evidence.command(),
        "machine": machine,
        "smoke": args.smoke,
        "settings": {
            "per_student": settings,
            "warmup_steps_left_out": args.warmup,
            "seeds": args.seeds,
            "max_seq_length": args.max_seq_length,
            "threads": args.threads,
            "teacher_dir": str(teacher),
            "word_embeddings": "frozen",
            "hf_distill_allocator": "DistillationTrainingArguments defaults: cpu_keep_freed_memory=True (glibc "
            "mmap/trim thresholds raised in its run's process); the other toolkits' processes keep glibc's defaults",
        },  # fmt: skip
        "students": prepared["students"],
        "teacher_test_accuracy": teacher_acc,
        "data": {"train": len(train), "test": len(test), "split_seed": DATA_SEED},
        "unavailable": {toolkit: reason for toolkit, reason in unavailable.items() if reason},
        "user_code_lines": user_code_lines(),
        "capabilities_from_source": CAPABILITIES,
        "summary": summary,
        "runs": runs,
        "seconds": clock.seconds(),
    }
    header = (
        f"BBC News (demo split): {len(train)} train / {len(test)} test articles; teacher {teacher} (test accuracy "
        f"{teacher_acc:.4f}); every run {args.steps} steps of {args.batch_size}, {args.max_seq_length} tokens, lr "
        f"{args.learning_rate}, T={args.temperature}, alpha={args.alpha}, hidden {args.hidden_loss} x "
        f"{args.hidden_weight}; {args.seeds} seed(s); step times after {args.warmup} warm-up steps; load average "
        f"at start {machine['load_average_at_start']}"
    )
    print_tables(results, header)
    if args.profile:
        print_profiles(runs)
    json_path = _evidence.results_path(args.results_dir, NAME, args.smoke, "json")
    _evidence.write_json(json_path, results)
    png = _evidence.results_path(args.results_dir, NAME, args.smoke, "png")
    plot(png, results)
    print(f"\nTotal {clock.seconds():.0f} s; load average at end {list(os.getloadavg())}")
    print(f"JSON: {json_path}\nPNG: {png}")
    return results


if __name__ == "__main__":
    main()
