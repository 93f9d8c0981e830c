"""Import paths of modules that moved when the package was given its subpackages, kept working.

`import hf_distill.quantization` (or `from hf_distill.cross_tokenizer import vocabulary_map`) still works: the old
name is an alias of the module at its new path, the same module object, so patching one patches the other. A
finder at the front of `sys.meta_path` resolves the old names; nothing is imported until an old name is used.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

# old name -> new name; a package's submodules follow it (hf_distill.pruning.structured -> ...pruning.structured).
MOVED = {
    "hf_distill.accumulation": "hf_distill.training.accumulation",
    "hf_distill.atomic": "hf_distill.storage.atomic",
    "hf_distill.card_base_model": "hf_distill.reporting.base_model",
    "hf_distill.checkpoints": "hf_distill.training.checkpoints",
    "hf_distill.compression_recipe": "hf_distill.compression.recipe",
    "hf_distill.compression_report": "hf_distill.compression.report",
    "hf_distill.cpu_features": "hf_distill.reporting.machine",
    "hf_distill.cross_tokenizer": "hf_distill.alignment",
    "hf_distill.cross_tokenizer_kd": "hf_distill.sources.cross_tokenizer",
    "hf_distill.data_checks": "hf_distill.training.data_checks",
    "hf_distill.deployed": "hf_distill.compression.deployed",
    "hf_distill.ensemble": "hf_distill.sources.ensemble",
    "hf_distill.evaluation": "hf_distill.training.evaluation",
    "hf_distill.fingerprint": "hf_distill.storage.fingerprint",
    "hf_distill.hub": "hf_distill.reporting.model_card",
    "hf_distill.int8_scheme": "hf_distill.compression.int8_scheme",
    "hf_distill.kd_choice": "hf_distill.sources.choice",
    "hf_distill.kd_sources": "hf_distill.sources",
    "hf_distill.latency": "hf_distill.reporting.latency",
    "hf_distill.logit_cache": "hf_distill.caches.topk",
    "hf_distill.logit_cache_cross": "hf_distill.caches.cross_tokenizer",
    "hf_distill.logit_cache_format": "hf_distill.caches.format",
    "hf_distill.logit_cache_mixture": "hf_distill.caches.mixture",
    "hf_distill.matching": "hf_distill.training.matching",
    "hf_distill.on_policy": "hf_distill.training.on_policy",
    "hf_distill.onnx_int8": "hf_distill.compression.onnx_int8",
    "hf_distill.pairing": "hf_distill.training.pairing",
    "hf_distill.pruning": "hf_distill.compression.pruning",
    "hf_distill.qat": "hf_distill.compression.qat",
    "hf_distill.quantization": "hf_distill.compression.quantization",
    "hf_distill.report": "hf_distill.reporting.report",
    "hf_distill.student": "hf_distill.students",
    "hf_distill.task_loss": "hf_distill.training.task_loss",
    "hf_distill.teacher": "hf_distill.training.teacher",
    "hf_distill.tasks.augmentation": "hf_distill.tasks.classification.augmentation",
    "hf_distill.tasks.classification_metrics": "hf_distill.tasks.classification.metrics",
    "hf_distill.tasks.classification_models": "hf_distill.tasks.classification.models",
    "hf_distill.tasks.compression_stages": "hf_distill.tasks.compression.stages",
    "hf_distill.tasks.generation_limits": "hf_distill.tasks.common.generation_limits",
    "hf_distill.tasks.language_modeling": "hf_distill.tasks.lm",
    "hf_distill.tasks.lm_args": "hf_distill.tasks.lm.args",
    "hf_distill.tasks.lm_cross_tokenizer": "hf_distill.tasks.lm.cross_tokenizer",
    "hf_distill.tasks.lm_data": "hf_distill.tasks.lm.data",
    "hf_distill.tasks.lm_models": "hf_distill.tasks.lm.models",
    "hf_distill.tasks.lm_report": "hf_distill.tasks.lm.report",
    "hf_distill.tasks.lm_seq_kd": "hf_distill.tasks.lm.seq_kd",
    "hf_distill.tasks.mutual_recipe": "hf_distill.tasks.classification.mutual",
    "hf_distill.tasks.quantization_aware": "hf_distill.tasks.classification.quantization_aware",
    "hf_distill.tasks.raw_data": "hf_distill.tasks.common.raw_data",
    "hf_distill.tasks.seq_kd_cache": "hf_distill.tasks.common.seq_kd_cache",
    "hf_distill.tasks.transfer": "hf_distill.tasks.classification.transfer",
    "hf_distill.tasks.translation_args": "hf_distill.tasks.translation.args",
    "hf_distill.tasks.translation_data": "hf_distill.tasks.translation.data",
    "hf_distill.tasks.translation_models": "hf_distill.tasks.translation.models",
    "hf_distill.tasks.translation_seq_kd": "hf_distill.tasks.translation.seq_kd",
}


def new_name(old: str) -> str | None:
    """The module an old import path now names (its package's new path for a submodule), or None."""
    if old in MOVED:
        return MOVED[old]
    package, _, rest = old.rpartition(".")
    while package:
        if package in MOVED:
            return f"{MOVED[package]}.{old[len(package) + 1 :]}"
        package = package.rpartition(".")[0]
    return None


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec) -> ModuleType:
        return importlib.import_module(self.target)  # the module itself: its own name and spec are kept

    def exec_module(self, module: ModuleType) -> None:
        pass


class _MovedModules(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        target_name = new_name(fullname) if fullname.startswith("hf_distill.") else None
        if target_name is None:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(target_name))


def install() -> None:
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedModules())
