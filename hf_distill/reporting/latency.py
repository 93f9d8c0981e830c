"""Latency timing that a busy machine distorts as little as possible: time the models alternately, repeat, report
medians with their spread, and flag a wide spread.

Timing model A for ten calls and then model B for ten lets a burst of background load (another job, a
compilation, a CPU frequency change) land on one of them and turn into a fake speed-up. `time_alternately` runs
rounds instead: each round calls every runner once, so a slow stretch of the machine slows all of them alike, and
the start of the round rotates (round r starts at runner r mod n) so no runner always runs right after the same
other one (warm caches, waking thread pools). Each runner's samples give its median and its 10th-90th percentile
range; spread = (p90 - p10) / median, and `wide` marks a spread above the threshold: the medians are then less
trustworthy, and reports say so.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["Timing", "batch_runner", "summarize", "time_alternately"]


@dataclass(frozen=True)
class Timing:
    """Summary of one runner's wall-clock samples, in milliseconds.

    low_ms / high_ms: 10th / 90th percentiles (linear interpolation between the sorted samples, as numpy's default);
    spread: (high_ms - low_ms) / median_ms; wide: spread above the threshold it was summarised with.
    """

    median_ms: float
    low_ms: float
    high_ms: float
    spread: float
    repeats: int
    wide: bool
    samples_ms: tuple[float, ...] = ()

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        values = asdict(self)
        if not samples:
            values.pop("samples_ms")
        else:
            values["samples_ms"] = list(self.samples_ms)
        return values


def _percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Linear interpolation between closest ranks (numpy's default method)."""
    position = fraction * (len(sorted_values) - 1)
    lower = int(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    return sorted_values[lower] + (sorted_values[upper] - sorted_values[lower]) * (position - lower)


def summarize(samples_ms: Sequence[float], *, wide_spread: float = 0.25) -> Timing:
    """Median, 10th-90th percentile range and spread of `samples_ms`."""
    if not samples_ms:
        raise ValueError("summarize needs at least one sample.")
    ordered = sorted(float(sample) for sample in samples_ms)
    median = statistics.median(ordered)
    low, high = _percentile(ordered, 0.1), _percentile(ordered, 0.9)
    spread = (high - low) / median if median > 0 else 0.0
    return Timing(
        median_ms=median,
        low_ms=low,
        high_ms=high,
        spread=spread,
        repeats=len(ordered),
        wide=spread > wide_spread,
        samples_ms=tuple(float(sample) for sample in samples_ms),
    )


def time_alternately(
    runners: Mapping[str, Callable[[], Any]],
    *,
    repeats: int = 10,
    warmup: int = 2,
    wide_spread: float = 0.25,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Timing]:
    """Time zero-argument callables in rounds; returns name -> Timing.

    `warmup` untimed rounds come first (lazy initialisation, thread pools, caches), then `repeats` timed rounds.
    Every round calls each runner once, in the order of `runners` rotated by the round's index (round r starts with
    runner r mod n; warm-up rounds count). `clock` returns seconds (injectable for tests). A runner that uses an
    asynchronous device must synchronise before it returns (`batch_runner` does).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}.")
    if not runners:
        raise ValueError("time_alternately needs at least one runner.")
    names = list(runners)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        start = round_index % len(names)
        for name in names[start:] + names[:start]:
            began = clock()
            runners[name]()
            elapsed_ms = (clock() - began) * 1000.0
            if round_index >= warmup:
                samples[name].append(elapsed_ms)
    return {name: summarize(samples[name], wide_spread=wide_spread) for name in names}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":
        torch.xpu.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def batch_runner(model_or_session: Any, batch: Mapping[str, Any]) -> Callable[[], Any]:
    """A zero-argument callable that runs one forward pass of `batch` (keyword inputs) through the model.

    - torch `nn.Module`: put in eval mode now (the caller restores the mode if it matters); the batch's tensors are
      moved to the model's device once; each call runs under `torch.inference_mode()` and synchronises the device.
    - `deployed.OnnxSequenceClassifier` (or anything with `.runner(batch)`): its own runner, inputs converted
      once.
    - `onnxruntime.InferenceSession`: `session.run` on int64 numpy versions of the inputs the graph takes.
    """
    if isinstance(model_or_session, torch.nn.Module):
        model = model_or_session.eval()
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        inputs = {
            name: value.to(device) if isinstance(value, torch.Tensor) else value
            for name, value in batch.items()
        }

        def run_torch():
            with torch.inference_mode():
                output = model(**inputs)
            _synchronize(device)
            return output

        return run_torch
    if hasattr(model_or_session, "runner"):
        return model_or_session.runner(batch)
    if hasattr(model_or_session, "get_inputs") and hasattr(model_or_session, "run"):
        import numpy as np

        session = model_or_session
        feed = {}
        for node in session.get_inputs():
            if node.name not in batch:
                raise ValueError(f"The ONNX session takes {node.name!r}; the batch has {sorted(batch)}.")
            value = batch[node.name]
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            feed[node.name] = np.asarray(value, dtype=np.int64)
        return lambda: session.run(None, feed)
    raise TypeError(
        f"batch_runner takes a torch nn.Module, an OnnxSequenceClassifier or an onnxruntime.InferenceSession; got "
        f"{type(model_or_session).__name__}."
    )
