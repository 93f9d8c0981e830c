"""What the generation report measures, read from each stage's folder: held-out perplexity (causal LM) or BLEU and
chrF (translation), parameters, size on disk, prefill and decode speed at batch 1 and 8 (all models timed in the
same alternating rounds), peak memory, and assisted decoding of the teacher by the recipe's drafts."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer
from transformers.utils import logging

from hf_distill.compression.generation_runtime import deployed_size, load_generation_model
from hf_distill.reporting.decoding import measure_decoding, peak_memory_mib
from hf_distill.reporting.latency import time_alternately
from hf_distill.tasks.compression.generation_data import GenerationData, ids_for

logger = logging.get_logger(__name__)

BATCHES = (1, 8)
# Translation speed: this many consecutive batches of test sources, each translated to its end.
SPEED_BATCHES = 4


def _tokenizer(path: Path) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def relative(path: Path, root: Path) -> str:
    return os.path.relpath(path, root) if path.is_relative_to(root) else str(path)


def perplexity(model: Any, tokenizer: Any, texts: Sequence[str], teacher_positions: int) -> float:
    """exp(-(sum of the model's log-likelihood of every chunk, under its own tokenization) / the teacher's scored
    positions): the usual perplexity for the teacher's tokenizer, comparable across vocabularies."""
    blocks = [tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] for text in texts]
    total, _ = model.log_likelihood([block for block in blocks if len(block) > 1])
    return math.exp(-total / teacher_positions)


