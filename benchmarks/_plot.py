"""Bar charts for the benchmarks: matplotlib with the Agg backend (no display), PNGs written atomically
(hf_distill.storage.atomic.atomic_write_bytes), so a reader sees the previous chart or the new one, never half a file.

    bar_chart(path, title, labels, values, ylabel, errors=None)         one bar per label
    grouped_bar_chart(path, title, labels, series, ylabel, errors=None)  one bar per (label, series) pair
    figure, axes = new_figure(panels); draw_bars(axes[0], ...); save_png(figure, path)   several panels

A value of None or NaN (a case that failed or was skipped) draws no bar and an "n/a" mark in its place. matplotlib
and hf_distill are imported on first use, so importing this module costs nothing.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Number = float | int | None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _missing(value: Number) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def new_figure(panels: int = 1, *, width: float = 6.0, height: float = 4.2) -> tuple[Any, list[Any]]:
    """A figure of `panels` side-by-side axes, each `width` x `height` inches; returns (figure, [axes])."""
    plt = _plt()
    figure, axes = plt.subplots(1, panels, figsize=(width * panels, height), squeeze=False)
    return figure, list(axes[0])


def draw_bars(
    axis: Any,
    labels: Sequence[str],
    series: Mapping[str, Sequence[Number]],
    ylabel: str,
    errors: Mapping[str, Sequence[Number]] | None = None,
    *,
    title: str | None = None,
    value_format: str = "{:.3g}",
) -> None:
    """Bars on `axis`: a group per label, a bar per series in each group (a legend when there are several), its
    value written above it; `errors` (same keys and lengths as `series`) become symmetric error bars."""
    names = list(series)
    width = 0.8 / max(len(names), 1)
    bars = {
        name: (
            [0.0 if _missing(v) else float(v) for v in series[name]],
            [0.0 if _missing(e) else float(e) for e in (errors or {}).get(name, [None] * len(series[name]))],
        )
        for name in names
    }
    tops = [h + e for name in names for v, h, e in zip(series[name], *bars[name]) if not _missing(v)]
    top = max(tops, default=1.0) or 1.0
    for index, name in enumerate(names):
        heights, spreads = bars[name]
        offsets = [g + (index - (len(names) - 1) / 2) * width for g in range(len(labels))]
        axis.bar(
            offsets,
            heights,
            width,
            yerr=spreads if any(spreads) else None,
            capsize=4 if any(spreads) else 0,
            label=name if len(names) > 1 else None,
            color=f"C{index % 10}",
        )
        for x, value, height, spread in zip(offsets, series[name], heights, spreads):
            text = "n/a" if _missing(value) else value_format.format(value)
            axis.annotate(
                text, (x, height + spread), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=7
            )
    long_labels = max((len(label) for label in labels), default=0) > 12
    axis.set_xticks(range(len(labels)))
    axis.set_xticklabels(labels, rotation=20 if long_labels else 0, ha="right" if long_labels else "center")
    axis.set_ylabel(ylabel)
    axis.set_ylim(0, top * (1.3 if len(names) > 1 else 1.18))  # room for the values and the legend
    axis.grid(axis="y", alpha=0.3)
    if title:
        axis.set_title(title, fontsize=10)
    if len(names) > 1:
        axis.legend(fontsize=8)


def save_png(figure: Any, path: str | Path, *, dpi: int = 120) -> Path:
    """Render `figure` to PNG bytes, write them to `path` atomically, close the figure; returns the path."""
    from hf_distill.storage.atomic import atomic_write_bytes

    buffer = io.BytesIO()
    try:
        figure.tight_layout()
        figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")  # "tight": keeps a wide title
    finally:
        _plt().close(figure)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def grouped_bar_chart(
    path: str | Path,
    title: str,
    labels: Sequence[str],
    series: Mapping[str, Sequence[Number]],
    ylabel: str,
    errors: Mapping[str, Sequence[Number]] | None = None,
) -> Path:
    """One panel of grouped bars (see `draw_bars`) saved to `path`."""
    figure, (axis,) = new_figure(1, width=max(6.0, 1.1 * len(labels) * max(len(series), 1) ** 0.5 + 2))
    draw_bars(axis, labels, series, ylabel, errors)
    figure.suptitle(title, fontsize=11)
    return save_png(figure, path)


def bar_chart(
    path: str | Path,
    title: str,
    labels: Sequence[str],
    values: Sequence[Number],
    ylabel: str,
    errors: Sequence[Number] | None = None,
) -> Path:
    """One bar per label, with symmetric `errors` (e.g. std over seeds) when given, saved to `path`."""
    return grouped_bar_chart(
        path, title, labels, {ylabel: values}, ylabel, None if errors is None else {ylabel: errors}
    )


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value), for error bars over seeds or repeats."""
    values = [float(v) for v in values]
    if not values:
        return float("nan"), 0.0
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
