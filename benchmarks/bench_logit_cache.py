"""Does training from a teacher logits cache cost more than training the student alone?

One epoch of a small causal LM (Llama, hidden 128, 2 layers, a few-thousand-word vocabulary, blocks of 128
tokens) two ways, on the same packed blocks, batches and initial weights:
- plain: `transformers.Trainer` on the hard labels (the student alone);
- cache: `DistillationTrainer` with `teacher_logits_cache` (no teacher in memory; (1 - alpha) * CE + alpha *
  sparse top-k KD), its batches carrying the cached top-k columns read from disk.
The cache is built first (its build time is printed but not part of the comparison). The two variants
alternate (plain, cache, plain, cache, ...) so machine noise hits both alike; the median epoch time of each is
compared. Target: cache epoch <= 1.10x plain epoch. A second table splits one step's time between the
student itself, its CE and the sparse KD loss, apart and in the one shared pass over the logits that the cache
run uses (`sparse_distillation_and_cross_entropy`), to show where a difference comes from.

    python benchmarks/bench_logit_cache.py [--repeats 3] [--blocks 256] [--vocab 4000] [--top_k 64] [--temperature 2]
        [--student_hidden 128] [--student_layers 2] [--output results.json]
    python benchmarks/bench_logit_cache.py --smoke   # seconds: tiny vocabulary, models and data; checks the script

Writes benchmarks/results/bench_logit_cache.json (with --smoke: bench_logit_cache_smoke.json; --output: elsewhere)
and a PNG beside it: the epoch times of the two variants and the one-step breakdown.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments
from transformers.utils import logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _evidence  # noqa: E402
import _plot  # noqa: E402

try:
    from hf_distill.tasks import lm
except ImportError:  # a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hf_distill.tasks import lm

from hf_distill import DistillationTrainer, DistillationTrainingArguments  # noqa: E402
from hf_distill.caches.format import INDICES_COLUMN, LOGPROBS_COLUMN, TAIL_COLUMN  # noqa: E402
from hf_distill.caches.topk import build_logit_cache, load_logit_cache  # noqa: E402
from hf_distill.losses import sparse_distillation_and_cross_entropy, sparse_distillation_loss  # noqa: E402

TARGET = 1.10
NAME = "bench_logit_cache"
TEACHER_HIDDEN, TEACHER_LAYERS = 256, 4
SMOKE_TEACHER_HIDDEN, SMOKE_TEACHER_LAYERS = 64, 2
SHORT_BREAKDOWN = ("student fwd+bwd (CE)", "CE alone", "sparse KD alone", "CE + KD, one pass")


def make_tokenizer(num_words: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over w0 ... w{num_words-1} with bos/eos/pad."""
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(num_words)])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=1024,
    )


def make_texts(num_words: int, num_tokens: int, seed: int = 0) -> list[str]:
    """Zipf-distributed words in lines of 20 to 80, about `num_tokens` words in all."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(num_words)]
    words = [f"w{i}" for i in range(num_words)]
    texts, total = [], 0
    while total < num_tokens:
        length = rng.randint(20, 80)
        texts.append(" ".join(rng.choices(words, weights=weights, k=length)))
        total += length + 1
    return texts


def llama(vocab_size: int, hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def training_args(cls, output_dir: str, batch_size: int, **extra):
    return cls(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        num_train_epochs=1,
        learning_rate=1e-3,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        **extra,
    )


def median_ms(run, repeats: int = 5) -> float:
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        timings.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(timings)


def step_breakdown(student, batch, temperature: float) -> dict[str, float]:
    """Where a cache step's time goes, on one batch: the student's forward + backward with its CE, and the CE
    and the sparse KD loss alone (forward + backward on fixed logits)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["labels"][:, 1:]
    mask = labels.ne(-100)
    logprobs, indices = batch[LOGPROBS_COLUMN][:, :-1], batch[INDICES_COLUMN][:, :-1]
    # the cache's remaining mass, tempered at `temperature` as the cache run uses it
    tail = {"teacher_tail_logmass": batch[TAIL_COLUMN][:, :-1], "tail_temperature": temperature}

    def student_step():
        student.zero_grad(set_to_none=True)
        logits = student(**inputs).logits[:, :-1]
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)).backward()

    with torch.no_grad():
        fixed_logits = student(**inputs).logits[:, :-1].float()

    def ce_only():
        logits = fixed_logits.clone().requires_grad_()
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).backward()

    def kd_only():
        logits = fixed_logits.clone().requires_grad_()
        sparse_distillation_loss(
            logits, logprobs, indices, temperature=temperature, mask=mask, reduction="sum", **tail
        ).backward()

    def ce_and_kd():
        logits = fixed_logits.clone().requires_grad_()
        kd, ce = sparse_distillation_and_cross_entropy(
            logits, logprobs, indices, labels, temperature=temperature, mask=mask, reduction="sum", **tail
        )
        (kd + ce).backward()

    return {
        "student forward + backward (CE)": median_ms(student_step),
        "CE alone, forward + backward": median_ms(ce_only),
        "sparse KD alone, forward + backward": median_ms(kd_only),
        "CE + sparse KD in one pass (the cache run's loss)": median_ms(ce_and_kd),
    }


