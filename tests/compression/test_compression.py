"""The compression recipe's checks and the compression report's arithmetic (scripts/compress.py end to end is in
tests/test_compress_script.py)."""

from __future__ import annotations

import json

import pytest

from hf_distill.compression.recipe import check_recipe, parse_stage_flag, recipe_from_mapping
from hf_distill.compression.report import build_compression_report, write_compression_report

BASE = {
    "data": {"train_file": "train.csv", "test_file": "test.csv"},
    "teacher": {"model_name_or_path": "teacher"},
}


def _recipe(stages, **extra):
    return recipe_from_mapping({**BASE, "stages": stages, **extra})


def test_a_valid_recipe_fills_in_sources_and_the_final_stage():
    recipe = _recipe(
        [
            {"type": "prune", "name": "p", "heads": 0.5, "vocab": "data"},
            {"type": "distill", "name": "d", "epochs": 2},
            {"type": "quantize", "name": "q", "method": "qat"},
            {"type": "quantize", "name": "q_ptq", "from": "d"},
        ],
        final="q",
    )
    check_recipe(recipe)
    assert [stage.source for stage in recipe.stages] == ["teacher", "p", "d", "d"]
    assert recipe.final_stage == "q"
    assert recipe.to_dict()["stages"][1] == {
        "name": "d", "type": "distill", "from": "p", "teacher": "teacher", "epochs": 2, "learning_rate": None,
        "temperature": None, "alpha": None, "hidden_weight": 0.0, "attention_weight": 0.0,
        "attention_head_mapping": "per_head", "kd_loss": "forward_kl",
    }  # fmt: skip


@pytest.mark.parametrize(
    "stages, extra, message",
    [
        ([], {}, "no stages"),
        ([{"type": "shrink"}], {}, "'shrink' is not a stage type"),
        ([{"type": "prune", "heads": 1.0}], {}, r"heads: 1.0 is the fraction removed and must be in \[0, 1\)"),
        ([{"type": "prune", "ffn": -0.1}], {}, "ffn: -0.1 is the fraction removed"),
        ([{"type": "prune", "vocab": "all"}], {}, "vocab: 'all'; use vocab: data"),
        ([{"type": "prune", "hidden": 0}], {}, "hidden: 0 must be a positive width"),
        ([{"type": "prune", "sparsity": 0.5}], {}, r"unknown key\(s\) \['sparsity'\]"),
        ([{"type": "quantize", "method": "int4"}], {}, "'int4' is not a quantization method; use one of"),
        ([{"type": "quantize", "name": "q"}, {"type": "prune"}], {}, "already quantized to INT8.*put quantize stages last"),
        ([{"type": "quantize", "name": "q"}, {"type": "distill"}], {}, "already quantized"),
        ([{"type": "quantize", "name": "q"}, {"type": "quantize"}], {}, "already quantized"),
        ([{"type": "distill", "from": "later"}, {"type": "prune", "name": "later"}], {}, "'later' is not the teacher or an earlier stage"),
        ([{"type": "prune", "name": "p"}, {"type": "distill", "teacher": "p", "from": "p"}], {}, "the same model"),
        ([{"type": "prune", "name": "x"}, {"type": "prune", "name": "x"}], {}, "used twice"),
        ([{"type": "prune", "name": "teacher"}], {}, "used twice"),
        ([{"type": "prune"}, {"type": "distill", "epochs": 0}], {}, "epochs: 0 must be > 0"),
        ([{"type": "prune"}, {"type": "distill", "kd_loss": "kl"}], {}, r"kd_loss: 'kl'; use one of \['forward_kl'"),
        ([{"type": "prune"}, {"type": "distill", "attention_head_mapping": "max"}], {}, r"attention_head_mapping: 'max'; use one of \['per_head', 'mean'\]"),
        ([{"type": "quantize", "name": "q"}, {"type": "distill", "from": "teacher", "teacher": "q"}], {}, "teacher: 'q' is an INT8 ONNX model"),
        ([{"type": "prune"}], {"final": "nope"}, "final: 'nope' is not a stage"),
    ],
)  # fmt: skip
def test_recipes_that_cannot_work_fail_naming_the_value_and_the_fix(stages, extra, message):
    with pytest.raises(ValueError, match=message):
        check_recipe(_recipe(stages, **extra))


