"""Two CPU processes of real DDP training (gloo), against one process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

WORKER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "distributed", "trainer_worker.py")

pytestmark = pytest.mark.slow


def accelerate_launch(num_processes: int, *arguments: str, config_file: str | None = None) -> None:
    if shutil.which("accelerate") is None and not os.path.exists(
        os.path.join(os.path.dirname(sys.executable), "accelerate")
    ):
        pytest.skip("accelerate CLI not installed")
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is not None:
        launcher += ["--config_file", config_file]
    elif num_processes > 1:
        launcher += ["--multi_gpu", "--num_processes", str(num_processes)]
    else:
        launcher += ["--cpu", "--num_processes", "1"]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        launcher
        + [
            "--main_process_port",
            "29533",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ]
        + list(arguments),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def test_two_ranks_match_one_rank_with_the_same_global_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    accelerate_launch(1, WORKER, str(one), "8")
    accelerate_launch(2, WORKER, str(two), "4")

    single = json.loads((one / "rank0.json").read_text())
    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert single["world_size"] == 1 and ranks[0]["world_size"] == 2

    # the teacher is never wrapped in DDP; evaluation sees each of the 7 examples once
    assert not any(report["teacher_wrapped"] for report in ranks)
    assert all(report["eval_examples"] == 7 for report in ranks + [single])

    # both ranks hold the same student and projections, equal to the single-process run's
    for name, values in single["weights"].items():
        for report in ranks:
            torch.testing.assert_close(
                torch.tensor(report["weights"][name]), torch.tensor(values), rtol=1e-4, atol=1e-5
            )
    for name, values in single["projections"].items():
        for report in ranks:
            torch.testing.assert_close(
                torch.tensor(report["projections"][name]), torch.tensor(values), rtol=1e-4, atol=1e-5
            )
    assert ranks[0]["losses"] == pytest.approx(single["losses"], rel=1e-4)

    # only the main process writes the model, card and checkpoints (one copy, no per-rank files besides ours)
    assert (two / "model.safetensors").is_file() and (two / "README.md").is_file()
    assert sorted(p.name for p in two.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-3"]