def epoch_seconds(trainer) -> float:
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def plot(path: Path, timings: dict[str, list[float]], breakdown: dict[str, float], title: str) -> Path:
    """Left: median epoch time of the student alone and of the cache run (error bars: std over repeats); right:
    one batch's time split between the student and its losses."""
    figure, (epochs, step) = _plot.new_figure(2, width=5.5)
    stats = {name: _plot.mean_and_std(values) for name, values in timings.items()}
    _plot.draw_bars(
        epochs,
        ["student alone (Trainer)", "from the cache (KD)"],
        {"median epoch (s)": [statistics.median(timings[name]) for name in ("plain", "cache")]},
        "s per epoch (median; bars: std over repeats)",
        {"median epoch (s)": [stats[name][1] for name in ("plain", "cache")]},
        title="one epoch",
    )
    _plot.draw_bars(
        step,
        list(SHORT_BREAKDOWN),
        {"ms": list(breakdown.values())},
        "ms per batch (median of 5)",
        title="one batch, forward + backward",
    )
    figure.suptitle(title, fontsize=11)
    return _plot.save_png(figure, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=4000, help="words in the tokenizer")
    parser.add_argument("--blocks", type=int, default=256, help="training blocks (one epoch)")
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--top_k", type=int, default=64)
    parser.add_argument("--student_hidden", type=int, default=128)
    parser.add_argument("--student_layers", type=int, default=2)
    parser.add_argument("--logprobs_dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--temperature", type=float, default=2.0, help="KD temperature of the cache run")
    parser.add_argument("--alpha", type=float, default=0.5, help="KD weight of the cache run")
    parser.add_argument("--repeats", type=int, default=3, help="epochs of each variant, alternating")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="seconds: vocabulary 200, 8 blocks of 32, a 1-layer student and a small teacher, one repeat",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="JSON results file (default benchmarks/results/bench_logit_cache.json, _smoke.json with --smoke); "
        "the PNG goes beside it",
    )
    options = parser.parse_args(argv)
    teacher_hidden, teacher_layers = TEACHER_HIDDEN, TEACHER_LAYERS
    if options.smoke:
        options.vocab, options.blocks, options.block_size, options.batch_size = 200, 8, 32, 4
        options.top_k, options.student_hidden, options.student_layers, options.repeats = 8, 32, 1, 1
        teacher_hidden, teacher_layers = SMOKE_TEACHER_HIDDEN, SMOKE_TEACHER_LAYERS
    logging.set_verbosity_error()
    if options.threads:
        torch.set_num_threads(options.threads)
    machine = _evidence.machine()  # with the load average before the run

    tokenizer = make_tokenizer(options.vocab)
    data_args = lm.DataArguments(train_file="unused.txt", block_size=options.block_size)
    raw = DatasetDict(
        {
            "train": Dataset.from_dict(
                {"text": make_texts(options.vocab, options.blocks * (options.block_size + 2))}
            )
        }
    )
    data_format = lm.DataFormat(lm.TEXT, ("text",))
    train = lm.preprocess(raw, data_format, tokenizer, options.block_size, data_args)["train"]
    train = train.select(range(min(options.blocks, len(train))))
    collator = lm.CausalLMCollator(tokenizer.pad_token_id)
    vocab = len(tokenizer)

    with tempfile.TemporaryDirectory() as workdir:
        teacher = llama(vocab, hidden=teacher_hidden, layers=teacher_layers, seed=1).eval()
        start = time.perf_counter()
        build_logit_cache(
            teacher,
            train,
            Path(workdir) / "cache",
            tokenizer=tokenizer,
            teacher_name="bench-teacher",
            block_size=options.block_size,
            temperature=options.temperature,
            top_k=options.top_k,
            logprobs_dtype=options.logprobs_dtype,
        )
        build_seconds = time.perf_counter() - start
        del teacher
        cached_train, manifest = load_logit_cache(
            Path(workdir) / "cache",
            train,
            tokenizer=tokenizer,
            block_size=options.block_size,
            temperature=options.temperature,
        )
        plain_train = train.with_format("numpy")  # the same row format as the cached dataset
        student = llama(vocab, hidden=options.student_hidden, layers=options.student_layers, seed=0)

        timings: dict[str, list[float]] = {"plain": [], "cache": []}
        for _ in range(options.repeats):
            plain = Trainer(
                model=copy.deepcopy(student),
                args=training_args(TrainingArguments, workdir + "/plain", options.batch_size),
                train_dataset=plain_train,
                data_collator=collator,
            )
            timings["plain"].append(epoch_seconds(plain))
            cache = DistillationTrainer(
                model=copy.deepcopy(student),
                teacher_model=None,
                args=training_args(
                    DistillationTrainingArguments,
                    workdir + "/cache_run",
                    options.batch_size,
                    teacher_logits_cache=str(Path(workdir) / "cache"),
                    temperature=options.temperature,
                    alpha=options.alpha,
                ),
                train_dataset=cached_train,
                data_collator=collator,
                processing_class=tokenizer,
            )
            timings["cache"].append(epoch_seconds(cache))
        breakdown = step_breakdown(
            copy.deepcopy(student),
            collator([cached_train[i] for i in range(options.batch_size)]),
            options.temperature,
        )

    tokens = len(train) * options.block_size
    print(
        f"\nstudent: Llama hidden {options.student_hidden}, {options.student_layers} layers, vocab {vocab}; "
        f"{len(train)} blocks x {options.block_size} tokens; "
        f"batch {options.batch_size}; cache top-{manifest['top_k']} {manifest['logprobs_dtype']}; "
        f"KD temperature {options.temperature}, alpha {options.alpha}; "
        f"torch threads {torch.get_num_threads()}"
    )
    print(
        f"cache build (teacher hidden {teacher_hidden}, {teacher_layers} layers): {build_seconds:.2f} s "
        f"({tokens / build_seconds:,.0f} tokens/s)\n"
    )
    print("| variant | epochs (s) | median epoch (s) | tokens/s |")
    print("|---|---|---:|---:|")
    medians = {}
    for name, values in timings.items():
        medians[name] = statistics.median(values)
        listed = ", ".join(f"{value:.2f}" for value in values)
        print(f"| {name} | {listed} | {medians[name]:.2f} | {tokens / medians[name]:,.0f} |")
    print(f"\n| one batch of {options.batch_size} x {options.block_size} (median of 5) | ms |")
    print("|---|---:|")
    for name, milliseconds in breakdown.items():
        print(f"| {name} | {milliseconds:.1f} |")
    ratio = medians["cache"] / medians["plain"]
    verdict = "PASS" if ratio <= TARGET else "FAIL"
    print(f"\ncache / plain epoch time: {ratio:.3f}x (target <= {TARGET:.2f}x): {verdict}")

    results = {
        "question": __doc__.splitlines()[0],
        "command": _evidence.command(),
        "machine": machine,
        "smoke": options.smoke,
        "settings": {key: value for key, value in vars(options).items() if key != "output"}
        | {"teacher_hidden": teacher_hidden, "teacher_layers": teacher_layers, "vocab_size": vocab},
        "cache": {
            "top_k": manifest["top_k"],
            "logprobs_dtype": manifest["logprobs_dtype"],
            "build_seconds": build_seconds,
        },
        "blocks": len(train),
        "tokens_per_epoch": tokens,
        "epoch_seconds": timings,
        "median_epoch_seconds": medians,
        "tokens_per_second": {name: tokens / value for name, value in medians.items()},
        "step_breakdown_ms": breakdown,
        "cache_over_plain": ratio,
        "target": TARGET,
        "verdict": verdict,
        "torch_threads": torch.get_num_threads(),
    }
    json_path = (
        Path(options.output) if options.output else _evidence.results_path(None, NAME, options.smoke, "json")
    )
    json_path.parent.mkdir(parents=True, exist_ok=True)
    _evidence.write_json(json_path, results)
    png = plot(
        json_path.with_suffix(".png"),
        timings,
        breakdown,
        f"Epoch from a top-{manifest['top_k']} logits cache vs the student alone: {ratio:.2f}x "
        f"(target <= {TARGET:.2f}x){' [smoke]' if options.smoke else ''}",
    )
    print(f"JSON: {json_path}\nPNG: {png}")
    return results


if __name__ == "__main__":
    main()
