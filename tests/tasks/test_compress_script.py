"""scripts/compress.py end to end on a tiny BERT teacher and CSV files in tmp_path: every stage type, the report,
resuming after a stage folder is lost, and the checks that fail before any work."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WORDS
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
)

from hf_distill.scripts import compress

LABELS = ["pos", "neg", "other"]


def _write(path: Path, n: int, seed: int) -> str:
    rng = random.Random(seed)
    # The label is readable from the words, so that a few steps teach something.
    cue = {"pos": "good", "neg": "bad", "other": "car"}
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for _ in range(n):
            label = rng.choice(LABELS)
            words = [rng.choice(WORDS[:40]) for _ in range(rng.randint(3, 9))] + [cue[label]]
            rng.shuffle(words)
            writer.writerow([" ".join(words), label])
    return str(path)


@pytest.fixture
def setup(tmp_path, bert_tokenizer):
    return make_setup(tmp_path, bert_tokenizer)


def make_setup(tmp_path, bert_tokenizer):
    """A tiny BERT teacher (4 layers, width 32, 4 heads) with the data's labels, and train/validation/test CSVs."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(bert_tokenizer), hidden_size=32, num_attention_heads=4, intermediate_size=64,
        num_hidden_layers=4, max_position_embeddings=64, num_labels=3,
        id2label=dict(enumerate(LABELS)), label2id={label: i for i, label in enumerate(LABELS)},
    )  # fmt: skip
    teacher = tmp_path / "teacher"
    BertForSequenceClassification(config).save_pretrained(teacher)
    bert_tokenizer.save_pretrained(teacher)
    files = {
        "train": _write(tmp_path / "train.csv", 48, 1),
        "validation": _write(tmp_path / "validation.csv", 12, 2),
        "test": _write(tmp_path / "test.csv", 24, 3),
    }
    return tmp_path, str(teacher), files


def _flags(teacher, files, output_dir, stages):
    return [
        "--teacher_model_name_or_path", teacher, "--train_file", files["train"],
        "--validation_file", files["validation"], "--test_file", files["test"],
        "--max_seq_length", "16", "--output_dir", str(output_dir), "--num_threads", "1", "--stage", *stages,
    ]  # fmt: skip


STAGES = [
    "prune:name=pruned,heads=0.5,ffn=0.5,hidden=16,layers=2,vocab=data",
    "distill:name=distilled,epochs=1,hidden_weight=1.0",
    "quantize:name=ptq,method=ptq",
    "quantize:name=qat,from=distilled,method=qat,epochs=1",
]


def test_compress_runs_every_stage_writes_the_report_and_resumes(setup):
    tmp_path, teacher, files = setup
    output = tmp_path / "out"
    report = compress.main(_flags(teacher, files, output, STAGES))

    saved = json.loads((output / "compression_report.json").read_text())
    names = [stage["name"] for stage in saved["stages"]]
    assert names == ["teacher", "pruned", "distilled", "ptq", "qat"]  # teacher first, the final stage last
    for stage in saved["stages"]:
        for key in ("name", "path", "metric", "value", "retained", "params", "size_bytes", "latency_ms_b1",
                    "latency_ms_b32", "speedup_b32"):  # fmt: skip
            assert stage[key] is not None, (stage["name"], key)
        path = Path(stage["path"]) if Path(stage["path"]).is_absolute() else output / stage["path"]
        assert path.is_dir()
    assert saved["reference"]["name"] == "teacher_int8_ptq"
    assert (output / "compression_report.md").is_file() and (output / "compression_report.png").is_file()
    assert report["stages"][-1]["name"] == "qat"

    # The pruned stage is an ordinary model folder: standard loaders, the edited config, no masks.
    pruned = AutoModelForSequenceClassification.from_pretrained(output / "stages" / "pruned")
    assert (pruned.config.hidden_size, pruned.config.num_attention_heads) == (16, 2)
    assert (pruned.config.intermediate_size, pruned.config.num_hidden_layers) == (32, 2)
    tokenizer = AutoTokenizer.from_pretrained(output / "stages" / "pruned")
    assert pruned.config.vocab_size == len(tokenizer) < len(AutoTokenizer.from_pretrained(teacher))
    params = sum(p.numel() for p in pruned.parameters())
    assert saved["stages"][1]["params"] == params

    # Accuracy in the report is recomputed here from the distilled folder with plain transformers.
    distilled_dir = output / "stages" / "distilled"
    model = AutoModelForSequenceClassification.from_pretrained(distilled_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(distilled_dir)
    with open(files["test"]) as handle:
        rows = list(csv.DictReader(handle))
    with torch.no_grad():
        logits = model(**tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=16,
                                   return_tensors="pt")).logits  # fmt: skip
    expected = np.mean([model.config.id2label[int(i)] == r["label"] for i, r in zip(logits.argmax(-1), rows)])
    assert saved["stages"][2]["value"] == pytest.approx(expected)

    # A second run finds every stage done; a lost stage folder is rebuilt, and only that one.
    markers = {name: (output / "stages" / name / "stage.json").stat().st_mtime_ns for name in names[1:]}
    import shutil

    shutil.rmtree(output / "stages" / "ptq")
    compress.main(_flags(teacher, files, output, STAGES))
    for name in ("pruned", "distilled", "qat"):
        assert (output / "stages" / name / "stage.json").stat().st_mtime_ns == markers[name]
    assert (output / "stages" / "ptq" / "stage.json").is_file()

    # The same folder with another recipe for a finished stage is refused, naming the folder.
    changed = [STAGES[0].replace("ffn=0.5", "ffn=0.25"), *STAGES[1:]]
    with pytest.raises(ValueError, match="was built by a different recipe"):
        compress.main(_flags(teacher, files, output, changed))


