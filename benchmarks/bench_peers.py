"""Against the peers, same work, one run: our DistillationTrainer, TRL 1.16's GKDTrainer and a bare PyTorch loop.

(a) Training. One tiny Llama pair (teacher 4 x 256, student 2 x 128, vocabulary 32,000), the same batches (random
    tokens, seeded, in order), the same optimizer (fused AdamW, lr 1e-4, linear decay, clipping at 1.0), the same
    loss: forward KL(teacher || student) at T = 1 over every next-token position, nothing else:

        ours        DistillationTrainer, alpha = 1, temperature = 1, kd_loss = forward_kl (full logits)
        ours fused  the same with fused_kd_loss = True (logits formed chunk by chunk inside the loss)
        trl gkd     trl.experimental.gkd.GKDTrainer with GKDConfig(lmbda=0, beta=0): lmbda = 0 never samples from
                    the student (off-policy), and GKDTrainer.generalized_jsd_loss with beta = 0 is
                    F.kl_div(student_log_probs, teacher_log_probs, log_target=True) = KL(teacher || student)
                    (checked in the installed source; it does not apply GKDConfig.temperature to the loss)
        bare loop   teacher forward under no_grad, student forward, F.kl_div on full log-softmaxes (the last
                    position masked out, not sliced off), backward, clip, step

    Each case runs in a fresh process (forked from a server that only imported the libraries): models and batches
    are built, the peak-RSS counter is reset (benchmarks/bench_kd_loss.py's method: /proc/self/clear_refs, then
    VmHWM - VmRSS), and everything from building the trainer (or the loop's optimizer) to the last step counts, so
    the peak memory includes optimizer state, activations and logits for all alike. Step time: from one step's end to the next after warm-up steps. The cases
    alternate (round r starts with method r mod 4) over --rounds; the table shows the median step over all rounds
    with the p10-p90 spread (hf_distill.reporting.latency.summarize; spread above 25% flagged) and the median peak. The loss
    of the first step is printed: the four must agree.

(b) The KD losses alone, forward + backward, batch 1, T in {512, 2048} positions, V in {32,000, 128,256}, H = 256
    (Llama-2 and Llama-3 vocabulary sizes), measured exactly as benchmarks/bench_kd_loss.py does (its helpers, one
    fresh process per case): logit naive (full float32 log-softmax of both), logit chunked (ours, --chunk_size
    positions at a time), TRL's GKDTrainer.generalized_jsd_loss (beta = 0; every position labelled, as the trainer
    calls it), fused naive (both logits formed with F.linear, then the naive loss) and fused ours
    (fused_linear_distillation_loss). The logit methods take the two (1, T, V) logits as inputs, the fused ones the
    hidden states and heads, so "above inputs" excludes 2 x T x V x 4 bytes for the first three only.

    python benchmarks/bench_peers.py            # ~12 min on 2 quiet CPU cores; (b) needs up to ~10 GiB of RAM
    python benchmarks/bench_peers.py --smoke    # seconds: tiny sizes, checks the script only

Writes benchmarks/results/bench_peers.json and .png (--results_dir to change; --smoke: bench_peers_smoke.*).
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

sys.path.insert(0, str(Path(__file__).parent))

import _evidence  # noqa: E402
import bench_kd_loss  # noqa: E402  (torch only: spawned children import this module cheaply)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

NAME = "bench_peers"
TRAIN_METHODS = ("ours", "ours fused", "trl gkd", "bare loop")
TRL_LOSS = "trl generalized_jsd_loss"
LOSS_METHODS = ("logit naive", "logit chunked", TRL_LOSS, "fused naive", "fused ours")
FULL = {
    "vocab": 32000,
    "teacher": (256, 4, 4, 688),  # hidden, layers, heads, intermediate
    "student": (128, 2, 4, 344),
    "batch": 4,
    "seq": 256,
    "lr": 1e-4,
    "loss_shapes": [
        (1, 512, 32000, 256),
        (1, 512, 128256, 256),
        (1, 2048, 32000, 256),
        (1, 2048, 128256, 256),
    ],
}
SMOKE = {
    "vocab": 512,
    "teacher": (32, 2, 2, 64),
    "student": (16, 1, 2, 32),
    "batch": 2,
    "seq": 32,
    "lr": 1e-4,
    "loss_shapes": [(1, 64, 512, 32)],
}


# ----------------------------------------------------------------------------------------------------------------
# (a) Training: one method in a fresh process
# ----------------------------------------------------------------------------------------------------------------


def _llama(vocab: int, sizes: tuple[int, int, int, int], seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, intermediate = sizes
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def _rows(vocab: int, count: int, seq: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(count):
        input_ids = torch.randint(4, vocab, (seq,), generator=generator)
        rows.append(
            {"input_ids": input_ids, "attention_mask": torch.ones(seq, dtype=torch.long), "labels": input_ids}
        )
    return rows


def _tokenizer(vocab: int):
    """A word-level tokenizer with the models' vocabulary size (GKDTrainer needs a pad token)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, **{f"w{i}": i for i in range(4, vocab)}}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>")),
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )


