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
                    "latency_ms": {"1": 9.1, "32": 310.0}, "throughput": {"1": 110.0, "32": 103.2}},
        "student": {..., "retained_pct": 99.1, "speedup": {"1": 2.7, "32": 2.9}, "compression": 1.45},
      }
    }
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from .atomic import atomic_open, atomic_write_text

logger = logging.get_logger(__name__)

REPORT_JSON = "distill_report.json"
REPORT_MARKDOWN = "distill_report.md"
REPORT_PLOT = "distill_report.png"

# Files that hold weights; everything else in a model directory (configs, tokenizer, card) is not "size".
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_BYTES_PER_MB = 1e6


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

    A directory is measured as it is (weight files only, not the tokenizer or configs); a model object
    is saved with `save_pretrained` (safetensors, its current dtype) into a temporary directory first,
    so models loaded from anywhere are measured the same way.
    """
    if isinstance(model_or_dir, (str, os.PathLike)):
        directory = Path(model_or_dir)
        if not directory.is_dir():
            raise ValueError(f"size_on_disk_mb expects a model directory, got {str(directory)!r}.")
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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":
        torch.xpu.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_latency(
    model: torch.nn.Module,
    make_inputs: Callable[[int], Mapping[str, torch.Tensor]],
    batch_sizes: Sequence[int] = (1, 32),
    warmup: int = 3,
    repeats: int = 10,
    device: torch.device | str | None = None,
) -> dict[int, float]:
    """Median wall-clock milliseconds of one forward pass, per batch size.

    `make_inputs(batch_size)` returns the model's keyword inputs for that batch size (tensors on any
    device; they are moved to `device`, default the model's). Runs under `torch.inference_mode()` in
    eval mode; the model's training mode is restored afterwards.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}.")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    latencies: dict[int, float] = {}
    try:
        with torch.inference_mode():
            for batch_size in batch_sizes:
                inputs = {name: tensor.to(device) for name, tensor in make_inputs(batch_size).items()}
                for _ in range(warmup):
                    model(**inputs)
                _synchronize(device)
                timings = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    model(**inputs)
                    _synchronize(device)
                    timings.append((time.perf_counter() - start) * 1000.0)
                latencies[int(batch_size)] = statistics.median(timings)
    finally:
        model.train(was_training)
    return latencies


def profile_model(
    model: torch.nn.Module,
    make_inputs: Callable[[int], Mapping[str, torch.Tensor]],
    batch_sizes: Sequence[int] = (1, 32),
    warmup: int = 3,
    repeats: int = 10,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Parameters, size on disk and latency of one model: the non-metric part of a report entry."""
    return {
        "params": count_parameters(model),
        "size_mb": size_on_disk_mb(model),
        "latency_ms": measure_latency(
            model, make_inputs, batch_sizes, warmup=warmup, repeats=repeats, device=device
        ),
    }


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
    "latency_ms": {batch_size: ms}} plus any extra keys (e.g. "name_or_path"), which are kept.
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

    metric_names: list[str] = []
    for entry in models.values():
        metric_names += [name for name in entry.get("metrics", {}) if name not in metric_names]
    if metric_names:
        lines += ["", "| model | " + " | ".join(metric_names) + " |", "|---|" + "---:|" * len(metric_names)]
        for name, entry in models.items():
            values = [_format(entry.get("metrics", {}).get(metric)) for metric in metric_names]
            lines.append(f"| {name} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


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
