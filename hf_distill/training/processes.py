"""Ending a multi-process run: every rank leaves together."""

from __future__ import annotations

import torch


def finish_processes() -> None:
    """End a finished run on every rank together: wait for the others, then take the process group down.

    Without it a rank that finished first (the others return at once from the report, which the main process
    alone measures) left while the main one still held the group, and gloo aborted it at exit (SIGABRT), so a
    launch that had written every file returned an error. A no-op in a single process.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