def _common_training_args(output_dir: str, config: dict, steps: int) -> dict:
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=config["batch"],
        max_steps=steps,
        learning_rate=config["lr"],
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",
        train_sampling_strategy="sequential",
        logging_steps=10**6,
        logging_first_step=True,  # one log, at step 1: its loss is compared across methods
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_pin_memory=False,
        seed=0,
        log_level="error",
    )


def _run_trainer(
    method: str, student, teacher, dataset, config: dict, steps: int
) -> tuple[list[float], float]:
    from transformers import TrainerCallback, default_data_collator

    class Recorder(TrainerCallback):
        def __init__(self):
            self.ends, self.first_loss = [], None

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.first_loss is None and logs and "loss" in logs:
                self.first_loss = float(logs["loss"])

    recorder = Recorder()
    with tempfile.TemporaryDirectory() as output_dir:
        common = _common_training_args(output_dir, config, steps)
        if method == "trl gkd":
            from trl.experimental.gkd import GKDConfig, GKDTrainer

            args = GKDConfig(
                **common, lmbda=0.0, beta=0.0, temperature=1.0, gradient_checkpointing=False, bf16=False
            )
            trainer = GKDTrainer(
                model=student,
                teacher_model=teacher,
                args=args,
                data_collator=default_data_collator,
                train_dataset=dataset,
                processing_class=_tokenizer(config["vocab"]),
                callbacks=[recorder],
            )
        else:
            from hf_distill import DistillationTrainer, DistillationTrainingArguments

            args = DistillationTrainingArguments(
                **common,
                alpha=1.0,
                temperature=1.0,
                kd_loss="forward_kl",
                fused_kd_loss=method == "ours fused",
            )
            trainer = DistillationTrainer(
                model=student,
                teacher_model=teacher,
                args=args,
                data_collator=default_data_collator,
                train_dataset=dataset,
                callbacks=[recorder],
            )
        trainer.train()
    return recorder.ends, recorder.first_loss


def _run_loop(student, teacher, rows, config: dict, steps: int) -> tuple[list[float], float]:
    from transformers import default_data_collator, get_linear_schedule_with_warmup

    student.train()
    teacher.eval()
    optimizer = torch.optim.AdamW(student.parameters(), lr=config["lr"], weight_decay=0.0, fused=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, steps)
    ends, first_loss = [], None
    for start in range(0, steps * config["batch"], config["batch"]):
        batch = default_data_collator(rows[start : start + config["batch"]])
        labels = batch.pop("labels")
        with torch.no_grad():
            teacher_logits = teacher(**batch).logits  # (batch, seq, vocab)
        student_logits = student(**batch).logits
        # Position t predicts token t + 1, so the last position has no target. The logits are used whole (a mask
        # drops the last position) rather than sliced, which would copy them.
        counts = torch.zeros_like(labels, dtype=torch.bool)  # (batch, seq)
        counts[:, :-1] = labels[:, 1:] != -100
        divergence = F.kl_div(
            F.log_softmax(student_logits.float(), -1),
            F.log_softmax(teacher_logits.float(), -1),
            reduction="none",
            log_target=True,
        ).sum(-1)  # (batch, seq)
        loss = (divergence * counts).sum() / counts.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        first_loss = loss.item() if first_loss is None else first_loss
        ends.append(time.perf_counter())
    return ends, first_loss


