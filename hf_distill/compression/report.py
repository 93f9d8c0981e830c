"""compression_report.{json,md,png}: every stage of a compression run against its teacher.

For each stage: the task metric and the % of the teacher's it keeps, parameters, size on disk and the
compression ratio, latency at batch 1 and 32 in the runtime the stage deploys in (medians of alternating
rounds, with their spread), and the speed-up against the teacher as users run it today (PyTorch, float32,
same threads). A reference row times the teacher itself in the student's runtime, so that what the runtime
gives and what compression gives are both visible. The plot shows quality against speed-up and against size.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hf_distill.storage.atomic import atomic_write_bytes, atomic_write_text

__all__ = ["build_compression_report", "compression_report_markdown", "write_compression_report"]

BATCH_SIZES = (1, 32)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator in (None, 0):
        return None
    return numerator / denominator


def build_compression_report(
    stages: Sequence[Mapping[str, Any]],
    *,
    metric: str,
    reference: Mapping[str, Any] | None = None,
    targets: Mapping[str, float | None] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report's dictionary.

    stages: the teacher first and the final student last, each with name, path, runtime, value (the metric),
    params, size_bytes and timing {batch size: {"median_ms", "low_ms", "high_ms", "spread", "wide"}}.
    reference: the teacher in the final stage's runtime, same keys. targets: min_retained_pct, max_size_pct,
    min_speedup_b32 (None = no target).
    """
    teacher = stages[0]

    def row(entry: Mapping[str, Any]) -> dict[str, Any]:
        timing = entry["timing"]
        result = {
            "name": entry["name"],
            "path": entry["path"],
            "runtime": entry["runtime"],
            "metric": metric,
            "value": entry["value"],
            "retained": _ratio(100.0 * entry["value"], teacher["value"]),
            "params": entry["params"],
            "size_bytes": entry["size_bytes"],
            "size_pct": _ratio(100.0 * entry["size_bytes"], teacher["size_bytes"]),
            "compression": _ratio(teacher["size_bytes"], entry["size_bytes"]),
        }
        for batch in BATCH_SIZES:
            measured = timing[batch]
            result[f"latency_ms_b{batch}"] = measured["median_ms"]
            result[f"latency_spread_b{batch}"] = measured["spread"]
            result[f"latency_wide_b{batch}"] = measured["wide"]
            result[f"speedup_b{batch}"] = _ratio(teacher["timing"][batch]["median_ms"], measured["median_ms"])
        result.update({key: value for key, value in entry.items() if key in ("stage", "seconds", "note")})
        return result

    rows = [row(entry) for entry in stages]
    final = rows[-1]
    checks = {}
    for key, value in (targets or {}).items():
        if value is None:
            continue
        if key == "min_retained_pct":
            checks[f"retained >= {value:g}%"] = final["retained"] is not None and final["retained"] >= value
        elif key == "max_size_pct":
            checks[f"size <= {value:g}% of the teacher's"] = final["size_pct"] <= value
        elif key == "min_speedup_b32":
            checks[f"speed-up at batch 32 >= {value:g}x"] = (final["speedup_b32"] or 0) >= value
    return {
        "metric": metric,
        "stages": rows,
        "reference": row(reference) if reference is not None else None,
        "targets": checks,
        "metadata": dict(metadata or {}),
    }


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _latency(row: Mapping[str, Any], batch: int) -> str:
    text = f"{row[f'latency_ms_b{batch}']:.2f} ±{100 * row[f'latency_spread_b{batch}']:.0f}%"
    return text + (" (wide)" if row[f"latency_wide_b{batch}"] else "")