def measure_lm_stages(
    data: GenerationData,
    paths: Mapping[str, Path],
    output_dir: Path,
    *,
    threads: int,
    repeats: int,
    memory: bool = True,
) -> dict[str, dict[str, Any]]:
    """name -> entry (name, path, runtime, value = perplexity, params, size_bytes, speed {1, 8}, memory)."""
    teacher_tokenizer = data.tokenizer()
    texts = data.eval_texts()
    positions = sum(
        max(len(teacher_tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"]) - 1, 0)
        for t in texts
    )
    prompts = data.prompt_ids()
    models, prompt_ids, entries = {}, {}, {}
    for name, path in paths.items():
        print(f"[report] {name}: perplexity on {len(texts)} held-out chunks")
        model = load_generation_model(path, num_threads=threads)
        tokenizer = _tokenizer(path)
        models[name] = model
        prompt_ids[name] = [ids_for(tokenizer, teacher_tokenizer, prompt) for prompt in prompts]
        entries[name] = {
            "name": name,
            "path": relative(path, output_dir),
            "runtime": model.runtime,
            "value": perplexity(model, tokenizer, texts, positions),
            "params": model.params,
            "size_bytes": deployed_size(path),
        }
    print(f"[report] timing {len(models)} models alternately at batch 1 and 8, {threads} threads")
    speeds = measure_decoding(
        models, prompt_ids, batch_sizes=BATCHES, new_tokens=data.new_tokens, repeats=repeats
    )
    for name, entry in entries.items():
        entry["speed"] = {batch: speed.to_dict() for batch, speed in speeds[name].items()}
        if memory:
            entry["memory"] = peak_memory_mib(
                load_generation_model,
                paths[name],
                prompt_ids[name][: max(BATCHES)],
                data.new_tokens,
                num_threads=threads,
            )
    return entries


# --------------------------------------------------------------------------------------------- translation
def _corpus_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    import sacrebleu

    return {
        "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
        "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
    }


def measure_translation_stages(
    data: GenerationData,
    paths: Mapping[str, Path],
    output_dir: Path,
    *,
    threads: int,
    repeats: int,
    memory: bool = False,
) -> dict[str, dict[str, Any]]:
    """name -> entry with BLEU (greedy, sacrebleu) on the first `eval_blocks` test pairs, and speed: translating
    SPEED_BATCHES consecutive batches of 1 and of 8 test sources greedily to their end, generated tokens per second
    (time to first token apart) and sentences per second (everything included)."""
    pairs = data.pairs["test"][: data.eval_blocks]
    sources, references = [s for s, _ in pairs], [t for _, t in pairs]
    models, source_ids, entries = {}, {}, {}
    for name, path in paths.items():
        print(f"[report] {name}: BLEU on {len(pairs)} test pairs")
        model = load_generation_model(path, num_threads=threads)
        tokenizer = _tokenizer(path)
        models[name] = model
        encoded = [
            tokenizer(text, truncation=True, max_length=data.block_size)["input_ids"] for text in sources
        ]
        source_ids[name] = encoded
        hypotheses = []
        for start in range(0, len(encoded), 16):
            outputs = model.translate(encoded[start : start + 16], max_new_tokens=2 * data.block_size)
            hypotheses += tokenizer.batch_decode(outputs, skip_special_tokens=True)
        scores = _corpus_scores(hypotheses, references)
        entries[name] = {
            "name": name, "path": relative(path, output_dir), "runtime": model.runtime, "value": scores["bleu"],
            "chrf": scores["chrf"], "params": model.params, "size_bytes": deployed_size(path), "speed": {},
        }  # fmt: skip
    for batch in BATCHES:
        runners, produced, timed = {}, {}, {}
        for name, model in models.items():
            timed_rows = source_ids[name][: SPEED_BATCHES * batch]  # fewer where the test split is smaller
            chunks = [timed_rows[start : start + batch] for start in range(0, len(timed_rows), batch)]
            timed[name] = (len(timed_rows), len(chunks))
            produced[name] = sum(
                len(out)
                for rows in chunks
                for out in model.translate(rows, max_new_tokens=2 * data.block_size)
            )
            runners[f"{name}/first"] = lambda model=model, rows=chunks[0]: model.translate(
                rows, max_new_tokens=1
            )
            runners[f"{name}/all"] = lambda model=model, chunks=chunks: [
                model.translate(rows, max_new_tokens=2 * data.block_size) for rows in chunks
            ]
        timings = time_alternately(runners, repeats=repeats, warmup=1)
        for name in models:
            first, whole = timings[f"{name}/first"], timings[f"{name}/all"]
            source_tokens = sum(len(row) for row in source_ids[name][:batch])
            sentences, calls = timed[name]
            decode_ms = max(whole.median_ms - calls * first.median_ms, 1e-9)
            entries[name]["speed"][batch] = {
                "batch": batch, "sentences": sentences, "ttft_ms": first.median_ms, "generate_ms": whole.median_ms,
                "prefill_tokens_per_s": source_tokens * 1000.0 / first.median_ms,
                "decode_tokens_per_s": max(produced[name] - sentences, 1) * 1000.0 / decode_ms,
                "sentences_per_s": sentences * 1000.0 / whole.median_ms, "wide": first.wide or whole.wide,
            }  # fmt: skip
    if memory:
        for name, entry in entries.items():
            entry["memory"] = peak_memory_mib(
                load_generation_model, paths[name], source_ids[name][: max(BATCHES)], 2 * data.block_size,
                num_threads=threads,
            )  # fmt: skip
    return entries


# --------------------------------------------------------------------------------------------- assisted
def measure_assisted(
    teacher_dir: Path,
    drafts: Mapping[str, Path],
    prompts: Sequence[Sequence[int]],
    new_tokens: int,
    output_dir: Path,
    *,
    num_assistant_tokens: int,
    schedule: str,
    repeats: int,
    confidence_threshold: float | None = None,
    draft_quantization: str | None = None,
) -> dict[str, dict[str, Any]]:
    """For each draft (quantized at load time as `draft_quantization` says): acceptance rate, the teacher's greedy
    tokens/s (batch 1, PyTorch) with and without it timed in the same rounds, whether the tokens are identical, and
    the per-token costs of teacher and draft alone."""
    from transformers import AutoModelForCausalLM

    from hf_distill.compression.assisted import (
        UNIVERSAL,
        assisted_generate,
        check_assistable,
        load_draft,
    )

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    teacher_tokenizer = _tokenizer(teacher_dir)
    inputs = [torch.tensor([list(prompt)]) for prompt in prompts]
    reference = [assisted_generate(teacher, None, ids, new_tokens)[0] for ids in inputs]
    loaded, modes = {}, {}
    for name, path in drafts.items():
        draft = load_draft(path, draft_quantization)
        draft_tokenizer = _tokenizer(path)
        modes[name] = check_assistable(teacher.config, teacher_tokenizer, draft.config, draft_tokenizer)
        extra = {}
        if modes[name] == UNIVERSAL:
            extra = {"tokenizer": teacher_tokenizer, "assistant_tokenizer": draft_tokenizer}
        loaded[name] = (draft, extra, draft_tokenizer)

    def run(draft: Any | None, extra: dict[str, Any]) -> list[Any]:
        return [
            assisted_generate(
                teacher,
                draft,
                ids,
                new_tokens,
                num_assistant_tokens=num_assistant_tokens,
                schedule=schedule,
                confidence_threshold=confidence_threshold,
                **extra,
            )
            for ids in inputs
        ]

    runners = {"teacher": lambda: run(None, {})}
    for name, (draft, extra, draft_tokenizer) in loaded.items():
        runners[f"assisted/{name}"] = lambda draft=draft, extra=extra: run(draft, extra)
        draft_inputs = [torch.tensor([ids_for(draft_tokenizer, teacher_tokenizer, list(p))]) for p in prompts]
        runners[f"draft/{name}"] = lambda draft=draft, rows=draft_inputs: [
            assisted_generate(draft, None, ids, new_tokens) for ids in rows
        ]
    timings = time_alternately(runners, repeats=repeats, warmup=1)
    tokens = len(prompts) * new_tokens
    teacher_rate = tokens * 1000.0 / timings["teacher"].median_ms
    results = {}
    for name, (draft, extra, _) in loaded.items():
        outputs = run(draft, extra)
        identical = all(torch.equal(out, ref) for (out, _), ref in zip(outputs, reference))
        counts = outputs[0][1]
        for _, more in outputs[1:]:
            counts.add(more)
        assisted_rate = tokens * 1000.0 / timings[f"assisted/{name}"].median_ms
        results[name] = {
            "draft_path": relative(drafts[name], output_dir),
            "mode": modes[name],
            "acceptance_rate": counts.acceptance_rate,
            **{k: v for k, v in counts.to_dict().items() if k != "acceptance_rate"},
            "teacher_tokens_per_s": teacher_rate,
            "assisted_tokens_per_s": assisted_rate,
            "speedup": assisted_rate / teacher_rate,
            "identical": identical,
            "teacher_ms_per_token": timings["teacher"].median_ms / tokens,
            "draft_ms_per_token": timings[f"draft/{name}"].median_ms / tokens,
            "num_assistant_tokens": num_assistant_tokens,
            "draft_quantization": draft_quantization,
            "schedule": schedule,
            "confidence_threshold": confidence_threshold,
            "prompts": len(prompts),
            "new_tokens": new_tokens,
            "timing_wide": timings[f"assisted/{name}"].wide or timings["teacher"].wide,
        }
    return results