def _train_child(method: str, config: dict, warmup: int, steps: int, threads: int, queue) -> None:
    try:
        torch.set_num_threads(threads)
        import transformers  # noqa: F401  (every import before the baseline, for all methods alike)

        import hf_distill  # noqa: F401

        if method == "trl gkd":
            import trl.experimental.gkd  # noqa: F401
        teacher = _llama(config["vocab"], config["teacher"], seed=1).eval()
        student = _llama(config["vocab"], config["student"], seed=2)
        total = warmup + steps
        rows = _rows(config["vocab"], total * config["batch"], config["seq"])
        if method != "bare loop":
            from datasets import Dataset

            rows = Dataset.from_list([{k: v.tolist() for k, v in row.items()} for row in rows]).with_format(
                "torch"
            )
        gc.collect()
        exact = bench_kd_loss._reset_peak_rss()
        base_kib = bench_kd_loss._status_kib("VmRSS")
        if method == "bare loop":
            ends, first_loss = _run_loop(student, teacher, rows, config, total)
        else:
            ends, first_loss = _run_trainer(method, student, teacher, rows, config, total)
        high_kib = bench_kd_loss._status_kib("VmHWM") if exact else _ru_maxrss_kib()
        step_ms = [1000 * (b - a) for a, b in zip(ends[warmup - 1 :], ends[warmup:])]
        queue.put(
            {
                "step_ms": step_ms,
                "peak_mib": (high_kib - base_kib) / 1024,
                "first_loss": first_loss,
                "steps": len(ends),
            }
        )
    except BaseException as error:  # reported in the table
        queue.put({"error": f"{type(error).__name__}: {error}"})


