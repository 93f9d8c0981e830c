"""Does Deep Mutual Learning beat the same students trained independently for the same steps? BBC News, CPU.

Two 1-layer peers cut from the demo's all-MiniLM-L6-v2 (its layer 0 and its layer 3, fresh heads seeded per run)
are trained (a) each on its own with the task loss (cross-entropy) and (b) together with `MutualLearningTrainer`
(each: (1 - alpha) * CE + alpha * KL towards the other's prediction, T = 1 as in the paper, alpha = 0.5), for the
same number of steps from the same initialisations. No pretrained teacher is used. Printed: each peer's test
accuracy, mean ± std over seeds; JSON in benchmarks/results/bench_mutual.json (or --output) and a PNG beside it
(accuracy per peer and setting, std error bars).

    python benchmarks/bench_mutual.py [--seeds 3]     # ~10 min on 2 CPU cores
    python benchmarks/bench_mutual.py --smoke          # seconds: checks the script only
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
from transformers import DataCollatorWithPadding  # noqa: E402

from hf_distill.mutual import MutualLearningTrainer  # noqa: E402

PEER_LAYERS = ([0], [3])
TEMPERATURE, ALPHA = 1.0, 0.5


def main() -> dict:
    args = _bbc.parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(args.threads)
    machine = _evidence.machine()  # with the load average before the run
    sizes = _bbc.SMOKE if args.smoke else _bbc.REAL
    steps = 2 if args.smoke else 2 * sizes.train // sizes.batch_size  # two epochs
    clock = _bbc.Clock()
    data = _bbc.bbc_subset(sizes)
    topics, tok = data["topics"], _bbc.tokenizer()
    train = _bbc.encode(tok, *data["train"], sizes.max_seq_length)
    test = _bbc.encode(tok, *data["test"], sizes.max_seq_length)
    work = f"{args.work_dir}/{'smoke' if args.smoke else 'real'}/runs"

    def peers(seed: int) -> list:
        return [
            _bbc.minilm_classifier(topics, layers, seed=100 * seed + i)
            for i, layers in enumerate(PEER_LAYERS)
        ]

    results: dict[str, list[float]] = {}
    for seed in range(args.seeds):
        for index, peer in enumerate(peers(seed)):
            _bbc.fine_tune(
                peer,
                train,
                tok,
                f"{work}/alone_{index}_{seed}",
                seed,
                sizes,
                max_steps=steps,
                lr=_bbc.STUDENT_LR,
            )
            score = _bbc.accuracy(_bbc.predict_logits(peer, test, tok), data["test"][1])
            results.setdefault(f"peer {index} (layer {PEER_LAYERS[index][0]}) alone", []).append(score)
        together = peers(seed)
        trainer = MutualLearningTrainer(
            together,
            _bbc.training_args(
                f"{work}/mutual_{seed}",
                seed,
                sizes,
                max_steps=steps,
                lr=_bbc.STUDENT_LR,
                temperature=TEMPERATURE,
                alpha=ALPHA,
            ),
            train_dataset=train,
            processing_class=tok,
            data_collator=DataCollatorWithPadding(tok),
        )
        trainer.train()
        for index, peer in enumerate(together):
            score = _bbc.accuracy(_bbc.predict_logits(peer, test, tok), data["test"][1])
            results.setdefault(f"peer {index} (layer {PEER_LAYERS[index][0]}) mutual", []).append(score)

    print(f"\nBBC News subset: {sizes.train} train / {sizes.test} test articles, {sizes.max_seq_length} tokens, "
          f"{steps} steps of batch {sizes.batch_size} for every peer, {args.seeds} seeds")  # fmt: skip
    print("| 1-layer peer | test acc mean ± std | per seed |\n|---|---:|---|")
    for name, values in results.items():
        print(f"| {name} | {_bbc.mean_std(values)} | {', '.join(f'{v:.4f}' for v in values)} |")
    print(f"\nTotal {clock.seconds():.0f} s")
    summary = {
        "sizes": vars(sizes),
        "steps": steps,
        "temperature": TEMPERATURE,
        "alpha": ALPHA,
        "accuracy": results,
        "seconds": clock.seconds(),
        "smoke": args.smoke,
        "command": _evidence.command(),
        "machine": machine | {"load_average_at_end": list(os.getloadavg())},
    }
    json_path = _bbc.write_results("bench_mutual" + ("_smoke" if args.smoke else ""), args.output, summary)
    print("JSON:", json_path)
    stats = {name: _plot.mean_and_std(values) for name, values in results.items()}
    png = _plot.bar_chart(
        Path(json_path).with_suffix(".png"),
        f"BBC News: 1-layer peers alone or by mutual learning ({args.seeds} seed(s), bars: std)"
        + (" [smoke]" if args.smoke else ""),
        list(results),
        [mean for mean, _ in stats.values()],
        "test accuracy",
        [spread for _, spread in stats.values()],
    )
    print("PNG:", png)
    return summary


if __name__ == "__main__":
    main()
