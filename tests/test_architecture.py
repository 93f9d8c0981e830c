"""The layout is the architecture: no import circles between files or between the parts a reader sees (subpackages
and top-level modules), every part says what it holds, no module past 500 lines, and every import path the README
and docs name (old paths of moved modules included) still imports."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("import_graph", REPO / "docs" / "import_graph.py")
import_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_graph)


def test_no_file_imports_another_in_a_circle():
    assert import_graph.circles(import_graph.file_graph()) == []


def test_no_part_imports_another_in_a_circle():
    # Parts: hf_distill/training/, hf_distill/trainer.py, tasks/lm/, ... (imports inside functions count too).
    parts = import_graph.part_graph()
    assert import_graph.circles(parts) == []
    floors = import_graph.floors(parts)
    for source, targets in parts.items():
        for target in targets:
            assert floors[target] < floors[source], f"{source} -> {target} runs back up"


def test_the_library_never_imports_a_recipe():
    """hf_distill's parts import no task or script (the `hf-distill` command only dispatches to them)."""
    for module, targets in import_graph.file_graph().items():
        if module.startswith(("hf_distill.tasks", "hf_distill.scripts")) or module == "hf_distill.cli":
            continue
        recipes = sorted(t for t in targets if t.startswith(("hf_distill.tasks", "hf_distill.scripts")))
        assert recipes == [], f"{module} imports {recipes}"


def test_every_subpackage_says_what_it_holds_and_modules_stay_small():
    for package_init in [*(REPO / "hf_distill").rglob("__init__.py"), *(REPO / "tasks").rglob("__init__.py")]:
        docstring = ast.get_docstring(ast.parse(package_init.read_text()))
        assert docstring and len(docstring) > 80, (
            f"{package_init} needs a docstring saying what the part holds"
        )
    for path in [
        *(REPO / "hf_distill").rglob("*.py"),
        *(REPO / "tasks").rglob("*.py"),
        *(REPO / "scripts").glob("*.py"),
    ]:
        lines = len(path.read_text().splitlines())
        assert lines <= 500, f"{path.relative_to(REPO)} has {lines} lines"


def _documented_import_paths() -> set[str]:
    """Every `hf_distill.<module>` path named in README.md and docs/*.md (code and prose)."""
    texts = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    found: set[str] = set()
    for path in texts:
        for match in re.finditer(r"(?<![\w/.])hf_distill(?:\.[A-Za-z_]\w*)+", path.read_text()):
            found.add(match.group(0))
    return found


# Import paths users wrote against the layout before the subpackages, with a name each must still give.
MOVED_PATHS = {
    "hf_distill.cross_tokenizer": ["prediction_pairs", "vocabulary_map", "CrossTokenizerCollator"],
    "hf_distill.mutual": ["MutualLearningTrainer"],
    "hf_distill.quantization": ["export_onnx", "quantize_int8", "load_deployed"],
    "hf_distill.deployed": ["load_deployed", "size_on_disk"],
    "hf_distill.pruning": ["prune_model", "prune_vocabulary", "measure_importance"],
    "hf_distill.pruning.structured": ["PruningSpec"],
    "hf_distill.qat": ["prepare_qat", "strip_qat"],
    "hf_distill.logit_cache": ["load_logit_cache", "build_logit_cache"],
    "hf_distill.logit_cache_cross": ["build_cross_tokenizer_cache"],
    "hf_distill.logit_cache_mixture": ["build_mixture_cache"],
    "hf_distill.kd_sources": ["KDSource", "LogitsKD", "CachedTopKKD"],
    "hf_distill.ensemble": ["teacher_set"],
    "hf_distill.matching": ["HiddenProjections", "attention_heads"],
    "hf_distill.teacher": ["prepare_teacher", "unwrap_model"],
    "hf_distill.report": ["build_report", "count_parameters"],
    "hf_distill.hub": ["write_model_card"],
    "hf_distill.latency": ["time_alternately"],
    "hf_distill.student": ["create_student"],
    "hf_distill.compression_recipe": ["load_recipe"],
    "hf_distill.tasks.language_modeling": ["CausalLMCollator"],
    "hf_distill.tasks.seq_kd_cache": ["DATA_DIR"],
}


@pytest.mark.parametrize("path", sorted(MOVED_PATHS))
def test_old_import_paths_give_the_moved_module_itself(path):
    module = importlib.import_module(path)
    for name in MOVED_PATHS[path]:
        assert hasattr(module, name), f"{path}.{name}"
    # the same module object as at its new path: patching one patches the other
    assert importlib.import_module(module.__name__) is module


def test_every_path_the_docs_name_imports():
    paths = _documented_import_paths()
    assert "hf_distill.losses" in paths  # the scan finds what the README shows
    for path in sorted(paths):
        # a path may end in an attribute (hf_distill.losses.logit_distillation_loss): import the longest module
        parts = path.split(".")
        for end in range(len(parts), 0, -1):
            try:
                module = importlib.import_module(".".join(parts[:end]))
            except ModuleNotFoundError:
                continue
            target = module
            for attribute in parts[end:]:
                target = getattr(target, attribute, None)
                assert target is not None, f"{path}: {'.'.join(parts[:end])} has no {attribute}"
            break
        else:
            pytest.fail(f"{path} does not import")


def test_the_command_line_stays_light():
    """`hf-distill --help` answers without loading torch or transformers (it took 14-65 s)."""
    import subprocess
    import sys

    code = (
        "import sys, hf_distill.cli, hf_distill; print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