def _ru_maxrss_kib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _context():
    """A fresh process per case, forked from a server that has imported the libraries once (saves ~5-10 s of
    imports per case; the server never runs torch ops, so forking it is safe). Imports happen before the baseline
    either way and are the same for every method."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        preload = ["torch", "transformers", "datasets", "hf_distill", "bench_kd_loss"]
        if _has_trl():
            preload.append("trl.experimental.gkd")
        _CONTEXT.set_forkserver_preload(preload)
    return _CONTEXT


_CONTEXT = None


def _has_trl() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def _spawn(target, args: tuple, timeout: float) -> dict:
    context = _context()
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    try:
        result = queue.get(timeout=timeout)
    except Exception:
        result = {"error": f"no result within {timeout:.0f} s"}
    process.join(timeout=30)
    if process.is_alive():
        process.kill()
    if process.exitcode not in (0, None) and "error" not in result:
        result = {"error": f"exit code {process.exitcode}"}
    return result


def run_training(config: dict, args, methods: list[str]) -> dict:
    from hf_distill.reporting.latency import summarize

    runs: dict[str, list[dict]] = {method: [] for method in methods}
    for round_index in range(args.rounds):
        start = round_index % len(methods)
        for method in methods[start:] + methods[:start]:
            runs[method].append(
                _spawn(
                    _train_child, (method, config, args.warmup, args.steps, args.threads), args.case_timeout
                )
            )
    results = {}
    for method, method_runs in runs.items():
        good = [run for run in method_runs if "error" not in run]
        errors = [run["error"] for run in method_runs if "error" in run]
        if not good:
            results[method] = {"error": errors[0] if errors else "no result"}
            continue
        timing = summarize([ms for run in good for ms in run["step_ms"]])
        peaks = [run["peak_mib"] for run in good]
        results[method] = {
            "step": timing.to_dict(samples=True),
            "round_median_step_ms": [statistics.median(run["step_ms"]) for run in good],
            "peak_mib": statistics.median(peaks),
            "peak_mib_per_round": peaks,
            "first_loss": good[0]["first_loss"],
            "errors": errors,
        }
    return results


def print_training(results: dict, config: dict, args) -> None:
    teacher, student = config["teacher"], config["student"]
    print(
        f"\n(a) Training: Llama teacher {teacher[1]} x {teacher[0]}, student {student[1]} x {student[0]}, vocabulary "
        f"{config['vocab']}, batch {config['batch']} x {config['seq']} tokens, float32 on CPU ({args.threads} "
        f"threads); {args.warmup} warm-up + {args.steps} timed steps per run, {args.rounds} alternating round(s)"
    )
    print(
        "| method | step ms median [p10-p90] | vs ours | peak MiB (median of rounds) | vs ours | first-step loss |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    ours = results.get("ours", {})
    for method, result in results.items():
        if "error" in result:
            print(f"| {method} | failed: {result['error']} | | | | |")
            continue
        step = result["step"]
        flag = " (wide)" if step["wide"] else ""
        time_ratio = step["median_ms"] / ours["step"]["median_ms"] if "step" in ours else float("nan")
        memory_ratio = result["peak_mib"] / ours["peak_mib"] if "peak_mib" in ours else float("nan")
        print(
            f"| {method} | {step['median_ms']:.1f} [{step['low_ms']:.1f}-{step['high_ms']:.1f}]{flag} | "
            f"{time_ratio:.2f}x | {result['peak_mib']:.1f} | {memory_ratio:.2f}x | {result['first_loss']:.6f} |"
        )
        if result["errors"]:
            print(f"  ({len(result['errors'])} run(s) of {method} failed: {result['errors'][0]})")


# ----------------------------------------------------------------------------------------------------------------
# (b) The losses alone: bench_kd_loss's measurement, plus TRL's generalized_jsd_loss
# ----------------------------------------------------------------------------------------------------------------


def _loss_child(method: str, shape, threads: int, chunk_size: int, queue) -> None:
    try:
        torch.set_num_threads(threads)
        losses = bench_kd_loss._load_losses()
        trl_loss = None
        if method == TRL_LOSS:
            from trl.experimental.gkd import GKDTrainer

            trl_loss = GKDTrainer.generalized_jsd_loss
        inputs_of = "logit naive" if method == TRL_LOSS else method

        def loss_of(inputs: dict, chunk: int) -> torch.Tensor:
            if trl_loss is None:
                return bench_kd_loss._loss(method, inputs, losses, chunk, None)
            # Every position labelled, as GKDTrainer passes its labels: mean over positions, like the others.
            labels = torch.zeros(inputs["student_logits"].shape[:-1], dtype=torch.long)
            return trl_loss(inputs["student_logits"], inputs["teacher_logits"], labels=labels, beta=0.0)

        warm = bench_kd_loss._make_inputs(inputs_of, bench_kd_loss.WARMUP_SHAPE, "cpu", seed=1)
        loss_of(warm, min(chunk_size, 4)).backward()
        del warm
        inputs = bench_kd_loss._make_inputs(inputs_of, shape, "cpu", seed=0)
        gc.collect()
        exact = bench_kd_loss._reset_peak_rss()
        base_kib = bench_kd_loss._status_kib("VmRSS")
        start = time.perf_counter()
        loss = loss_of(inputs, chunk_size)
        loss.backward()
        elapsed = time.perf_counter() - start
        high_kib = bench_kd_loss._status_kib("VmHWM") if exact else _ru_maxrss_kib()
        queue.put({"peak_mib": (high_kib - base_kib) / 1024, "time_s": elapsed, "loss": loss.item()})
    except BaseException as error:
        queue.put({"error": f"{type(error).__name__}: {error}"})


def run_losses(config: dict, args, methods: list[str]) -> list[dict]:
    shapes = []
    for shape in config["loss_shapes"]:
        runs: dict[str, list[dict]] = {method: [] for method in methods}
        for _ in range(args.loss_repeats):
            for method in methods:
                runs[method].append(
                    _spawn(_loss_child, (method, shape, args.threads, args.chunk_size), args.case_timeout)
                )
        entry = {"shape": dict(zip(("batch", "seq", "vocab", "hidden"), shape)), "methods": {}}
        for method, method_runs in runs.items():
            good = [run for run in method_runs if "error" not in run]
            if not good:
                errors = [run.get("error", "no result") for run in method_runs]
                entry["methods"][method] = {"error": errors[0]}
                continue
            entry["methods"][method] = {
                key: statistics.median(run[key] for run in good) for key in ("peak_mib", "time_s", "loss")
            } | {"runs": len(good)}
        shapes.append(entry)
        print_losses(entry, args)
    return shapes


def print_losses(entry: dict, args) -> None:
    shape, methods = entry["shape"], entry["methods"]
    logits_gib = 2 * shape["batch"] * shape["seq"] * shape["vocab"] * 4 / 2**30
    print(
        f"\n(b) B={shape['batch']} T={shape['seq']} V={shape['vocab']} H={shape['hidden']} float32, forward + "
        f"backward, median of {args.loss_repeats} run(s); the logit inputs are {logits_gib:.2f} GiB"
    )
    print(
        "| loss | peak MiB above inputs | vs logit naive | vs TRL | time s | loss value |\n|---|---:|---:|---:|---:|---:|"
    )
    naive = methods.get("logit naive", {}).get("peak_mib")
    trl = methods.get(TRL_LOSS, {}).get("peak_mib")
    for method, result in methods.items():
        if "error" in result:
            print(f"| {method} | failed: {result['error']} | | | | |")
            continue
        label = f"logit chunked({args.chunk_size})" if method == "logit chunked" else method
        against_naive = f"{result['peak_mib'] / naive:.2f}x" if naive else "-"
        against_trl = f"{result['peak_mib'] / trl:.2f}x" if trl else "-"
        print(
            f"| {label} | {result['peak_mib']:.1f} | {against_naive} | {against_trl} | {result['time_s']:.2f} | "
            f"{result['loss']:.6f} |"
        )


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------


def plot(path: Path, training: dict, loss_shapes: list[dict], loss_methods: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    methods = [m for m, r in training.items() if "error" not in r]
    steps = [training[m]["step"] for m in methods]
    medians = [s["median_ms"] for s in steps]
    error = [[s["median_ms"] - s["low_ms"] for s in steps], [s["high_ms"] - s["median_ms"] for s in steps]]
    axes[0].bar(methods, medians, yerr=error, capsize=4, color=[f"C{i}" for i in range(len(methods))])
    axes[0].set_ylabel("training step, ms (median, p10-p90)")
    axes[1].bar(
        methods, [training[m]["peak_mib"] for m in methods], color=[f"C{i}" for i in range(len(methods))]
    )
    axes[1].set_ylabel("peak memory during training, MiB")
    for axis in axes[:2]:
        axis.tick_params(axis="x", labelsize=8)
        axis.set_title("(a) same work, tiny Llama pair", fontsize=9)
    width = 0.8 / len(loss_methods)
    for index, method in enumerate(loss_methods):
        values = [entry["methods"].get(method, {}).get("peak_mib", 0.0) for entry in loss_shapes]
        positions = [i + (index - (len(loss_methods) - 1) / 2) * width for i in range(len(loss_shapes))]
        axes[2].bar(positions, [max(v, 0.1) for v in values], width, label=method)
    axes[2].set_xticks(
        range(len(loss_shapes)), [f"T={e['shape']['seq']}\nV={e['shape']['vocab']}" for e in loss_shapes]
    )
    axes[2].set_yscale("log")
    axes[2].set_ylabel("peak MiB above inputs (log)")
    axes[2].set_title("(b) KD loss forward + backward, batch 1", fontsize=9)
    axes[2].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def machine() -> dict:
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    return {**_evidence.machine(), "trl": trl_version}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: checks the script only")
    parser.add_argument(
        "--rounds", type=int, default=3, help="(a) alternating rounds of the training methods"
    )
    parser.add_argument("--warmup", type=int, default=3, help="(a) untimed steps at the start of each run")
    parser.add_argument("--steps", type=int, default=12, help="(a) timed steps of each run")
    parser.add_argument("--loss_repeats", type=int, default=1, help="(b) runs per loss and shape")
    parser.add_argument(
        "--chunk_size", type=int, default=128, help="(b) positions per chunk of 'logit chunked'"
    )
    parser.add_argument(
        "--skip", choices=("training", "losses"), default=None, help="leave out part (a) or (b)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in each case")
    parser.add_argument(
        "--case_timeout", type=float, default=600.0, help="seconds before a case is abandoned"
    )
    parser.add_argument(
        "--results_dir", default=None, help="where the JSON and PNG go (default benchmarks/results)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # the parent runs no torch ops; this is what the JSON records
    machine_at_start = machine()  # with the load average before the run
    config = SMOKE if args.smoke else FULL
    if args.smoke:
        args.rounds, args.warmup, args.steps, args.loss_repeats = 1, 1, 2, 1
    has_trl = _has_trl()
    if not has_trl:
        print("note: trl is not installed, its rows are skipped (pip install trl==1.16.0, the 'bench' extra)")
    started = time.perf_counter()
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} cores")

    training, loss_shapes = {}, []
    loss_methods = [m for m in LOSS_METHODS if has_trl or m != TRL_LOSS]
    if args.skip != "training":
        methods = [m for m in TRAIN_METHODS if has_trl or m != "trl gkd"]
        training = run_training(config, args, methods)
        print_training(training, config, args)
    if args.skip != "losses":
        loss_shapes = run_losses(config, args, loss_methods)
    seconds = time.perf_counter() - started
    print(f"\nTotal {seconds:.0f} s")

    results = {
        "question": __doc__.splitlines()[0],
        "command": _evidence.command(),
        "machine": machine_at_start,
        "smoke": args.smoke,
        "settings": {k: v for k, v in vars(args).items() if k != "results_dir"},
        "models": {k: config[k] for k in ("vocab", "teacher", "student", "batch", "seq", "lr")},
        "training": training,
        "losses": loss_shapes,
        "seconds": seconds,
    }
    json_path = _evidence.results_path(args.results_dir, NAME, args.smoke, "json")
    _evidence.write_json(json_path, results)
    png = _evidence.results_path(args.results_dir, NAME, args.smoke, "png")
    plot(png, training, loss_shapes, loss_methods)
    print(f"JSON: {json_path}\nPNG: {png}")
    return results


if __name__ == "__main__":
    main()