@pytest.mark.parametrize(
    "stages, message",
    [
        (["prune:heads=0.5"], "heads"),  # BERT: heads alone would leave hidden / heads inconsistent
        (["prune:hidden=20"], "20"),  # 20 is not a multiple of the head size 8
        (["prune:layers=9"], "layers"),
        (["prune:hidden=64"], "64"),  # wider than the teacher
    ],
)
def test_impossible_pruning_fails_before_any_work(setup, stages, message):
    tmp_path, teacher, files = setup
    output = tmp_path / "refused"
    with pytest.raises(ValueError, match=message):
        compress.main(_flags(teacher, files, output, stages))
    assert not output.exists()


def test_check_only_validates_without_work(setup, capsys):
    tmp_path, teacher, files = setup
    output = tmp_path / "checked"
    compress.main(_flags(teacher, files, output, STAGES) + ["--check_only"])
    assert "pass every check" in capsys.readouterr().out
    assert not output.exists()


# --- --check_only runs every check a later stage would fail -------------------------------------------------


def _check_only(setup, stages):
    tmp_path, teacher, files = setup
    output = tmp_path / "checked"
    result = compress.main(_flags(teacher, files, output, stages) + ["--check_only"])
    assert not output.exists()
    return result


@pytest.mark.parametrize(
    "stages, message",
    [
        (["distill:temperature=-1"], "temperature: -1 must be > 0"),
        (["distill:temperature=0"], "temperature: 0 must be > 0"),
        (["distill:alpha=1.5"], r"alpha: 1.5 must be in \[0, 1\]"),
        (["distill:learning_rate=-0.001"], "learning_rate: -0.001 must be >= 0"),
        (["distill:hidden_weight=-1"], "hidden_weight: -1 must be >= 0"),
        (["distill:epochs=abc"], "epochs: 'abc' must be a number"),
        (["quantize:method=qat,alpha=-0.5"], r"alpha: -0.5 must be in \[0, 1\]"),
        # The pruned student keeps 2 of the teacher's 4 heads: per-head attention maps cannot be paired.
        (
            ["prune:name=p,hidden=16", "distill:name=d,attention_weight=1"],
            r"stage d: attention matching head by head.*\(p, 2 heads\).*\(teacher, 4 heads\).*mean",
        ),
        # A student with the whole vocabulary cannot read the ids of a vocabulary-pruned teacher.
        (
            ["prune:name=small,vocab=data,hidden=16", "distill:name=a", "prune:name=wide,from=teacher,layers=2",
             "distill:name=b,teacher=a"],
            r"stage b: its student \(wide\) has the teacher's whole vocabulary, but its teacher \(a\) keeps only",
        ),
    ],
)  # fmt: skip
def test_check_only_refuses_what_a_later_stage_would_refuse(setup, stages, message):
    with pytest.raises(ValueError, match=message):
        _check_only(setup, stages)


def test_check_only_accepts_what_works(setup):
    _check_only(setup, ["prune:name=p,hidden=16", "distill:attention_weight=1,attention_head_mapping=mean"])
    _check_only(setup, ["prune:name=p,layers=2", "distill:attention_weight=1,learning_rate=0,alpha=0"])


