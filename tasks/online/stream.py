"""Where the chunks of a stream come from, and the checks each chunk passes before anything trains on it.

A chunk is a `Chunk(name, rows, fingerprint)`: a `datasets.Dataset` of text and (optional) label columns, and a
sha256 fingerprint of its content, which a resumed run compares with the one recorded when the chunk was consumed.

- `FolderChunks`: the files of a folder (.csv, .tsv, .json, .jsonl, .parquet), in name order, each one chunk; with
  `poll_seconds` it waits for files that appear later, until `idle_timeout_seconds` pass without one. Names starting
  with "." are ignored, so a writer can build a chunk under a temporary name and rename it in (a rename is atomic;
  a file copied in place could be read half-written).
- `IterableChunks`: any iterable of chunks given in Python: datasets, lists of row dicts, or (name, rows) pairs.
- `RowChunks`: an iterable of rows (an `IterableDataset`, a generator) cut into chunks of `chunk_rows` rows.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, load_dataset
from transformers.utils import logging

from hf_distill.tasks.common.raw_data import FILE_BUILDERS

logger = logging.get_logger(__name__)

CHUNK_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")


@dataclass
class Chunk:
    name: str
    rows: Dataset
    fingerprint: str


def rows_fingerprint(rows: Dataset) -> str:
    """sha256 of the rows' content (column names and values, in order)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(rows.column_names)).encode())
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def read_chunk_file(path: Path) -> Dataset:
    suffix = path.suffix.lower()
    if suffix not in CHUNK_SUFFIXES:
        raise ValueError(
            f"chunk {path.name}: unknown format {suffix!r}; chunk files are {list(CHUNK_SUFFIXES)}."
        )
    options: dict[str, Any] = {"delimiter": "\t"} if suffix == ".tsv" else {}
    if suffix != ".parquet" and len([line for line in path.read_text().splitlines() if line.strip()]) <= (
        0 if suffix in (".json", ".jsonl") else 1  # csv/tsv: a header alone is no row
    ):
        return Dataset.from_dict({})
    # keep_in_memory: the chunk is read once and trained on at once; no cache files per chunk.
    return load_dataset(
        FILE_BUILDERS[suffix], data_files={"train": str(path)}, split="train", keep_in_memory=True, **options
    )


class FolderChunks:
    """The chunk files of `folder` matching `pattern`, in name order (see the module docstring)."""

    def __init__(
        self,
        folder: str | Path,
        pattern: str = "*",
        *,
        poll_seconds: float = 0.0,
        idle_timeout_seconds: float = 0.0,
    ):
        self.folder, self.pattern = Path(folder), pattern
        if not self.folder.is_dir():
            raise ValueError(
                f"--stream_dir {str(self.folder)!r} is not a folder; create it and put the chunks in it."
            )
        if poll_seconds < 0 or idle_timeout_seconds < 0:
            raise ValueError("poll_seconds and idle_timeout_seconds must be >= 0.")
        self.poll_seconds, self.idle_timeout_seconds = poll_seconds, idle_timeout_seconds

    def _files(self) -> list[Path]:
        return sorted(
            path
            for path in self.folder.glob(self.pattern)
            if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in CHUNK_SUFFIXES
        )

    def __iter__(self) -> Iterator[Chunk]:
        seen: list[str] = []
        idle_since = time.monotonic()
        while True:
            files = self._files()
            if [path.name for path in files[: len(seen)]] != seen:
                raise ValueError(
                    f"the chunk files of {self.folder} changed order: a file was added before ones already read "
                    f"({[p.name for p in files]}; read so far {seen}). Name chunks so that they sort in arrival "
                    "order (zero-padded numbers, or timestamps)."
                )
            new = files[len(seen) :]
            for path in new:
                seen.append(path.name)
                data = path.read_bytes()
                yield Chunk(path.name, read_chunk_file(path), hashlib.sha256(data).hexdigest())
            if new:
                idle_since = time.monotonic()
                continue
            if self.poll_seconds <= 0 or time.monotonic() - idle_since >= self.idle_timeout_seconds:
                return
            time.sleep(self.poll_seconds)


class IterableChunks:
    """Chunks given in Python: each item a `Dataset`, a list of row dicts, a column dict, or a (name, rows) pair."""

    def __init__(self, chunks: Iterable[Any]):
        self.chunks = chunks

    def __iter__(self) -> Iterator[Chunk]:
        for index, item in enumerate(self.chunks):
            name, rows = item if isinstance(item, tuple) else (f"chunk-{index:05d}", item)
            if isinstance(rows, dict):
                rows = Dataset.from_dict(rows)
            elif not isinstance(rows, Dataset):
                rows = Dataset.from_list(list(rows))
            yield Chunk(str(name), rows, rows_fingerprint(rows))


class RowChunks:
    """An iterable of row dicts (e.g. a streaming `IterableDataset`) cut into chunks of `chunk_rows` rows; a last
    chunk with fewer rows is kept."""

    def __init__(self, rows: Iterable[dict[str, Any]], chunk_rows: int):
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}.")
        self.rows, self.chunk_rows = rows, chunk_rows

    def __iter__(self) -> Iterator[Chunk]:
        batch: list[dict[str, Any]] = []

        def emit(index: int) -> Chunk:
            rows = Dataset.from_list(batch)
            return Chunk(f"rows-{index * self.chunk_rows:09d}", rows, rows_fingerprint(rows))

        index = 0
        for row in self.rows:
            batch.append(dict(row))
            if len(batch) == self.chunk_rows:
                yield emit(index)
                batch, index = [], index + 1
        if batch:
            yield emit(index)


def check_chunk(
    chunk: Chunk, text_columns: Sequence[str], label_column: str, label_names: Sequence[str]
) -> int:
    """Raise on a chunk nothing can be learned from, or that the head cannot take; returns its labelled rows.

    Errors: no rows; a text column missing; labels that are not classes of the model's head."""
    rows = chunk.rows
    if len(rows) == 0:
        raise ValueError(
            f"chunk {chunk.name} is empty: a chunk needs at least one row. Remove the file, or write chunks only "
            "once they hold data."
        )
    missing = [column for column in text_columns if column not in rows.column_names]
    if missing:
        raise ValueError(
            f"chunk {chunk.name} lacks the text column(s) {missing}; its columns are {rows.column_names} (set "
            "--text_column_names)."
        )
    if label_column not in rows.column_names:
        return 0
    values = [value for value in rows[label_column] if value not in (None, "")]
    unknown = sorted({str(value) for value in values} - set(label_names))
    if unknown:
        raise ValueError(
            f"chunk {chunk.name} has labels {unknown} that the model's head does not know (its classes: "
            f"{list(label_names)}); the head is fixed for the whole stream: start from a teacher whose head has "
            "every class the stream will bring (its rows may come later), or fix the chunk."
        )
    return len(values)
