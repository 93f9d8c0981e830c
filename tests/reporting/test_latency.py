"""hf_distill.reporting.latency: round-robin timing, its statistics against numpy's, and runners for torch models."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch
from torch import nn

from hf_distill.reporting.latency import Timing, batch_runner, summarize, time_alternately


class FakeClock:
    """A clock that only moves when a fake runner says it ran for some time."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_runners(durations_ms: dict[str, list[float]], clock: FakeClock, calls: list[str]):
    """Runners that log their name and advance the clock by their next duration."""
    remaining = {name: list(values) for name, values in durations_ms.items()}

    def make(name):
        def run():
            calls.append(name)
            clock.now += remaining[name].pop(0) / 1000.0

        return run

    return {name: make(name) for name in durations_ms}


def test_rounds_call_every_runner_once_with_a_rotating_start():
    clock, calls = FakeClock(), []
    runners = fake_runners({name: [1.0] * 5 for name in "abc"}, clock, calls)
    timings = time_alternately(runners, repeats=3, warmup=2, clock=clock)
    rounds = [calls[i : i + 3] for i in range(0, len(calls), 3)]
    assert rounds == [list("abc"), list("bca"), list("cab"), list("abc"), list("bca")]
    assert all(timings[name].repeats == 3 for name in "abc")


def test_statistics_match_numpy_on_the_timed_rounds_only():
    rng = np.random.default_rng(0)
    warmup, repeats = 2, 11
    durations = {
        "teacher": list(rng.uniform(8.0, 12.0, warmup + repeats)),
        "student": list(rng.uniform(2.0, 5.0, warmup + repeats)),
    }
    durations["teacher"][0] = 500.0  # a slow first call (lazy initialisation) must not count
    clock, calls = FakeClock(), []
    timings = time_alternately(
        fake_runners(durations, clock, calls), repeats=repeats, warmup=warmup, wide_spread=0.4, clock=clock
    )
    for name, values in durations.items():
        timed = np.array(values[warmup:])
        p10, p90 = np.percentile(timed, [10, 90])
        timing = timings[name]
        assert timing.median_ms == pytest.approx(statistics.median(timed), rel=1e-9)
        assert timing.low_ms == pytest.approx(p10, rel=1e-9)
        assert timing.high_ms == pytest.approx(p90, rel=1e-9)
        assert timing.spread == pytest.approx((p90 - p10) / np.median(timed), rel=1e-9)
        assert timing.wide == ((p90 - p10) / np.median(timed) > 0.4)
        assert timing.samples_ms == pytest.approx(list(timed), rel=1e-9)
    assert timings["student"].wide and not timings["teacher"].wide  # spreads 0.50 and 0.33 with this seed


def test_wide_flag_follows_the_threshold():
    samples = [10.0, 10.0, 10.0, 10.0, 14.0, 6.0, 10.0, 10.0, 10.0, 10.0]
    p10, p90 = np.percentile(samples, [10, 90])
    spread = (p90 - p10) / 10.0
    assert summarize(samples, wide_spread=spread - 1e-6).wide
    assert not summarize(samples, wide_spread=spread + 1e-6).wide
    single = summarize([3.0])
    assert single == Timing(3.0, 3.0, 3.0, 0.0, 1, False, (3.0,))
    assert set(single.to_dict()) == {"median_ms", "low_ms", "high_ms", "spread", "repeats", "wide"}


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        time_alternately({"a": lambda: None}, repeats=0)
    with pytest.raises(ValueError, match="warmup must be >= 0"):
        time_alternately({"a": lambda: None}, warmup=-1)
    with pytest.raises(ValueError, match="at least one runner"):
        time_alternately({})
    with pytest.raises(TypeError, match="batch_runner takes"):
        batch_runner(object(), {})


def test_real_clock_orders_sleeps():
    import time

    timings = time_alternately(
        {"slow": lambda: time.sleep(0.004), "fast": lambda: time.sleep(0.001)}, repeats=3, warmup=0
    )
    assert timings["slow"].median_ms > timings["fast"].median_ms >= 1.0


class _Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.seen = []

    def forward(self, x):
        self.seen.append((self.training, torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return self.linear(x)


def test_batch_runner_runs_a_torch_model_in_eval_and_inference_mode():
    torch.manual_seed(0)
    model = _Recorder().train()
    x = torch.randn(4, 3)
    run = batch_runner(model, {"x": x})
    output = run()
    assert model.seen == [(False, True, False)]
    torch.testing.assert_close(output, model.linear(x).detach())
