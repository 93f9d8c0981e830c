"""Every benchmark with a `--smoke` mode runs it: exit status 0, and its smoke JSON is written and parses.

Scripts are found by reading benchmarks/bench_*.py for the "--smoke" flag. Where a script takes an output flag the
JSON goes to tmp_path: --results_dir (a folder; <name>_smoke.json inside), --output or --json (a file); otherwise the
script's own benchmarks/results/<name>_smoke.json must be (re)written by the run. A --work_dir flag is pointed at
tmp_path too, so nothing is left in outputs/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SMOKE_SCRIPTS = sorted(path for path in BENCHMARKS.glob("bench_*.py") if "--smoke" in path.read_text())
# Smoke runs measured above ~30 s on the shared 2-core machine (2026-11-30, load average 3-4): bench_lm 69 s,
# bench_transfer 63 s. The others took 8-25 s.
SLOW = {"bench_lm", "bench_transfer"}
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_DISABLED": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def _has_flag(source: str, flag: str) -> bool:
    return f'"{flag}"' in source or f"'{flag}'" in source


def _command(script: Path, tmp_path: Path) -> tuple[list[str], Path]:
    """The smoke command line and where its JSON must appear."""
    source, name = script.read_text(), script.stem
    command = [sys.executable, str(script), "--smoke"]
    if _has_flag(source, "--results_dir"):
        command += ["--results_dir", str(tmp_path)]
        expected = tmp_path / f"{name}_smoke.json"
    elif _has_flag(source, "--output") or _has_flag(source, "--json"):
        expected = tmp_path / f"{name}_smoke.json"
        command += ["--output" if _has_flag(source, "--output") else "--json", str(expected)]
    else:
        expected = BENCHMARKS / "results" / f"{name}_smoke.json"
    if _has_flag(source, "--work_dir"):
        command += ["--work_dir", str(tmp_path / "work")]
    return command, expected


def test_smoke_scripts_are_found():
    names = {path.name for path in SMOKE_SCRIPTS}
    assert {"bench_classification.py", "bench_peers.py"} <= names, names


@pytest.mark.parametrize(
    "script",
    [pytest.param(path, marks=pytest.mark.slow) if path.stem in SLOW else path for path in SMOKE_SCRIPTS],
    ids=lambda path: path.stem,
)
def test_benchmark_smoke(script: Path, tmp_path: Path):
    command, expected = _command(script, tmp_path)
    started = time.time()
    completed = subprocess.run(
        command,
        cwd=tmp_path,  # a script that writes beside the working directory writes into tmp_path
        env={**os.environ, **OFFLINE},
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = (completed.stdout + completed.stderr)[-4000:]
    assert completed.returncode == 0, f"{' '.join(command)} exited {completed.returncode}:\n{output}"
    assert expected.is_file(), f"{script.name} --smoke wrote no {expected}:\n{output}"
    assert expected.stat().st_mtime >= started - 1, f"{expected} is older than this run"
    results = json.loads(expected.read_text())
    assert isinstance(results, dict) and results, f"{expected} holds no results"
