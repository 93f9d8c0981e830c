"""Which model a distilled student's card names as its `base_model`, and why: only a Hub repo id
(`is_hub_repo_id`) can stand there; a PEFT adapter's base is the model it loads onto; otherwise the teacher, the
checkpoint the student was initialised from, or the origin a local teacher's config.json records. Used by
`hf_distill.reporting.model_card`."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["base_model", "display_name", "is_hub_repo_id", "peft_model"]

_WINDOWS_ABSOLUTE = re.compile(r"^(?:[A-Za-z]:)?[\\/]")


def display_name(name: Any) -> Any:
    """How a model card names a model: a Hub repo id or a relative path as given, an absolute path (`/...`, `~/...`,
    `C:\\...`) by its folder's name. A card is read on other machines, where a path on this one means nothing (and
    may tell more than it should: user names, mount points); the folder's name is what the model is called.
    Anything that is not a non-empty string is returned as it is."""
    if not isinstance(name, str) or not name:
        return name
    if not (name.startswith("~") or os.path.isabs(name) or _WINDOWS_ABSOLUTE.match(name)):
        return name
    parts = [part for part in re.split(r"[\\/]", name) if part and part != "~"]
    return parts[-1] if parts else name


def is_hub_repo_id(name: Any) -> bool:
    """Whether `name` can stand for a model on the Hub: `owner/name`, valid for huggingface_hub, and not a path that
    exists here. A name without an owner (`teacher_glue`) is refused: Hub models live under an owner (the old
    un-namespaced ids such as `gpt2` are redirects), while a bare name is usually a local folder seen from another
    working directory, e.g. in a teacher-logits cache's manifest. Nothing is looked up on the Hub."""
    if not isinstance(name, str) or name.count("/") != 1 or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def peft_model(model: torch.nn.Module) -> torch.nn.Module | None:
    """The `peft.PeftModel` under DDP/DeepSpeed wrappers, or None when the student is not one."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None)):
        return model
    return None


def _adapter_base(peft_model: torch.nn.Module) -> str | None:
    """`base_model_name_or_path` of the active adapter's config: the model the adapter must be loaded onto."""
    configs = peft_model.peft_config
    config = configs.get(getattr(peft_model, "active_adapter", None)) or next(iter(configs.values()), None)
    return getattr(config, "base_model_name_or_path", None) or None


def base_model(
    peft_student: torch.nn.Module | None,
    student: torch.nn.Module,
    teacher_name: str,
    finetuned_from: str | None,
) -> tuple[str | None, str]:
    """The Hub repo id for `base_model` (None for none) and a sentence for the card saying what it is."""
    if peft_student is not None:
        adapter_base = _adapter_base(peft_student)
        if finetuned_from is not None and finetuned_from != adapter_base:
            logger.warning(
                f"finetuned_from={finetuned_from!r} is not written as the card's base_model: a PEFT adapter's "
                f"base_model must be the model it is loaded onto, {adapter_base!r} (its adapter_config.json)."
            )
        if is_hub_repo_id(adapter_base):
            return adapter_base, (
                f"The student is a PEFT adapter on [{adapter_base}](https://huggingface.co/{adapter_base}), "
                "the card's `base_model`."
            )
        on = (
            f"`{display_name(adapter_base)}`, which is not a Hub repository id (owner/name)"
            if adapter_base
            else "an unnamed model"
        )
        return None, (
            f"The student is a PEFT adapter on {on}, so the card names no `base_model`: load that model, then the "
            "adapter onto it."
        )
    if finetuned_from is not None:
        if is_hub_repo_id(finetuned_from):
            return finetuned_from, (
                f"The card's `base_model` is [{finetuned_from}](https://huggingface.co/{finetuned_from}), given as "
                "`finetuned_from`."
            )
        logger.warning(
            f"finetuned_from={finetuned_from!r} is a local path or otherwise not a Hub repo id (owner/name), so the "
            "model card names it in its text and leaves base_model out. Pass the Hub id of the model (e.g. "
            "'google-bert/bert-base-uncased', not 'bert-base-uncased') to link it."
        )
        return None, (
            f"It was fine-tuned from `{display_name(finetuned_from)}`, which is not a Hub repository id (owner/name), "
            "so the card names no `base_model`."
        )
    candidates = (
        (teacher_name, "the teacher"),
        (getattr(student.config, "_name_or_path", None), "the checkpoint the student was initialised from"),
        (
            _recorded_origin(teacher_name),
            f"the model that the config.json of the local teacher `{display_name(teacher_name)}` names as its origin "
            "(`_name_or_path`); the student was distilled from that local teacher, not from it directly",
        ),
    )
    for repo_id, what in candidates:
        if is_hub_repo_id(repo_id):
            return (
                repo_id,
                f"The card's `base_model` is [{repo_id}](https://huggingface.co/{repo_id}), {what}.",
            )
    return None, (
        f"The teacher, `{display_name(teacher_name)}`, is a local path or otherwise not a Hub repository id "
        "(owner/name), so the card names no `base_model`."
    )


def _recorded_origin(path: str) -> str | None:
    """`_name_or_path` in the config.json of a local model folder: where that model had been loaded from when it was
    saved. transformers 4 wrote it; 5 leaves it out, so this is None for folders that 5 saved."""
    if not path or not os.path.isdir(path):
        return None
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            origin = json.load(f).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return origin if isinstance(origin, str) else None
