"""Atomic writes: whoever reads a path sees the previous complete file (or directory) or the new complete one, never
half of one, and a write that fails (an exception, or a killed process) leaves the previous one as it was.

- Files (`atomic_open`, `atomic_write_text`, `atomic_write_bytes`): the content goes to a temporary file in the same
  directory (one file system, so the rename is atomic), is flushed and fsync'ed, then `os.replace`s the target, and
  the directory is fsync'ed so that the rename survives a power cut. The file gets the permissions a plain `open`
  gives (0o666 less the umask), so shared caches and model folders stay readable by others.
- Directories (`atomic_directory`): a cache (data plus manifest) is built in a temporary sibling and renamed to the
  target only when the block completes; temporaries of killed builds are removed by the next build of that target.

Temporary names start with "." so that listings and globs pass over them: `.<name>.<random>.tmp` for a file,
`.<name>.tmp-<random>` for a directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from transformers.utils import logging

logger = logging.get_logger(__name__)

_TEMP_MARKER = ".tmp-"
_OWNER_FILE = ".owner.json"
_ORPHAN_AGE_S = 3600.0


def fsync_directory(directory: str | os.PathLike) -> None:
    """Persist the entries of `directory` (a rename into it); a no-op where directories cannot be opened (Windows)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# --------------------------------------------------------------------------------------------- files
@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike, mode: str = "w", *, encoding: str = "utf-8", newline: str | None = None
) -> Iterator[IO]:
    """A handle whose content replaces `path` when the block completes; a block that raises leaves `path` as it was
    and no temporary file behind. mode: "w" (text, with `encoding` and `newline` as for `open`) or "wb". The parent
    directory is created if needed."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    # os.open with 0o666 applies the umask, as open() does (tempfile would create the file 0o600).
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        text_options = {} if mode == "wb" else {"encoding": encoding, "newline": newline}
        with os.fdopen(descriptor, mode, **text_options) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> None:
    """Replace `path` by `text` atomically (see `atomic_open`)."""
    with atomic_open(path, "w", encoding=encoding) as handle:
        handle.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` by `data` atomically (see `atomic_open`)."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


# --------------------------------------------------------------------------------------------- directories
def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temporaries(target: Path) -> None:
    """Remove temporary directories that builds of `target` left behind when they were killed: those whose
    owning process (recorded inside) is gone from this host, or ownerless ones older than an hour."""
    host = socket.gethostname()
    for candidate in target.parent.glob(f".{target.name}{_TEMP_MARKER}*"):
        try:
            owner = json.loads((candidate / _OWNER_FILE).read_text(encoding="utf-8"))
            stale = owner.get("host") == host and not _is_alive(int(owner.get("pid", -1)))
        except (OSError, ValueError):
            stale = time.time() - candidate.stat().st_mtime > _ORPHAN_AGE_S
        if stale:
            logger.warning(f"Removing {candidate}, left by a build of {target} that did not finish.")
            shutil.rmtree(candidate, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory in a temporary sibling and rename it to `target` only if the block completes.

    A block that raises (or a process that is killed) leaves `target` untouched; the temporary directory is
    removed on error, or by the next build of the same target when the process died. With `overwrite`, an
    existing `target` is replaced; without it, an existing `target` is an error.
    """
    target = Path(target).resolve()
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to rebuild it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    temporary = target.parent / f".{target.name}{_TEMP_MARKER}{uuid.uuid4().hex[:12]}"
    temporary.mkdir()  # 0o777 less the umask, as for any directory (tempfile.mkdtemp would make it 0o700)
    try:
        (temporary / _OWNER_FILE).write_text(
            json.dumps({"host": socket.gethostname(), "pid": os.getpid()}), encoding="utf-8"
        )
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    (temporary / _OWNER_FILE).unlink(missing_ok=True)
    old = None
    if target.exists():
        # A directory cannot be renamed over a non-empty one: move the old one aside first.
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(target, old)
    os.replace(temporary, target)
    fsync_directory(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
