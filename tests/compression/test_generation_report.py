"""The generation report's arithmetic and targets on hand-made entries (the figures written in the test), its files,
and the decoding-speed formula of hf_distill.reporting.decoding against a fake model with known costs."""

from __future__ import annotations

import json

import pytest

from hf_distill.compression.generation_report import build_generation_report, write_generation_report
from hf_distill.reporting import decoding


def _entry(name, runtime, value, size, b1, b8, params=1000):
    speed = {
        batch: {"decode_tokens_per_s": rate, "prefill_tokens_per_s": 100.0, "ttft_ms": 5.0, "wide": False}
        for batch, rate in ((1, b1), (8, b8))
    }
    return {"name": name, "path": name, "runtime": runtime, "value": value, "params": params, "size_bytes": size,
            "speed": speed, "memory": {"peak_above_start_mib": 10.0, "peak_rss_mib": 300.0}}  # fmt: skip


def test_ratios_and_targets(tmp_path):
    teacher = _entry("teacher", "pytorch", 50.0, 4000, 20.0, 100.0)
    final = _entry("int8", "ctranslate2", 55.0, 900, 100.0, 600.0)
    reference = _entry("teacher_in_runtime", "ctranslate2", 50.5, 1100, 40.0, 300.0)
    assisted = {"draft_path": "stages/d", "acceptance_rate": 0.6, "accepted": 6, "drafted": 10, "verifications": 4,
                "teacher_tokens_per_s": 20.0, "assisted_tokens_per_s": 28.0, "speedup": 1.4, "identical": True}  # fmt: skip
    report = build_generation_report(
        [teacher, final],
        metric="perplexity",
        reference=reference,
        assisted=assisted,
        targets={
            "max_size_pct": 25,
            "min_speedup_b1": 4,
            "min_runtime_speedup_b1": 2,
            "max_perplexity_ratio": 1.15,
            "min_assisted_speedup": 1.5,
        },  # fmt: skip
    )
    row = report["stages"][-1]
    assert row["size_pct"] == pytest.approx(100 * 900 / 4000)
    assert row["speedup_b1"] == pytest.approx(5.0) and row["speedup_b8"] == pytest.approx(6.0)
    assert row["runtime_speedup_b1"] == pytest.approx(2.5)
    assert row["ratio_to_teacher"] == pytest.approx(1.1)
    assert row["peak_memory_mib"] == 10.0
    assert list(report["targets"].values()) == [
        True,
        True,
        True,
        True,
        False,
    ]  # the assisted 1.4x misses 1.5x
    write_generation_report(report, tmp_path)
    assert json.loads((tmp_path / "compression_report.json").read_text())["stages"][-1]["name"] == "int8"
    markdown = (tmp_path / "compression_report.md").read_text()
    assert "MISSED" in markdown and "acceptance rate" in markdown
    assert (tmp_path / "compression_report.png").stat().st_size > 0


def test_translation_target_reads_sentences_per_second():
    # decode tokens/s say 4x, whole sentences/s (encoder included) say 2.5x: the target is on sentences
    teacher = _entry("teacher", "pytorch", 30.0, 4000, 20.0, 100.0)
    final = _entry("fp32", "ctranslate2", 28.0, 3000, 80.0, 400.0)
    for entry, (b1, b8) in ((teacher, (4.0, 20.0)), (final, (10.0, 50.0))):
        entry["speed"][1]["sentences_per_s"], entry["speed"][8]["sentences_per_s"] = b1, b8
    report = build_generation_report(
        [teacher, final], metric="bleu", targets={"min_retained_pct": 90, "min_sentences_speedup": 3}
    )
    row = report["stages"][-1]
    assert row["speedup_b8"] == pytest.approx(4.0) and row["sentences_speedup_b8"] == pytest.approx(2.5)
    assert list(report["targets"].values()) == [True, False]  # 93.3% of the BLEU; 2.5x < 3x sentences/s


class _FakeModel:
    """generate costs `prefill_ms` once plus `step_ms` per token after the first (a clock that advances by it)."""

    def __init__(self, clock, prefill_ms, step_ms):
        self.clock, self.prefill_ms, self.step_ms = clock, prefill_ms, step_ms

    def generate(self, prompts, max_new_tokens):
        self.clock.now += (self.prefill_ms + self.step_ms * (max_new_tokens - 1)) / 1000.0
        return [[0] * max_new_tokens for _ in prompts]


class _Clock:
    now = 0.0

    def __call__(self):
        return self.now


def test_decode_rate_excludes_the_first_token(monkeypatch):
    clock = _Clock()
    real = decoding.time_alternately
    monkeypatch.setattr(decoding, "time_alternately", lambda runners, **kw: real(runners, clock=clock, **kw))
    model = _FakeModel(clock, prefill_ms=40.0, step_ms=5.0)
    speeds = decoding.measure_decoding(
        {"m": model}, [[1] * 10] * 8, batch_sizes=(1, 8), new_tokens=11, repeats=2
    )
    for batch, speed in speeds["m"].items():
        assert speed.ttft_ms == pytest.approx(40.0)
        assert speed.decode_tokens_per_s == pytest.approx(batch * 1000.0 / 5.0)  # 10 tokens in 50 ms, per row
        assert speed.prefill_tokens_per_s == pytest.approx(batch * 10 * 1000.0 / 40.0)


def test_sub_millisecond_calls_are_repeated_within_a_sample(monkeypatch):
    """A model whose call is far below the timer's useful resolution is called many times per sample; the figures
    are still per call: prefill 0.02 ms and 0.01 ms per later token give exactly 1e5 decode tokens/s per row."""
    clock = _Clock()
    real = decoding.time_alternately
    monkeypatch.setattr(decoding, "time_alternately", lambda runners, **kw: real(runners, clock=clock, **kw))
    model = _FakeModel(clock, prefill_ms=0.02, step_ms=0.01)
    calls = []
    original = model.generate
    model.generate = lambda prompts, n: calls.append(n) or original(prompts, n)
    speeds = decoding.measure_decoding(
        {"m": model}, [[1] * 4] * 8, batch_sizes=(1,), new_tokens=5, repeats=2, min_sample_ms=10.0
    )
    speed = speeds["m"][1]
    assert speed.ttft_ms == pytest.approx(0.02)
    assert speed.decode_tokens_per_s == pytest.approx(1000.0 / 0.01)
    assert len(calls) > 100  # the call was repeated inside the samples
