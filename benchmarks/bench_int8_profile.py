"""Where does the deployed INT8 classifier's time go on each kind of x86 CPU, and which graph is fast on all of them?

The question of issue 26: the compression demo's INT8 student was 9.7x faster than its PyTorch teacher at batch 32 on
an AVX-512 VNNI CPU but 5.5-7.0x on an AVX2-only one. This script times, side by side and per operator, graph
variants of one student on three kinds of CPU:

    native           this CPU as it is (here: AMD EPYC Zen 4, AVX-512 VNNI: MLAS's VPDPBUSDS u8s8 kernel)
    avx512_no_vnni   CPUID without VNNI (Skylake-SP / Cascade Lake-less AVX-512: VPMADDUBSW on zmm)
    avx2             CPUID without AVX-512, VNNI and AMX (Haswell to Zen 3: VPMADDUBSW on ymm, FMA3 SGEMM on ymm)

The two hidden kinds are presented by benchmarks/_cpu_view.py (CPUID faulting): ONNX Runtime, PyTorch (oneDNN,
MKL) and numpy pick the kernels they pick on such a CPU, and those kernels run natively here. So the figures are
those of the AVX2 / AVX-512 code paths *on this microarchitecture*, not of an AVX2-only machine (other clocks,
caches and memory): ratios measured side by side, not absolute times of another CPU.

Each kind runs in its own child process, which records the CPU as it sees it (`describe_cpu`, CPUID) and which
u8 x s8 kernel family really ran (`deployed.probe_u8s8_kernel`: a product that saturates only in VPMADDUBSW), then:
- times every variant and the PyTorch teacher and student alternately (`time_alternately`) at batch 1 and 32;
- profiles every ONNX variant per operator (ONNX Runtime's profiler) at batch 32, summed by operator family.

Variants (`--variants`): "int8 whole" is the deployed graph of issue 20 (every token through every layer); "int8" is
what `export_onnx` + `quantize_int8` deploy now (the last layer computes only the token the head reads); "fp32" is
ONNX Runtime fp32 of the same export. Every variant is checked against the first one on the test texts (max |logit
difference| and accuracy).

    python benchmarks/bench_int8_profile.py --teacher T --student S --test_file test.csv   # the demo's folders
    python benchmarks/bench_int8_profile.py ... --views avx2 --update   # re-time one kind, keep the others' figures
    python benchmarks/bench_int8_profile.py --replot     # print and plot the JSON again
    python benchmarks/bench_int8_profile.py --smoke      # tiny config-built BERTs, seconds; checks the script

A kind timed while the 1-minute load average exceeded twice the usable cores is marked BUSY (not reportable) in the
printout and the plot.

Writes benchmarks/results/bench_int8_profile.json and .png (--smoke: a temporary folder, unless --output is given).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
VIEWS = ("native", "avx512_no_vnni", "avx2")
# Operator families of the per-operator profile.
FAMILIES = {
    "int8 GEMM": ("MatMulIntegerToFloat", "MatMulInteger", "QGemm", "DynamicQuantizeMatMul", "QAttention"),
    "quantize": ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"),
    "fp32 GEMM": ("MatMul", "FusedMatMul", "Gemm"),
    "attention (fused)": ("MultiHeadAttention", "Attention"),
    "softmax": ("Softmax",),
    "GELU": ("Gelu", "BiasGelu", "FastGelu", "Erf"),
    "LayerNorm": ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization"),
    "elementwise": ("Add", "Mul", "Div", "Sub", "Where", "Tanh", "Cast", "Equal", "And", "Not"),
}


# --------------------------------------------------------------------------------------------- the models
def read_csv(path: str, limit: int) -> tuple[list[str], list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))[:limit]
    return [row["text"] for row in rows], [row["label"] for row in rows]


def smoke_models(work: Path) -> tuple[Path, Path, list[str], list[str]]:
    """A 4-layer teacher and a 2-layer student (tiny BERTs from configs, random weights) and synthetic texts."""
    import numpy as np
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from hf_distill.compression.qat import prepare_qat, strip_qat

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_bert_tokenizer

    tokenizer = make_bert_tokenizer()
    folders = []
    for name, layers in (("teacher", 4), ("student", 2)):
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=layers, num_attention_heads=2,
            intermediate_size=128, max_position_embeddings=64, num_labels=3,
            id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2},
        )  # fmt: skip
        model = BertForSequenceClassification(config).eval()
        if name == "student":  # ranges in config.json, as a QAT stage leaves them
            batch = tokenizer(["the movie was good", "a sad story"] * 4, padding=True, return_tensors="pt")
            prepare_qat(model)
            model.train()
            model(**batch)
            strip_qat(model.eval())
        model.save_pretrained(work / name)
        tokenizer.save_pretrained(work / name)
        folders.append(work / name)
    words = "the a movie film good bad story music long short love hate cat dog red blue one two".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, 40)) for _ in range(16)]
    labels = [["a", "b", "c"][i % 3] for i in range(16)]
    return folders[0], folders[1], texts, labels


def calibration_batches(student: Path, texts: list[str], max_length: int) -> list[dict] | None:
    """None if the student carries QAT ranges (they are deployed), else batches of `texts` to calibrate on."""
    from transformers import AutoConfig, AutoTokenizer

    if (getattr(AutoConfig.from_pretrained(student), "int8_qat", None) or {}).get("activation_ranges"):
        return None
    tokenizer = AutoTokenizer.from_pretrained(student)
    return [
        dict(
            tokenizer(
                texts[i : i + 16], truncation=True, max_length=max_length, padding=True, return_tensors="np"
            )
        )
        for i in range(0, len(texts), 16)
    ]


# name -> (INT8, the last layer computes only the token the head reads, attention and GELU fused, ONNX Runtime's
# SkipLayerNormFusion turned off as load_deployed does). The first is what issue 20 deployed, as it was run; "plain
# session" is today's file in an InferenceSession with ONNX Runtime's defaults (SkipLayerNormFusion on).
VARIANTS = {
    "int8 (issue 20)": (True, False, False, False),
    "+ no SkipLayerNorm": (True, False, False, True),
    "+ fused attention, GELU": (True, False, True, True),
    "int8 (deployed now)": (True, True, True, True),
    "int8 (deployed now), plain session": (True, True, True, False),
    "fp32 (issue 20 graph)": (False, False, False, False),
    "fp32 (same rewrites)": (False, True, True, True),
}


def build_variants(
    args, student: Path, calibration_texts: list[str], work: Path
) -> dict[str, dict[str, Any]]:
    """Export and quantize the student in each graph variant of `args.variants`; name -> folder. Built natively (a
    graph does not depend on the CPU; calibration is float32 min / max)."""
    import onnx
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_distill.compression.deployed import DISABLED_OPTIMIZERS
    from hf_distill.compression.onnx_first_token import first_token_checked
    from hf_distill.compression.quantization import export_onnx, quantize_int8

    model = AutoModelForSequenceClassification.from_pretrained(student).eval()
    tokenizer = AutoTokenizer.from_pretrained(student)
    calibration = calibration_batches(student, calibration_texts, args.seq_len)
    folders: dict[str, dict[str, Any]] = {}
    exports: dict[bool, Path] = {}
    for name in args.variants:
        int8, first_token, fused, skip_off = VARIANTS[name]
        if fused not in exports:
            exports[fused] = export_onnx(
                model, tokenizer, work / f"export_fused{int(fused)}", max_length=args.seq_len, fuse=fused
            )
        target = work / f"variant_{len(folders)}"
        if int8:
            quantize_int8(exports[fused], target, calibration=calibration, first_token_only=first_token)
        else:  # ONNX Runtime fp32: the same graph rewrites, without quantization
            shutil.copytree(exports[fused], target)
            if first_token:
                graph = onnx.load(str(target / "model.onnx"))
                print(f"  {name}: {first_token_checked(graph, target, target)['tokens']}")
                onnx.save(graph, str(target / "model.onnx"))
        folders[name] = {
            "folder": str(target),
            "disabled_optimizers": list(DISABLED_OPTIMIZERS) if skip_off else [],
        }
    return folders


# --------------------------------------------------------------------------------------------- one CPU kind
def profile_operators(
    variant: dict[str, Any], feed: dict, threads: int, runs: int, work: Path
) -> dict[str, Any]:
    """ONNX Runtime's per-operator times over `runs` calls: {op type: ms per call}, families and the total."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_profiling = True
    folder = Path(variant["folder"])
    options.profile_file_prefix = str(work / f"profile_{folder.name}")
    options.log_severity_level = 3
    session = ort.InferenceSession(
        str(folder / "model.onnx"),
        options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=variant["disabled_optimizers"],
    )
    names = [node.name for node in session.get_inputs()]
    warmup = 2
    for _ in range(warmup):
        session.run(None, {name: feed[name] for name in names})
    began = time.perf_counter()
    for _ in range(runs):
        session.run(None, {name: feed[name] for name in names})
    wall_ms = (time.perf_counter() - began) * 1000 / runs
    trace = json.loads(Path(session.end_profiling()).read_text())
    runs_seen = sorted(
        (event["ts"], event["dur"] / 1000)
        for event in trace
        if event.get("cat") == "Session" and event.get("name") == "model_run"
    )
    timed_from = runs_seen[warmup][0]  # the warm-up calls (first-call allocations) are left out
    model_runs = [ms for _, ms in runs_seen[warmup:]]
    per_op: dict[str, float] = {}
    for event in trace:
        if (
            event.get("cat") == "Node"
            and event.get("name", "").endswith("_kernel_time")
            and event["ts"] >= timed_from
        ):
            op = event["args"]["op_name"]
            per_op[op] = per_op.get(op, 0.0) + event["dur"] / 1000
    per_op = {op: ms / len(model_runs) for op, ms in sorted(per_op.items(), key=lambda item: -item[1])}
    families = {family: 0.0 for family in [*FAMILIES, "layout and other"]}
    for op, ms in per_op.items():
        family = next((name for name, ops in FAMILIES.items() if op in ops), "layout and other")
        families[family] += ms
    return {
        "ms_per_call_by_op": per_op,
        "ms_per_call_by_family": families,
        "kernel_ms_per_call": sum(per_op.values()),
        "model_run_ms_median": sorted(model_runs)[len(model_runs) // 2],
        "wall_ms_per_call": wall_ms,
    }


def run_kind(job: dict[str, Any]) -> dict[str, Any]:
    """In the child: the CPU as seen, the kernel probe, fidelity, alternating timing and operator profiles."""
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_distill.compression.deployed import OnnxSequenceClassifier, probe_u8s8_kernel
    from hf_distill.reporting.latency import batch_runner, time_alternately
    from hf_distill.reporting.machine import describe_cpu

    torch.set_num_threads(job["threads"])
    work = Path(job["work"])
    result: dict[str, Any] = {
        "cpu": describe_cpu(),
        "u8s8_probe": probe_u8s8_kernel(),
        "load_average_at_start": list(os.getloadavg()),
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    tokenizer = AutoTokenizer.from_pretrained(job["student"])
    teacher_tokenizer = AutoTokenizer.from_pretrained(job["teacher"])
    runtimes: dict[str, Any] = {
        "teacher (pytorch fp32)": AutoModelForSequenceClassification.from_pretrained(job["teacher"]).eval(),
        "student (pytorch fp32)": AutoModelForSequenceClassification.from_pretrained(job["student"]).eval(),
    }
    for name, variant in job["variants"].items():
        runtimes[name] = OnnxSequenceClassifier(
            variant["folder"],
            num_threads=job["threads"],
            allow_spinning=False,
            disabled_optimizers=variant["disabled_optimizers"],
        )

    def encode(which, texts):
        return dict(
            which(
                texts, truncation=True, max_length=job["seq_len"], padding="max_length", return_tensors="pt"
            )
        )

    texts, labels = job["texts"], job["labels"]
    fidelity: dict[str, Any] = {}
    first = next(iter(job["variants"]))
    logits = {}
    for name in job["variants"]:
        parts = [
            runtimes[name].predict_logits(encode(tokenizer, texts[i : i + 32]))
            for i in range(0, len(texts), 32)
        ]
        logits[name] = np.concatenate(parts)
    label_names = [runtimes[first].config.id2label[i] for i in range(logits[first].shape[1])]
    for name, values in logits.items():
        predictions = [label_names[i] for i in values.argmax(-1)]
        fidelity[name] = {
            "max_abs_logit_diff_vs_first": float(np.abs(values - logits[first]).max()),
            "accuracy": float(np.mean([p == gold for p, gold in zip(predictions, labels)])),
        }
    result["fidelity"] = fidelity

    timings: dict[str, Any] = {}
    for batch_size in job["batch_sizes"]:
        rows = [texts[i % len(texts)] for i in range(batch_size)]
        runners = {}
        for name, runtime in runtimes.items():
            batch = encode(teacher_tokenizer if name.startswith("teacher") else tokenizer, rows)
            runners[name] = batch_runner(runtime, batch)
        measured = time_alternately(runners, repeats=job["repeats"], warmup=job["warmup"])
        timings[str(batch_size)] = {name: timing.to_dict(samples=True) for name, timing in measured.items()}
    result["timing"] = timings

    profiles: dict[str, Any] = {}
    batch_size = max(job["batch_sizes"])
    feed = {
        k: v.numpy() for k, v in encode(tokenizer, [texts[i % len(texts)] for i in range(batch_size)]).items()
    }
    for name, variant in job["variants"].items():
        profiles[name] = profile_operators(variant, feed, job["threads"], job["profile_runs"], work)
    result["profile_batch_size"] = batch_size
    result["profiles"] = profiles
    result["load_average_at_end"] = list(os.getloadavg())
    return result


# --------------------------------------------------------------------------------------------- report
def speedups(kind: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{batch: {runtime: teacher median / its median}}."""
    table = {}
    for batch, timings in kind["timing"].items():
        teacher = timings["teacher (pytorch fp32)"]["median_ms"]
        table[batch] = {name: teacher / timing["median_ms"] for name, timing in timings.items()}
    return table


def busy(kind: dict[str, Any]) -> float | None:
    """The highest 1-minute load average seen around a kind's run if it was above twice the usable cores (other work
    shared the cores: its timings are not reportable), else None."""
    loads = [kind.get(key, [0.0])[0] for key in ("load_average_at_start", "load_average_at_end")]
    return max(loads) if max(loads) > 2 * len(os.sched_getaffinity(0)) else None


def print_report(results: dict[str, Any]) -> None:
    for view, kind in results["kinds"].items():
        if "error" in kind:
            print(f"\n== {view}: not run ({kind['error']})")
            continue
        if busy(kind):
            print(
                f"\n== {view}: BUSY MACHINE (load average {busy(kind):.1f}): timings not reportable, re-run it"
            )
        cpu, probe = kind["cpu"], kind["u8s8_probe"]
        print(f"\n== {view}: {cpu['model']}; CPUID flags: "
              f"{', '.join(flag for flag, on in cpu['flags'].items() if on) or 'none'}")  # fmt: skip
        print(
            f"   u8s8 kernel by flags: {cpu['u8s8_kernel']}; probe: {probe['family']} ({probe['observed']})"
        )
        ratios = speedups(kind)
        print(
            f"   {'runtime':<26}" + "".join(f"{'b' + b + ' ms':>12}{'x teacher':>10}" for b in kind["timing"])
        )
        for name in kind["timing"][next(iter(kind["timing"]))]:
            line = f"   {name:<26}"
            for batch, timings in kind["timing"].items():
                timing = timings[name]
                line += f"{timing['median_ms']:>12.2f}{ratios[batch][name]:>9.2f}x"
            print(line + ("  (wide spread)" if any(t[name]["wide"] for t in kind["timing"].values()) else ""))
        print(
            f"   per-operator profile at batch {kind['profile_batch_size']} (ms per call, share of kernel time):"
        )
        for name, profile in kind["profiles"].items():
            total = profile["kernel_ms_per_call"]
            shares = ", ".join(f"{family} {ms:.1f} ({100 * ms / total:.0f}%)"
                               for family, ms in profile["ms_per_call_by_family"].items() if ms > 0.005 * total)  # fmt: skip
            print(f"     {name:<24} total {total:.1f} ms: {shares}")
        for name, values in kind["fidelity"].items():
            print(f"   {name:<26} accuracy {values['accuracy']:.4f}, max |logit - first variant's| "
                  f"{values['max_abs_logit_diff_vs_first']:.2e}")  # fmt: skip


def plot(results: dict[str, Any], path: Path) -> None:
    import _plot

    kinds = {view: kind for view, kind in results["kinds"].items() if "error" not in kind}
    if not kinds:
        return
    figure, axes = _plot.new_figure(2, width=6.5)
    batches = list(next(iter(kinds.values()))["timing"])
    names = [
        name for name in next(iter(kinds.values()))["timing"][batches[-1]] if not name.startswith("teacher")
    ]
    series = {
        view + (f" (busy: load {busy(kind):.1f}, not reportable)" if busy(kind) else ""): [
            speedups(kind)[batches[-1]][name] for name in names
        ]
        for view, kind in kinds.items()
    }
    _plot.draw_bars(axes[0], names, series, f"speed-up over the PyTorch teacher, batch {batches[-1]}",
                    title="throughput against the teacher, per CPU kind")  # fmt: skip
    families = [*FAMILIES, "layout and other"]
    quiet = [view for view in ("avx2", "avx512_no_vnni", "native") if view in kinds and not busy(kinds[view])]
    view = quiet[0] if quiet else next(iter(kinds))
    profiles = kinds[view]["profiles"]
    _plot.draw_bars(axes[1], families, {name: [p["ms_per_call_by_family"][f] for f in families]
                                        for name, p in profiles.items()},
                    "ms per call", title=f"where the time goes ({view}, batch {kinds[view]['profile_batch_size']})",
                    value_format="{:.1f}")  # fmt: skip
    figure.suptitle(results["title"], fontsize=10)
    _plot.save_png(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny config-built BERTs, seconds: checks the script"
    )
    parser.add_argument("--teacher", help="the teacher's Hugging Face folder (PyTorch fp32 baseline)")
    parser.add_argument(
        "--student", help="the student's Hugging Face folder (QAT ranges in config.json, or calibrated)"
    )
    parser.add_argument(
        "--deployed", help="a deployed INT8 stage folder, timed and checked beside the variants"
    )
    parser.add_argument("--test_file", help="CSV with text,label: timing texts and the fidelity check")
    parser.add_argument(
        "--train_file", help="CSV with text: calibration texts when the student has no QAT ranges"
    )
    parser.add_argument("--views", nargs="+", default=list(VIEWS), choices=VIEWS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile_runs", type=int, default=10)
    parser.add_argument("--texts", type=int, default=426, help="test texts for the fidelity check")
    parser.add_argument("--output", default=None, help="JSON path (the PNG goes beside it)")
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep the kinds of an existing --output JSON that this run does not measure (e.g. re-run one kind "
        "whose timing a busy machine spoiled); each kind records its own load average and time",
    )
    parser.add_argument(
        "--replot", action="store_true", help="print and plot the --output JSON again, no run"
    )
    parser.add_argument("--child", nargs=2, metavar=("JOB", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(Path(args.child[0]).read_text())
        Path(args.child[1]).write_text(json.dumps(run_kind(job), indent=2))
        return

    if args.replot:
        output = Path(args.output) if args.output else RESULTS / "bench_int8_profile.json"
        results = json.loads(output.read_text())
        print_report(results)
        plot(results, output.with_suffix(".png"))
        return

    import _cpu_view
    from transformers import logging as hf_logging

    from hf_distill.reporting.machine import describe_cpu

    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    load_at_start = list(os.getloadavg())
    if args.smoke:
        args.seq_len, args.batch_sizes, args.repeats, args.warmup, args.profile_runs = 32, [1, 4], 3, 1, 3
        args.variants = ["int8 (issue 20)", "int8 (deployed now)"]
    output = Path(args.output) if args.output else None
    if output is None:
        output = (Path(tempfile.mkdtemp()) if args.smoke else RESULTS) / "bench_int8_profile.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        if args.smoke:
            teacher, student, texts, labels = smoke_models(work)
            calibration_texts = texts
        else:
            if not (args.teacher and args.student and args.test_file):
                parser.error("--teacher, --student and --test_file are needed (or --smoke)")
            teacher, student = Path(args.teacher), Path(args.student)
            texts, labels = read_csv(args.test_file, args.texts)
            calibration_texts = read_csv(args.train_file, 256)[0] if args.train_file else texts
        print(f"Building {args.variants} from {student} ...", flush=True)
        variants = build_variants(args, student, calibration_texts, work)
        if args.deployed:  # the stage folder as the pipeline built it, run as issue 20 ran it
            variants = {"deployed stage": {"folder": str(Path(args.deployed).resolve()), "disabled_optimizers": []},
                        **variants}  # fmt: skip
        job = {
            "teacher": str(teacher), "student": str(student), "variants": variants, "texts": texts, "labels": labels,
            "threads": args.threads, "seq_len": args.seq_len, "batch_sizes": args.batch_sizes, "repeats": args.repeats,
            "warmup": args.warmup, "profile_runs": args.profile_runs, "work": str(work),
        }  # fmt: skip
        (work / "job.json").write_text(json.dumps(job))
        kinds: dict[str, Any] = {}
        for view in args.views:
            env = dict(os.environ)
            if view != "native":
                reason = _cpu_view.unavailable()
                if reason is not None:
                    kinds[view] = {"error": reason}
                    continue
                env = _cpu_view.cpu_view_env(view)
            print(f"Running the {view} CPU kind ...", flush=True)
            target = work / f"result_{view}.json"
            completed = subprocess.run(
                [sys.executable, __file__, "--child", str(work / "job.json"), str(target)],
                env=env, capture_output=True, text=True, timeout=3600,
            )  # fmt: skip
            if completed.returncode != 0:
                kinds[view] = {"error": f"child failed: {completed.stderr[-2000:]}"}
                print(kinds[view]["error"])
                continue
            kinds[view] = json.loads(target.read_text())
    earlier: dict[str, Any] = {}
    if args.update and output.is_file():
        previous = json.loads(output.read_text())
        earlier = {view: kind for view, kind in previous["kinds"].items() if view not in kinds}
        for kind in earlier.values():
            kind.setdefault("command", previous.get("command"))
    for kind in kinds.values():
        kind["command"] = "python " + " ".join(sys.argv)
    kinds = {view: (kinds.get(view) or earlier[view]) for view in VIEWS if view in kinds or view in earlier}
    results = {
        "title": f"{'smoke' if args.smoke else student.name}: {args.threads} threads, {args.seq_len} tokens",
        "question": "where the INT8 student's time goes per CPU kind, and which graph is fast on all",
        "command": "python " + " ".join(sys.argv),
        "teacher": str(teacher), "student": str(student), "variants": list(variants),
        "threads": args.threads, "seq_len": args.seq_len, "batch_sizes": args.batch_sizes, "repeats": args.repeats,
        "machine": {"cpu": describe_cpu(), "load_average_at_start": load_at_start,
                    "load_average_at_end": list(os.getloadavg())},
        "note": "avx512_no_vnni and avx2 are CPUID views of this CPU (benchmarks/_cpu_view.py): those kernels' code "
        "paths timed on this microarchitecture, not on a CPU of that kind",
        "seconds": round(time.perf_counter() - started, 1),
        "kinds": kinds,
    }  # fmt: skip
    print_report(results)
    output.write_text(json.dumps(results, indent=2))
    plot(results, output.with_suffix(".png"))
    print(f"\nWrote {output} and {output.with_suffix('.png')} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
