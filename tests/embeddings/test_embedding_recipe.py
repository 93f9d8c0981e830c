"""`hf-distill embeddings` end to end on a tiny sentence-transformers teacher and text files: the student folder
loads in SentenceTransformer in the teacher's space, its card says what loads it, the report holds the fields
outside checks read, a rerun in the same folder resumes instead of retraining, and bad input is refused before any
training."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml
from embedding_helpers import TEXTS, TOPICS, st_teacher_folder
from huggingface_hub import ModelCard

from hf_distill import cli

REPORT_FIELDS = ("knn_accuracy", "mrr_at_10", "mean_cosine_to_teacher", "params", "size_bytes", "throughput_b32",
                 "speedup_b32")  # fmt: skip


def _files(tmp_path) -> list[str]:
    (tmp_path / "train.txt").write_text("\n".join(TEXTS * 2) + "\n")
    for name, rows in (("index", zip(TEXTS, TOPICS)), ("queries", list(zip(TEXTS, TOPICS))[::2])):
        with open(tmp_path / f"{name}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(rows)
    return [
        "--train_file", str(tmp_path / "train.txt"), "--index_file", str(tmp_path / "index.csv"),
        "--eval_file", str(tmp_path / "queries.csv"), "--max_seq_length", "24", "--calibration_texts", "16",
    ]  # fmt: skip


def _config(tmp_path, teacher) -> str:
    values = {
        "teacher_model_name_or_path": str(teacher),
        "student_num_layers": 1,
        "student_hidden": 16,
        "max_steps": 3,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-3,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "latency_warmup": 0,
        "latency_repeats": 1,
        "embedding_cosine_weight": 1.0,
        "int8": False,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_the_recipe_writes_a_student_sentence_transformers_loads_and_the_report(tmp_path):
    from sentence_transformers import SentenceTransformer

    teacher = st_teacher_folder(tmp_path)
    out = tmp_path / "out"
    argv = [
        "--config",
        _config(tmp_path, teacher),
        *_files(tmp_path),
        "--output_dir",
        str(out),
        "--int8",
        "true",
    ]
    results = cli.run("embeddings", argv)

    student = SentenceTransformer(str(out / "student"), device="cpu")
    embeddings = student.encode(TEXTS, convert_to_numpy=True)
    teacher_embeddings = SentenceTransformer(str(teacher), device="cpu").encode(TEXTS, convert_to_numpy=True)
    assert (
        embeddings.shape == teacher_embeddings.shape
    )  # the teacher's space: same dimension, comparable by cosine
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)  # normalised as the teacher's

    card = ModelCard.load(out / "student" / "README.md")
    assert card.data.library_name == "sentence-transformers"
    assert card.data.pipeline_tag == "sentence-similarity"

    report = json.loads((out / "embedding_report.json").read_text())
    assert report["models"] == ["teacher", "student", "student_int8"]
    for name in ("teacher", "student", "student_int8"):
        for field in REPORT_FIELDS:
            assert isinstance(report[name][field], (int, float)), (name, field)
    assert report["teacher"]["speedup_b32"] == pytest.approx(1.0)
    assert report["teacher"]["mean_cosine_to_teacher"] == pytest.approx(1.0)
    assert report["student"]["params"] < report["teacher"]["params"]
    assert set(report["student"]["targets"]) == {
        "size_pct_of_teacher", "speedup_b32", "knn_retained_pct", "mean_cosine_to_teacher"
    }  # fmt: skip
    assert results["student"]["knn_accuracy"] == report["student"]["knn_accuracy"]
    for suffix in ("md", "png"):
        assert (out / f"embedding_report.{suffix}").stat().st_size > 0

    # a rerun in the same folder measures again without retraining; other settings there are refused
    trained_at = (out / "student" / "model.safetensors").stat().st_mtime_ns
    cli.run("embeddings", argv)
    assert (out / "student" / "model.safetensors").stat().st_mtime_ns == trained_at
    with pytest.raises(ValueError, match="other settings"):
        cli.run("embeddings", [*argv, "--learning_rate", "0.01"])


def test_a_teacher_without_pooling_is_refused_before_training_naming_the_flag(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    teacher = st_teacher_folder(tmp_path)
    plain = tmp_path / "plain"
    AutoModel.from_pretrained(teacher).save_pretrained(plain)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(plain)
    out = tmp_path / "out"
    argv = ["--config", _config(tmp_path, plain), *_files(tmp_path), "--output_dir", str(out)]
    with pytest.raises(ValueError, match="--pooling"):
        cli.run("embeddings", argv)
    assert not (out / "training").exists()
    cli.run("embeddings", [*argv, "--pooling", "mean", "--normalize", "true"])
    assert (out / "student" / "modules.json").is_file()


def test_flags_are_checked_before_anything_is_loaded(tmp_path):
    with pytest.raises(ValueError, match="No student shape"):
        cli.run("embeddings", ["--bbc_demo", "true", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="no flag of this recipe"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("student_num_layers: 1\nbbc_demo: true\nnot_a_flag: 3\n")
        cli.run("embeddings", ["--config", str(bad), "--output_dir", str(tmp_path)])
