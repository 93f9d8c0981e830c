"""Loading models, tokenizers and Hub datasets offline-aware, and building the student the flags ask for."""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import datasets
from transformers import PreTrainedModel
from transformers.utils import logging

from hf_distill.tasks.common.arguments import LoadingArguments, ModelArguments

logger = logging.get_logger(__name__)


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
