"""Evaluation of a distilled model against its teacher: quality, size, latency, and a plot.

Task-agnostic: a recipe evaluates its models with its own metrics, then hands this module the metrics
and the models. The report is a plain dict (JSON-serialisable) so it can be written, rendered into the
model card and compared across runs.

Report layout::

    {
      "primary_metric": "accuracy", "greater_is_better": true, "reference": "teacher",
      "batch_sizes": [1, 32], ...metadata (task, split, device, sequence length...),
      "models": {
        "teacher": {"metrics": {...}, "primary": 0.97, "params": 22.7e6, "size_mb": 90.9,
                    "latency_ms": {"1": 9.1, "32": 310.0}, "throughput": {"1": 110.0, "32": 103.2},
                    "latency_low_ms": {"1": 8.8, ...}, "latency_high_ms": {"1": 9.9, ...},
                    "latency_spread": {"1": 0.12, ...}, "latency_wide": {"1": false, ...}, "latency_repeats": 10},
        "student": {..., "retained_pct": 99.1, "speedup": {"1": 2.7, "32": 2.9}, "compression": 1.45},
      }
    }

Latency: `profile_models` times all models alternately (hf_distill.reporting.latency.time_alternately: every round runs each
model once), so background load hits teacher and student alike; latency_ms is the median, latency_low_ms /
latency_high_ms the 10th / 90th percentiles, latency_spread (p90 - p10) / median, and latency_wide marks a spread
above 25%, which the markdown points out.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from hf_distill.reporting.latency import Timing, batch_runner, time_alternately
from hf_distill.storage.atomic import atomic_open, atomic_write_text

logger = logging.get_logger(__name__)

REPORT_JSON = "distill_report.json"
REPORT_MARKDOWN = "distill_report.md"
REPORT_PLOT = "distill_report.png"

# Files that hold weights; everything else in a model directory (configs, tokenizer, card) is not "size".
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_BYTES_PER_MB = 1e6
_ONNX_FILE = "model.onnx"
WIDE_SPREAD = 0.25  # latency spread ((p90 - p10) / median) above which the report warns
_LATENCY_FIELDS = ("latency_low_ms", "latency_high_ms", "latency_spread", "latency_wide")


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of `model`; tied weights (shared tensors) are counted once, and ZeRO-3 partitioned
    parameters at their full size."""
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():
        if trainable_only and not parameter.requires_grad:
            continue
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += getattr(parameter, "ds_numel", parameter.numel())
    return total


def size_on_disk_mb(model_or_dir: torch.nn.Module | str | os.PathLike) -> float:
    """Size of a model's weight files in megabytes (10**6 bytes).

    A directory is measured as it is (weight files only, not the tokenizer or configs; an ONNX folder's
    model.onnx and its external data); a model object is saved with `save_pretrained` (safetensors, its current
    dtype) into a temporary directory first, so models loaded from anywhere are measured the same way; a deployed
    ONNX model (`deployed.OnnxSequenceClassifier`) is measured in its folder.
    """
    onnx_folder = getattr(model_or_dir, "path", None) if hasattr(model_or_dir, "session") else None
    if onnx_folder is not None:
        model_or_dir = onnx_folder
    if isinstance(model_or_dir, (str, os.PathLike)):
        directory = Path(model_or_dir)
        if not directory.is_dir():
            raise ValueError(f"size_on_disk_mb expects a model directory, got {str(directory)!r}.")
        if (directory / _ONNX_FILE).is_file():
            from hf_distill.storage.sizes import size_on_disk

            return size_on_disk(directory) / _BYTES_PER_MB
        weight_files = [p for p in directory.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)]
        if not weight_files:
            raise ValueError(
                f"No weight files ({', '.join(_WEIGHT_SUFFIXES)}) in {str(directory)!r}; found "
                f"{sorted(p.name for p in directory.iterdir())}."
            )
        return sum(p.stat().st_size for p in weight_files) / _BYTES_PER_MB
    if not hasattr(model_or_dir, "save_pretrained"):
        raise TypeError(
            f"size_on_disk_mb needs a directory or a model with save_pretrained, got {type(model_or_dir)}."
        )
    with tempfile.TemporaryDirectory() as directory:
        model_or_dir.save_pretrained(directory)
        return size_on_disk_mb(directory)


