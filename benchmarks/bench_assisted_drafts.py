"""What limits assisted decoding with a distilled draft on CPU: how often its tokens are accepted, how many it
proposes per teacher pass, and what each pass costs?

Question: the teacher's greedy tokens/s at batch 1 alone and with each draft (`teacher.generate(...,
assistant_model=draft)`), under transformers' default stopping rule for the draft (it stops proposing when its top
token's probability falls below `assistant_confidence_threshold`, 0.4, re-tuned during generation when scikit-learn
is installed) and with that rule off (threshold 0: always `num_assistant_tokens`); by default at 4 and 8 proposed
tokens, any others with `--settings 2:0,3:0,4:default,...`; `--quantize_drafts` adds each draft with its Linear layers
in dynamic INT8 (`hf_distill.compression.assisted.load_draft(folder, "dynamic_int8")`) as NAME_int8.
Per setting: acceptance rate (accepted / drafted), drafted and accepted tokens per teacher pass, tokens/s, whether
the tokens equal the teacher's own greedy tokens, and the per-token cost of the teacher and the draft alone. All
settings and the teacher alone are timed in the same alternating rounds (`hf_distill.reporting.latency`).

    python benchmarks/bench_assisted_drafts.py --teacher OUT/stages/teacher --text_file OUT/data/test.csv \\
        --draft kd=OUT/stages/draft_kd --draft labels_only=OUT/stages/draft_labels   # the LM demo's folders
    python benchmarks/bench_assisted_drafts.py --smoke       # tiny random models, seconds; checks the script

Prompts: the first `--prompt_tokens` tokens (teacher's tokenizer) of the first `--prompts` texts of `--text_file`
long enough (one text per line, or a CSV's `text` column: OUT/data/test.csv gives the recipe's own prompts), or
random ids without it; `--new_tokens` per prompt. Writes
benchmarks/results/bench_assisted_drafts.{json,png} (`--results_dir`; --smoke: *_smoke.*).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_distill.compression.assisted import (  # noqa: E402
    DYNAMIC_INT8,
    AcceptanceCounts,
    assisted_generate,
    load_draft,
)
from hf_distill.reporting.latency import time_alternately  # noqa: E402
from hf_distill.reporting.machine import describe_cpu  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_settings(text: str) -> list[tuple[int, float | None]]:
    """ "4:default,4:0" -> [(4, None), (4, 0.0)]: (num_assistant_tokens, confidence_threshold; None = transformers')."""
    settings = []
    for item in text.split(","):
        tokens, _, threshold = item.partition(":")
        if not tokens.strip().isdigit() or not threshold:
            raise SystemExit(f"--settings: {item!r} is not TOKENS:THRESHOLD (e.g. 4:0 or 4:default)")
        settings.append((int(tokens), None if threshold.strip() == "default" else float(threshold)))
    return settings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random models, seconds: checks the script")
    parser.add_argument(
        "--teacher", default=None, help="the teacher's folder (a causal LM with its tokenizer)"
    )
    parser.add_argument("--draft", action="append", default=[], help="NAME=FOLDER, repeatable")
    parser.add_argument(
        "--text_file", default=None, help="texts for the prompts: one per line, or a CSV with a text column"
    )
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results_dir", default=str(RESULTS))
    parser.add_argument(
        "--settings",
        default="4:default,4:0,8:0",
        help="comma-separated TOKENS:THRESHOLD pairs (THRESHOLD a number, or `default` for transformers' 0.4 rule)",
    )
    parser.add_argument(
        "--quantize_drafts",
        action="store_true",
        help="also time each draft with its Linear layers in dynamic INT8 (NAME_int8; assisted.load_draft)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.prompts, args.prompt_tokens, args.new_tokens, args.repeats = 2, 6, 8, 1
    elif args.teacher is None or not args.draft:
        parser.error("give --teacher and at least one --draft NAME=FOLDER (or --smoke)")
    return args


def _tiny_models(folder: Path) -> tuple[Path, dict[str, Path]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    def save(name: str, layers: int, hidden: int, seed: int) -> Path:
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, eos_token_id=2, pad_token_id=0,
        )  # fmt: skip
        LlamaForCausalLM(config).save_pretrained(folder / name)
        return folder / name

    return save("teacher", 2, 64, 0), {"random_a": save("a", 1, 32, 1), "random_b": save("b", 1, 32, 2)}


def _prompts(args: argparse.Namespace, teacher_dir: Path, vocab: int) -> list[torch.Tensor]:
    if args.text_file:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        rows = []
        path = Path(args.text_file)
        if path.suffix == ".csv":  # a `text` column, as the recipe's data/test.csv
            import csv

            with path.open(encoding="utf-8", newline="") as handle:
                texts = [row["text"] for row in csv.DictReader(handle)]
        else:
            texts = path.read_text(encoding="utf-8").splitlines()
        for line in texts:
            ids = tokenizer(line, add_special_tokens=False)["input_ids"]
            if len(ids) >= args.prompt_tokens:
                rows.append(torch.tensor([ids[: args.prompt_tokens]]))
            if len(rows) == args.prompts:
                return rows
        raise SystemExit(f"{args.text_file}: fewer than {args.prompts} lines of {args.prompt_tokens} tokens")
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randint(4, vocab, (1, args.prompt_tokens), generator=generator) for _ in range(args.prompts)
    ]


def measure(args: argparse.Namespace, teacher_dir: Path, drafts: dict[str, Path]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    settings = parse_settings(args.settings)
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
    teacher = load(teacher_dir)
    models = {name: load(path) for name, path in drafts.items()}
    if args.quantize_drafts:
        models.update({f"{name}_int8": load_draft(path, DYNAMIC_INT8) for name, path in drafts.items()})
    prompts = _prompts(args, teacher_dir, teacher.config.vocab_size)
    reference = [assisted_generate(teacher, None, ids, args.new_tokens)[0] for ids in prompts]

    def run(draft: Any, tokens: int | None = None, threshold: float | None = None) -> list[Any]:
        return [
            assisted_generate(
                teacher,
                draft,
                ids,
                args.new_tokens,
                num_assistant_tokens=tokens,
                schedule="constant",
                confidence_threshold=0.4 if draft is not None and threshold is None else threshold,
            )  # fmt: skip
            for ids in prompts
        ]

    runners = {"teacher": lambda: run(None)}
    for name, draft in models.items():
        runners[f"{name}/alone"] = lambda draft=draft: [
            assisted_generate(draft, None, ids, args.new_tokens) for ids in prompts
        ]
        for tokens, threshold in settings:
            runners[f"{name}/{tokens}/{threshold}"] = lambda d=draft, n=tokens, t=threshold: run(d, n, t)
    timings = time_alternately(runners, repeats=args.repeats, warmup=1)
    produced = len(prompts) * args.new_tokens
    teacher_rate = produced * 1000.0 / timings["teacher"].median_ms
    rows: dict[str, Any] = {}
    for name, draft in models.items():
        for tokens, threshold in settings:
            outputs = run(draft, tokens, threshold)
            counts = AcceptanceCounts()
            for _, more in outputs:
                counts.add(more)
            timing = timings[f"{name}/{tokens}/{threshold}"]
            rate = produced * 1000.0 / timing.median_ms
            rows[f"{name}/{tokens}/{threshold}"] = {
                "draft": name, "num_assistant_tokens": tokens,
                "confidence_threshold": "transformers default (0.4, re-tuned)" if threshold is None else threshold,
                **counts.to_dict(),
                "drafted_per_verification": counts.drafted / max(counts.verifications, 1),
                "assisted_tokens_per_s": rate, "speedup": rate / teacher_rate,
                "identical": all(torch.equal(out, ref) for (out, _), ref in zip(outputs, reference)),
                "spread": timing.spread, "wide": timing.wide or timings["teacher"].wide,
            }  # fmt: skip
        rows[f"{name}/alone"] = {"draft_ms_per_token": timings[f"{name}/alone"].median_ms / produced}
    return {
        "teacher": str(teacher_dir), "drafts": {k: str(v) for k, v in drafts.items()},
        "quantize_drafts": args.quantize_drafts,
        "teacher_tokens_per_s": teacher_rate, "teacher_ms_per_token": timings["teacher"].median_ms / produced,
        "prompts": len(prompts), "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rows": rows,
    }  # fmt: skip


def print_table(results: dict[str, Any]) -> None:
    print(
        f"\nteacher alone: {results['teacher_tokens_per_s']:.1f} tokens/s "
        f"({results['teacher_ms_per_token']:.2f} ms/token), {results['prompts']} prompts x {results['new_tokens']}"
    )
    print(
        "| draft | proposed | threshold | acceptance | drafted/pass | accepted/pass | tok/s | speed-up | identical |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---|")
    for key, row in results["rows"].items():
        if key.endswith("/alone"):
            continue
        print(
            f"| {row['draft']} | {row['num_assistant_tokens']} | {row['confidence_threshold']} | "
            f"{row['acceptance_rate'] or 0:.3f} | {row['drafted_per_verification']:.2f} | "
            f"{row['mean_accepted_per_verification'] or 0:.2f} | {row['assisted_tokens_per_s']:.1f} | "
            f"{row['speedup']:.2f}x{' (wide)' if row['wide'] else ''} | {row['identical']} |"
        )
    for key, row in results["rows"].items():
        if key.endswith("/alone"):
            print(f"- {key}: {row['draft_ms_per_token']:.2f} ms/token")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {key: row for key, row in results["rows"].items() if not key.endswith("/alone")}
    figure, axis = plt.subplots(figsize=(8, 4))
    axis.bar(range(len(rows)), [row["speedup"] for row in rows.values()])
    axis.axhline(1.0, color="grey", linewidth=1)
    labels = [
        f"{row['draft']}\n{row['num_assistant_tokens']} tok, thr {'def' if isinstance(row['confidence_threshold'], str) else row['confidence_threshold']}"  # noqa: E501
        for row in rows.values()
    ]
    axis.set_xticks(range(len(rows)), labels, fontsize=7)
    axis.set_ylabel("teacher greedy tokens/s, with draft / alone")
    axis.set_title("Assisted decoding on CPU (batch 1)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        if args.smoke:
            teacher_dir, drafts = _tiny_models(Path(scratch))
        else:
            teacher_dir = Path(args.teacher)
            drafts = dict((item.split("=", 1)[0], Path(item.split("=", 1)[1])) for item in args.draft)
        results = measure(args, teacher_dir, drafts)
    results.update(
        threads=args.threads, cpu=describe_cpu(), torch=torch.__version__, load_average_start=load_start,
        load_average_end=os.getloadavg(), seconds=round(time.perf_counter() - started, 1), command=" ".join(sys.argv),
    )  # fmt: skip
    print_table(results)
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = "bench_assisted_drafts" + ("_smoke" if args.smoke else "")
    (results_dir / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str))
    plot(results, results_dir / f"{stem}.png")
    print(f"\nwrote {results_dir / stem}.json and .png ({results['seconds']} s)")
    return results


if __name__ == "__main__":
    main()