def test_check_only_names_the_extra_a_quantize_stage_needs(setup, monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a),
    )
    with pytest.raises(ValueError, match=r"\['onnxruntime'\].*pip install \"hf-distill\[compress\]\""):
        _check_only(setup, ["prune:name=p,hidden=16", "quantize:method=ptq"])
    _check_only(setup, ["prune:name=p,hidden=16", "distill:epochs=1"])  # no quantize stage: nothing missing
    assert "pass every check" in capsys.readouterr().out


def test_check_only_refuses_data_files_compress_cannot_read(setup):
    tmp_path, teacher, files = setup
    (tmp_path / "no_label.csv").write_text("text,category\nthe movie,pos\n")
    (tmp_path / "train.json").write_text('{"text": "the movie", "label": "pos"}\n')
    for key, path, message in (
        ("train", str(tmp_path / "missing.csv"), "does not exist"),
        ("test", str(tmp_path / "no_label.csv"), r"no \['label'\]"),
        ("train", str(tmp_path / "train.json"), "reads CSV files"),
    ):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            _check_only((tmp_path, teacher, {**files, key: path}), ["prune:name=p,hidden=16"])


def test_check_only_refuses_heads_llama_cannot_save(tmp_path, bert_tokenizer):
    """check_pruning's save/reload check, reached from the recipe before any work: 8 heads in 4 groups at hidden 64
    lose one group, and LlamaConfig refuses 6 heads at hidden 64."""
    from transformers import LlamaConfig

    _, _, files = make_setup(tmp_path, bert_tokenizer)
    teacher = tmp_path / "llama_teacher"
    LlamaConfig(
        vocab_size=len(bert_tokenizer), hidden_size=64, num_attention_heads=8, num_key_value_heads=4, head_dim=8,
        intermediate_size=32, num_hidden_layers=2, num_labels=3, pad_token_id=0,
    ).save_pretrained(teacher)  # fmt: skip
    with pytest.raises(ValueError, match=r"stage p: heads=0.25 .* 6 attention heads.*heads: 0.5 \(4 heads\)"):
        _check_only((tmp_path, str(teacher), files), ["prune:name=p,heads=0.25"])


# --- the distillation stage's folder -----------------------------------------------------------------------


def test_distill_stage_honours_zero_and_describes_the_real_models(setup):
    """learning_rate: 0 is honoured (AdamW's update and its decoupled weight decay both scale with it, so the
    distilled weights are the pruned ones exactly); the card names the stage, the real teacher (its folder, its
    parameter count from disk) and the stage the student came from, with no path of this machine; every stage's
    tokenizer loads in transformers 4 too, and transformers' pipeline runs on the stage."""
    import re

    import transformers
    from huggingface_hub import ModelCard, metadata_load

    tmp_path, teacher, files = setup
    output = tmp_path / "out"
    stages = [
        "prune:name=pruned,hidden=16,layers=2,vocab=data",
        "distill:name=distilled,epochs=1,learning_rate=0",
    ]
    compress.main(_flags(teacher, files, output, stages))

    pruned_dir, distilled_dir = output / "stages" / "pruned", output / "stages" / "distilled"
    pruned = AutoModelForSequenceClassification.from_pretrained(pruned_dir).state_dict()
    distilled = AutoModelForSequenceClassification.from_pretrained(distilled_dir).state_dict()
    assert pruned.keys() == distilled.keys()
    for key in pruned:
        torch.testing.assert_close(distilled[key], pruned[key], rtol=0, atol=0)

    readme = (distilled_dir / "README.md").read_text()
    assert str(tmp_path) not in readme and "teacher_view" not in readme
    assert not re.search(r"(?<![\w:/.])(?:/|~/|[A-Za-z]:\\)[\w.-]+[/\\]", readme), (
        "an absolute path in the card"
    )
    card = ModelCard(readme)  # parses the metadata as the Hub does
    with open(distilled_dir / "README.md", encoding="utf-8") as handle:
        assert metadata_load(handle.name) == card.data.to_dict()
    assert card.text.lstrip().startswith("# distilled\n")
    teacher_params = sum(
        p.numel() for p in BertForSequenceClassification.from_pretrained(teacher).parameters()
    )
    assert "distilled from **teacher**" in card.text
    assert f"| Parameters | {teacher_params:,} |" in card.text
    assert "fine-tuned from `pruned`" in card.text

    for stage in ("pruned", "distilled"):
        saved = json.loads((output / "stages" / stage / "tokenizer_config.json").read_text())
        assert saved["tokenizer_class"] == "PreTrainedTokenizerFast", stage
    classify = transformers.pipeline("text-classification", model=str(distilled_dir), device="cpu")
    assert classify("the movie was good")[0]["label"] in LABELS
