"""The flags every recipe shares (loading, models, report) and their parsing from a command line or one YAML/JSON file."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging as py_logging
import sys
import typing
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import datasets
import transformers
from transformers import HfArgumentParser, Seq2SeqTrainingArguments, TrainingArguments
from transformers.utils import logging

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
TRAINER_GROUP = "training: transformers' TrainingArguments (every Trainer setting)"


def _group_title(dtype: type) -> str:
    name = getattr(dtype, "_argument_group_name", None)
    if name:
        return name
    doc = (dtype.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    return f"{dtype.__name__}: {doc}" if doc and not doc.startswith(dtype.__name__ + "(") else dtype.__name__


class RecipeArgumentParser(HfArgumentParser):
    """`HfArgumentParser` whose help reads from the top: what the command does (`description`), then the
    distillation flags, then each dataclass's flags in a group of its own, and transformers' TrainingArguments
    last. Flags in `hidden` (settings of other recipes) still parse, from the command line or a config file, but
    are not listed."""

    def __init__(
        self, dataclass_types: Sequence[type], *, description: str | None = None, hidden: Collection[str] = ()
    ):
        self._hidden = set(hidden)
        self._distillation_groups: list[Any] = []
        super().__init__(
            tuple(dataclass_types),
            description=description,
            usage="%(prog)s [--flag value ...]   or   %(prog)s config.yaml (one YAML/JSON file with the flags)",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        trainer = [g for g in self._action_groups[2:] if g.title == TRAINER_GROUP]
        rest = [g for g in self._action_groups[2:] if g not in trainer and g not in self._distillation_groups]
        self._action_groups[2:] = [*self._distillation_groups, *rest, *trainer]

    def _add_dataclass_arguments(self, dtype: Any) -> None:
        type_hints = typing.get_type_hints(dtype)
        trainer_fields = (
            {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments)}
            if isinstance(dtype, type) and issubclass(dtype, TrainingArguments)
            else set()
        )
        own_group = self.add_argument_group(_group_title(dtype))
        trainer_group = self.add_argument_group(TRAINER_GROUP) if trainer_fields else None
        if trainer_fields:  # the fields a TrainingArguments subclass adds: the distillation settings
            own_group.title = "distillation: " + own_group.title.partition(": ")[2]
            self._distillation_groups.append(own_group)
        for dataclass_field in dataclasses.fields(dtype):
            if not dataclass_field.init:
                continue
            dataclass_field.type = type_hints[dataclass_field.name]
            if dataclass_field.name in self._hidden:
                dataclass_field = copy.copy(dataclass_field)
                dataclass_field.metadata = MappingProxyType(
                    {**dataclass_field.metadata, "help": argparse.SUPPRESS}
                )
            group = trainer_group if dataclass_field.name in trainer_fields else own_group
            self._parse_dataclass_field(group, dataclass_field)


def parse_args(
    dataclass_types: Sequence[type],
    argv: Sequence[str] | None = None,
    *,
    description: str | None = None,
    hidden: Collection[str] = (),
) -> tuple[Any, ...]:
    """Flags from the command line, or from one .yaml/.yml/.json file standing in for all of them. `description`
    opens --help (the script's docstring); `hidden` flags parse but are not listed (see `RecipeArgumentParser`)."""
    parser = RecipeArgumentParser(dataclass_types, description=description, hidden=hidden)
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
