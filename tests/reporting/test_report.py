"""hf_distill.reporting.report: parameter counts, size on disk, latency, the report's comparisons and its files."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from hf_distill.reporting import report as report_module
from hf_distill.reporting.report import (
    build_report,
    count_parameters,
    latency_fields,
    measure_latencies,
    measure_latency,
    profile_models,
    report_to_markdown,
    size_on_disk_mb,
    write_report,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP spinning makes them slow.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_bert(layers: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    return BertForSequenceClassification(config)


def test_count_parameters_counts_shared_weights_once():
    shared = nn.Linear(4, 3)  # 4*3 + 3 = 15
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(3, 2))  # + 3*2 + 2 = 8
    assert count_parameters(model) == 15 + 8
    model[3].requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 15


def test_size_on_disk_of_a_directory_and_of_a_model(tmp_path):
    model = _tiny_bert()
    model.save_pretrained(tmp_path)
    weights = (tmp_path / "model.safetensors").stat().st_size
    (tmp_path / "notes.txt").write_text("x" * 10_000)  # not a weight file
    assert size_on_disk_mb(tmp_path) == pytest.approx(weights / 1e6)
    assert size_on_disk_mb(model) == pytest.approx(weights / 1e6)
    # float32 safetensors: 4 bytes per parameter plus a JSON header of a few kB
    assert 0 < weights - 4 * count_parameters(model) < 8_000
    with pytest.raises(ValueError, match="No weight files"):
        size_on_disk_mb(tmp_path / "..")


class _SleepModel(nn.Module):
    """Sleeps 2 ms + 0.2 ms per example, and records whether it ran in inference mode."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.inference_mode = []

    def forward(self, x):
        self.inference_mode.append(torch.is_inference_mode_enabled())
        time.sleep(0.002 + 0.0002 * x.shape[0])
        return x


def test_measure_latency_times_each_batch_size():
    model = _SleepModel().train()
    latencies = measure_latency(
        model, lambda bs: {"x": torch.zeros(bs, 3)}, batch_sizes=(1, 32), warmup=1, repeats=3
    )
    assert set(latencies) == {1, 32}
    assert latencies[1] >= 2.2 and latencies[32] >= 2 + 0.2 * 32
    assert latencies[32] > latencies[1]
    assert len(model.inference_mode) == 2 * (1 + 3) and all(model.inference_mode)
    assert model.training  # mode restored


class _Clocked(nn.Module):
    """Logs its name into a shared list on every forward."""

    def __init__(self, name, calls, seconds):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.name, self.calls, self.seconds = name, calls, seconds

    def forward(self, x):
        self.calls.append(self.name)
        time.sleep(self.seconds)
        return x


def test_teacher_and_student_are_timed_alternately():
    calls = []
    models = {
        "teacher": _Clocked("teacher", calls, 0.004).train(),
        "student": _Clocked("student", calls, 0.001),
    }
    timings = measure_latencies(
        models, lambda bs: {"x": torch.zeros(bs, 3)}, batch_sizes=(1, 2), warmup=1, repeats=3
    )
    rounds = [calls[i : i + 2] for i in range(0, len(calls), 2)]
    assert len(rounds) == 2 * (1 + 3) and all(sorted(r) == ["student", "teacher"] for r in rounds)
    assert rounds[0] == ["teacher", "student"] and rounds[1] == ["student", "teacher"]  # the start rotates
    assert models["teacher"].training  # mode restored
    for bs in (1, 2):
        assert timings["teacher"][bs].median_ms > timings["student"][bs].median_ms >= 1.0

    fields = latency_fields(timings["teacher"])
    assert fields["latency_repeats"] == 3
    for bs in (1, 2):
        timing = timings["teacher"][bs]
        assert fields["latency_ms"][bs] == timing.median_ms
        assert fields["latency_low_ms"][bs] <= timing.median_ms <= fields["latency_high_ms"][bs]
        spread = (fields["latency_high_ms"][bs] - fields["latency_low_ms"][bs]) / timing.median_ms
        assert fields["latency_spread"][bs] == pytest.approx(spread)
        assert fields["latency_wide"][bs] == (spread > 0.25)


def test_profile_models_gives_report_entries():
    teacher, student = _tiny_bert(layers=2), _tiny_bert(layers=1)
    profiles = profile_models(
        {"teacher": teacher, "student": student},
        lambda bs: {"input_ids": torch.ones(bs, 8, dtype=torch.long)},
        batch_sizes=(1, 2),
        warmup=1,
        repeats=2,
    )
    assert profiles["teacher"]["params"] == count_parameters(teacher)
    assert profiles["student"]["size_mb"] == pytest.approx(size_on_disk_mb(student))
    assert (
        set(profiles["student"]["latency_spread"]) == {1, 2} and profiles["student"]["latency_repeats"] == 2
    )
    report = build_report(
        {name: {**entry, "metrics": {"accuracy": 0.5}} for name, entry in profiles.items()},
        primary_metric="accuracy",
    )
    assert set(report["models"]["student"]["latency_low_ms"]) == {"1", "2"}


