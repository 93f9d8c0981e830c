"""The embedding recipe's report: <output_dir>/embedding_report.json (the teacher and every student with its
metrics, throughput, size and speed-up; the targets and whether each student meets them; the machine and the
load), a Markdown table beside it and a PNG of k-NN accuracy against throughput at batch 32."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.utils import logging

from hf_distill.reporting.machine import describe_cpu
from hf_distill.storage.atomic import atomic_open, atomic_write_text

logger = logging.get_logger(__name__)

REPORT_NAME = "embedding_report"


def targets_of(row: dict[str, Any], args: Any) -> dict[str, dict[str, Any]]:
    """Each target with the student's figure and whether it is met."""
    checks = {
        "size_pct_of_teacher": (row["size_pct_of_teacher"], "<=", args.target_max_size_pct),
        "speedup_b32": (row.get("speedup_b32"), ">=", args.target_min_speedup_b32),
        "knn_retained_pct": (row["knn_retained_pct"], ">=", args.target_min_knn_retained_pct),
        "mean_cosine_to_teacher": (row["mean_cosine_to_teacher"], ">=", args.target_min_mean_cosine),
    }
    result = {}
    for name, (value, direction, bound) in checks.items():
        met = None if value is None else (value <= bound if direction == "<=" else value >= bound)
        result[name] = {"value": value, "target": f"{direction} {bound}", "met": met}
    return result


def build(
    rows: dict[str, dict[str, Any]],
    texts: Any,
    args: Any,
    settings: dict[str, Any],
    trained: dict[str, Any],
    *,
    threads: int,
) -> dict[str, Any]:
    """The report's content: `rows` (from `evaluation.measure`, teacher first) with each student's targets."""
    students = {name: row for name, row in rows.items() if name != "teacher"}
    for row in students.values():
        row["targets"] = targets_of(row, args)
        row["meets_all_targets"] = all(check["met"] for check in row["targets"].values())
    return {
        **rows,
        "models": list(rows),
        "data": texts.description,
        "settings": settings,
        "training": trained or None,
        "timing": "end to end (tokenization included), alternating rounds; throughput = texts / median seconds",
        "machine": {
            "cpu": describe_cpu(),
            "cores_usable": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "torch_threads": threads,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }


def _format(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def to_markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Data: {results['data']}",
        "",
        "| model | runtime | dim | k-NN acc | % of teacher | MRR@10 | cos to teacher | Spearman | params | size MB "
        "| texts/s b1 | texts/s b32 | speed-up b32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in results["models"]:
        row = results[name]
        lines.append(
            f"| {name} | {row['runtime']} | {row['dimension']} | {_format(row['knn_accuracy'])} | "
            f"{row['knn_retained_pct']:.1f} | {_format(row['mrr_at_10'])} | {_format(row['mean_cosine_to_teacher'])} | "
            f"{_format(row['similarity_spearman'])} | {row['params'] / 1e6:.2f}M | {row['size_bytes'] / 1e6:.1f} | "
            f"{row['throughput_b1']:.1f} | {row['throughput_b32']:.1f} | {row['speedup_b32']:.2f}x |"
        )
    for name in results["models"][1:]:
        checks = results[name]["targets"]
        described = ", ".join(
            f"{key} {_format(check['value'], 3)} ({check['target']}: {'met' if check['met'] else 'MISSED'})"
            for key, check in checks.items()
        )
        lines += ["", f"Targets, {name}: {described}."]
    machine = results["machine"]
    lines += [
        "",
        f"Machine: {machine['cpu']['model']}, {machine['torch_threads']} threads, load average "
        f"{machine['load_average']}; {results['timing']}.",
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """k-NN accuracy against throughput at batch 32 (log scale), one labelled point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for name in results["models"]:
        row = results[name]
        axis.scatter(row["throughput_b32"], row["knn_accuracy"], s=30)
        axis.annotate(name, (row["throughput_b32"], row["knn_accuracy"]), textcoords="offset points", xytext=(4, 4),
                      fontsize=8)  # fmt: skip
    axis.set_xscale("log")
    axis.set_xlabel("texts per second at batch 32 (end to end, log scale)")
    axis.set_ylabel("k-NN topic accuracy (test articles)")
    axis.grid(True, alpha=0.3)
    figure.tight_layout()
    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=120)
    plt.close(figure)


def write(results: dict[str, Any], output_dir: Path) -> None:
    atomic_write_text(output_dir / f"{REPORT_NAME}.json", json.dumps(results, indent=2, default=str))
    atomic_write_text(output_dir / f"{REPORT_NAME}.md", to_markdown(results))
    plot(results, output_dir / f"{REPORT_NAME}.png")
    logger.info(f"Wrote {output_dir / REPORT_NAME}.{{json,md,png}}\n{to_markdown(results)}")
