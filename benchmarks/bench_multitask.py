"""Several tasks in one student: does one encoder with a head per task, each task taught by its own teacher, match
single-task students of the same size on their tasks? BBC News, CPU.

Two tasks on the BBC News articles (the demo's split, seed 42): `topic`, 5 classes, taught by all-MiniLM-L6-v2
fine-tuned on the topics (6 layers; kept in --work_dir between runs), and `embedding`, the sentence embedding of the
pretrained all-MiniLM-L6-v2 (mean pooling), learnt through a linear head with 1 - cosine. Every student is a 2-layer
cut of the same MiniLM (layers 0 and 5, word embeddings frozen) with a head per task: a topic-only student and an
embedding-only student train --steps steps each; the multi-task student trains 2 x --steps steps, its batches mixed
round-robin (--steps batches of each task), so every task sees the same batches in all three (the same compute as
the two single-task students together, for one model). KD at T = 2, alpha = 0.5 for the topics.

The embedding head reads the mean-pooled last hidden states, the topic head the first token's (--topic_pooling cls;
mean: both read the same vector); the embedding head starts at the identity (--embedding_init identity: the cut's own
pooled output; normal: random), and the embedding task's loss is weighted by --embedding_weight (default 3, in the
single-task and the multi-task runs alike).

Printed, mean ± std over seeds: topic test accuracy, the embedding's mean cosine with the teacher's on the test
articles, parameters; the target: the multi-task student within 1 point (0.01) of each single-task student.
JSON and a PNG in benchmarks/results/bench_multitask.*

    python benchmarks/bench_multitask.py              # ~10 min on 2 CPU cores, + ~2 min for the topic teacher once
    python benchmarks/bench_multitask.py --smoke      # seconds: checks the script only
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import _bbc  # noqa: E402  (sets the offline environment before transformers is imported)
import _evidence  # noqa: E402
import _plot  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, seconds long: checks the script only"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=80, help="steps per task (batch 16)")
    parser.add_argument("--sampling", default="round_robin", help="proportional, temperature or round_robin")
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument(
        "--teacher_steps", type=int, default=150, help="fine-tuning steps of the topic teacher"
    )
    parser.add_argument(
        "--embedding_init", default="identity", choices=("normal", "identity"),
        help="how the embedding head starts: random (normal) or the identity (the cut's own pooled output)",
    )  # fmt: skip
    parser.add_argument(
        "--embedding_weight", type=float, default=3.0, help="the embedding task's loss weight"
    )
    parser.add_argument(
        "--topic_pooling", default="cls", choices=("mean", "cls"), help="what the topic head reads"
    )
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--layers", default="0,5", help="the MiniLM layers every student keeps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work_dir", default="outputs/bench_multitask")
    parser.add_argument("--results_dir", default=None, help="default benchmarks/results")
    return parser


def _splits(work: Path, smoke: bool) -> dict:
    import csv

    from hf_distill.tasks.classification.bbc import prepare_bbc_splits

    paths = prepare_bbc_splits(work / "bbc", seed=42)
    splits = {}
    for name in ("train", "test"):
        with open(paths[name], newline="") as handle:
            rows = [(row["text"], row["label"]) for row in csv.DictReader(handle)]
        splits[name] = rows[:: max(len(rows) // 32, 1)][:32] if smoke else rows
    return splits


def main() -> dict:
    args = _parser().parse_args()
    if args.smoke:
        args.seeds, args.steps, args.teacher_steps, args.max_seq_length, args.layers = 1, 2, 2, 32, "0"
    torch.set_num_threads(args.threads)
    from transformers import AutoModel, DataCollatorWithPadding

    from hf_distill import (
        DistillationTask,
        MultiTaskDistillationTrainer,
        MultiTaskModel,
        TaskHead,
        create_student,
    )
    from hf_distill.multitask.model import mean_pool
    from hf_distill.reporting.machine import describe_cpu
    from hf_distill.reporting.report import count_parameters
    from hf_distill.storage.atomic import atomic_write_text

    machine = _evidence.machine() | {"cpu_flags": describe_cpu()}
    clock = _bbc.Clock()
    work = Path(args.work_dir) / ("smoke" if args.smoke else "real")
    sizes = _bbc.Sizes(train=0, test=0, max_seq_length=args.max_seq_length)
    splits = _splits(work, args.smoke)
    topics = sorted({label for _, label in splits["train"]})
    tok = _bbc.tokenizer()
    ids = {topic: index for index, topic in enumerate(topics)}

    def encoded(split: str, labelled: bool):
        texts = [text for text, _ in splits[split]]
        labels = [ids[label] for _, label in splits[split]] if labelled else None
        return _bbc.encode(tok, texts, labels, args.max_seq_length)

    train_topic, test_topic = encoded("train", True), encoded("test", True)
    train_text, test_text = encoded("train", False), encoded("test", False)

    def build_teacher():
        model = _bbc.minilm_classifier(topics, None, seed=0)
        return _bbc.fine_tune(model, train_topic, tok, str(work / "teacher_run"), 0, sizes,
                              max_steps=args.teacher_steps, lr=1e-4)  # fmt: skip

    topic_teacher = _bbc.cached_teacher(str(work), "topic_teacher", build_teacher).eval()
    teacher_accuracy = _bbc.accuracy(
        _bbc.predict_logits(topic_teacher, test_topic, tok), [ids[label] for _, label in splits["test"]]
    )
    embedding_teacher = AutoModel.from_pretrained(_bbc.minilm_path()).eval()
    width = embedding_teacher.config.hidden_size
    layers = [int(layer) for layer in args.layers.split(",")]
    cut = create_student(
        AutoModel.from_pretrained(_bbc.minilm_path()), num_hidden_layers=len(layers), layers=layers
    )

    # reference: the cut's own mean-pooled output against the teacher's embedding, before any training
    collator = DataCollatorWithPadding(tok)
    with torch.no_grad():
        batch = collator([test_text[i] for i in range(len(test_text))])
        teacher_vectors = mean_pool(embedding_teacher(**batch).last_hidden_state, batch["attention_mask"])
        cut_vectors = mean_pool(cut(**batch).last_hidden_state, batch["attention_mask"])
    cut_cosine = float(torch.nn.functional.cosine_similarity(cut_vectors, teacher_vectors, dim=-1).mean())

    heads = {
        "topic": TaskHead("topic", "classification", len(topics), tuple(topics), pooling=args.topic_pooling),
        "embedding": TaskHead("embedding", "embedding", width, init=args.embedding_init),
    }

    def task(name: str) -> DistillationTask:
        if name == "topic":
            return DistillationTask("topic", topic_teacher, train_topic, test_topic)
        return DistillationTask(
            "embedding", embedding_teacher, train_text, test_text, weight=args.embedding_weight
        )

    runs = {"topic only": ["topic"], "embedding only": ["embedding"], "multi-task": ["topic", "embedding"]}
    scores: dict[str, dict[str, list[float]]] = {}
    parameters, seconds = {}, {}
    for seed in range(args.seeds):
        for run, names in runs.items():
            torch.manual_seed(seed)
            encoder = copy.deepcopy(cut)
            encoder.get_input_embeddings().requires_grad_(False)
            model = MultiTaskModel(encoder, [heads[name] for name in names])
            training = _bbc.training_args(
                str(work / "runs" / f"{run.replace(' ', '_')}_{seed}"), seed, sizes,
                max_steps=args.steps * len(names), lr=args.learning_rate, temperature=2.0, alpha=0.5,
            )  # fmt: skip
            trainer = MultiTaskDistillationTrainer(
                model, [task(name) for name in names], training, processing_class=tok,
                data_collator=collator, sampling=args.sampling,
            )  # fmt: skip
            started = time.perf_counter()
            trainer.train()
            seconds.setdefault(run, []).append(time.perf_counter() - started)
            metrics = trainer.evaluate()
            for name in names:
                key = "accuracy" if name == "topic" else "cosine"
                scores.setdefault(run, {}).setdefault(name, []).append(metrics[f"eval_{name}_{key}"])
            parameters[run] = count_parameters(model)
        print(f"seed {seed} done at {clock.seconds():.0f} s: {scores}")

    print(
        f"\nBBC News (split seed 42): {len(splits['train'])} training / {len(splits['test'])} test articles, "
        f"{args.max_seq_length} tokens, batch 16; MiniLM cut to layers {args.layers}; {args.steps} steps per task "
        f"({args.sampling}); topic head on {args.topic_pooling} pooling; embedding head {args.embedding_init}, weight "
        f"{args.embedding_weight}; {args.seeds} "
        f"seed(s). Topic teacher accuracy {teacher_accuracy:.4f}; the cut's own "
        f"mean-pooled output has cosine {cut_cosine:.4f} with the embedding teacher's"
    )
    print("| student | topic acc | embedding cosine | parameters | train s |\n|---|---:|---:|---:|---:|")
    for run in runs:
        cells = [
            _bbc.mean_std(scores[run][name]) if name in scores[run] else "" for name in ("topic", "embedding")
        ]
        print(f"| {run} | {' | '.join(cells)} | {parameters[run] / 1e6:.2f}M | {np.mean(seconds[run]):.0f} |")
    gaps = {
        name: float(np.mean(scores["multi-task"][name]) - np.mean(scores[f"{name} only"][name]))
        for name in ("topic", "embedding")
    }
    checks = {
        f"multi-task within 1 point of the {name}-only student": bool(gap >= -0.01)
        for name, gap in gaps.items()
    }
    for (name, passed), gap in zip(checks.items(), gaps.values()):
        print(f"{'PASS' if passed else 'MISS'}: {name} ({gap:+.4f})")
    print(f"\nTotal {clock.seconds():.0f} s")

    output = {
        "question": __doc__.splitlines()[0],
        "settings": vars(args),
        "topic_teacher_accuracy": teacher_accuracy,
        "cut_cosine_before_training": cut_cosine,
        "scores": scores,
        "gaps_multi_minus_single": gaps,
        "targets": checks,
        "parameters": parameters,
        "train_seconds": seconds,
        "seconds": clock.seconds(),
        "smoke": args.smoke,
        "command": _evidence.command(),
        "machine": machine | {"load_average_at_end": list(os.getloadavg())},
    }
    directory = Path(args.results_dir) if args.results_dir else Path(__file__).parent / "results"
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / f"bench_multitask{'_smoke' if args.smoke else ''}.json"
    atomic_write_text(json_path, json.dumps(output, indent=2, default=float) + "\n")
    print("JSON:", json_path)
    figure, axes = _plot.new_figure(2, width=4.5)
    for axis, (name, label) in zip(
        axes, (("topic", "topic test accuracy"), ("embedding", "cosine with the teacher"))
    ):
        shown = [run for run in runs if name in scores[run]]
        stats = [_plot.mean_and_std(scores[run][name]) for run in shown]
        _plot.draw_bars(
            axis, shown, {label: [m for m, _ in stats]}, label, {label: [s for _, s in stats]}, title=name
        )
    figure.suptitle(
        f"One student for two tasks against one per task ({args.seeds} seed(s), bars: std)"
        + (" [smoke]" if args.smoke else ""),
        fontsize=11,
    )
    print("PNG:", _plot.save_png(figure, json_path.with_suffix(".png")))
    return output


if __name__ == "__main__":
    main()
