"""What every task recipe shares: model flags, config-file parsing, offline-friendly loading, building the
student, checkpoint resumption, result files and the distillation report.

Nothing here knows about a particular task; recipes (classification, translation, language modelling)
bring their data, metrics and model class.
"""

from __future__ import annotations

import functools
import logging as py_logging
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import datasets
import torch
import transformers
from transformers import HfArgumentParser, PreTrainedModel, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from hf_distill.checkpoints import resume_flag

logger = logging.get_logger(__name__)

CONFIG_FILE_SUFFIXES = (".yaml", ".yml", ".json")


# --------------------------------------------------------------------------------------------- flags
@dataclass(kw_only=True)
class LoadingArguments:
    """How models and tokenizers are fetched; shared by every script."""

    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Tokenizer name or local path, if not the one stored with the (teacher) model."},
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where models and datasets downloaded from the Hub are cached."}
    )
    model_revision: str = field(
        default="main", metadata={"help": "Model version on the Hub: a branch name, tag or commit id."}
    )
    token: str | None = field(default=None, metadata={"help": "Hub token for private models."})
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Allow models whose code lives in their Hub repository. Only for repositories you trust."
        },
    )
    freeze_embeddings: bool = field(
        default=False,
        metadata={
            "help": "Do not train the input word embeddings of the model being trained (the student, or the "
            "model train_teacher.py fine-tunes): fewer parameters to update, noticeably faster on CPU."
        },
    )


@dataclass(kw_only=True)
class ModelArguments(LoadingArguments):
    """Teacher and student of a distillation run."""

    teacher_model_name_or_path: str = field(
        metadata={
            "help": "The teacher: a Hub name or a local directory with config.json, already trained for the "
            "task (scripts/train_teacher.py fine-tunes classifiers)."
        }
    )
    student_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A pretrained student to distil into. Alternative to --student_num_layers."},
    )
    student_num_layers: int | None = field(
        default=None,
        metadata={
            "help": "Build the student from the teacher, keeping this many of its layers (create_student)."
        },
    )
    student_layers: str | None = field(
        default=None,
        metadata={
            "help": "Which teacher layers the student copies, e.g. '0,2,5' (0-based). Default: evenly spaced "
            "('uniform'). Implies --student_num_layers."
        },
    )

    def __post_init__(self):
        if self.student_num_layers is not None and self.student_num_layers < 1:
            raise ValueError(f"student_num_layers must be >= 1, got {self.student_num_layers}.")
        layers = self.student_layer_indices()
        if (
            layers is not None
            and self.student_num_layers is not None
            and len(layers) != self.student_num_layers
        ):
            raise ValueError(
                f"student_layers {self.student_layers!r} lists {len(layers)} layers but student_num_layers is "
                f"{self.student_num_layers}; pass one of the two or make them agree."
            )
        from_teacher = self.student_num_layers is not None or layers is not None
        if from_teacher and self.student_model_name_or_path is not None:
            raise ValueError(
                "Pass either --student_model_name_or_path (a pretrained student) or --student_num_layers / "
                f"--student_layers (a student built from the teacher), not both; got "
                f"{self.student_model_name_or_path!r} and {self.student_num_layers or self.student_layers!r}."
            )
        if not from_teacher and self.student_model_name_or_path is None:
            raise ValueError(
                "No student given: pass --student_num_layers k to build a k-layer student from the teacher, "
                "or --student_model_name_or_path for a pretrained one."
            )

    def student_layer_indices(self) -> list[int] | None:
        """--student_layers as a list of ints, or None when not given."""
        if self.student_layers is None or self.student_layers.strip().lower() in ("", "uniform"):
            return None
        try:
            return [int(part) for part in self.student_layers.split(",") if part.strip()]
        except ValueError:
            raise ValueError(
                f"student_layers must be comma-separated layer indices such as '0,2,5', got {self.student_layers!r}."
            ) from None


@dataclass(kw_only=True)
class PretrainedModelArguments(LoadingArguments):
    """The one model a fine-tuning script (train_teacher.py) trains."""

    model_name_or_path: str = field(
        metadata={"help": "Model to fine-tune: a Hub name or a local directory with config.json."}
    )


