"""One checkpoint per chunk, so that a killed run resumes at the chunk after the last one it finished.

    <output_dir>/checkpoints/chunk-00003/
        student/            the student after chunk 3 (an ordinary model folder, with the tokenizer)
        teacher/            the teacher, only when it was refreshed at chunk 3
        chunk_state.json    every chunk consumed so far (name, fingerprint), where the current teacher is, the
                            metrics of every chunk so far, and the run's settings

Each checkpoint is built in a temporary folder and renamed into place when complete
(`hf_distill.storage.atomic.atomic_directory`), so a folder named chunk-N is always whole: a run killed while
working on chunk N + 1 left nothing of it, and redoes it from the start; chunks 0..N are neither trained on again
nor skipped. The newest `keep` checkpoints are kept, and the one holding the current teacher.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_distill.storage.atomic import atomic_directory

CHECKPOINTS = "checkpoints"
STATE_FILE = "chunk_state.json"
_NAME = re.compile(r"^chunk-(\d+)$")


def checkpoint_name(index: int) -> str:
    return f"chunk-{index:05d}"


@dataclass
class ChunkCheckpoint:
    index: int
    folder: Path
    state: dict[str, Any]

    @property
    def student_dir(self) -> Path:
        return self.folder / "student"

    def teacher_dir(self, output_dir: str | Path) -> str:
        """Where the current teacher is: a checkpoint's teacher/ folder, or the initial teacher's path."""
        teacher = self.state["teacher"]
        if teacher.get("checkpoint"):
            return str(Path(output_dir) / CHECKPOINTS / teacher["checkpoint"] / "teacher")
        return teacher["path"]


def _read_state(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def latest_checkpoint(output_dir: str | Path) -> ChunkCheckpoint | None:
    """The complete checkpoint of the highest chunk in `output_dir`, or None when there is none."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    found = []
    for folder in root.iterdir():
        match = _NAME.match(folder.name)
        if match and folder.is_dir():
            state = _read_state(folder)
            if state is not None:
                found.append(ChunkCheckpoint(int(match.group(1)), folder, state))
    return max(found, key=lambda checkpoint: checkpoint.index) if found else None


def write_checkpoint(
    output_dir: str | Path,
    index: int,
    state: dict[str, Any],
    student: Any,
    tokenizer: Any,
    teacher: Any | None = None,
) -> Path:
    """Write chunk `index`'s checkpoint atomically: the student, the teacher when given (it was refreshed), and the
    state; returns its folder."""
    folder = Path(output_dir) / CHECKPOINTS / checkpoint_name(index)
    with atomic_directory(folder, overwrite=True) as building:
        student.save_pretrained(building / "student")
        tokenizer.save_pretrained(building / "student")
        if teacher is not None:
            teacher.save_pretrained(building / "teacher")
            tokenizer.save_pretrained(building / "teacher")
        (building / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    return folder


def prune_checkpoints(output_dir: str | Path, keep: int, teacher_checkpoint: str | None) -> list[str]:
    """Remove all but the newest `keep` chunk checkpoints (0: keep all), never the one holding the current teacher
    (`teacher_checkpoint`, its folder name); returns the names removed."""
    if keep <= 0:
        return []
    root = Path(output_dir) / CHECKPOINTS
    folders = sorted(
        (int(match.group(1)), folder)
        for folder in root.iterdir()
        if (match := _NAME.match(folder.name)) and folder.is_dir()
    )
    removed = []
    for _, folder in folders[: max(len(folders) - keep, 0)]:
        if folder.name != teacher_checkpoint:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed
