"""Online distillation on a stream (scripts/distill_online.py): a run killed mid-chunk resumes to the same student as
an uninterrupted run, every chunk trained once; the teacher is refreshed when due; bad chunks and a changed stream are
refused before they are trained on. Tiny BERT models built from configs, chunks as CSV files in tmp_path.

References: the uninterrupted run's student (an invariant: resume = no interruption), the teacher's weights before and
after each chunk (refreshed exactly at chunks N-1, 2N-1, ...)."""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification

from hf_distill.tasks.online import IterableChunks, RowChunks, checkpoints
from hf_distill.tasks.online.stream import FolderChunks

REPO = Path(__file__).resolve().parents[2]
LABELS = ("sport", "tech", "politics")
WORDS = {
    "sport": "game team win lose star".split(),
    "tech": "phone computer price market".split(),
    "politics": "vote election world".split(),
}
FILLER = "the a it this that and very".split()


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_online_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


distill_online = _load_script("distill_online")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rows(labels, count, seed, unlabelled=0):
    rng = random.Random(seed)
    rows = [
        {"text": " ".join([rng.choice(WORDS[label]), *rng.sample(FILLER, 3)]), "label": label}
        for label in labels
        for _ in range(count)
    ]
    rows += [{"text": " ".join(rng.sample(FILLER, 4)), "label": ""} for _ in range(unlabelled)]
    rng.shuffle(rows)
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def stream(tmp_path, bert_tokenizer):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(bert_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64, num_labels=3, id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )  # fmt: skip
    teacher = BertForSequenceClassification(config)
    teacher.save_pretrained(tmp_path / "teacher")
    bert_tokenizer.save_pretrained(tmp_path / "teacher")
    folder = tmp_path / "incoming"
    folder.mkdir()
    # drift: politics arrives from the third chunk on; the second chunk has unlabelled rows too
    plan = [(("sport", "tech"), 0), (("sport", "tech"), 2), (LABELS, 0), (("tech", "politics"), 0)]
    for index, (labels, unlabelled) in enumerate(plan):
        _write(folder / f"chunk_{index:03d}.csv", _rows(labels, 3, index, unlabelled))
    _write(tmp_path / "test.csv", _rows(LABELS, 2, 99))
    return {"teacher": str(tmp_path / "teacher"), "folder": folder, "test": str(tmp_path / "test.csv")}


def _flags(stream, output: Path, *extra: str) -> list[str]:
    return [
        "--teacher_model_name_or_path", stream["teacher"], "--student_num_layers", "1",
        "--stream_dir", str(stream["folder"]), "--eval_file", stream["test"], "--refresh_every", "2",
        "--refresh_learning_rate", "1e-3", "--output_dir", str(output), "--num_train_epochs", "1",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--report_to", "none",
        "--disable_tqdm", "true", "--seed", "3", "--keep_checkpoints", "0", "--max_seq_length", "16", *extra,
    ]  # fmt: skip


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_a_killed_run_resumes_to_the_same_student_training_each_chunk_once(tmp_path, stream, monkeypatch):
    straight = distill_online.main(_flags(stream, tmp_path / "straight"))
    assert [chunk["name"] for chunk in straight["chunks"]] == [f"chunk_{i:03d}.csv" for i in range(4)]
    assert [m["teacher_refreshed"] for m in straight["metrics"]] == [False, True, False, True]
    assert all(
        m["eval"]["student"] is not None and m["prequential"]["teacher"] is not None
        for m in straight["metrics"]
    )

    write = checkpoints.write_checkpoint

    class DiesWhileSaving:  # the student is written, then the process is killed before the checkpoint completes
        def __init__(self, model):
            self.model = model

        def save_pretrained(self, folder):
            self.model.save_pretrained(folder)
            raise KeyboardInterrupt("killed while chunk 2 was being saved")

    def killed_at_chunk_2(output_dir, index, state, student, *args, **kwargs):
        return write(
            output_dir, index, state, DiesWhileSaving(student) if index == 2 else student, *args, **kwargs
        )

    monkeypatch.setattr(checkpoints, "write_checkpoint", killed_at_chunk_2)
    with pytest.raises(KeyboardInterrupt):
        distill_online.main(_flags(stream, tmp_path / "killed"))
    monkeypatch.setattr(checkpoints, "write_checkpoint", write)
    folders = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert folders == [
        "chunk-00000",
        "chunk-00001",
    ]  # nothing of chunk 2 survived the kill, no temporary folder
    resumed = distill_online.main(_flags(stream, tmp_path / "killed"))
    assert [m["chunk"] for m in resumed["metrics"]] == [0, 1, 2, 3]  # chunk 2 once, none skipped
    assert resumed["chunks"] == straight["chunks"]
    want, got = _weights(tmp_path / "straight" / "student"), _weights(tmp_path / "killed" / "student")
    assert want.keys() == got.keys()
    # bit for bit on one machine; the tolerance only allows for kernels that round by alignment
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    summary = json.loads((tmp_path / "killed" / "stream_summary.json").read_text())
    assert summary["teacher"].endswith("chunk-00003/teacher") and len(summary["metrics"]) == 4


