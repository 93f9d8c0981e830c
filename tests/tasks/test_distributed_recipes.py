"""Every recipe script under two CPU processes (DDP over gloo): it runs, only the main process writes results,
and evaluation counts each example once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    """A port nothing listens on now: a fixed one can still be held by the previous launch's sockets."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_two_ranks(script: str, argv: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", str(_free_port()), str(REPO / "scripts" / script), *argv]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    # Every rank ends cleanly: one that left while the main one still timed the report was aborted by gloo.
    assert "terminate called" not in result.stderr, result.stderr[-3000:]
    return result


def test_translation_recipe_on_two_ranks(tmp_path, seq2seq_tokenizer):
    import test_translation as helpers

    teacher_dir = helpers._save(helpers._marian(seq2seq_tokenizer), seq2seq_tokenizer, tmp_path / "teacher")
    train = helpers._write_jsonl(tmp_path / "train.jsonl", helpers.PAIRS)
    validation = helpers._write_jsonl(tmp_path / "valid.jsonl", helpers.PAIRS[:7])
    output_dir = tmp_path / "out"
    launch_two_ranks(
        "distill_translation.py",
        [
            "--teacher_model_name_or_path", teacher_dir,
            "--student_num_layers", "2", "--student_num_decoder_layers", "1",
            "--train_file", train, "--validation_file", validation, "--test_file", validation,
            "--source_lang", "en", "--target_lang", "de",
            "--do_train", "--do_eval", "--do_predict", "--predict_with_generate", "--generation_max_length", "8",
            "--max_steps", "2", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
            "--seq_kd", "--seq_kd_num_beams", "2", "--seq_kd_max_length", "8",
            "--report_batch_sizes", "1,2", "--latency_warmup", "0", "--latency_repeats", "1",
            "--output_dir", str(output_dir), "--report_to", "none", "--save_strategy", "no",
        ],
    )  # fmt: skip
    results = json.loads((output_dir / "eval_results.json").read_text())
    assert results["eval_samples"] == 7
    # generation over 7 examples on 2 ranks pads the last batch; the padding must not come back as predictions
    predictions = (output_dir / "generated_predictions.txt").read_text().splitlines()
    assert len(predictions) == 7
    assert "eval_bleu" in results and "eval_chrf" in results
    assert (output_dir / "distill_report.json").is_file() and (output_dir / "README.md").is_file()
    assert (output_dir / "seq_kd_cache" / "manifest.json").is_file()
    leftovers = [p.name for p in output_dir.rglob("*") if p.name.startswith(".tmp")]
    assert leftovers == []


def test_language_modeling_recipe_on_two_ranks(tmp_path, lm_tokenizer):
    import test_language_modeling as helpers

    teacher = helpers.save_model(
        tmp_path / "teacher", helpers.tiny_llama(len(lm_tokenizer), tokenizer=lm_tokenizer), lm_tokenizer
    )
    train = helpers.write_lines(tmp_path / "train.txt", helpers.sentences(60, seed=0))
    valid = helpers.write_lines(tmp_path / "valid.txt", helpers.sentences(12, seed=1))
    output_dir = tmp_path / "out"
    flags = [
        "--teacher_model_name_or_path", teacher, "--student_num_layers", "1",
        "--train_file", train, "--validation_file", valid, "--block_size", "16",
        "--do_train", "--do_eval", "--kd_loss", "reverse_kl", "--hidden_weight", "0.5",
    ]  # fmt: skip
    launch_two_ranks("distill_lm.py", flags + helpers.run_flags(output_dir, max_steps=2))
    results = json.loads((output_dir / "eval_results.json").read_text())
    assert results["perplexity"] > 1
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and any("hidden_loss" in entry for entry in state["log_history"])
    assert (output_dir / "distill_report.json").is_file() and (output_dir / "model.safetensors").is_file()


def test_classification_recipe_on_two_ranks(tmp_path, bert_tokenizer):
    import test_classification as helpers

    teacher = helpers._save_teacher(tmp_path / "teacher", bert_tokenizer)
    train = helpers._write(tmp_path / "train.csv", helpers._rows(48, seed=1, two_columns=True))
    validation = helpers._write(tmp_path / "validation.csv", helpers._rows(15, seed=2, two_columns=True))
    test = helpers._write(tmp_path / "test.csv", helpers._rows(15, seed=3, two_columns=True))
    output_dir = tmp_path / "out"
    flags = [
        "--teacher_model_name_or_path", teacher, "--student_num_layers", "2",
        "--train_file", train, "--validation_file", validation, "--test_file", test,
        "--do_train", "--do_eval", "--do_predict", "--hidden_weight", "0.5",
    ]  # fmt: skip
    flags += helpers._training_flags(output_dir, max_steps=2) + [
        "--per_device_eval_batch_size",
        "4",
        "--report_to",
        "none",
    ]
    launch_two_ranks("distill_glue.py", flags)
    # 15 test examples on 2 ranks with batches of 4: the padded repeats must not reach the predictions file
    rows = (output_dir / "predict_results_custom.txt").read_text().strip().splitlines()
    assert len(rows) == 1 + 15
    assert json.loads((output_dir / "eval_results.json").read_text())["eval_samples"] == 15
    assert (output_dir / "distill_report.json").is_file() and (output_dir / "README.md").is_file()


def test_compress_pipeline_on_two_ranks(tmp_path, bert_tokenizer):
    """Training stages run on both ranks, pruning, quantization and the report on the main one; every stage
    folder is written once and the report names them all."""
    import test_compress_script as helpers

    _, teacher, files = helpers.make_setup(tmp_path, bert_tokenizer)
    output_dir = tmp_path / "out"
    stages = [helpers.STAGES[0], helpers.STAGES[1], helpers.STAGES[3]]  # prune, distill, qat
    launch_two_ranks("compress.py", helpers._flags(teacher, files, output_dir, stages))
    report = json.loads((output_dir / "compression_report.json").read_text())
    assert [stage["name"] for stage in report["stages"]] == ["teacher", "pruned", "distilled", "qat"]
    for name in ("pruned", "distilled", "qat"):
        assert (output_dir / "stages" / name / "stage.json").is_file()
    # No half-built folder (the atomic writes' temporaries) is left beside the stages.
    assert sorted(path.name for path in (output_dir / "stages").iterdir()) == ["distilled", "pruned", "qat"]