def test_report_keeps_the_spread_and_warns_when_it_is_wide():
    measured = _measured()
    for entry in measured.values():
        entry.update(
            latency_low_ms={1: 0.9 * entry["latency_ms"][1], 32: 0.95 * entry["latency_ms"][32]},
            latency_high_ms={1: 1.1 * entry["latency_ms"][1], 32: 1.05 * entry["latency_ms"][32]},
            latency_spread={1: 0.2, 32: 0.1},
            latency_wide={1: False, 32: False},
            latency_repeats=10,
        )
    measured["student"]["latency_spread"][1] = 0.6
    measured["student"]["latency_wide"][1] = True
    report = build_report(measured, primary_metric="accuracy")
    assert json.loads(json.dumps(report)) == report
    student = report["models"]["student"]
    assert student["latency_spread"] == {"1": 0.6, "32": 0.1} and student["latency_wide"]["1"] is True
    assert student["latency_low_ms"]["32"] == pytest.approx(0.95 * 50.0)
    markdown = report_to_markdown(report)
    assert "median of 10 rounds, the models timed alternately" in markdown
    assert "teacher b1 20%, b32 10%; student b1 60%, b32 10%" in markdown
    assert "**Spread wide** for student b1 (60%)" in markdown
    calm = build_report(
        {name: {**entry, "latency_wide": {1: False, 32: False}} for name, entry in measured.items()},
        primary_metric="accuracy",
    )
    assert "Spread wide" not in report_to_markdown(calm)
    assert "Latency: median" not in report_to_markdown(build_report(_measured(), primary_metric="accuracy"))


def _measured():
    return {
        "teacher": {"metrics": {"accuracy": 0.90, "f1": 0.8}, "params": 1000, "size_mb": 4.0,
                    "latency_ms": {1: 10.0, 32: 160.0}},
        "student": {"metrics": {"accuracy": 0.87, "f1": 0.7}, "params": 400, "size_mb": 1.6,
                    "latency_ms": {1: 4.0, 32: 50.0}, "name_or_path": "out"},
    }  # fmt: skip


def test_build_report_compares_against_the_teacher():
    report = build_report(_measured(), primary_metric="accuracy", metadata={"task": "toy"})
    assert report["task"] == "toy" and report["batch_sizes"] == [1, 32]
    teacher, student = report["models"]["teacher"], report["models"]["student"]
    assert teacher["primary"] == 0.90 and "retained_pct" not in teacher
    assert student["retained_pct"] == pytest.approx(100 * 0.87 / 0.90)
    assert student["speedup"] == {"1": pytest.approx(10 / 4), "32": pytest.approx(160 / 50)}
    assert student["compression"] == pytest.approx(1000 / 400)
    assert student["throughput"]["32"] == pytest.approx(32 / 0.050)
    assert student["name_or_path"] == "out"
    assert json.loads(json.dumps(report)) == report  # JSON-ready: string keys only

    lower = build_report(
        {"teacher": {"metrics": {"perplexity": 10.0}}, "student": {"metrics": {"perplexity": 12.5}}},
        primary_metric="perplexity",
        greater_is_better=False,
    )
    assert lower["models"]["student"]["retained_pct"] == pytest.approx(100 * 10.0 / 12.5)

    with pytest.raises(ValueError, match=r"primary metric 'mcc' missing .*\['accuracy', 'f1'\]"):
        build_report(_measured(), primary_metric="mcc")
    with pytest.raises(ValueError, match="reference model 'big'"):
        build_report(_measured(), primary_metric="accuracy", reference="big")


def test_markdown_table_lists_every_model_and_comparison():
    report = build_report(_measured(), primary_metric="accuracy", metadata={"task": "toy", "device": "cpu"})
    markdown = report_to_markdown(report)
    lines = markdown.splitlines()
    header = next(line for line in lines if line.startswith("| model | accuracy"))
    assert "latency b1 (ms)" in header and "latency b32 (ms)" in header and "speed-up b32" in header
    student_row = next(line for line in lines if line.startswith("| student |"))
    assert f"{100 * 0.87 / 0.9:.4g}" in student_row and "3.2x" in student_row and "2.5x" in student_row
    assert "task: toy" in markdown and "| f1 |" not in header  # secondary metrics go to the second table
    assert any(line.startswith("| model | accuracy | f1 |") for line in lines)


def test_write_report_writes_three_files_atomically(tmp_path, monkeypatch):
    report = build_report(_measured(), primary_metric="accuracy", metadata={"device": "cpu"})
    paths = write_report(report, tmp_path / "run")
    assert json.loads(paths["json"].read_text()) == report
    assert paths["markdown"].read_text().startswith("# Distillation report")
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = paths["plot"].read_bytes()

    def broken_plot(report, handle):
        handle.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(report_module, "_plot", broken_plot)
    with pytest.raises(RuntimeError, match="disk full"):
        write_report(report, tmp_path / "run")
    assert paths["plot"].read_bytes() == before  # the previous plot survives a failed write
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "distill_report.json",
        "distill_report.md",
        "distill_report.png",
    ]