@dataclass
class ReportArguments:
    """The distillation report written at the end of a run with evaluation."""

    report_batch_sizes: str = field(
        default="1,32", metadata={"help": "Batch sizes at which latency is measured, comma-separated."}
    )
    latency_warmup: int = field(default=3, metadata={"help": "Untimed forward passes before timing."})
    latency_repeats: int = field(
        default=10, metadata={"help": "Timed forward passes per batch size; the report gives their median."}
    )

    def __post_init__(self):
        try:
            sizes = [int(part) for part in self.report_batch_sizes.split(",") if part.strip()]
        except ValueError:
            sizes = []
        if not sizes or min(sizes) < 1:
            raise ValueError(
                f"report_batch_sizes must be positive integers separated by commas, e.g. '1,32'; got "
                f"{self.report_batch_sizes!r}."
            )
        if self.latency_repeats < 1 or self.latency_warmup < 0:
            raise ValueError(
                f"latency_repeats must be >= 1 and latency_warmup >= 0, got {self.latency_repeats} and "
                f"{self.latency_warmup}."
            )

    @property
    def batch_sizes(self) -> list[int]:
        return [int(part) for part in self.report_batch_sizes.split(",") if part.strip()]


# --------------------------------------------------------------------------------------------- parsing
def parse_args(dataclass_types: Sequence[type], argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    """Flags from the command line, or from one .yaml/.yml/.json file standing in for all of them."""
    parser = HfArgumentParser(tuple(dataclass_types))
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].lower().endswith(CONFIG_FILE_SUFFIXES):
        path = Path(argv[0])
        if not path.is_file():
            raise FileNotFoundError(f"Config file {str(path)!r} does not exist.")
        if path.suffix.lower() == ".json":
            return parser.parse_json_file(str(path.resolve()))
        return parser.parse_yaml_file(str(path.resolve()))
    return parser.parse_args_into_dataclasses(args=argv)


