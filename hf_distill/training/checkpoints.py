"""Which checkpoints can be resumed from.

`Trainer` writes a checkpoint file by file, so a run killed while saving leaves a `checkpoint-N` folder that
looks like the newest one but is missing pieces. `trainer_state.json` is written after the weights, optimizer,
scheduler and RNG states, so a checkpoint whose state file parses is complete.
"""

from __future__ import annotations

import json
import os
import re

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def is_complete_checkpoint(path: str) -> bool:
    state_file = os.path.join(path, TRAINER_STATE)
    try:
        with open(state_file, encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The complete checkpoint with the highest step in `output_dir`, or None."""
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path) and is_complete_checkpoint(path):
            steps.append((int(match.group(1)), path))
    return max(steps)[1] if steps else None


def resume_flag(value: str | bool | None) -> str | bool | None:
    """A `--resume_from_checkpoint` value as `Trainer.train` takes it: the words true/false (any case, unless a
    folder of that name exists) become the booleans, so `--resume_from_checkpoint true` resumes from the newest
    complete checkpoint instead of looking for a folder named "true"."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false") and not os.path.isdir(value):
        return value.strip().lower() == "true"
    return value


def resolve_resume(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | bool | None:
    """`resume_from_checkpoint` for `Trainer.train`, with `True` meaning the newest *complete* checkpoint in
    `output_dir` (so a run killed while writing one resumes from the one before); an incomplete folder raises.
    The strings "true"/"false" (from a command line) count as the booleans (`resume_flag`)."""
    resume_from_checkpoint = resume_flag(resume_from_checkpoint)
    if resume_from_checkpoint is True:
        latest = last_complete_checkpoint(output_dir)
        if latest is None:
            raise ValueError(
                f"resume_from_checkpoint=True but {output_dir} has no complete checkpoint; start without "
                "resume_from_checkpoint or point it at a checkpoint folder."
            )
        return latest
    if isinstance(resume_from_checkpoint, str) and not is_complete_checkpoint(resume_from_checkpoint):
        if not os.path.exists(resume_from_checkpoint):
            raise ValueError(
                f"--resume_from_checkpoint {resume_from_checkpoint!r}: no such folder. Pass a checkpoint folder, "
                f"or true to resume from the newest complete checkpoint in {output_dir} (rerunning the same "
                "command with the same --output_dir also resumes)."
            )
        latest = last_complete_checkpoint(os.path.dirname(os.path.abspath(resume_from_checkpoint)))
        raise ValueError(
            f"{resume_from_checkpoint} is not a complete checkpoint (no readable trainer_state.json: the run was "
            f"probably stopped while saving it). The newest complete one is {latest}."
        )
    return resume_from_checkpoint
