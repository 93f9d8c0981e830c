"""What every recipe shares, one idea per module (scripts use them as `common.<name>`):

- arguments.py         the shared flags (loading, models, report) and their parsing from a command line or a file
- loading.py           models, tokenizers and Hub datasets, offline-aware; the student the flags ask for
- running.py           resume, train, evaluate, save metrics, the distillation report, ending every rank together
- raw_data.py          the data flags and raw splits shared by the classification and LM recipes
- seq_kd_cache.py      the sequence-level KD cache (the teacher's outputs, generated once)
- generation_limits.py vocabulary and position limits of generation

May import hf_distill (the library) and the standard libraries; nothing of the other tasks.
"""

from __future__ import annotations

from hf_distill.tasks.common.arguments import (
    CONFIG_FILE_SUFFIXES,
    LoadingArguments,
    ModelArguments,
    PretrainedModelArguments,
    RecipeArgumentParser,
    ReportArguments,
    parse_args,
    setup_logging,
)
from hf_distill.tasks.common.loading import (
    build_student,
    freeze_input_embeddings,
    hub_is_reachable,
    is_offline_mode,
    load_hub_dataset,
    load_pretrained,
)
from hf_distill.tasks.common.running import (
    batch_maker,
    device_description,
    evaluate_datasets,
    finish_processes,
    resume_checkpoint,
    save_metrics,
    strip_prefix,
    train_and_save,
    write_distillation_report,
)

__all__ = [
    "RecipeArgumentParser",
    "CONFIG_FILE_SUFFIXES",
    "LoadingArguments",
    "ModelArguments",
    "PretrainedModelArguments",
    "ReportArguments",
    "batch_maker",
    "build_student",
    "device_description",
    "evaluate_datasets",
    "finish_processes",
    "freeze_input_embeddings",
    "hub_is_reachable",
    "is_offline_mode",
    "load_hub_dataset",
    "load_pretrained",
    "parse_args",
    "resume_checkpoint",
    "save_metrics",
    "setup_logging",
    "strip_prefix",
    "train_and_save",
    "write_distillation_report",
]