def test_the_teacher_changes_only_when_refreshed(tmp_path, stream):
    state = distill_online.main(_flags(stream, tmp_path / "run", "--refresh_every", "3"))
    assert [m["teacher_refreshed"] for m in state["metrics"]] == [False, False, True, False]
    teacher = _weights(Path(stream["teacher"]))
    refreshed = _weights(tmp_path / "run" / "checkpoints" / "chunk-00002" / "teacher")
    assert any(not torch.equal(teacher[name], refreshed[name]) for name in teacher)
    assert not (tmp_path / "run" / "checkpoints" / "chunk-00001" / "teacher").exists()
    # prequential accuracy: the initial teacher on chunks 0-2, the refreshed one on chunk 3
    assert state["teacher"]["checkpoint"] == "chunk-00002"


def test_keep_checkpoints_keeps_the_newest_and_the_teachers(tmp_path, stream):
    distill_online.main(_flags(stream, tmp_path / "run", "--keep_checkpoints", "1", "--refresh_every", "3"))
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["chunk-00002", "chunk-00003"]  # chunk 2 holds the current teacher


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], r"chunk chunk_002.csv is empty"),
        (
            [{"text": "the game", "label": "weather"}],
            r"labels \['weather'\] that the model's head does not know",
        ),
    ],
)
def test_a_bad_chunk_is_refused_before_it_is_trained_on(tmp_path, stream, rows, message):
    path = stream["folder"] / "chunk_002.csv"
    if rows:
        _write(path, rows)
    else:
        path.write_text("text,label\n")
    with pytest.raises(ValueError, match=message):
        distill_online.main(_flags(stream, tmp_path / "run"))
    done = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert done == ["chunk-00000", "chunk-00001"]


def test_a_changed_stream_or_other_settings_are_refused_on_resume(tmp_path, stream):
    distill_online.main(_flags(stream, tmp_path / "run", "--max_chunks", "2"))
    with pytest.raises(ValueError, match=r"other settings \(refresh_every: 2 then, 1 now"):
        distill_online.main(_flags(stream, tmp_path / "run", "--refresh_every", "1"))
    _write(stream["folder"] / "chunk_001.csv", _rows(("sport",), 2, 50))
    with pytest.raises(
        ValueError, match=r"chunk 1 of the stream is chunk_001.csv .* the stream changed since"
    ):
        distill_online.main(_flags(stream, tmp_path / "run"))


def test_python_chunk_sources(tmp_path):
    rows = [{"text": f"row {i}", "label": LABELS[i % 3]} for i in range(7)]
    chunks = list(RowChunks(iter(rows), 3))
    assert [len(chunk.rows) for chunk in chunks] == [3, 3, 1]
    again = list(IterableChunks([rows[:3], ("late", rows[3:6]), {"text": ["x"], "label": ["tech"]}]))
    assert [chunk.name for chunk in again] == ["chunk-00000", "late", "chunk-00002"]
    assert again[0].fingerprint == chunks[0].fingerprint  # the same rows, the same fingerprint
    assert again[1].fingerprint != chunks[0].fingerprint
    folder = tmp_path / "stream"
    folder.mkdir()
    _write(folder / "b.csv", rows[:2])
    _write(folder / ".a.csv.tmp", rows[:2])  # a chunk still being written
    assert [chunk.name for chunk in FolderChunks(folder)] == ["b.csv"]