def measure_latencies(
    models: Mapping[str, Any],
    make_inputs: Callable[[int], Mapping[str, torch.Tensor]],
    batch_sizes: Sequence[int] = (1, 32),
    warmup: int = 3,
    repeats: int = 10,
    device: torch.device | str | None = None,
    wide_spread: float = WIDE_SPREAD,
) -> dict[str, dict[int, Timing]]:
    """Wall-clock milliseconds of one forward pass of each model, per batch size, timed alternately.

    models: name -> torch module or deployed ONNX model (`deployed.OnnxSequenceClassifier`). For each batch size,
    `warmup` untimed and `repeats` timed rounds each run every model once (`latency.time_alternately`), so load on
    the machine hits all models alike. `make_inputs(batch_size)` returns the keyword inputs (moved to `device` if
    given, else to each torch model's own device). Torch models run in eval mode under `torch.inference_mode()` and
    get their training mode back afterwards. Returns name -> batch size -> Timing (median, p10, p90, spread, wide).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}.")
    modes = {name: model.training for name, model in models.items() if isinstance(model, torch.nn.Module)}
    timings: dict[str, dict[int, Timing]] = {name: {} for name in models}
    try:
        for batch_size in batch_sizes:
            inputs = dict(make_inputs(batch_size))
            if device is not None:
                inputs = {
                    name: value.to(device) if isinstance(value, torch.Tensor) else value
                    for name, value in inputs.items()
                }
            runners = {name: batch_runner(model, inputs) for name, model in models.items()}
            measured = time_alternately(runners, repeats=repeats, warmup=warmup, wide_spread=wide_spread)
            for name, timing in measured.items():
                timings[name][int(batch_size)] = timing
    finally:
        for name, training in modes.items():
            models[name].train(training)
    return timings


def measure_latency(
    model: torch.nn.Module,
    make_inputs: Callable[[int], Mapping[str, torch.Tensor]],
    batch_sizes: Sequence[int] = (1, 32),
    warmup: int = 3,
    repeats: int = 10,
    device: torch.device | str | None = None,
) -> dict[int, float]:
    """Median wall-clock milliseconds of one forward pass, per batch size, of one model (see `measure_latencies`,
    which times several alternately and also gives the spread).

    `make_inputs(batch_size)` returns the model's keyword inputs (tensors on any device; they are moved to `device`,
    default the model's). Runs under `torch.inference_mode()` in eval mode; the model's training mode is restored
    afterwards.
    """
    timings = measure_latencies(
        {"model": model}, make_inputs, batch_sizes, warmup=warmup, repeats=repeats, device=device
    )["model"]
    return {batch_size: timing.median_ms for batch_size, timing in timings.items()}


def latency_fields(timings: Mapping[int, Timing]) -> dict[str, Any]:
    """A report entry's latency keys from per-batch-size Timings: latency_ms (medians) and the spread fields."""
    return {
        "latency_ms": {int(bs): timing.median_ms for bs, timing in timings.items()},
        "latency_low_ms": {int(bs): timing.low_ms for bs, timing in timings.items()},
        "latency_high_ms": {int(bs): timing.high_ms for bs, timing in timings.items()},
        "latency_spread": {int(bs): timing.spread for bs, timing in timings.items()},
        "latency_wide": {int(bs): timing.wide for bs, timing in timings.items()},
        "latency_repeats": min((timing.repeats for timing in timings.values()), default=0),
    }


def _static_profile(model: Any) -> dict[str, Any]:
    if isinstance(model, torch.nn.Module):
        return {"params": count_parameters(model), "size_mb": size_on_disk_mb(model)}
    return {"params": None, "size_mb": size_on_disk_mb(model)}  # a deployed ONNX model: size from its folder


def profile_models(
    models: Mapping[str, Any],
    make_inputs: Callable[[int], Mapping[str, torch.Tensor]],
    batch_sizes: Sequence[int] = (1, 32),
    warmup: int = 3,
    repeats: int = 10,
    device: torch.device | str | None = None,
) -> dict[str, dict[str, Any]]:
    """Parameters, size on disk and latency of several models, their latencies timed alternately
    (`measure_latencies`): name -> the non-metric part of a report entry. Deployed ONNX models get params None."""
    timings = measure_latencies(
        models, make_inputs, batch_sizes, warmup=warmup, repeats=repeats, device=device
    )
    return {
        name: {**_static_profile(model), **latency_fields(timings[name])} for name, model in models.items()
    }


