"""Online distillation on a stream (scripts/distill_online.py, `hf-distill online`): data arrives in chunks, every N
chunks the teacher is refreshed on the newest labelled rows, the student distils from the current teacher on every
chunk, and a checkpoint per chunk lets a killed run resume without training a chunk twice or skipping one.

- arguments.py    the flags: the stream (folder, columns, waiting, a held-out file) and the teacher's refresh
- stream.py       the chunk sources (files in a folder, Python iterables, a stream of rows) and each chunk's checks
- checkpoints.py  one atomic checkpoint per chunk: student, refreshed teacher, what was consumed; resume and pruning
- flow.py         the loop: test then train on each chunk, refresh the teacher, distil the student, checkpoint
- recipe.py       the script's flow: flags, loading or resuming the models, the summary

May import tasks/common and hf_distill; nothing of the other tasks.
"""

from __future__ import annotations

from hf_distill.tasks.online.arguments import OnlineArguments, StreamArguments
from hf_distill.tasks.online.checkpoints import ChunkCheckpoint, latest_checkpoint
from hf_distill.tasks.online.flow import run_stream
from hf_distill.tasks.online.stream import Chunk, FolderChunks, IterableChunks, RowChunks, check_chunk

__all__ = [
    "Chunk",
    "ChunkCheckpoint",
    "FolderChunks",
    "IterableChunks",
    "OnlineArguments",
    "RowChunks",
    "StreamArguments",
    "check_chunk",
    "latest_checkpoint",
    "run_stream",
]
