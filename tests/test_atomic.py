"""Atomic publication: whole files or nothing, never an overwrite."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from muse import _atomic
from muse._atomic import (
    TEMP_PREFIX,
    publish_new,
    remove_stale_temps,
    write_bytes_atomic,
)
from muse._errors import Conflict, StorageFull


def temp_files(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_write_bytes_atomic_writes_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "state.bin"

    write_bytes_atomic(path, b"first")
    write_bytes_atomic(path, b"second")

    assert path.read_bytes() == b"second"
    assert temp_files(tmp_path) == []


def test_publish_new_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "1.json"
    publish_new(path, b"original")

    with pytest.raises(Conflict, match="1.json is already published"):
        publish_new(path, b"impostor")

    assert path.read_bytes() == b"original"
    assert temp_files(tmp_path) == []


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "state.bin"
    write_bytes_atomic(path, b"old")

    # Not a buffer: the write step raises after the temporary file exists.
    with pytest.raises(TypeError):
        write_bytes_atomic(path, object())  # type: ignore[arg-type]

    assert path.read_bytes() == b"old"
    assert temp_files(tmp_path) == []


def test_write_step_on_a_full_device_raises_storage_full(tmp_path: Path) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("/dev/full is not available on this system")
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(StorageFull, match="no space left to write .*x.bin"):
            _atomic._write_and_sync(fd, b"payload", tmp_path / "x.bin")
    finally:
        os.close(fd)


@contextlib.contextmanager
def tiny_tmpfs(where: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs at ``where``; skips the test when mounting is refused."""
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def test_full_disk_raises_storage_full_and_keeps_old_file(tmp_path: Path) -> None:
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root on Linux")
    with tiny_tmpfs(tmp_path / "small") as small:
        path = small / "state.bin"
        write_bytes_atomic(path, b"old")

        with pytest.raises(StorageFull, match="no space left"):
            write_bytes_atomic(path, b"x" * 1_000_000)
        with pytest.raises(StorageFull, match="nothing already stored was changed"):
            publish_new(small / "new.bin", b"x" * 1_000_000)

        assert path.read_bytes() == b"old"
        assert not (small / "new.bin").exists()
        assert temp_files(small) == []


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_remove_stale_temps_spares_live_writers(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    dead = tmp_path / "sub" / f"{TEMP_PREFIX}{dead_pid()}-abc"
    live = tmp_path / f"{TEMP_PREFIX}{os.getpid()}-def"
    old = tmp_path / f"{TEMP_PREFIX}{os.getpid()}-ghi"
    published = tmp_path / "1.json"
    for path in (dead, live, old, published):
        path.write_bytes(b"partial")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))

    removed = remove_stale_temps(tmp_path)

    assert removed == 2
    assert not dead.exists() and not old.exists()
    assert live.exists() and published.exists()
