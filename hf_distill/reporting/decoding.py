"""Generation speed, measured the same way for every runtime: time to first token, prefill and decode tokens per
second at fixed prompts and lengths, greedy, models timed alternately (`latency.time_alternately`), and the peak
memory of one generation in a process of its own.

A model is anything with `generate(prompts, max_new_tokens) -> new ids` that produces exactly `max_new_tokens` per
row (`hf_distill.compression.generation_runtime` gives one per runtime). For a batch of B prompts of P tokens:

- time to first token (TTFT) = the median time of `generate(prompts, 1)`: the prompt's forward pass and one token;
- prefill tokens/s = B * P / TTFT;
- decode tokens/s = B * (N - 1) / (T(N) - TTFT) with T(N) the median time of `generate(prompts, N)`: the tokens
  produced after the first, over the time they took, so that a long prompt does not flatter or hide decoding.

A call shorter than `min_sample_ms` (a tiny model, a fast runtime) is repeated inside each timed sample, the same
number of times for both of a model's runners, and the sample divided by that count: otherwise the timer's
resolution and per-call jitter swamp the difference T(N) - TTFT, which can then come out negative.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hf_distill.reporting.latency import Timing, summarize, time_alternately

__all__ = ["DecodingSpeed", "measure_decoding", "peak_memory_mib"]


@dataclass(frozen=True)
class DecodingSpeed:
    """One model at one batch size (medians of alternating rounds; spreads are (p90 - p10) / median)."""

    batch: int
    prompt_tokens: int
    new_tokens: int
    ttft_ms: float
    generate_ms: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float | None
    ttft_spread: float
    generate_spread: float
    wide: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _speed(batch: int, prompt_tokens: int, new_tokens: int, first: Timing, whole: Timing) -> DecodingSpeed:
    decode_ms = whole.median_ms - first.median_ms
    # a model so fast that the whole generation is not measurably longer than its first token: no decode figure
    decode = batch * (new_tokens - 1) * 1000.0 / decode_ms if decode_ms > 0 else None
    return DecodingSpeed(
        batch=batch,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        ttft_ms=first.median_ms,
        generate_ms=whole.median_ms,
        prefill_tokens_per_s=batch * prompt_tokens * 1000.0 / first.median_ms,
        decode_tokens_per_s=decode,
        ttft_spread=first.spread,
        generate_spread=whole.spread,
        wide=first.wide or whole.wide or decode is None,
    )


def _calls_per_sample(runner: Callable[[], Any], min_sample_ms: float) -> int:
    """How many calls of `runner` one timed sample needs to last at least `min_sample_ms` (one warm-up call, one
    timed call, through `time_alternately` so that an injected clock applies here too)."""
    once_ms = time_alternately({"probe": runner}, repeats=1, warmup=1)["probe"].median_ms
    return max(1, min(1000, math.ceil(min_sample_ms / max(once_ms, 1e-6))))


def _repeated(runner: Callable[[], Any], calls: int) -> Callable[[], Any]:
    if calls == 1:
        return runner
    return lambda: [runner() for _ in range(calls)]


def _per_call(timing: Timing, calls: int) -> Timing:
    if calls == 1:
        return timing
    return summarize([sample / calls for sample in timing.samples_ms])


def measure_decoding(
    models: Mapping[str, Any],
    prompts: Sequence[Sequence[int]] | Mapping[str, Sequence[Sequence[int]]],
    *,
    batch_sizes: Sequence[int] = (1, 8),
    new_tokens: int = 64,
    repeats: int = 5,
    warmup: int = 1,
    min_sample_ms: float = 10.0,
) -> dict[str, dict[int, DecodingSpeed]]:
    """name -> batch size -> DecodingSpeed, every model timed in the same rounds.

    prompts: at least max(batch_sizes) prompts of one length (token ids), or such prompts per model name (the same
    text under each model's own vocabulary); batch b uses the first b. min_sample_ms: a model whose first-token call
    is shorter is called that many times more per sample (see the module's docstring)."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens={new_tokens}: decode speed needs at least 2 new tokens.")
    by_model = prompts if isinstance(prompts, Mapping) else {name: prompts for name in models}
    lengths = {len(prompt) for rows in by_model.values() for prompt in rows}
    if len(lengths) != 1:
        raise ValueError(f"the prompts must have one length (no padding), got lengths {sorted(lengths)}.")
    if min(len(rows) for rows in by_model.values()) < max(batch_sizes):
        raise ValueError(f"fewer prompts than a batch of {max(batch_sizes)}; give at least that many.")
    (prompt_tokens,) = lengths
    results: dict[str, dict[int, DecodingSpeed]] = {name: {} for name in models}
    for batch in batch_sizes:
        runners: dict[str, Callable[[], Any]] = {}
        calls: dict[str, int] = {}
        for name, model in models.items():
            rows = [list(prompt) for prompt in by_model[name][:batch]]
            first = lambda model=model, rows=rows: model.generate(rows, 1)  # noqa: E731
            calls[name] = _calls_per_sample(first, min_sample_ms)
            runners[f"{name}/first"] = _repeated(first, calls[name])
            runners[f"{name}/all"] = _repeated(
                lambda model=model, rows=rows: model.generate(rows, new_tokens), calls[name]
            )
        timings = time_alternately(runners, repeats=repeats, warmup=warmup)
        for name in models:
            results[name][batch] = _speed(
                batch,
                prompt_tokens,
                new_tokens,
                _per_call(timings[f"{name}/first"], calls[name]),
                _per_call(timings[f"{name}/all"], calls[name]),
            )
    return results


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _measure_in_child(
    loader: Callable[..., Any], folder: str, prompts: list[list[int]], new_tokens: int, threads: int | None
) -> dict[str, float]:
    """Runs in a fresh process: load the model, generate once; peak RSS above the RSS after the imports."""
    started = _rss_mib("VmRSS")
    began = time.perf_counter()
    model = loader(folder, num_threads=threads)
    model.generate(prompts, new_tokens)
    return {
        "peak_rss_mib": _rss_mib("VmHWM"),
        "start_rss_mib": started,
        "peak_above_start_mib": _rss_mib("VmHWM") - started,
        "seconds": time.perf_counter() - began,
    }


def peak_memory_mib(
    loader: Callable[..., Any],
    folder: str | os.PathLike,
    prompts: Sequence[Sequence[int]],
    new_tokens: int,
    *,
    num_threads: int | None = None,
) -> dict[str, float]:
    """Peak resident memory of loading `folder` with `loader(folder, num_threads=...)` and generating once, in a
    spawned process (nothing else of this process counts): `peak_rss_mib` (the process's high-water mark, the
    imported libraries included) and `peak_above_start_mib` (above the RSS once the libraries are imported).
    `loader` must be importable by name (a module-level function or class)."""
    # An executor, not a Pool: a child that dies raises here instead of being replaced over and over.
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as executor:
        future = executor.submit(
            _measure_in_child, loader, str(folder), [list(p) for p in prompts], new_tokens, num_threads
        )
        return future.result()
