"""hf_distill/atomic.py: a file or directory is replaced whole or not at all, and a failed write leaves the previous
one as it was, with no temporary behind."""

from __future__ import annotations

import os
import stat

import pytest

from hf_distill.storage.atomic import atomic_directory, atomic_open, atomic_write_bytes, atomic_write_text


def test_write_text_and_bytes_create_and_replace(tmp_path):
    path = tmp_path / "sub" / "report.md"  # the parent is created
    atomic_write_text(path, "first\n")
    assert path.read_text(encoding="utf-8") == "first\n"
    atomic_write_text(path, "second, é\n")
    assert path.read_text(encoding="utf-8") == "second, é\n"
    atomic_write_bytes(tmp_path / "plot.png", b"\x89PNG")
    assert (tmp_path / "plot.png").read_bytes() == b"\x89PNG"
    assert sorted(os.listdir(tmp_path / "sub")) == ["report.md"]


def test_a_write_interrupted_by_an_exception_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    path.write_text('{"old": true}')
    for error in (RuntimeError("disk full"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with atomic_open(path) as handle:
                handle.write('{"new": ')
                raise error
        assert path.read_text() == '{"old": true}'
        assert os.listdir(tmp_path) == ["results.json"]
    # A first write that fails leaves nothing at all.
    with pytest.raises(RuntimeError):
        with atomic_open(tmp_path / "fresh.txt", "wb") as handle:
            handle.write(b"half")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == ["results.json"]


def test_the_file_gets_the_permissions_of_a_plain_open(tmp_path):
    atomic_write_text(tmp_path / "atomic.txt", "x")
    (tmp_path / "plain.txt").write_text("x")
    mode = stat.S_IMODE(os.stat(tmp_path / "atomic.txt").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode)


def test_text_mode_takes_newline_as_open_does(tmp_path):
    with atomic_open(tmp_path / "rows.csv", "w", newline="") as handle:
        handle.write("a,b\r\n")
    assert (tmp_path / "rows.csv").read_bytes() == b"a,b\r\n"
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb', got 'a'"):
        with atomic_open(tmp_path / "rows.csv", "a"):
            pass


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "cache"
    with atomic_directory(target) as building:
        assert building.parent == tmp_path and building.name.startswith(".cache.tmp-")
        assert not target.exists()  # invisible until complete
        (building / "manifest.json").write_text("1")
    assert sorted(os.listdir(target)) == ["manifest.json"]

    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        with atomic_directory(target):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(target, overwrite=True) as building:
            (building / "manifest.json").write_text("2")
            raise RuntimeError("killed")
    assert (target / "manifest.json").read_text() == "1"
    assert os.listdir(tmp_path) == ["cache"]

    with atomic_directory(target, overwrite=True) as building:
        (building / "data").mkdir()
    assert sorted(os.listdir(target)) == ["data"]  # replaced, not merged
    assert os.listdir(tmp_path) == ["cache"]
