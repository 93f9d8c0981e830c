"""Does a student learn more from an ensemble of teachers than from the best of them? BBC News, CPU.

Three 3-layer teachers cut from the demo's all-MiniLM-L6-v2 (layers 0,2,4 / 1,3,5 / 0,3,5, each with its own
head seed) are fine-tuned on the same labelled subset. The best single teacher is chosen on a validation split.
Then a 1-layer student (MiniLM's first layer, a fresh head) is distilled, for the same number of steps and from the
same initialisation per seed, from (a) the best single teacher and (b) the equal-weight mixture of the three
(hf_distill.sources.ensemble). Printed: each teacher's and the ensemble's test accuracy, the students' mean ± std over
seeds; JSON in benchmarks/results/bench_multi_teacher.json (or --output) and a PNG beside it (test accuracy per
model, the students' with std error bars).

    python benchmarks/bench_multi_teacher.py [--seeds 3]     # ~10-15 min on 2 CPU cores
    python benchmarks/bench_multi_teacher.py --smoke          # seconds: checks the script only
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import _bbc  # noqa: E402
import _evidence  # noqa: E402
import _plot  # noqa: E402
import torch  # noqa: E402
from transformers import DataCollatorWithPadding, set_seed  # noqa: E402

from hf_distill import DistillationTrainer  # noqa: E402

TEACHER_LAYERS = ([0, 2, 4], [1, 3, 5], [0, 3, 5])
TEMPERATURE, ALPHA = 2.0, 0.5


def main() -> dict:
    args = _bbc.parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(args.threads)
    machine = _evidence.machine()  # with the load average before the run
    sizes = _bbc.SMOKE if args.smoke else _bbc.REAL
    epochs_steps = 2 if args.smoke else 2 * sizes.train // sizes.batch_size  # two epochs
    clock = _bbc.Clock()
    data = _bbc.bbc_subset(sizes)
    topics, tok = data["topics"], _bbc.tokenizer()
    encoded = {
        split: _bbc.encode(tok, *data[split], sizes.max_seq_length)
        for split in ("train", "validation", "test")
    }
    work = f"{args.work_dir}/{'smoke' if args.smoke else 'real'}"

    teachers, rows = {}, []
    for index, layers in enumerate(TEACHER_LAYERS):
        name = f"teacher_{''.join(map(str, layers))}"

        def build(layers=layers, index=index, name=name):
            model = _bbc.minilm_classifier(topics, layers, seed=index)
            return _bbc.fine_tune(
                model,
                encoded["train"],
                tok,
                f"{work}/runs/{name}",
                index,
                sizes,
                max_steps=epochs_steps,
                lr=_bbc.TEACHER_LR,
            )

        teachers[name] = _bbc.cached_teacher(work, name, build)
    logits = {
        name: {split: _bbc.predict_logits(model, encoded[split], tok) for split in ("validation", "test")}
        for name, model in teachers.items()
    }
    test_labels = data["test"][1]
    for name in teachers:
        rows.append(
            {
                "model": name,
                "validation": _bbc.accuracy(logits[name]["validation"], data["validation"][1]),
                "test": _bbc.accuracy(logits[name]["test"], test_labels),
            }
        )
    best = max(rows, key=lambda row: row["validation"])["model"]
    weights = [1 / len(teachers)] * len(teachers)
    ensemble_test = _bbc.ensemble_accuracy(
        [logits[n]["test"] for n in teachers], weights, test_labels, TEMPERATURE
    )
    rows.append({"model": "ensemble (equal weights, T=2)", "validation": None, "test": ensemble_test})

    students: dict[str, list[float]] = {"from best teacher": [], "from ensemble": []}
    for seed in range(args.seeds):
        for condition, teacher in (("from best teacher", teachers[best]), ("from ensemble", dict(teachers))):
            student = _bbc.minilm_classifier(topics, [0], seed=100 + seed)
            set_seed(seed)
            trainer = DistillationTrainer(
                model=student,
                teacher_model=teacher,
                args=_bbc.training_args(
                    f"{work}/runs/student_{condition.split()[-1]}_{seed}",
                    seed,
                    sizes,
                    max_steps=epochs_steps,
                    lr=_bbc.STUDENT_LR,
                    temperature=TEMPERATURE,
                    alpha=ALPHA,
                ),
                train_dataset=encoded["train"],
                processing_class=tok,
                data_collator=DataCollatorWithPadding(tok),
            )
            trainer.train()
            students[condition].append(
                _bbc.accuracy(_bbc.predict_logits(student, encoded["test"], tok), test_labels)
            )

    print(f"\nBBC News subset: {sizes.train} train / {sizes.test // 2} validation / {sizes.test} test articles, "
          f"{sizes.max_seq_length} tokens, {epochs_steps} steps of batch {sizes.batch_size} for every model")  # fmt: skip
    print("| model | validation acc | test acc |\n|---|---:|---:|")
    for row in rows:
        validation = "" if row["validation"] is None else f"{row['validation']:.4f}"
        print(
            f"| {row['model']}{' (best)' if row['model'] == best else ''} | {validation} | {row['test']:.4f} |"
        )
    print(f"\n| 1-layer student (seeds {args.seeds}) | test acc mean ± std | per seed |\n|---|---:|---|")
    for condition, values in students.items():
        print(f"| {condition} | {_bbc.mean_std(values)} | {', '.join(f'{v:.4f}' for v in values)} |")
    print(f"\nTotal {clock.seconds():.0f} s")
    results = {
        "sizes": vars(sizes),
        "steps": epochs_steps,
        "temperature": TEMPERATURE,
        "alpha": ALPHA,
        "teachers": rows,
        "best_teacher": best,
        "students": students,
        "seconds": clock.seconds(),
        "smoke": args.smoke,
        "command": _evidence.command(),
        "machine": machine | {"load_average_at_end": list(os.getloadavg())},
    }
    json_path = _bbc.write_results(
        "bench_multi_teacher" + ("_smoke" if args.smoke else ""), args.output, results
    )
    print("JSON:", json_path)
    stats = {condition: _plot.mean_and_std(values) for condition, values in students.items()}
    png = _plot.bar_chart(
        Path(json_path).with_suffix(".png"),
        f"BBC News: a 1-layer student from the best teacher or the ensemble ({args.seeds} seed(s), bars: std)"
        + (" [smoke]" if args.smoke else ""),
        [row["model"].split(" (")[0] + (" (best)" if row["model"] == best else "") for row in rows]
        + [f"student {condition}" for condition in students],
        [row["test"] for row in rows] + [stats[condition][0] for condition in students],
        "test accuracy",
        [0.0] * len(rows) + [stats[condition][1] for condition in students],
    )
    print("PNG:", png)
    return results


if __name__ == "__main__":
    main()
