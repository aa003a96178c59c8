"""Atomic writes (omniad/atomic.py): the mode a plain open() would give, all or nothing."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from omniad.atomic import atomic_file, current_umask, write_bytes_atomic, write_json_atomic

UMASKS = (0o022, 0o002, 0o027, 0o077, 0o000)


@pytest.fixture
def restore_umask() -> Iterator[None]:
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", UMASKS)
def test_atomic_files_get_the_mode_open_gives_not_mkstemps_0600(
        tmp_path: Path, umask: int, restore_umask: None) -> None:
    os.umask(umask)
    reference = tmp_path / "plain.txt"
    with open(reference, "w") as fh:  # the reference: what any other writer would make
        fh.write("x")
    assert _mode(reference) == 0o666 & ~umask
    assert current_umask() == umask and os.umask(umask) == umask  # read, not changed

    with atomic_file(tmp_path / "text.txt") as fh:
        fh.write("x")
    write_bytes_atomic(tmp_path / "bytes.bin", b"\0\1")
    write_json_atomic(tmp_path / "data.json", {"a": 1})
    (tmp_path / "old.json").write_text("{}")
    os.chmod(tmp_path / "old.json", 0o600)  # a replaced file takes the umask's mode too
    write_json_atomic(tmp_path / "old.json", {"b": 2})
    for name in ("text.txt", "bytes.bin", "data.json", "old.json"):
        assert _mode(tmp_path / name) == _mode(reference), (name, oct(_mode(tmp_path / name)))


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"auroc": 0.5})
    before = target.read_text()
    with pytest.raises(RuntimeError), atomic_file(target) as fh:
        fh.write('{"auroc": 0.')
        raise RuntimeError("killed mid-write")
    assert target.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