def profile_model(
    model: torch.nn.Module,
    make_inputs: Callable[[int], Mapping[str, torch.Tensor]],
    batch_sizes: Sequence[int] = (1, 32),
    warmup: int = 3,
    repeats: int = 10,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Parameters, size on disk and latency of one model: the non-metric part of a report entry. To compare a
    teacher and a student, prefer `profile_models`, which times them alternately."""
    return profile_models(
        {"model": model}, make_inputs, batch_sizes, warmup=warmup, repeats=repeats, device=device
    )["model"]


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    value = numerator / denominator
    return value if math.isfinite(value) else None


def build_report(
    models: Mapping[str, Mapping[str, Any]],
    *,
    primary_metric: str,
    reference: str = "teacher",
    greater_is_better: bool = True,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Combine per-model measurements into a report, adding comparisons against `reference`.

    models: name -> {"metrics": {metric: value}, "params": int, "size_mb": float,
    "latency_ms": {batch_size: ms}} plus any extra keys (e.g. "name_or_path", the latency spread fields of
    `profile_models`), which are kept (batch-size keys as strings).
    Every model other than the reference gets
    - retained_pct: 100 * primary / reference primary (inverted when lower is better, e.g. perplexity),
    - speedup: reference latency / model latency, per batch size,
    - compression: reference params / model params.
    """
    if reference not in models:
        raise ValueError(f"reference model {reference!r} is not among the models {list(models)}.")
    entries: dict[str, dict[str, Any]] = {}
    batch_sizes: set[int] = set()
    for name, measured in models.items():
        metrics = dict(measured.get("metrics", {}))
        if primary_metric not in metrics:
            raise ValueError(
                f"primary metric {primary_metric!r} missing from the metrics of {name!r}: {sorted(metrics)}."
            )
        latency = {str(int(bs)): float(ms) for bs, ms in measured.get("latency_ms", {}).items()}
        batch_sizes.update(int(bs) for bs in latency)
        entry = {key: value for key, value in measured.items() if key not in ("metrics", "latency_ms")}
        for key in _LATENCY_FIELDS:
            if isinstance(entry.get(key), Mapping):
                entry[key] = {str(int(bs)): value for bs, value in entry[key].items()}
        entry.update(
            metrics=metrics,
            primary=float(metrics[primary_metric]),
            latency_ms=latency,
            # samples per second at each batch size
            throughput={bs: 1000.0 * int(bs) / ms for bs, ms in latency.items() if ms > 0},
        )
        entries[name] = entry

    reference_entry = entries[reference]
    for name, entry in entries.items():
        if name == reference:
            continue
        if greater_is_better:
            retained = _ratio(entry["primary"], reference_entry["primary"])
        else:
            retained = _ratio(reference_entry["primary"], entry["primary"])
        entry["retained_pct"] = None if retained is None else 100.0 * retained
        entry["speedup"] = {
            bs: _ratio(reference_entry["latency_ms"].get(bs), ms) for bs, ms in entry["latency_ms"].items()
        }
        entry["compression"] = _ratio(reference_entry.get("params"), entry.get("params"))

    report: dict[str, Any] = {
        "primary_metric": primary_metric,
        "greater_is_better": greater_is_better,
        "reference": reference,
        "batch_sizes": sorted(batch_sizes),
    }
    report.update(metadata or {})
    report["models"] = entries
    return report


def _format(value: Any, digits: int = 4) -> str:
    """`digits` significant digits, without exponents: 0.9718, 19.8, 1,563."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and abs(value) >= 10 ** (digits - 1):
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def report_to_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: a context line, a comparison table and a table of all metrics."""
    models: Mapping[str, Mapping[str, Any]] = report["models"]
    primary = report["primary_metric"]
    reference = report.get("reference", "teacher")
    batch_sizes = [str(bs) for bs in report.get("batch_sizes", [])]

    context = {
        key: value
        for key, value in report.items()
        if key not in ("models", "batch_sizes", "primary_metric", "greater_is_better", "reference")
        and not isinstance(value, (dict, list))
    }
    lines = [
        f"Primary metric: **{primary}** ({'higher' if report.get('greater_is_better', True) else 'lower'} is "
        f"better); comparisons are against the {reference}."
    ]
    if context:
        lines.append("; ".join(f"{key}: {_format(value)}" for key, value in context.items()) + ".")
    lines.append("")

    header = ["model", primary, "params (M)", "size (MB)"]
    header += [f"latency b{bs} (ms)" for bs in batch_sizes]
    header += [f"throughput b{bs} (samples/s)" for bs in batch_sizes[-1:]]
    header += ["retained (%)"] + [f"speed-up b{bs}" for bs in batch_sizes] + ["compression"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for name, entry in models.items():
        params = entry.get("params")
        row = [
            name,
            _format(entry.get("primary")),
            _format(None if params is None else params / 1e6, 3),
            _format(entry.get("size_mb"), 3),
        ]
        row += [_format(entry.get("latency_ms", {}).get(bs), 3) for bs in batch_sizes]
        row += [_format(entry.get("throughput", {}).get(bs), 3) for bs in batch_sizes[-1:]]
        retained = entry.get("retained_pct")
        row.append("100 (reference)" if name == reference else _format(retained, 4))
        row += [
            "1" if name == reference else _format(entry.get("speedup", {}).get(bs), 3) + "x"
            for bs in batch_sizes
        ]
        row.append("1" if name == reference else _format(entry.get("compression"), 3) + "x")
        lines.append("| " + " | ".join(row) + " |")

    lines += _latency_notes(models, batch_sizes)

    metric_names: list[str] = []
    for entry in models.values():
        metric_names += [name for name in entry.get("metrics", {}) if name not in metric_names]
    if metric_names:
        lines += ["", "| model | " + " | ".join(metric_names) + " |", "|---|" + "---:|" * len(metric_names)]
        for name, entry in models.items():
            values = [_format(entry.get("metrics", {}).get(metric)) for metric in metric_names]
            lines.append(f"| {name} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def _latency_notes(models: Mapping[str, Mapping[str, Any]], batch_sizes: Sequence[str]) -> list[str]:
    """A line on how latency was measured, with each model's spread, and a warning for wide spreads."""
    spreads = {name: entry.get("latency_spread") or {} for name, entry in models.items()}
    if not any(spreads.values()):
        return []
    repeats = max((entry.get("latency_repeats") or 0 for entry in models.values()), default=0)
    parts = []
    for name, spread in spreads.items():
        if spread:
            parts.append(
                f"{name} " + ", ".join(f"b{bs} {spread[bs]:.0%}" for bs in batch_sizes if bs in spread)
            )
    lines = [
        "",
        f"Latency: median of {repeats} rounds, the models timed alternately in each round; spread "
        f"(p90 - p10) / median: {'; '.join(parts)}.",
    ]
    wide = [
        f"{name} b{bs} ({spreads[name][bs]:.0%})"
        for name, entry in models.items()
        for bs in batch_sizes
        if (entry.get("latency_wide") or {}).get(bs)
    ]
    if wide:
        lines.append(
            f"**Spread wide** for {', '.join(wide)}: the machine was busy or the timer too coarse while timing, so "
            "these latencies and speed-ups are uncertain; rerun on an idle machine or with more repeats."
        )
    return lines


def _plot(report: Mapping[str, Any], handle) -> None:
    # Figure + Agg canvas directly, not pyplot: no global backend switch, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    batch_size = str(max(report["batch_sizes"])) if report.get("batch_sizes") else None
    figure = Figure(figsize=(6, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, entry in report["models"].items():
        latency = entry.get("latency_ms", {}).get(batch_size)
        if latency is None:
            continue
        axes.scatter([latency], [entry["primary"]], s=60)
        axes.annotate(name, (latency, entry["primary"]), textcoords="offset points", xytext=(6, 6))
    axes.set_xlabel(f"latency at batch {batch_size} (ms, lower is better)")
    axes.set_ylabel(report["primary_metric"])
    axes.set_title(f"Quality vs latency ({report.get('device', 'device')})")
    axes.grid(True, alpha=0.3)
    axes.margins(0.2)
    figure.tight_layout()
    figure.savefig(handle, format="png")


def write_report(
    report: Mapping[str, Any], output_dir: str | os.PathLike, extra_markdown: str = ""
) -> dict[str, Path]:
    """Write `distill_report.json`, `.md` and `.png` into `output_dir`, each atomically; `extra_markdown` (a recipe's
    own sections) ends the markdown.

    Returns the paths written, keyed by "json", "markdown" and "plot".
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": output_dir / REPORT_JSON,
        "markdown": output_dir / REPORT_MARKDOWN,
        "plot": output_dir / REPORT_PLOT,
    }
    atomic_write_text(paths["json"], json.dumps(report, indent=2, sort_keys=False))
    markdown = "# Distillation report\n\n" + report_to_markdown(report) + extra_markdown
    atomic_write_text(paths["markdown"], markdown)
    with atomic_open(paths["plot"], "wb") as handle:
        _plot(report, handle)
    logger.info(f"Wrote the distillation report to {output_dir}")
    return paths
