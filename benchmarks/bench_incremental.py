"""Adding classes without forgetting: BBC News with 3 topics first, then 2 new ones. How much of the old classes'
accuracy does each method keep, and what does it cost on the new classes?

A 2-layer cut of all-MiniLM-L6-v2 (its layers 0 and 5, word embeddings frozen) is fine-tuned on the 3 old topics
(`scripts/train_teacher.py`). It is then given the 2 new topics by `scripts/distill_glue.py
--previous_model_name_or_path` (the head grown, old rows kept) from the new topics' training rows alone:

- fine-tuning (`--alpha 0`): cross-entropy over the 5 classes;
- LwF (`--alpha 0.5 --temperature 2`): plus the previous model's softened predictions on the old classes;
- LwF on the old logits (`--kd_loss mse`): the previous model's logits themselves instead of their softmax, which
  also keeps their level against the new classes' (a variant, not the paper's loss);
- exemplars only (`--alpha 0`, `--exemplar_file` with `--exemplars` rows per old topic): replay without KD;
- LwF with exemplars: both;
- "+ weight aligning" (`--weight_aligning`): LwF, and LwF with exemplars, with the new classes' head rows scaled to
  the old rows' mean norm once training ends (Zhao et al., 2020);
- "(task-aware loss)" (`--task_aware_loss`): fine-tuning and LwF with each row's cross-entropy over its own group
  of classes (new-topic rows over the new topics): LwF's own setting, one head per task, read task-aware;
- joint training (the upper bound): the same cut fine-tuned on all 5 topics' rows for the steps of both stages.

Printed, mean ± std over seeds: accuracy on the test articles of the old topics and of the new topics (argmax over
all 5 classes: class-incremental), overall accuracy, the same two accuracies task-aware (argmax over the old topics
alone for old-topic articles, over the new ones for new-topic articles: the LwF paper's protocol, one head per task),
and the share of the model's old-topic accuracy before the new topics that each method keeps, both ways. Targets,
checked under each protocol: LwF keeps >= 90% of the old classes' accuracy where fine-tuning forgets most of it, and
is within 3 points of fine-tuning on the new classes; and under the paper's own setting (both trained with the
task-aware loss, read task-aware). JSON and a PNG in benchmarks/results/bench_incremental.*

    python benchmarks/bench_incremental.py                 # ~45 min on one CPU core
    python benchmarks/bench_incremental.py --new_steps 60 --methods fine-tuning,LwF   # a subset, another schedule
    python benchmarks/bench_incremental.py --seed_list 1 --reuse_runs &   # seeds in parallel processes, then
    python benchmarks/bench_incremental.py --seed_list 2 --reuse_runs; wait
    python benchmarks/bench_incremental.py --reuse_runs                   # measures every finished run together
    python benchmarks/bench_incremental.py --smoke         # seconds: checks the script only
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import _bbc  # noqa: E402  (sets the offline environment before transformers is imported)
import _evidence  # noqa: E402
import _plot  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

METHODS = {
    "fine-tuning": {"alpha": 0.0, "exemplars": False},
    "LwF": {"alpha": 0.5, "exemplars": False},
    "fine-tuning (task-aware loss)": {"alpha": 0.0, "exemplars": False, "task_aware_loss": True},
    "LwF (task-aware loss)": {"alpha": 0.5, "exemplars": False, "task_aware_loss": True},
    "LwF on the old logits (MSE)": {"alpha": 0.5, "exemplars": False, "kd_loss": "mse"},
    "exemplars only": {"alpha": 0.0, "exemplars": True},
    "LwF + exemplars": {"alpha": 0.5, "exemplars": True},
    "LwF + weight aligning": {"alpha": 0.5, "exemplars": False, "weight_aligning": True},
    "LwF + exemplars + weight aligning": {"alpha": 0.5, "exemplars": True, "weight_aligning": True},
}
# The pairs the targets compare: (fine-tuning, LwF, the accuracy suffix they are read with).
PAIRS = {
    "class-incremental": ("fine-tuning", "LwF", ""),
    "task-aware": ("fine-tuning", "LwF", "_task_aware"),
    "one head per task (task-aware loss)": (
        "fine-tuning (task-aware loss)",
        "LwF (task-aware loss)",
        "_task_aware",
    ),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, seconds long: checks the script only"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--seed_list",
        default=None,
        help="comma-separated seeds to run instead of 0 .. --seeds - 1 (e.g. `1,2`)",
    )
    parser.add_argument(
        "--reuse_runs",
        action="store_true",
        help="keep the work folder's finished runs (a saved model trained with the same flags) and only measure "
        "them: seeds trained by separate processes (--seed_list), then measured together",
    )
    parser.add_argument("--old_topics", default="business,entertainment,politics")
    parser.add_argument("--base_steps", type=int, default=100, help="steps on the old topics (batch 16)")
    parser.add_argument("--new_steps", type=int, default=150, help="steps adding the new topics (batch 16)")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated subset of the methods (the targets are checked for the pairs that ran)",
    )
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--exemplars", type=int, default=20, help="exemplar rows kept per old topic")
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--layers", default="0,5", help="the MiniLM layers the model keeps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work_dir", default="outputs/bench_incremental")
    parser.add_argument("--results_dir", default=None, help="default benchmarks/results")
    return parser


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> str:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return str(path)


def _read(path: str) -> list[tuple[str, str]]:
    with open(path, newline="") as handle:
        return [(row["text"], row["label"]) for row in csv.DictReader(handle)]


def _data(work: Path, old: list[str], smoke: bool) -> dict[str, str]:
    """The demo's BBC split (seed 42) cut into the files each stage reads."""
    from hf_distill.tasks.classification.bbc import prepare_bbc_splits

    splits = {name: _read(path) for name, path in prepare_bbc_splits(work / "bbc", seed=42).items()}
    if smoke:
        splits = {name: rows[:: max(len(rows) // 40, 1)][:40] for name, rows in splits.items()}
    folder = work / "files"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, rows in splits.items():
        files[f"{split}_all"] = _write_csv(folder / f"{split}_all.csv", rows)
        files[f"{split}_old"] = _write_csv(folder / f"{split}_old.csv", [r for r in rows if r[1] in old])
        files[f"{split}_new"] = _write_csv(folder / f"{split}_new.csv", [r for r in rows if r[1] not in old])
    return files


def _cut_minilm(work: Path, layers: list[int]) -> str:
    """The pretrained MiniLM cut to `layers`, saved once with its tokenizer (its head is replaced when trained)."""
    from transformers import AutoModelForSequenceClassification

    from hf_distill import create_student

    folder = work / f"minilm_layers_{'_'.join(map(str, layers))}"
    if not (folder / "config.json").is_file():
        full = AutoModelForSequenceClassification.from_pretrained(_bbc.minilm_path())
        create_student(full, num_hidden_layers=len(layers), layers=layers).save_pretrained(folder)
        _bbc.tokenizer().save_pretrained(folder)
    return str(folder)


def _common_flags(output: Path, seed: int, steps: int, args: argparse.Namespace) -> list[str]:
    return [
        "--output_dir", str(output), "--do_train", "--max_steps", str(steps), "--per_device_train_batch_size",
        "16", "--learning_rate", str(args.learning_rate), "--warmup_steps", "0.1", "--weight_decay", "0.01",
        "--max_seq_length", str(args.max_seq_length), "--seed", str(seed), "--save_strategy", "no",
        "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true", "--freeze_embeddings", "true",
        "--logging_steps", str(max(steps // 4, 1)), "--log_level", "warning",
    ]  # fmt: skip


def _accuracies(model_dir: Path, files: dict[str, str], old: list[str], max_length: int) -> dict[str, float]:
    """Old-topic, new-topic and overall test accuracy of the saved model (argmax over all its classes), and the
    old- and new-topic accuracies task-aware (argmax over the old, resp. new, classes alone)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    rows = _read(files["test_all"])
    tok = _bbc.tokenizer()
    logits = _bbc.predict_logits(model, _bbc.encode(tok, [t for t, _ in rows], None, max_length), tok)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    predicted = np.array([names[i] for i in logits.argmax(-1)])
    truth = np.array([label for _, label in rows])
    is_old = np.isin(truth, old)
    result = {"old": float((predicted[is_old] == truth[is_old]).mean())}
    if (~is_old).any() and len(names) > len(old):
        result["new"] = float((predicted[~is_old] == truth[~is_old]).mean())
        result["all"] = float((predicted == truth).mean())
        for key, rows, group in (("old_task_aware", is_old, True), ("new_task_aware", ~is_old, False)):
            columns = [i for i, name in enumerate(names) if (name in old) == group]
            within = np.array([names[columns[i]] for i in logits[:, columns].argmax(-1)])
            result[key] = float((within[rows] == truth[rows]).mean())
    return result


def main() -> dict:
    args = _parser().parse_args()
    if args.smoke:
        args.seeds, args.base_steps, args.new_steps, args.exemplars, args.max_seq_length = 1, 2, 2, 2, 32
        args.layers = "0"
    torch.set_num_threads(args.threads)
    from hf_distill.reporting.machine import describe_cpu
    from hf_distill.scripts import distill_glue, train_teacher
    from hf_distill.storage.atomic import atomic_write_text

    machine = _evidence.machine() | {"cpu_flags": describe_cpu()}
    clock = _bbc.Clock()
    work = Path(args.work_dir) / ("smoke" if args.smoke else "real")
    chosen = [name.strip() for name in args.methods.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose among {list(METHODS)}")
    if not args.reuse_runs:
        shutil.rmtree(work / "runs", ignore_errors=True)
    seeds = [int(s) for s in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
    args.seeds = len(seeds)

    def train(script, output: Path, flags: list[str]) -> None:
        """Run `script` with `flags`, unless --reuse_runs finds a finished run of exactly these flags."""
        record = output / "bench_flags.json"
        finished = (output / "model.safetensors").is_file() and record.is_file()
        if args.reuse_runs and finished and json.loads(record.read_text()) == flags:
            return
        script.main(flags)
        atomic_write_text(record, json.dumps(flags) + "\n")

    old = [topic.strip() for topic in args.old_topics.split(",")]
    files = _data(work, old, args.smoke)
    new = sorted({label for _, label in _read(files["train_new"])})
    base_model = _cut_minilm(Path(args.work_dir), [int(layer) for layer in args.layers.split(",")])
    results: dict[str, dict[str, list[float]]] = {}

    def record(method: str, scores: dict[str, float]) -> None:
        for key, value in scores.items():
            results.setdefault(method, {}).setdefault(key, []).append(value)

    for seed in seeds:
        runs = work / "runs" / f"seed{seed}"
        base = runs / "base"
        train(
            train_teacher,
            base,
            ["--model_name_or_path", base_model, "--train_file", files["train_old"]]
            + _common_flags(base, seed, args.base_steps, args),
        )
        record("before: old topics only", _accuracies(base, files, old, args.max_seq_length))
        for method in chosen:
            setting = METHODS[method]
            output = runs / "".join(c if c.isalnum() else "_" for c in method)
            flags = [
                "--previous_model_name_or_path", str(base), "--train_file", files["train_new"],
                "--alpha", str(setting["alpha"]), "--temperature", str(args.temperature),
            ] + _common_flags(output, seed, args.new_steps, args)  # fmt: skip
            flags += ["--kd_loss", setting.get("kd_loss", "forward_kl")]
            if setting["exemplars"]:
                flags += ["--exemplar_file", files["train_old"], "--exemplars_per_class", str(args.exemplars)]
            if setting.get("weight_aligning"):
                flags += ["--weight_aligning", "true"]
            if setting.get("task_aware_loss"):
                flags += ["--task_aware_loss", "true"]
            train(distill_glue, output, flags)
            record(method, _accuracies(output, files, old, args.max_seq_length))
        joint = runs / "joint"
        train(
            train_teacher,
            joint,
            ["--model_name_or_path", base_model, "--train_file", files["train_all"]]
            + _common_flags(joint, seed, args.base_steps + args.new_steps, args),
        )
        record("joint (upper bound)", _accuracies(joint, files, old, args.max_seq_length))
        print(
            f"seed {seed} done at {clock.seconds():.0f} s: "
            + ", ".join(f"{m}: {v}" for m, v in results.items())
        )

    before = np.mean(results["before: old topics only"]["old"])
    print(
        f"\nBBC News (split seed 42), old topics {old}, new topics {new}; MiniLM cut to layers {args.layers}, "
        f"{args.max_seq_length} "
        f"tokens, batch 16: {args.base_steps} steps on the old topics, then {args.new_steps} steps on the new ones; "
        f"{args.seeds} seed(s); exemplars: {args.exemplars} per old topic"
    )
    columns = ("old", "new", "all", "old_task_aware", "new_task_aware")
    print(
        "| method | old-topic acc | new-topic acc | all | old kept | task-aware: old-topic acc | new-topic acc | "
        "old kept |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    summary = {}
    for method, scores in results.items():
        kept = 100 * np.mean(scores["old"]) / before if before else float("nan")
        aware = scores.get("old_task_aware", scores["old"])  # before: the old classes are all there is
        kept_aware = 100 * np.mean(aware) / before if before else float("nan")
        summary[method] = {
            key: {
                "mean": float(np.mean(v)),
                "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                "per_seed": v,
            }
            for key, v in scores.items()
        } | {"old_kept_percent": kept, "old_kept_percent_task_aware": kept_aware}
        cells = [_bbc.mean_std(scores[key]) if key in scores else "" for key in columns]
        print(
            f"| {method} | {' | '.join(cells[:3])} | {kept:.1f}% | {' | '.join(cells[3:])} | {kept_aware:.1f}% |"
        )
    checks = {}
    for protocol, (tune_name, lwf_name, suffix) in PAIRS.items():
        if tune_name not in summary or lwf_name not in summary:
            continue
        lwf, tune = summary[lwf_name], summary[tune_name]
        checks |= {
            f"{protocol}: LwF keeps >= 90% of the old-topic accuracy": lwf[f"old_kept_percent{suffix}"]
            >= 90.0,
            f"{protocol}: fine-tuning forgets most of it (keeps < 50%)": tune[f"old_kept_percent{suffix}"]
            < 50.0,
            f"{protocol}: LwF within 3 points of fine-tuning on the new topics": tune[f"new{suffix}"]["mean"]
            - lwf[f"new{suffix}"]["mean"]
            <= 0.03,
        }
    checks = {name: bool(passed) for name, passed in checks.items()}
    for name, passed in checks.items():
        print(f"{'PASS' if passed else 'MISS'}: {name}")
    print(f"\nTotal {clock.seconds():.0f} s")
    output = {
        "question": __doc__.splitlines()[0],
        "old_topics": old,
        "new_topics": new,
        "settings": vars(args),
        "accuracy": summary,
        "targets": checks,
        "seconds": clock.seconds(),
        "smoke": args.smoke,
        "command": _evidence.command(),
        "machine": machine | {"load_average_at_end": list(os.getloadavg())},
    }
    directory = Path(args.results_dir) if args.results_dir else Path(__file__).parent / "results"
    json_path = directory / f"bench_incremental{'_smoke' if args.smoke else ''}.json"
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json_path, json.dumps(output, indent=2, default=float) + "\n")
    print("JSON:", json_path)
    methods = list(summary)
    shown = {"old": "old topics", "new": "new topics", "old_task_aware": "old topics, task-aware"}
    series = {
        label: [summary[m][key]["mean"] if key in summary[m] else None for m in methods]
        for key, label in shown.items()
    }
    errors = {
        label: [summary[m][key]["std"] if key in summary[m] else None for m in methods]
        for key, label in shown.items()
    }
    png = _plot.grouped_bar_chart(
        json_path.with_suffix(".png"),
        f"BBC News: {len(old)} topics, then {len(new)} new ones ({args.seeds} seed(s), bars: std)"
        + (" [smoke]" if args.smoke else ""),
        methods,
        series,
        "test accuracy",
        errors,
    )
    print("PNG:", png)
    return output


if __name__ == "__main__":
    main()
