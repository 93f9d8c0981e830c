"""Few labels, more text: does KD on a transfer set and augmented text help? BBC News, CPU.

Of the training subset only a fraction keeps its labels (5% and 20%); the rest is unlabelled transfer text. Per
fraction, a 3-layer teacher cut from all-MiniLM-L6-v2 (layers 0,2,4) is fine-tuned on the labelled part, and a
1-layer student (MiniLM's layer 0, a fresh head) is trained, for the same number of steps from the same
initialisation, (a) on the labels alone, (b) with KD on the labelled part, (c) with KD on the labelled part, the
transfer text and augmented copies of the labelled texts (tasks/augmentation.py: embedding-neighbour word
replacement with the teacher's input embeddings, written once with a manifest), the hard loss on labelled rows only
(label -100 elsewhere). Printed: accuracy on the test split per fraction, mean ± std over seeds; JSON in
benchmarks/results/bench_transfer.json (or --output) and a PNG beside it (accuracy per setting and fraction, std
error bars).

    python benchmarks/bench_transfer.py [--seeds 3]     # ~10-15 min on 2 CPU cores
    python benchmarks/bench_transfer.py --smoke          # seconds: checks the script only
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import _bbc  # noqa: E402
import _evidence  # noqa: E402
import _plot  # noqa: E402
import torch  # noqa: E402
from transformers import DataCollatorWithPadding, set_seed  # noqa: E402

from hf_distill import DistillationTrainer  # noqa: E402
from hf_distill.tasks.classification import augmentation, transfer  # noqa: E402

FRACTIONS = (0.05, 0.2)
TEACHER_LAYERS = [0, 2, 4]
TEMPERATURE, ALPHA = 2.0, 0.5
AUGMENT_COPIES = 4


def main() -> dict:
    parser = _bbc.parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps of every student (default 2 epochs)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = _evidence.machine()  # with the load average before the run
    sizes = _bbc.SMOKE if args.smoke else _bbc.REAL
    steps = 2 if args.smoke else args.steps or 2 * sizes.train // sizes.batch_size
    clock = _bbc.Clock()
    data = _bbc.bbc_subset(sizes)
    topics, tok = data["topics"], _bbc.tokenizer()
    texts, labels = data["train"]
    test = _bbc.encode(tok, *data["test"], sizes.max_seq_length)
    work = f"{args.work_dir}/{'smoke' if args.smoke else 'real'}"
    collator = DataCollatorWithPadding(tok)

    table: dict[str, dict[str, list[float]]] = {}
    for fraction in FRACTIONS:
        order = list(range(len(texts)))
        random.Random(0).shuffle(order)
        count = max(int(round(fraction * len(texts))), len(topics))
        chosen, rest = sorted(order[:count]), sorted(order[count:])
        labelled = _bbc.encode(
            tok, [texts[i] for i in chosen], [labels[i] for i in chosen], sizes.max_seq_length
        )
        name = f"teacher_{''.join(map(str, TEACHER_LAYERS))}_{count}labels"

        def build(labelled=labelled, name=name):
            model = _bbc.minilm_classifier(topics, TEACHER_LAYERS, seed=0)
            return _bbc.fine_tune(
                model, labelled, tok, f"{work}/runs/{name}", 0, sizes, max_steps=steps, lr=_bbc.TEACHER_LR
            )

        teacher = _bbc.cached_teacher(work, name, build)
        row = table.setdefault(f"{fraction:.0%} labels ({count})", {})
        row["teacher"] = [_bbc.accuracy(_bbc.predict_logits(teacher, test, tok), data["test"][1])]
        unlabelled = transfer.unlabelled(
            _bbc.encode(tok, [texts[i] for i in rest], None, sizes.max_seq_length)
        )
        augmented_path = augmentation.augmented_file(
            [{"text": texts[i]} for i in chosen],
            ("text",),
            tok,
            teacher.get_input_embeddings().weight,
            f"{work}/augmented_{count}",
            copies=AUGMENT_COPIES,
            replace_prob=0.4,
            neighbours=15,
            max_tokens=sizes.max_seq_length,
            seed=0,
        )
        augmented_texts = augmented_path.read_text().splitlines()
        augmented = transfer.unlabelled(
            _bbc.encode(
                tok, [json.loads(line)["text"] for line in augmented_texts], None, sizes.max_seq_length
            )
        )
        mixed = transfer.mixed_training_set(labelled, [unlabelled, augmented], seed=0)

        for seed in range(args.seeds):
            student = _bbc.minilm_classifier(topics, [0], seed=100 + seed)
            _bbc.fine_tune(
                student,
                labelled,
                tok,
                f"{work}/runs/labels_{count}_{seed}",
                seed,
                sizes,
                max_steps=steps,
                lr=_bbc.STUDENT_LR,
            )
            row.setdefault("student, labels alone", []).append(
                _bbc.accuracy(_bbc.predict_logits(student, test, tok), data["test"][1])
            )
            for condition, train in (("student, KD on the labelled part", labelled),
                                     ("student, KD + transfer set + augmentation", mixed)):  # fmt: skip
                student = _bbc.minilm_classifier(topics, [0], seed=100 + seed)
                set_seed(seed)
                trainer = DistillationTrainer(
                    model=student,
                    teacher_model=teacher,
                    args=_bbc.training_args(
                        f"{work}/runs/kd_{count}_{seed}",
                        seed,
                        sizes,
                        max_steps=steps,
                        lr=_bbc.STUDENT_LR,
                        temperature=TEMPERATURE,
                        alpha=ALPHA,
                    ),  # fmt: skip
                    train_dataset=train,
                    processing_class=tok,
                    data_collator=collator,
                )
                trainer.train()
                row.setdefault(condition, []).append(
                    _bbc.accuracy(_bbc.predict_logits(student, test, tok), data["test"][1])
                )
        row["rows: labelled / transfer / augmented"] = [len(labelled), len(unlabelled), len(augmented)]

    print(f"\nBBC News subset: {sizes.train} train articles (a fraction labelled, the rest transfer text) / "
          f"{sizes.test} test, {sizes.max_seq_length} tokens, {steps} steps of batch {sizes.batch_size} for the "
          f"teacher and every student, {args.seeds} seeds, {AUGMENT_COPIES} augmented copies per labelled text")  # fmt: skip
    conditions = [c for c in next(iter(table.values())) if not c.startswith("rows")]
    print("| model (test acc) | " + " | ".join(table) + " |\n|---|" + "---:|" * len(table))
    for condition in conditions:
        cells = [_bbc.mean_std(table[fraction][condition]) for fraction in table]
        print(f"| {condition} | " + " | ".join(cells) + " |")
    print(f"\nTotal {clock.seconds():.0f} s")
    summary = {"sizes": vars(sizes), "steps": steps, "temperature": TEMPERATURE, "alpha": ALPHA,
               "augment_copies": AUGMENT_COPIES, "results": table, "seconds": clock.seconds(), "smoke": args.smoke}  # fmt: skip
    summary["command"] = _evidence.command()
    summary["machine"] = machine | {"load_average_at_end": list(os.getloadavg())}
    json_path = _bbc.write_results("bench_transfer" + ("_smoke" if args.smoke else ""), args.output, summary)
    print("JSON:", json_path)
    stats = {
        fraction: {condition: _plot.mean_and_std(table[fraction][condition]) for condition in conditions}
        for fraction in table
    }
    png = _plot.grouped_bar_chart(
        Path(json_path).with_suffix(".png"),
        f"BBC News, few labels: KD, transfer text and augmentation ({args.seeds} seed(s), bars: std)"
        + (" [smoke]" if args.smoke else ""),
        [condition.replace("student, ", "") for condition in conditions],
        {fraction: [stats[fraction][condition][0] for condition in conditions] for fraction in table},
        "test accuracy",
        {fraction: [stats[fraction][condition][1] for condition in conditions] for fraction in table},
    )
    print("PNG:", png)
    return summary


if __name__ == "__main__":
    main()