def compression_report_markdown(report: Mapping[str, Any]) -> str:
    metric = report["metric"]
    lines = [
        "# Compression report",
        "",
        f"| stage | runtime | {metric} | % of teacher | params | size (MB) | compression | latency b=1 (ms) "
        "| latency b=32 (ms) | speed-up b=1 | speed-up b=32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = list(report["stages"])
    if report.get("reference") is not None:
        rows.append(
            {**report["reference"], "name": f"{report['reference']['name']} (reference, not a stage)"}
        )
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['runtime']} | {row['value']:.4f} | {_fmt(row['retained'])} | "
            f"{row['params'] / 1e6:.2f}M | {row['size_bytes'] / 1e6:.2f} | {_fmt(row['compression'])}x | "
            f"{_latency(row, 1)} | {_latency(row, 32)} | {_fmt(row['speedup_b1'])}x | {_fmt(row['speedup_b32'])}x |"
        )
    lines += [
        "",
        "Latency: median of alternating rounds (every model once per round, so background load hits all alike); "
        "± is the spread (90th - 10th percentile) / median; (wide) marks a spread above the threshold, where the "
        "machine was busy and the figure is less certain. Speed-up is against the teacher in PyTorch float32 with "
        "the same threads.",
    ]
    if report.get("targets"):
        lines += ["", "## Targets (final stage)", ""]
        lines += [f"- {'met' if met else 'MISSED'}: {name}" for name, met in report["targets"].items()]
    metadata = dict(report.get("metadata") or {})
    recipe = metadata.pop("recipe", None)
    lines += machine_lines(metadata)  # pops what it shows
    if metadata:
        lines += ["", "## Run", ""] + [f"- {key}: {value}" for key, value in metadata.items()]
    if recipe is not None:
        import yaml

        lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```"]
    return "\n".join(lines) + "\n"


def machine_lines(metadata: dict[str, Any]) -> list[str]:
    """The "## Machine" section: the CPU, the SIMD extensions the libraries saw, the kernels they imply and the one
    observed, the load while timing; removes those keys from `metadata`. Nothing if no CPU was recorded."""
    cpu = metadata.pop("cpu", None)
    probe = metadata.pop("u8s8_probe", None)
    load = metadata.pop("load_average", None)
    view = metadata.pop("cpu_view", None)
    if not isinstance(cpu, Mapping):
        return []
    flags = [flag for flag, present in cpu.get("flags", {}).items() if present]
    lines = [
        "",
        "## Machine",
        "",
        f"- CPU: {cpu.get('model', 'unknown')} ({cpu.get('machine', '?')}); SIMD extensions the libraries see "
        f"({cpu.get('flags_source', '/proc/cpuinfo')}): {', '.join(flags) or 'none of avx2, avx512, vnni, amx'}",
        f"- INT8 kernel (ONNX Runtime MLAS, uint8 x int8): {cpu.get('u8s8_kernel', '?')} by these extensions"
        + (f"; observed: {probe['family']}" if isinstance(probe, Mapping) else ""),
        f"- float32 kernels (attention, LayerNorm, GELU, the PyTorch stages): {cpu.get('fp32_kernel', '?')}",
    ]
    hidden = [flag for flag, present in (cpu.get("cpuinfo_disagrees") or {}).items() if present]
    if hidden or view:
        lines.append(
            f"- CPU view: {view or 'unnamed'}: /proc/cpuinfo also lists {', '.join(hidden) or 'nothing more'}, hidden "
            "from the libraries (an emulator or benchmarks/_cpu_view.py): the kernels are those of the view"
        )
    if load is not None:
        lines.append(
            f"- load average (1, 5, 15 min) when timing: {', '.join(f'{value:.2f}' for value in load)}"
        )
    return lines


def _plot(report: Mapping[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_speed, by_size) = plt.subplots(1, 2, figsize=(11, 4.5))
    rows = list(report["stages"])
    if report.get("reference") is not None:
        rows.append(report["reference"])
    for row in rows:
        marker = "*" if row is rows[0] else ("s" if row["runtime"] != "pytorch" else "o")
        by_speed.scatter(row["speedup_b32"], row["value"], marker=marker, s=60)
        by_speed.annotate(row["name"], (row["speedup_b32"], row["value"]), fontsize=7, xytext=(4, 2),
                          textcoords="offset points")  # fmt: skip
        by_size.scatter(row["size_bytes"] / 1e6, row["value"], marker=marker, s=60)
        by_size.annotate(row["name"], (row["size_bytes"] / 1e6, row["value"]), fontsize=7, xytext=(4, 2),
                         textcoords="offset points")  # fmt: skip
    by_speed.set_xscale("log")
    by_speed.set_xlabel("speed-up at batch 32 (x, log)")
    by_size.set_xscale("log")
    by_size.set_xlabel("size on disk (MB, log)")
    for axis in (by_speed, by_size):
        axis.set_ylabel(report["metric"])
        axis.grid(alpha=0.3)
    figure.suptitle("Quality against speed-up and size (circles: PyTorch, squares: ONNX Runtime INT8)")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()


def write_compression_report(report: Mapping[str, Any], output_dir: str | Path) -> None:
    """compression_report.json, .md and .png in `output_dir`, each written atomically."""
    output_dir = Path(output_dir)
    atomic_write_text(output_dir / "compression_report.json", json.dumps(report, indent=2))
    atomic_write_text(output_dir / "compression_report.md", compression_report_markdown(report))
    atomic_write_bytes(output_dir / "compression_report.png", _plot(report))
