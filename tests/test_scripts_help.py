"""Every script in scripts/ answers --help: argparse formats each help string with `%` (a bare `25%` there raises
`TypeError: %o format` only when help is printed), so a broken string goes unnoticed until someone asks for help.

Each script runs in its own interpreter (the test session's, i.e. the venv's), as a user would start it; all of
them start at once, since importing torch and transformers dominates and the runs are independent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(path.name for path in (REPO / "scripts").glob("*.py") if path.name != "__init__.py")

# Flags each script's usage must name: the ones a user starts from. A script not listed here (a new one) is still
# run, and must exit 0 with a usage text.
KEY_FLAGS = {
    "cache_teacher_logits.py": [
        "--teacher_model_name_or_path",
        "--cache_output_dir",
        "--top_k",
        "--block_size",
    ],
    "compress.py": ["--config", "--output_dir", "--stage", "--teacher_model_name_or_path", "--test_file"],
    "demo_bbc.py": ["--output_dir", "--student_num_layers", "--temperature", "--alpha"],
    "distill_glue.py": [
        "--teacher_model_name_or_path",
        "--student_num_layers",
        "--task_name",
        "--alpha",
        "--mutual_learning",
        "--peer_model_name_or_path",
        "--peer_num_layers",
        "--use_unlabelled_rows",
        "--transfer_split",
        "--augment_model_name_or_path",
    ],
    "distill_lm.py": [
        "--teacher_model_name_or_path",
        "--block_size",
        "--seq_kd",
        "--seq_kd_max_new_tokens",
        "--seq_kd_overwrite_cache",
        "--kd_loss",
    ],
    "distill_translation.py": [
        "--teacher_model_name_or_path",
        "--source_lang",
        "--max_source_length",
        "--max_target_length",
        "--seq_kd_max_length",
        "--predict_with_generate",
    ],
    "train_teacher.py": ["--model_name_or_path", "--task_name", "--train_file", "--output_dir"],
}


@pytest.fixture(scope="module")
def help_runs() -> dict[str, subprocess.CompletedProcess]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    processes = {
        script: subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / script), "--help"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for script in SCRIPTS
    }
    runs = {}
    try:
        for script, process in processes.items():
            stdout, stderr = process.communicate(timeout=600)
            runs[script] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
    return runs


def test_every_known_script_is_present():
    assert set(KEY_FLAGS) <= set(SCRIPTS), f"scripts missing from scripts/: {set(KEY_FLAGS) - set(SCRIPTS)}"


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_zero_and_names_the_key_flags(script, help_runs):
    completed = help_runs[script]
    assert completed.returncode == 0, f"{script} --help failed:\n{completed.stderr[-3000:]}"
    usage = completed.stdout
    assert usage.startswith("usage:"), usage[:500]
    missing = [flag for flag in KEY_FLAGS.get(script, []) if flag not in usage]
    assert not missing, f"{script} --help does not mention {missing}"
