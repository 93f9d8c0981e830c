"""Freed memory kept for the next step on CPU (hf_distill.training.cpu_memory): checked by what the kernel counts
(minor page faults of a fresh process re-allocating a 64 MiB block, read with getrusage), and by the trainer
calling it on CPU only when asked, with the same training result either way."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch
from test_trainer import classification_trainer

from hf_distill.training import cpu_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

_PROBE = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from hf_distill.training.cpu_memory import keep_freed_memory
    assert keep_freed_memory()
def touch():  # 64 MiB, above glibc's largest dynamic mmap threshold (32 MiB): mmapped unless told otherwise
    block = torch.empty(16 * 1024 * 1024, dtype=torch.float32)
    block.fill_(1.0)
    return float(block[-1])
touch()
touch()
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    touch()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_per_allocation(mode: str) -> list[int]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, timeout=300
    )
    return sorted(int(line) for line in result.stdout.split())


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    pages = 64 * 1024 * 1024 // 4096  # 16,384 pages of 4 KiB per fresh 64 MiB block
    default = _faults_per_allocation("default")  # five allocations each, faults per allocation, sorted
    kept = _faults_per_allocation("keep")
    assert default[0] > pages // 2, (
        f"without the setting every block should fault in again ({default} faults)"
    )
    assert kept[2] < pages // 20, f"with it the freed block should mostly be reused ({kept} faults)"


@pytest.mark.parametrize("keep", [True, False])
def test_trainer_sets_it_on_cpu_only_when_asked_and_learns_the_same(
    tmp_path, bert_tokenizer, monkeypatch, keep
):
    calls = []
    monkeypatch.setattr("hf_distill.trainer.keep_freed_memory", lambda: calls.append(True) or True)
    trainer = classification_trainer(tmp_path / "on", bert_tokenizer, cpu_keep_freed_memory=keep)
    trainer.train()
    assert calls == ([True] if keep else [])
    reference = classification_trainer(tmp_path / "off", bert_tokenizer, cpu_keep_freed_memory=False)
    reference.train()
    for (name, mine), (_, theirs) in zip(
        trainer.model.named_parameters(), reference.model.named_parameters()
    ):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=name)


def test_outside_glibc_nothing_is_changed(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_applied", False)
    monkeypatch.setattr(cpu_memory, "_glibc", lambda: None)
    assert cpu_memory.keep_freed_memory() is False