DISTILL_AFTER_PRUNE = [{"type": "prune", "name": "p"}]


@pytest.mark.parametrize(
    "stage, training, message",
    [
        ({"temperature": 0}, {}, r"stage distill_2: temperature: 0 must be > 0"),
        ({"temperature": -1.0}, {}, r"temperature: -1.0 must be > 0"),
        ({}, {"temperature": 0}, r"training: temperature: 0 must be > 0"),
        ({"alpha": 1.5}, {}, r"alpha: 1.5 must be in \[0, 1\]"),
        ({"alpha": -0.1}, {}, r"alpha: -0.1 must be in \[0, 1\]"),
        ({}, {"alpha": 2}, r"training: alpha: 2 must be in \[0, 1\]"),
        ({"learning_rate": -1e-4}, {}, r"learning_rate: -0.0001 must be >= 0"),
        ({"hidden_weight": -1}, {}, r"hidden_weight: -1 must be >= 0"),
        ({"attention_weight": -0.5}, {}, r"attention_weight: -0.5 must be >= 0"),
        ({"epochs": "abc"}, {}, r"stage distill_2: epochs: 'abc' must be a number, e.g. epochs: 3.0"),
        ({"epochs": None}, {}, r"epochs: null must be a number"),
        ({"alpha": True}, {}, r"alpha: True must be a number"),
        ({"temperature": float("nan")}, {}, r"temperature: nan must be a finite number"),
        ({"kd_loss": 3}, {}, r"kd_loss: 3 must be a string"),
        ({}, {"batch_size": 0}, r"training: batch_size: 0 must be >= 1"),
        ({}, {"num_threads": 0}, r"num_threads: 0 must be >= 1"),
        ({}, {"latency_repeats": 2.5}, r"latency_repeats: 2.5 must be an integer"),
    ],
)
def test_values_that_would_fail_in_a_later_stage_fail_before_the_first(stage, training, message):
    recipe = _recipe([*DISTILL_AFTER_PRUNE, {"type": "distill", **stage}], training=training)
    with pytest.raises(ValueError, match=message):
        check_recipe(recipe)


def test_quantization_aware_stage_values_are_checked_too():
    for values, message in (({"temperature": 0}, "temperature: 0"), ({"alpha": 3}, "alpha: 3")):
        with pytest.raises(ValueError, match=message):
            check_recipe(_recipe([{"type": "quantize", "method": "qat", **values}]))


def test_zero_is_honoured_where_it_is_valid_and_numbers_written_as_text_are_read():
    recipe = _recipe(
        [*DISTILL_AFTER_PRUNE, {"type": "distill", "learning_rate": 0, "alpha": 0, "hidden_weight": 0}],
        training={"learning_rate": "2e-4", "alpha": 1},  # PyYAML reads 2e-4 (no dot) as text
        teacher={"model_name_or_path": "teacher", "finetune_epochs": 0, "finetune_learning_rate": 0},
    )
    check_recipe(recipe)
    assert recipe.stages[1].learning_rate == 0 and recipe.stages[1].alpha == 0
    assert recipe.training.learning_rate == pytest.approx(2e-4)


def test_a_stage_that_is_not_a_mapping_and_a_section_that_is_not_empty_are_refused():
    with pytest.raises(ValueError, match=r"stage 1: 'prune' is not a mapping"):
        _recipe(["prune"])
    with pytest.raises(ValueError, match="training must be a mapping"):
        _recipe(DISTILL_AFTER_PRUNE, training=5)


