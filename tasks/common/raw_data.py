"""The data flags every recipe shares, and the raw splits they name: loaded from local files or the Hub, and checked
against the stages a run asks for before any model is loaded.

Each recipe's `DataArguments` subclasses the one here, keeping these flags (re-declaring one only where its help
says more for that recipe, with the same name and default) and adding its own. Its `load_raw_datasets` and
`check_splits` are thin wrappers around the ones here that pass what differs: the Hub dataset, the splits kept,
the validation hold-out, and what each stage needs.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import DatasetDict, IterableDatasetDict, load_dataset
from transformers.utils import logging

from hf_distill.tasks.common.arguments import LoadingArguments
from hf_distill.tasks.common.loading import load_hub_dataset

logger = logging.get_logger(__name__)

# The `datasets` builder that reads each kind of local file (.tsv is csv with tabs).
FILE_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
}
SPLITS = ("train", "validation", "test")


@dataclass
class DataArguments:
    """Where the data comes from and how much of it is used; every recipe's data flags start with these."""

    dataset_name: str | None = field(default=None, metadata={"help": "A dataset on the Hub (needs network)."})
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration of --dataset_name."}
    )
    train_file: str | None = field(default=None, metadata={"help": "Training data (a local file)."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation data, same format."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training examples."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N evaluation examples."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenization."}
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute the tokenized datasets."})

    def map_options(self, split: str) -> dict[str, Any]:
        """The `Dataset.map` options these flags set, for tokenizing `split`."""
        return {
            "num_proc": self.preprocessing_num_workers,
            "load_from_cache_file": not self.overwrite_cache,
            "desc": f"Tokenizing {split}",
        }

    @property
    def data_files(self) -> dict[str, str]:
        """split -> path of the --{split}_file flags given (a recipe without --test_file has no test split)."""
        named = {split: getattr(self, f"{split}_file", None) for split in SPLITS}
        return {split: path for split, path in named.items() if path is not None}


def check_file_types(files: Iterable[str], suffixes: Collection[str]) -> None:
    """Raise ValueError when a data file's suffix is not one of `suffixes`, or when the files need different
    `datasets` builders (a recipe reads all its files one way)."""
    files = list(files)
    found = {Path(path).suffix.lower() for path in files}
    unknown = found - set(suffixes)
    if unknown:
        raise ValueError(f"Unsupported data file type {sorted(unknown)}; use one of {sorted(suffixes)}.")
    if len({FILE_BUILDERS[suffix] for suffix in found}) > 1:
        raise ValueError(f"Data files must share one format, got {files}.")


def _load_file(path: str, split: str, *, keep_linebreaks: bool, **options: Any) -> Any:
    """`split` ("train", or a slice of it such as "train[:5%]") of one local file, by the builder of its suffix."""
    suffix = Path(path).suffix.lower()
    if suffix == ".tsv":
        options["delimiter"] = "\t"
    elif FILE_BUILDERS[suffix] == "text":
        options["keep_linebreaks"] = keep_linebreaks
    return load_dataset(FILE_BUILDERS[suffix], data_files={split.split("[")[0]: path}, split=split, **options)


def load_raw_datasets(
    data_args: DataArguments,
    loading_args: LoadingArguments | None = None,
    *,
    local_files: str,
    hub_dataset: tuple[str, str | None] | None = None,
    hub_splits: Sequence[str] | None = None,
    streaming: bool = False,
    validation_split_percentage: int = 0,
    keep_linebreaks: bool = True,
) -> DatasetDict | IterableDatasetDict:
    """The raw splits of a run.

    Local files (`data_args.data_files`) are loaded each on its own, so a test file may lack the label column; the
    builder follows the suffix (`FILE_BUILDERS`; .txt keeps line breaks unless `keep_linebreaks` is False).
    Otherwise the Hub dataset `hub_dataset` (default --dataset_name / --dataset_config_name): all its splits, or
    those of `hub_splits` it has; `local_files` names the local alternative in the error when it cannot be had.
    With `validation_split_percentage` > 0, a train split and no validation split, the first that many percent of
    the training data become the validation split, as run_clm.py does (not when streaming: a warning says so).
    """
    cache_dir = loading_args.cache_dir if loading_args else None
    token = loading_args.token if loading_args else None
    files = data_args.data_files
    for split, path in files.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"--{split}_file {path!r} does not exist.")
    name, config = hub_dataset or (data_args.dataset_name, data_args.dataset_config_name)
    options: dict[str, Any] = {"cache_dir": cache_dir, "streaming": streaming}

    def load(split: str) -> Any:
        if files:
            return _load_file(files[split.split("[")[0]], split, keep_linebreaks=keep_linebreaks, **options)
        return load_hub_dataset(name, config, local_files=local_files, split=split, token=token, **options)

    if files:
        raw = (IterableDatasetDict if streaming else DatasetDict)({split: load(split) for split in files})
    else:
        raw = load_hub_dataset(name, config, local_files=local_files, token=token, **options)
        if hub_splits is not None:
            raw = type(raw)({split: raw[split] for split in hub_splits if split in raw})
    if validation_split_percentage > 0 and "train" in raw and "validation" not in raw:
        if streaming:
            logger.warning(
                "No validation split and --streaming: no evaluation data (pass --validation_file)."
            )
        else:
            percent = validation_split_percentage
            raw["validation"] = load(f"train[:{percent}%]")
            raw["train"] = load(f"train[{percent}%:]")
    return raw


def stage_needs(
    do_train: bool,
    do_eval: bool,
    do_predict: bool,
    eval_splits: Sequence[str] = ("validation",),
    predict_splits: Sequence[str] = ("test",),
) -> list[tuple[str, Sequence[str], str, str]]:
    """`require_splits`'s needs of the stages requested with --do_train, --do_eval and --do_predict."""
    stages = (
        ("--do_train", do_train, ("train",), "train"),
        ("--do_eval", do_eval, eval_splits, "validation"),
        ("--do_predict", do_predict, predict_splits, "test"),
    )
    return [
        (flag, splits, f"{kind} data", f"pass --{kind}_file or drop {flag}")
        for flag, requested, splits, kind in stages
        if requested
    ]


def require_splits(raw: Any, needs: Iterable[tuple[str, Sequence[str], str, str]]) -> None:
    """Fail before any model is loaded when a requested stage has no data.

    needs: (who needs the data, the splits it needs, what they are, the fix), e.g. ("--do_eval", ("validation",),
    "validation data", "pass --validation_file or drop --do_eval"); an empty list of splits always fails.
    """
    for who, splits, what, fix in needs:
        if not splits or any(split not in raw for split in splits):
            raise ValueError(f"{who} needs {what}, but the loaded splits are {list(raw)}; {fix}.")
