"""The `hf-distill` command (hf_distill/cli.py): it lists every recipe of scripts/, hands each one its own flags
and config files, and a run through it equals the same run through the script's path. The subprocess tests start
the installed command (`pip install -e .` provides it), `python -m hf_distill` and `accelerate launch -m`, as a
user would; they are slow because each interpreter imports torch and transformers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from hf_distill import cli

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPTS = sorted(path.stem for path in (REPO / "scripts").glob("*.py") if path.stem != "__init__")

# Flags each command's help must name: the ones a user starts from.
KEY_FLAGS = {
    "glue": ["--teacher_model_name_or_path", "--student_num_layers", "--task_name", "--alpha"],
    "lm": ["--teacher_model_name_or_path", "--block_size", "--seq_kd", "--kd_loss"],
    "translation": ["--teacher_model_name_or_path", "--source_lang", "--predict_with_generate"],
    "teacher": ["--model_name_or_path", "--task_name", "--train_file", "--output_dir"],
    "cache-logits": ["--teacher_model_name_or_path", "--cache_output_dir", "--top_k"],
    "compress": ["--config", "--output_dir", "--stage"],
    "demo-bbc": ["--output_dir", "--student_num_layers", "--temperature", "--alpha"],
    "online": ["--teacher_model_name_or_path", "--stream_dir", "--refresh_every", "--output_dir"],
    "embeddings": ["--config", "--teacher_model_name_or_path", "--pooling", "--student_hidden"],
}


def _executable(name: str) -> str:
    """A console script of this venv (next to its python), else one on PATH."""
    path = BIN / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` is not installed next to {sys.executable} nor on PATH; run `pip install -e .`")
    return found


def _environment() -> dict[str, str]:
    # One thread: the runs compared below must do the same float operations, and 2 cores are shared.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}


def _run_all(commands: dict[str, list[str]], cwd: Path) -> dict[str, subprocess.CompletedProcess]:
    """Start every command at once (importing torch dominates and they are independent), wait for all."""
    processes = {
        key: subprocess.Popen(
            command, cwd=cwd, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for key, command in commands.items()
    }
    runs = {}
    try:
        for key, process in processes.items():
            stdout, stderr = process.communicate(timeout=900)
            runs[key] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
    return runs


def _check(completed: subprocess.CompletedProcess) -> str:
    assert completed.returncode == 0, (
        f"{' '.join(map(str, completed.args))} exited {completed.returncode}:\n{completed.stderr[-3000:]}"
    )
    return completed.stdout


# --------------------------------------------------------------------------------------------- in process
def test_every_script_has_a_command():
    assert sorted(command.module for command in cli.COMMANDS.values()) == SCRIPTS
    assert set(KEY_FLAGS) == set(cli.COMMANDS)


def test_help_lists_every_command_on_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    for name, command in cli.COMMANDS.items():
        matching = [line for line in lines if line.split()[:1] == [name]]
        assert len(matching) == 1, f"{name!r} is not listed once in:\n" + "\n".join(lines)
        assert f"scripts/{command.module}.py" in matching[0]


@pytest.mark.parametrize("argv", [[], ["distil"], ["--output_dir", "out"]])
def test_a_missing_or_unknown_command_exits_2_naming_the_commands(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "usage: hf-distill <command>" in error
    if argv == ["distil"]:
        assert all(repr(name) in error for name in cli.COMMANDS)


def test_command_help_is_the_scripts_own_under_the_commands_name(capsys):
    argv_before = list(sys.argv)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["teacher", "--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    assert usage.startswith("usage: hf-distill teacher ")
    assert all(flag in usage for flag in KEY_FLAGS["teacher"])
    assert sys.argv == argv_before


def test_run_refuses_an_unknown_command():
    with pytest.raises(ValueError, match="'distil'.*glue, lm, translation"):
        cli.run("distil", [])


# --------------------------------------------------------------------------------------------- subprocesses
@pytest.fixture(scope="module")
def help_runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    hf_distill = _executable("hf-distill")
    accelerate = shutil.which("accelerate", path=str(BIN)) or shutil.which("accelerate")
    commands = {"": [hf_distill, "--help"]}
    commands.update({name: [hf_distill, name, "--help"] for name in cli.COMMANDS})
    commands["python -m hf_distill"] = [sys.executable, "-m", "hf_distill", "lm", "--help"]
    if accelerate is not None:
        launch = [accelerate, "launch", "--num_processes", "1", "--num_machines", "1"]
        launch += ["--mixed_precision", "no", "--dynamo_backend", "no"]
        commands["accelerate -m cli"] = [*launch, "-m", "hf_distill.cli", "glue", "--help"]
        commands["accelerate -m script"] = [*launch, "-m", "hf_distill.scripts.distill_glue", "--help"]
    # Outside the checkout: the command must not depend on the working directory.
    return _run_all(commands, cwd=tmp_path_factory.mktemp("elsewhere"))


@pytest.mark.slow
def test_installed_command_lists_every_command(help_runs):
    usage = _check(help_runs[""])
    assert usage.startswith("usage: hf-distill <command>")
    for name in cli.COMMANDS:
        assert any(line.split()[:1] == [name] for line in usage.splitlines()), f"{name!r} not listed"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_command_help_exits_zero_and_names_the_key_flags(name, help_runs):
    usage = _check(help_runs[name])
    assert usage.startswith(f"usage: hf-distill {name} ")
    missing = [flag for flag in KEY_FLAGS[name] if flag not in usage]
    assert not missing, f"hf-distill {name} --help does not mention {missing}"


@pytest.mark.slow
def test_python_dash_m_hf_distill(help_runs):
    assert all(flag in _check(help_runs["python -m hf_distill"]) for flag in KEY_FLAGS["lm"])


@pytest.mark.slow
@pytest.mark.parametrize("key", ["accelerate -m cli", "accelerate -m script"])
def test_accelerate_launch_dash_m(key, help_runs):
    if key not in help_runs:
        pytest.skip("the `accelerate` command is not installed")
    usage = _check(help_runs[key])
    assert all(flag in usage for flag in KEY_FLAGS["glue"])


@pytest.mark.slow
def test_a_run_through_the_command_equals_the_run_through_the_script(tmp_path, lm_tokenizer):
    """Three runs of 3 distillation steps on a tiny Llama: `python scripts/distill_lm.py FLAGS`, `hf-distill lm
    FLAGS` and `hf-distill lm run.yaml` with the same settings must train the same student."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(lm_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=lm_tokenizer.bos_token_id,
        eos_token_id=lm_tokenizer.eos_token_id,
        pad_token_id=lm_tokenizer.pad_token_id,
    )
    teacher = tmp_path / "teacher"
    LlamaForCausalLM(config).save_pretrained(teacher)
    lm_tokenizer.save_pretrained(teacher)
    words = ["the movie was good", "i love this film", "a very happy story", "it was not fun", "bad movie"]
    train = tmp_path / "train.txt"
    train.write_text("".join(f"{words[i % 5]} and {words[(3 * i + 1) % 5]}\n" for i in range(40)))

    settings = {
        "teacher_model_name_or_path": str(teacher),
        "student_num_layers": 1,
        "train_file": str(train),
        "block_size": 16,
        "do_train": True,
        "kd_loss": "forward_kl",
        "temperature": 2.0,
        "alpha": 0.5,
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": 0,
    }

    def flags(output_dir: Path) -> list[str]:
        values = {**settings, "output_dir": str(output_dir)}
        return [item for key, value in values.items() for item in (f"--{key}", str(value))]

    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({**settings, "output_dir": str(tmp_path / "command_yaml")}))
    hf_distill = _executable("hf-distill")
    runs = _run_all(
        {
            "script": [sys.executable, str(REPO / "scripts" / "distill_lm.py"), *flags(tmp_path / "script")],
            "command": [hf_distill, "lm", *flags(tmp_path / "command")],
            "command_yaml": [hf_distill, "lm", str(config_file)],
        },
        cwd=tmp_path,
    )
    for completed in runs.values():
        _check(completed)

    results = {key: json.loads((tmp_path / key / "all_results.json").read_text()) for key in runs}
    weights = {key: load_file(tmp_path / key / "model.safetensors") for key in runs}
    assert results["script"]["train_loss"] > 0
    assert weights["script"]["model.layers.0.self_attn.q_proj.weight"].shape == (32, 32)
    kd_losses = {
        key: [
            entry["kd_loss"]
            for entry in json.loads((tmp_path / key / "trainer_state.json").read_text())["log_history"]
            if "kd_loss" in entry
        ]
        for key in runs
    }
    assert len(kd_losses["script"]) == 3
    for key in ("command", "command_yaml"):
        assert results[key]["train_loss"] == results["script"]["train_loss"], key
        assert kd_losses[key] == kd_losses["script"], key
        assert weights[key].keys() == weights["script"].keys(), key
        for name, tensor in weights["script"].items():
            assert torch.equal(weights[key][name], tensor), f"{key}: {name} differs"