def test_missing_sections_and_data():
    with pytest.raises(ValueError, match="no teacher"):
        recipe_from_mapping({"data": BASE["data"], "stages": [{"type": "prune"}]})
    with pytest.raises(ValueError, match=r"unknown section\(s\) \['stage'\]"):
        recipe_from_mapping({**BASE, "stage": []})
    with pytest.raises(ValueError, match="give train_file and test_file"):
        check_recipe(recipe_from_mapping({"teacher": BASE["teacher"], "stages": [{"type": "prune"}]}))


def test_stage_flags_read_yaml_scalars():
    assert parse_stage_flag("prune:heads=0.5,hidden=192,vocab=data") == {
        "type": "prune",
        "heads": 0.5,
        "hidden": 192,
        "vocab": "data",
    }
    assert parse_stage_flag("quantize:method=qat,per_channel=false") == {
        "type": "quantize",
        "method": "qat",
        "per_channel": False,
    }
    with pytest.raises(ValueError, match="is not key=value"):
        parse_stage_flag("prune:heads")


def _entry(name, value, params, size, b1, b32, runtime="pytorch", spread=0.05):
    timing = {
        batch: {"median_ms": ms, "low_ms": ms, "high_ms": ms, "spread": spread, "wide": spread > 0.25}
        for batch, ms in ((1, b1), (32, b32))
    }
    return {"name": name, "path": name, "runtime": runtime, "value": value, "params": params, "size_bytes": size,
            "timing": timing}  # fmt: skip


def test_report_ratios_against_the_teacher_and_targets(tmp_path):
    teacher = _entry("teacher", 0.96, 22_700_000, 90_000_000, 20.0, 600.0)
    pruned = _entry("pruned", 0.40, 3_000_000, 12_000_000, 5.0, 100.0, spread=0.4)
    final = _entry("int8", 0.95, 3_000_000, 4_000_000, 2.0, 50.0, runtime="onnxruntime-int8")
    reference = _entry("teacher_int8", 0.955, 22_700_000, 23_000_000, 8.0, 240.0, runtime="onnxruntime-int8")
    report = build_compression_report(
        [teacher, pruned, final],
        metric="accuracy",
        reference=reference,
        targets={"min_retained_pct": 97.0, "max_size_pct": 10.0, "min_speedup_b32": 8.0},
    )
    rows = {row["name"]: row for row in report["stages"]}
    assert [row["name"] for row in report["stages"]] == ["teacher", "pruned", "int8"]
    assert rows["teacher"]["retained"] == pytest.approx(100.0) and rows["teacher"]["speedup_b32"] == 1.0
    assert rows["int8"]["retained"] == pytest.approx(100 * 0.95 / 0.96)
    assert rows["int8"]["compression"] == pytest.approx(22.5)
    assert rows["int8"]["size_pct"] == pytest.approx(100 * 4 / 90)
    assert rows["int8"]["speedup_b32"] == pytest.approx(12.0) and rows["int8"]["speedup_b1"] == pytest.approx(
        10.0
    )
    assert report["reference"]["speedup_b32"] == pytest.approx(2.5)
    assert report["targets"] == {
        "retained >= 97%": True,
        "size <= 10% of the teacher's": True,
        "speed-up at batch 32 >= 8x": True,
    }
    for key in ("name", "path", "metric", "value", "retained", "params", "size_bytes", "latency_ms_b1",
                "latency_ms_b32", "speedup_b32"):  # fmt: skip
        assert key in rows["int8"]

    missed = build_compression_report(
        [teacher, pruned], metric="accuracy", targets={"min_retained_pct": 97.0}
    )
    assert missed["targets"] == {"retained >= 97%": False}

    write_compression_report(report, tmp_path)
    assert json.loads((tmp_path / "compression_report.json").read_text()) == json.loads(json.dumps(report))
    markdown = (tmp_path / "compression_report.md").read_text()
    assert "| int8 | onnxruntime-int8 | 0.9500 | 98.96 |" in markdown
    assert "(wide)" in markdown and "teacher_int8 (reference, not a stage)" in markdown
    assert (tmp_path / "compression_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