def setup_logging(training_args: TrainingArguments) -> None:
    """Log level per process as the HF examples do: info on the main process, warnings elsewhere."""
    py_logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[py_logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    level = training_args.get_process_log_level()
    logger.setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.warning(
        f"Process rank {training_args.process_index}, device {training_args.device}, n_gpu {training_args.n_gpu}, "
        f"distributed {training_args.parallel_mode.value == 'distributed'}"
    )


# --------------------------------------------------------------------------------------------- loading
def is_offline_mode() -> bool:
    """True when the user asked the HF libraries to stay offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    import huggingface_hub

    transformers_offline = os.environ.get("TRANSFORMERS_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")
    return bool(huggingface_hub.constants.HF_HUB_OFFLINE) or transformers_offline


@functools.cache
def hub_is_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub endpoint opens within `timeout` seconds.

    Checked before any download so that a machine without network fails in seconds with a clear message,
    not after the hub client's retries.
    """
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def load_hub_dataset(
    name: str,
    config: str | None,
    *,
    local_files: str,
    cache_dir: str | None = None,
    token: Any = None,
    **kwargs: Any,
) -> Any:
    """`datasets.load_dataset(name, config)` from the Hub, failing fast with a clear error when it cannot be had.

    `local_files` names the local alternative in the message, e.g. "local csv, json/jsonl or parquet files".
    """
    if not is_offline_mode() and not hub_is_reachable():
        raise OSError(
            f"Dataset {name!r} ({config}) must come from the Hugging Face Hub but this machine is offline; pass "
            f"{local_files} with --train_file/--validation_file, or set HF_HUB_OFFLINE=1 to use a copy already in "
            "the datasets cache."
        )
    try:
        return datasets.load_dataset(name, config, cache_dir=cache_dir, token=token, **kwargs)
    except (OSError, ConnectionError) as error:
        raise OSError(
            f"Dataset {name!r} ({config}) is not in the local cache and could not be downloaded (is this machine "
            f"offline?); pass {local_files} with --train_file/--validation_file. ({str(error).splitlines()[0]})"
        ) from error


def _offline_error(role: str, name_or_path: str, detail: str) -> OSError:
    return OSError(
        f"{role} {name_or_path!r} could not be found locally and this machine is offline; pass a local path (a "
        f"directory with config.json, e.g. one written by save_pretrained), or run once with network access to "
        f"fill the cache. (The Hugging Face Hub is unreachable or HF_HUB_OFFLINE is set: {detail})"
    )


def load_pretrained(
    loader: Any,
    name_or_path: str,
    *,
    role: str = "model",
    loading_args: LoadingArguments | None = None,
    **kwargs: Any,
) -> Any:
    """`loader.from_pretrained(name_or_path, **kwargs)` with errors that say what to do.

    loader: an Auto class (AutoConfig, AutoTokenizer, AutoModelFor...) or a model class. A local directory
    is loaded as is; a Hub name is looked up in the cache when the Hub cannot be reached, and otherwise fails
    fast with a message explaining how to pass a local path.
    """
    if loading_args is not None:
        kwargs.setdefault("cache_dir", loading_args.cache_dir)
        kwargs.setdefault("revision", loading_args.model_revision)
        kwargs.setdefault("token", loading_args.token)
        kwargs.setdefault("trust_remote_code", loading_args.trust_remote_code)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if getattr(loader, "__name__", "") != "AutoTokenizer" and not (path / "config.json").is_file():
            raise OSError(
                f"{role} directory {str(path)!r} has no config.json (found {sorted(p.name for p in path.iterdir())}); "
                "pass a directory written by save_pretrained."
            )
        return loader.from_pretrained(str(path), **kwargs)
    # A Hub id is "name" or "owner/name"; anything else was meant as a path.
    looks_local = (
        name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
    )
    if looks_local or path.exists():
        raise OSError(f"{role} path {name_or_path!r} does not exist or is not a directory with config.json.")
    offline = is_offline_mode() or not hub_is_reachable()
    if offline:
        kwargs["local_files_only"] = True
    try:
        return loader.from_pretrained(name_or_path, **kwargs)
    except OSError as error:
        if offline:
            raise _offline_error(role, name_or_path, str(error).splitlines()[0]) from error
        raise


# --------------------------------------------------------------------------------------------- student
def freeze_input_embeddings(model: PreTrainedModel) -> int:
    """Stop training the input embeddings; returns how many parameters were frozen."""
    embeddings = model.get_input_embeddings()
    frozen = 0
    for parameter in embeddings.parameters():
        if parameter.requires_grad:
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    return frozen


def build_student(
    model_args: ModelArguments,
    teacher: PreTrainedModel,
    load_student: Callable[[str], PreTrainedModel] | None = None,
) -> PreTrainedModel:
    """The student of `model_args`: loaded with `load_student(path)`, or built from the teacher by
    `create_student` (same class and config, fewer layers copied from the teacher)."""
    if model_args.student_model_name_or_path is not None:
        if load_student is None:
            raise ValueError(
                "this recipe needs a load_student function to load --student_model_name_or_path."
            )
        student = load_student(model_args.student_model_name_or_path)
    else:
        from hf_distill import create_student

        layers = model_args.student_layer_indices()
        num_layers = model_args.student_num_layers if layers is None else len(layers)
        student = create_student(
            teacher, num_hidden_layers=num_layers, layers="uniform" if layers is None else layers
        )
    if model_args.freeze_embeddings:
        logger.info(f"Froze {freeze_input_embeddings(student):,} input-embedding parameters of the student.")
    return student


# --------------------------------------------------------------------------------------------- running
def resume_checkpoint(training_args: TrainingArguments) -> str | bool | None:
    """What to pass as `trainer.train(resume_from_checkpoint=...)`.

    An explicit --resume_from_checkpoint wins; otherwise, if the output directory already holds checkpoints,
    the run resumes (True lets the trainer pick the last complete one) instead of starting over.
    """
    if training_args.resume_from_checkpoint is not None:
        return resume_flag(training_args.resume_from_checkpoint)  # "true"/"false" from the command line
    if os.path.isdir(training_args.output_dir) and get_last_checkpoint(training_args.output_dir) is not None:
        logger.info(
            f"Checkpoints found in {training_args.output_dir}: resuming training from the last complete one. "
            "Use another --output_dir to start from scratch."
        )
        return True
    return None


def finish_processes() -> None:
    """End a finished run on every rank together: wait for the others, then take the process group down.

    Without it a rank that finished first (the others return at once from the report, which the main process
    alone measures) left while the main one still held the group, and gloo aborted it at exit (SIGABRT), so a
    launch that had written every file returned an error. A no-op in a single process.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def save_metrics(trainer: transformers.Trainer, split: str, metrics: Mapping[str, float]) -> None:
    """Log `metrics` and write `{split}_results.json`, merged into `all_results.json` (main process only)."""
    trainer.log_metrics(split, dict(metrics))
    trainer.save_metrics(split, dict(metrics))


def train_and_save(
    trainer: transformers.Trainer, train_dataset: Any, resume_from_checkpoint: Any = None
) -> dict:
    """Train, then save the model, `train_results.json` and the trainer state, as HF's example scripts do."""
    train_result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.save_model()
    metrics = dict(train_result.metrics)
    try:
        metrics["train_samples"] = len(train_dataset)
    except TypeError:  # a streaming dataset has no length
        pass
    save_metrics(trainer, "train", metrics)
    trainer.save_state()
    return metrics


def evaluate_datasets(
    trainer: transformers.Trainer, eval_datasets: Mapping[str, Any], prefix: str = "eval"
) -> dict[str, float]:
    """Evaluate each dataset; the first one's metrics keep `prefix_` keys, the others get `_{name}` appended
    to each key (e.g. eval_accuracy_mm), as run_glue does for MNLI mismatched."""
    combined: dict[str, float] = {}
    for index, (name, dataset) in enumerate(eval_datasets.items()):
        metrics = trainer.evaluate(eval_dataset=dataset, metric_key_prefix=prefix)
        metrics[f"{prefix}_samples"] = len(dataset)
        combined.update(metrics if index == 0 else {f"{key}_{name}": value for key, value in metrics.items()})
    return combined


def strip_prefix(
    metrics: Mapping[str, float], prefix: str, keep: Sequence[str] | None = None
) -> dict[str, float]:
    """`{"eval_accuracy": x, ...}` -> `{"accuracy": x}`, keeping only the names in `keep` when given."""
    stripped = {
        key[len(prefix) + 1 :]: value for key, value in metrics.items() if key.startswith(f"{prefix}_")
    }
    return {key: value for key, value in stripped.items() if keep is None or key in keep}


def batch_maker(
    dataset: Any, collator: Callable[[list[dict]], Mapping[str, Any]], drop: Sequence[str] = ("labels",)
) -> Callable[[int], dict[str, Any]]:
    """`make_inputs(batch_size)` for latency measurement: the first `batch_size` examples of `dataset`
    (cycled when it is smaller), collated as in training, without the `drop` columns."""

    def make_inputs(batch_size: int) -> dict[str, Any]:
        rows = [dataset[i % len(dataset)] for i in range(batch_size)]
        batch = collator([{key: value for key, value in row.items() if key not in drop} for row in rows])
        return {key: value for key, value in batch.items() if key not in drop}

    return make_inputs


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return f"cpu, {threads} thread{'s' if threads != 1 else ''}"
    return str(device)


def write_distillation_report(
    trainer: transformers.Trainer,
    models: Mapping[str, Mapping[str, Any]],
    *,
    primary_metric: str,
    make_inputs: Callable[[int], Mapping[str, torch.Tensor]],
    report_args: ReportArguments,
    greater_is_better: bool = True,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Measure each model, then write the report files into the trainer's output directory.

    models: name -> {"model": module, "metrics": {metric: value}, ...}; other keys (e.g. "name_or_path") are
    kept in the report. Only the main process measures and writes; the others return None.
    """
    from hf_distill.report import build_report, profile_models, write_report

    if not trainer.is_world_process_zero():
        return None
    device = trainer.args.device
    logger.info(f"Measuring size and latency of {', '.join(models)} on {device}, timed alternately")
    # One round times every model once, so load from other jobs falls on all of them alike.
    profiles = profile_models(
        {name: entry["model"].to(device) for name, entry in models.items()},
        make_inputs,
        report_args.batch_sizes,
        warmup=report_args.latency_warmup,
        repeats=report_args.latency_repeats,
        device=device,
    )
    measured = {}
    for name, entry in models.items():
        measured[name] = {key: value for key, value in entry.items() if key != "model"}
        measured[name].update(profiles[name])
    report = build_report(
        measured,
        primary_metric=primary_metric,
        greater_is_better=greater_is_better,
        metadata={"device": device_description(device), **(metadata or {})},
    )
    write_report(report, trainer.args.output_dir)
    return report
