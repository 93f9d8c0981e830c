"""Online distillation on a stream with drift: topics of BBC News arrive over time. How do a teacher refreshed every
two chunks and the student that distils from it compare with a fixed teacher's student and with a student trained
once at the start?

The stream (`scripts/distill_online.py`, files in a folder): --chunks chunks of --chunk_rows training articles of the
demo's split (seed 42); the first two chunks hold business and sports only, then politics joins, then tech, then
entertainment (each chunk an equal share of the topics seen so far). The initial teacher is all-MiniLM-L6-v2 with a
5-topic head fine-tuned on business and sports articles kept out of the stream: its head knows every topic, it has
seen two. The student is its 2-layer cut (layers 0 and 5), distilled on every chunk by KD alone (alpha = 1, T = 2):
the labels only refresh the teacher. Runs:

- refreshed: every 2 chunks the teacher is fine-tuned on the newest 2 chunks' labelled rows, then the student
  distils from it;
- fixed teacher: the same stream, the teacher never refreshed (`--refresh_every 0`);
- once at the start: the student after the first chunk, never updated.

Printed per chunk: the accuracy of each model on the chunk before it is trained on (prequential: what a deployed
model would have scored on the data as it arrived) and on the test articles (all topics; the 426 of the split, or
every k-th of them with --test_rows) after the chunk.
JSON and a PNG in benchmarks/results/bench_online.*

    python benchmarks/bench_online.py             # ~8 min on 2 CPU cores
    python benchmarks/bench_online.py --smoke     # seconds: checks the script only
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import _bbc  # noqa: E402  (sets the offline environment before transformers is imported)
import _evidence  # noqa: E402
import _plot  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

ARRIVALS = ("business", "sports", "politics", "tech", "entertainment")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, seconds long: checks the script only"
    )
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--chunk_rows", type=int, default=100)
    parser.add_argument(
        "--prestream_rows", type=int, default=80, help="business and sports rows the teacher starts from"
    )
    parser.add_argument(
        "--teacher_steps", type=int, default=40, help="the initial teacher's steps (batch 16)"
    )
    parser.add_argument("--student_epochs", type=float, default=2.0, help="epochs over each chunk")
    parser.add_argument("--refresh_epochs", type=float, default=2.0)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--teacher_learning_rate", type=float, default=1e-4)
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument(
        "--test_rows",
        type=int,
        default=0,
        help="evaluate on every k-th test article, about this many (0: all 426)",
    )
    parser.add_argument("--student_layers", default="0,5", help="the teacher's layers the student keeps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work_dir", default="outputs/bench_online")
    parser.add_argument("--results_dir", default=None, help="default benchmarks/results")
    return parser


def _write(path: Path, rows: list[tuple[str, str]]) -> str:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return str(path)


def _stream(work: Path, args: argparse.Namespace) -> dict:
    """The pre-stream rows, the chunk files (topics arriving over time) and the test file."""
    from hf_distill.tasks.classification.bbc import prepare_bbc_splits

    paths = prepare_bbc_splits(work / "bbc", seed=42)
    with open(paths["train"], newline="") as handle:
        train = [(row["text"], row["label"]) for row in csv.DictReader(handle)]
    rng = random.Random(args.seed)
    pools = {topic: [row for row in train if row[1] == topic] for topic in ARRIVALS}
    for pool in pools.values():
        rng.shuffle(pool)
    prestream = [pools[t].pop() for _ in range(args.prestream_rows // 2) for t in ARRIVALS[:2]]
    folder = work / "stream"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    chunks = []
    for index in range(args.chunks):
        available = ARRIVALS[: min(2 + index // 2, len(ARRIVALS))]
        rows = [pools[available[i % len(available)]].pop() for i in range(args.chunk_rows)]
        rng.shuffle(rows)
        _write(folder / f"chunk_{index:03d}.csv", rows)
        chunks.append({"topics": list(available), "rows": rows})
    test = work / "test.csv"
    shutil.copyfile(paths["test"], test)
    return {"prestream": prestream, "folder": str(folder), "chunks": chunks, "test": str(test)}


def _initial_teacher(work: Path, rows: list[tuple[str, str]], args: argparse.Namespace) -> str:
    topics = sorted(ARRIVALS)
    tok = _bbc.tokenizer()
    sizes = _bbc.Sizes(train=len(rows), test=0, max_seq_length=args.max_seq_length)
    model = _bbc.minilm_classifier(topics, None if not args.smoke else [0, 5], seed=args.seed)
    data = _bbc.encode(
        tok, [t for t, _ in rows], [topics.index(label) for _, label in rows], args.max_seq_length
    )
    _bbc.fine_tune(model, data, tok, str(work / "teacher_run"), args.seed, sizes, max_steps=args.teacher_steps,
                   lr=args.teacher_learning_rate)  # fmt: skip
    folder = work / "teacher0"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _flags(stream: dict, teacher: str, output: Path, args: argparse.Namespace, *extra: str) -> list[str]:
    return [
        "--teacher_model_name_or_path", teacher, "--student_layers", args.student_layers,
        "--stream_dir", stream["folder"], "--eval_file", stream["test"], "--refresh_window", "2",
        "--refresh_epochs", str(args.refresh_epochs), "--refresh_learning_rate", str(args.teacher_learning_rate),
        "--output_dir", str(output), "--num_train_epochs", str(args.student_epochs), "--per_device_train_batch_size",
        "16", "--learning_rate", str(args.learning_rate), "--alpha", "1.0", "--temperature", "2.0",
        "--max_seq_length", str(args.max_seq_length), "--freeze_embeddings", "true", "--seed", str(args.seed),
        "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true", "--log_level", "warning", *extra,
    ]  # fmt: skip


def _accuracy(model_dir: Path, rows: list[tuple[str, str]], max_length: int) -> float:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    tok = _bbc.tokenizer()
    logits = _bbc.predict_logits(model, _bbc.encode(tok, [t for t, _ in rows], None, max_length), tok)
    names = np.array([model.config.id2label[i] for i in logits.argmax(-1)])
    return float((names == np.array([label for _, label in rows])).mean())


def main() -> dict:
    args = _parser().parse_args()
    if args.smoke:
        args.chunks, args.chunk_rows, args.prestream_rows, args.teacher_steps = 3, 8, 8, 2
        args.student_epochs = args.refresh_epochs = 1.0
        args.max_seq_length, args.student_layers = 32, "0"
    torch.set_num_threads(args.threads)
    from hf_distill.reporting.machine import describe_cpu
    from hf_distill.scripts import distill_online
    from hf_distill.storage.atomic import atomic_write_text

    machine = _evidence.machine() | {"cpu_flags": describe_cpu()}
    clock = _bbc.Clock()
    work = Path(args.work_dir) / ("smoke" if args.smoke else "real")
    shutil.rmtree(work / "runs", ignore_errors=True)
    stream = _stream(work, args)
    if args.smoke:
        args.test_rows = 16
    if args.test_rows:
        with open(stream["test"], newline="") as handle:
            rows = list(csv.DictReader(handle))
        rows = rows[:: max(len(rows) // args.test_rows, 1)][: args.test_rows]
        _write(Path(stream["test"]), [(row["text"], row["label"]) for row in rows])
    teacher = _initial_teacher(work, stream["prestream"], args)
    timings = {"initial teacher": clock.seconds()}
    runs = {}
    for name, extra in (("refreshed", ["--refresh_every", "2"]), ("fixed teacher", ["--refresh_every", "0"])):
        started = clock.seconds()
        state = distill_online.main(
            _flags(stream, teacher, work / "runs" / name.replace(" ", "_"), args, *extra)
        )
        runs[name] = state["metrics"]
        timings[name] = round(clock.seconds() - started, 1)
    once_dir = work / "runs" / "once"
    distill_online.main(_flags(stream, teacher, once_dir, args, "--refresh_every", "0", "--max_chunks", "1"))
    with open(stream["test"], newline="") as handle:
        test_rows = [(row["text"], row["label"]) for row in csv.DictReader(handle)]
    once_test = _accuracy(once_dir / "student", test_rows, args.max_seq_length)
    once = [_accuracy(once_dir / "student", chunk["rows"], args.max_seq_length) for chunk in stream["chunks"]]

    table = []
    for index, chunk in enumerate(stream["chunks"]):
        refreshed, fixed = runs["refreshed"][index], runs["fixed teacher"][index]
        table.append({
            "chunk": index, "topics": chunk["topics"], "teacher_refreshed": refreshed["teacher_refreshed"],
            "prequential": {
                "teacher, refreshed": refreshed["prequential"]["teacher"], "student, refreshed teacher":
                refreshed["prequential"]["student"], "teacher, fixed": fixed["prequential"]["teacher"],
                "student, fixed teacher": fixed["prequential"]["student"],
                "student trained once": once[index] if index > 0 else None,
            },
            "test": {
                "teacher, refreshed": refreshed["eval"]["teacher"], "student, refreshed teacher":
                refreshed["eval"]["student"], "teacher, fixed": fixed["eval"]["teacher"],
                "student, fixed teacher": fixed["eval"]["student"], "student trained once": once_test,
            },
        })  # fmt: skip
    models = list(table[0]["test"])
    print(
        f"\nBBC News stream: {args.chunks} chunks of {args.chunk_rows} articles, topics arriving over time; initial "
        f"teacher (6-layer MiniLM) fine-tuned on {args.prestream_rows} business/sports articles; student: its "
        f"layers {args.student_layers}, KD only (T = 2), {args.student_epochs:g} epochs per chunk; refresh every 2 "
        f"chunks on the newest 2, {args.refresh_epochs:g} epochs; {args.max_seq_length} tokens; {len(test_rows)} test "
        f"articles; seed {args.seed}"
    )
    for what, title in (
        ("prequential", "accuracy on each chunk before training on it"),
        ("test", "test accuracy after each chunk"),
    ):
        print(
            f"\n{title}\n| chunk | topics | " + " | ".join(models) + " |\n|---|---|" + "---:|" * len(models)
        )
        for row in table:
            cells = ["" if row[what][m] is None else f"{row[what][m]:.3f}" for m in models]
            print(
                f"| {row['chunk']}{' (refresh)' if row['teacher_refreshed'] else ''} | {len(row['topics'])} | "
                f"{' | '.join(cells)} |"
            )
    mean_prequential = {
        m: float(np.mean([row["prequential"][m] for row in table[1:] if row["prequential"][m] is not None]))
        for m in models
    }
    final = table[-1]["test"]
    print(
        "\nmean prequential accuracy over chunks 1..: "
        + ", ".join(f"{m} {v:.3f}" for m, v in mean_prequential.items())
    )
    print("test accuracy at the end: " + ", ".join(f"{m} {v:.3f}" for m, v in final.items()))
    print(f"\nTotal {clock.seconds():.0f} s ({timings})")

    output = {
        "question": __doc__.splitlines()[0],
        "settings": vars(args),
        "chunks": table,
        "mean_prequential_after_chunk_0": mean_prequential,
        "final_test": final,
        "runs": runs,
        "seconds": clock.seconds(),
        "timings": timings,
        "smoke": args.smoke,
        "command": _evidence.command(),
        "machine": machine | {"load_average_at_end": list(os.getloadavg())},
    }
    directory = Path(args.results_dir) if args.results_dir else Path(__file__).parent / "results"
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / f"bench_online{'_smoke' if args.smoke else ''}.json"
    atomic_write_text(json_path, json.dumps(output, indent=2, default=float) + "\n")
    print("JSON:", json_path)
    figure, axes = _plot.new_figure(2, width=6.0)
    for axis, (what, title) in zip(
        axes,
        (
            ("prequential", "on each chunk, before training on it"),
            ("test", "on the test set, after each chunk"),
        ),
    ):
        for index, model in enumerate(models):
            points = [(row["chunk"], row[what][model]) for row in table if row[what][model] is not None]
            axis.plot(
                [x for x, _ in points], [y for _, y in points], marker="o", label=model, color=f"C{index}"
            )
        for row in table:
            if row["teacher_refreshed"]:
                axis.axvline(row["chunk"], color="grey", alpha=0.2)
        axis.set_xlabel("chunk (grey: teacher refreshed)")
        axis.set_ylabel("accuracy")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle(
        "BBC News stream, topics arriving over time" + (" [smoke]" if args.smoke else ""), fontsize=11
    )
    print("PNG:", _plot.save_png(figure, json_path.with_suffix(".png")))
    return output


if __name__ == "__main__":
    main()
