"""compression_report.{json,md,png} for generation models: every stage against the teacher, and assisted decoding.

The JSON has the classifier report's shape (`report.py`): a `stages` list, the teacher first and the final stage
last, each with name, path, runtime, metric (`perplexity` or `bleu`), value, params, size_bytes, and for generation
decode_tokens_per_s_b1 / _b8, prefill tokens/s, time to first token, peak memory and speed-ups: `speedup_b1` /
`speedup_b8` against the teacher in PyTorch float32, `runtime_speedup_b1` against the teacher in the stage's own
runtime (the `reference` row, when the final stage is deployed). `assisted` and `assisted_labels_only` hold the
draft's acceptance rate and the teacher's greedy tokens/s with and without it. Targets are printed met or MISSED.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hf_distill.storage.atomic import atomic_write_bytes, atomic_write_text

__all__ = ["build_generation_report", "generation_report_markdown", "write_generation_report"]

BATCHES = (1, 8)
LOWER_IS_BETTER = {"perplexity"}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator in (None, 0):
        return None
    return numerator / denominator


def build_generation_report(
    entries: Sequence[Mapping[str, Any]],
    *,
    metric: str,
    reference: Mapping[str, Any] | None = None,
    assisted: Mapping[str, Any] | None = None,
    assisted_labels_only: Mapping[str, Any] | None = None,
    targets: Mapping[str, float | None] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """entries: the teacher (PyTorch) first and the final stage last, each with name, path, runtime, value, params,
    size_bytes, speed {batch: DecodingSpeed.to_dict()} and optionally memory {peak_rss_mib, ...}. reference: the
    teacher in the final stage's runtime, same keys."""
    teacher = entries[0]

    def row(entry: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = {
            "name": entry["name"],
            "path": entry["path"],
            "runtime": entry["runtime"],
            "metric": metric,
            "value": entry["value"],
            "ratio_to_teacher": _ratio(entry["value"], teacher["value"]),
            "params": entry["params"],
            "size_bytes": entry["size_bytes"],
            "size_pct": _ratio(100.0 * entry["size_bytes"], teacher["size_bytes"]),
        }
        for batch in BATCHES:
            speed, base = entry["speed"][batch], teacher["speed"][batch]
            result[f"decode_tokens_per_s_b{batch}"] = speed["decode_tokens_per_s"]
            result[f"prefill_tokens_per_s_b{batch}"] = speed["prefill_tokens_per_s"]
            result[f"ttft_ms_b{batch}"] = speed["ttft_ms"]
            result[f"timing_wide_b{batch}"] = speed["wide"]
            result[f"speedup_b{batch}"] = _ratio(speed["decode_tokens_per_s"], base["decode_tokens_per_s"])
            if reference is not None:
                result[f"runtime_speedup_b{batch}"] = _ratio(
                    speed["decode_tokens_per_s"], reference["speed"][batch]["decode_tokens_per_s"]
                )
            if "sentences_per_s" in speed:  # translation: whole sentences, encoder and decoder, to the end
                result[f"sentences_per_s_b{batch}"] = speed["sentences_per_s"]
                result[f"sentences_speedup_b{batch}"] = _ratio(
                    speed["sentences_per_s"], base["sentences_per_s"]
                )
        memory = entry.get("memory") or {}
        result["peak_memory_mib"] = memory.get("peak_above_start_mib")  # the model and its generation
        result["peak_rss_mib"] = memory.get("peak_rss_mib")  # the whole process, libraries included
        result.update({key: entry[key] for key in ("note", "seconds") if key in entry})
        return result

    rows = [row(entry) for entry in entries]
    final = rows[-1]
    checks = _targets(final, metric, targets or {}, assisted)
    return {
        "metric": metric,
        "stages": rows,
        "reference": row(reference) if reference is not None else None,
        "assisted": dict(assisted) if assisted is not None else None,
        "assisted_labels_only": dict(assisted_labels_only) if assisted_labels_only is not None else None,
        "targets": checks,
        "metadata": dict(metadata or {}),
    }


def _targets(
    final: Mapping[str, Any],
    metric: str,
    targets: Mapping[str, float | None],
    assisted: Mapping[str, Any] | None,
) -> dict[str, bool]:
    checks: dict[str, bool] = {}
    for key, value in targets.items():
        if value is None:
            continue
        if key == "max_size_pct":
            checks[f"size <= {value:g}% of the teacher's"] = final["size_pct"] <= value
        elif key == "min_speedup_b1":
            checks[f"decode tokens/s at batch 1 >= {value:g}x the teacher in PyTorch fp32"] = (
                final["speedup_b1"] or 0
            ) >= value
        elif key == "min_runtime_speedup_b1":
            checks[f"decode tokens/s at batch 1 >= {value:g}x the teacher in the same runtime"] = (
                final.get("runtime_speedup_b1") or 0
            ) >= value
        elif key == "max_perplexity_ratio" and metric == "perplexity":
            checks[f"perplexity <= {value:g}x the teacher's"] = final["ratio_to_teacher"] <= value
        elif key == "min_retained_pct" and metric != "perplexity":
            checks[f"{metric} >= {value:g}% of the teacher's"] = (
                100 * (final["ratio_to_teacher"] or 0) >= value
            )
        elif key == "min_sentences_speedup":
            checks[f"sentences/s at batch 8 >= {value:g}x the teacher in PyTorch fp32"] = (
                final.get("sentences_speedup_b8") or 0
            ) >= value
        elif key == "min_assisted_speedup" and assisted is not None:
            checks[f"assisted greedy decoding >= {value:g}x the teacher alone, identical tokens"] = bool(
                assisted["identical"] and assisted["speedup"] >= value
            )
    return checks


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def generation_report_markdown(report: Mapping[str, Any]) -> str:
    metric = report["metric"]
    rows = list(report["stages"])
    if report.get("reference") is not None:
        rows.append(
            {**report["reference"], "name": f"{report['reference']['name']} (reference, not a stage)"}
        )
    lines = [
        "# Compression report (generation)",
        "",
        f"| stage | runtime | {metric} | x teacher | params | size MB | size % | prefill tok/s b1 | TTFT ms b1 "
        "| decode tok/s b1 | decode tok/s b8 | speed-up b1 | speed-up b8 | x teacher same runtime b1 | peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['runtime']} | {_fmt(row['value'])} | {_fmt(row['ratio_to_teacher'], 3)} | "
            f"{row['params'] / 1e6:.2f}M | {row['size_bytes'] / 1e6:.2f} | {_fmt(row['size_pct'], 1)} | "
            f"{_fmt(row['prefill_tokens_per_s_b1'], 0)} | {_fmt(row['ttft_ms_b1'], 1)} | "
            f"{_fmt(row['decode_tokens_per_s_b1'], 1)}{' (wide)' if row['timing_wide_b1'] else ''} | "
            f"{_fmt(row['decode_tokens_per_s_b8'], 1)}{' (wide)' if row['timing_wide_b8'] else ''} | "
            f"{_fmt(row['speedup_b1'])}x | {_fmt(row['speedup_b8'])}x | {_fmt(row.get('runtime_speedup_b1'))}x | "
            f"{_fmt(row['peak_memory_mib'], 0)} |"
        )
    translation = any("sentences_per_s_b8" in row for row in rows)
    if translation:
        lines += [
            "",
            "| stage | sentences/s b1 | sentences/s b8 | x teacher b1 | x teacher b8 |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {row['name']} | {_fmt(row.get('sentences_per_s_b1'), 1)} | {_fmt(row.get('sentences_per_s_b8'), 1)} "
            f"| {_fmt(row.get('sentences_speedup_b1'))}x | {_fmt(row.get('sentences_speedup_b8'))}x |"
            for row in rows
        ]
    lines += [
        "",
        "Decode tokens/s: greedy, fixed prompts and lengths, the tokens after the first over the time they took "
        "(time to first token apart); medians of alternating rounds, (wide) where the spread passed 25%. Speed-ups "
        "are against the teacher in PyTorch float32 with the same threads. Peak MiB: the resident-set high-water "
        "mark of a fresh process that loads the model and generates at batch 8, above its size once the libraries "
        "are imported (the JSON's peak_rss_mib includes them).",
    ]
    if translation:
        lines.append(
            "\nSentences/s (translation): test sources translated greedily to their end of sentence, encoder and "
            "decoder, in consecutive batches of 1 or 8; the x teacher columns divide by the teacher in PyTorch fp32."
        )
    for key, title in (("assisted", "KD draft"), ("assisted_labels_only", "labels-only draft")):
        section = report.get(key)
        if section:
            lines += [
                "",
                f"## Assisted decoding: {title} ({section['draft_path']})",
                "",
                f"- acceptance rate (accepted / drafted tokens): {_fmt(section['acceptance_rate'], 3)} "
                f"({section['accepted']} / {section['drafted']}, {section['verifications']} teacher verifications)",
                f"- teacher greedy tokens/s alone: {_fmt(section['teacher_tokens_per_s'], 1)}; with the draft: "
                f"{_fmt(section['assisted_tokens_per_s'], 1)}; speed-up {_fmt(section['speedup'])}x",
                f"- tokens identical to the teacher's greedy tokens: {section['identical']}",
                f"- per call: teacher forward {_fmt(section.get('teacher_ms_per_token'), 2)} ms/token alone, draft "
                f"forward {_fmt(section.get('draft_ms_per_token'), 2)} ms/token alone",
                f"- up to {section.get('num_assistant_tokens')} proposed tokens per teacher pass; the draft's "
                f"Linear layers: {section.get('draft_quantization') or 'float32'}",
            ]
    if report.get("targets"):
        lines += ["", "## Targets", ""]
        lines += [f"- {'met' if met else 'MISSED'}: {name}" for name, met in report["targets"].items()]
    metadata = dict(report.get("metadata") or {})
    recipe = metadata.pop("recipe", None)
    if metadata:
        lines += ["", "## Run", ""] + [f"- {key}: {value}" for key, value in metadata.items()]
    if recipe is not None:
        import yaml

        lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _plot(report: Mapping[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_speed, by_size) = plt.subplots(1, 2, figsize=(11, 4.5))
    rows = list(report["stages"]) + ([report["reference"]] if report.get("reference") else [])
    for row in rows:
        marker = "*" if row is rows[0] else ("s" if row["runtime"] != "pytorch" else "o")
        for axis, x in ((by_speed, row["decode_tokens_per_s_b1"]), (by_size, row["size_bytes"] / 1e6)):
            if x is None:
                continue
            axis.scatter(x, row["value"], marker=marker, s=60)
            axis.annotate(
                row["name"], (x, row["value"]), fontsize=7, xytext=(4, 2), textcoords="offset points"
            )
    by_speed.set_xscale("log")
    by_speed.set_xlabel("decode tokens/s at batch 1 (log)")
    by_size.set_xscale("log")
    by_size.set_xlabel("size on disk (MB, log)")
    for axis in (by_speed, by_size):
        axis.set_ylabel(
            report["metric"] + (" (lower is better)" if report["metric"] in LOWER_IS_BETTER else "")
        )
        axis.grid(alpha=0.3)
    figure.suptitle("Quality against decoding speed and size (circles: PyTorch, squares: deployed runtime)")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()


def write_generation_report(report: Mapping[str, Any], output_dir: str | Path) -> None:
    """compression_report.json, .md and .png in `output_dir`, each written atomically."""
    output_dir = Path(output_dir)
    atomic_write_text(output_dir / "compression_report.json", json.dumps(report, indent=2))
    atomic_write_text(output_dir / "compression_report.md", generation_report_markdown(report))
    atomic_write_bytes(output_dir / "compression_report.png", _plot(report))
