"""Atomic file publication for the registry.

Every file MUSE publishes goes through the same four steps: write the bytes
to a temporary file in the destination's directory, flush and ``fsync`` it,
move it into place, then ``fsync`` the directory so the new name survives a
power cut.  A reader therefore sees either the old file or the whole new one,
never a prefix.

Two ways to move into place:

- ``write_bytes_atomic`` replaces whatever is there (``os.replace``); used
  for state that is legitimately rewritten, such as calibration samples.
- ``publish_new`` refuses to replace anything (``os.link`` fails with
  ``EEXIST``); used for versioned artifacts, which are never overwritten.
  The link is atomic even between processes, so two writers racing for the
  same version number cannot both win.

Temporary files start with ``TEMP_PREFIX`` followed by the writer's pid.
Readers skip such names, and ``remove_stale_temps`` deletes the leftovers of
killed writers when a registry is opened.

A full disk (``ENOSPC`` or ``EDQUOT``) raises ``StorageFull``: the temporary
file is removed and nothing already published is touched.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from muse._errors import Conflict, StorageFull

__all__ = [
    "TEMP_PREFIX",
    "is_temp_name",
    "publish_new",
    "remove_stale_temps",
    "write_bytes_atomic",
]

logger = logging.getLogger("muse.registry")

#: Start of every temporary file name; no published name starts like this.
TEMP_PREFIX = ".muse-tmp-"

# A temporary file whose writer is gone is garbage.  When the writer's pid is
# still alive it may have been reused by an unrelated process, so a temp file
# older than this is removed anyway: no single write takes ten minutes.
STALE_AFTER_SECONDS = 600.0

# Errors that mean "the disk is full", as opposed to a broken disk.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of our temporary files.

    Args:
        name: a bare file name (no directory).

    Returns:
        True for names readers must ignore.
    """
    return name.startswith(TEMP_PREFIX)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, replacing any existing file.

    Args:
        path: destination; its directory must exist.
        data: the complete new contents.

    Raises:
        StorageFull: the disk or quota is full; ``path`` is unchanged.
        OSError: any other I/O failure; ``path`` is unchanged.
    """
    _publish(Path(path), data, overwrite=True)


def publish_new(path: str | os.PathLike[str], data: bytes) -> None:
    """Publish ``data`` at ``path``, which must not exist yet.

    Args:
        path: destination; its directory must exist.
        data: the complete contents.

    Raises:
        Conflict: ``path`` is already published (by us or a racing process);
            it is left untouched.
        StorageFull: the disk or quota is full; nothing was published.
        OSError: any other I/O failure; nothing was published.
    """
    _publish(Path(path), data, overwrite=False)


def remove_stale_temps(root: str | os.PathLike[str]) -> int:
    """Delete temporary files left under ``root`` by writers that died.

    A temporary file is stale when the pid in its name no longer runs, or
    when it is older than ``STALE_AFTER_SECONDS``.  Live writers' files are
    left alone so that two processes may share a registry.

    Args:
        root: directory searched recursively.

    Returns:
        How many files were removed.
    """
    removed = 0
    now = time.time()
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            if is_temp_name(name) and _is_stale(path, name, now):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    removed += 1
    if removed:
        logger.info("removed %d stale temporary files under %s", removed, root)
    return removed


def _publish(path: Path, data: bytes, *, overwrite: bool) -> None:
    directory = path.parent
    with _storage_errors(path):
        fd, temp = tempfile.mkstemp(
            prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=directory
        )
    try:
        try:
            _write_and_sync(fd, data, path)
        finally:
            os.close(fd)
        _move_into_place(temp, path, overwrite=overwrite)
        _fsync_directory(directory)
    except BaseException:
        # Whatever went wrong, including KeyboardInterrupt, the temporary
        # file must not outlive this call.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def _write_and_sync(fd: int, data: bytes, path: Path) -> None:
    """Write all of ``data`` to ``fd`` and fsync it.

    Kept apart so tests can aim it at ``/dev/full`` and see ``StorageFull``.

    Args:
        fd: a file descriptor open for writing.
        data: bytes to write.
        path: the final destination, named in error messages.

    Raises:
        StorageFull: the device is full.
        OSError: any other write failure.
    """
    view = memoryview(data)
    with _storage_errors(path):
        # os.write may write less than asked; loop until everything is out.
        while view:
            written = os.write(fd, view)
            view = view[written:]
        # Some filesystems (NFS, delayed allocation) only report a full disk
        # at fsync, so it sits inside the same translation.
        os.fsync(fd)


def _move_into_place(temp: str, path: Path, *, overwrite: bool) -> None:
    if overwrite:
        os.replace(temp, path)
        return
    # os.link refuses an existing target, which os.rename would silently
    # replace.  It needs hard-link support, which every local Linux
    # filesystem has; registries on filesystems without it are unsupported.
    try:
        os.link(temp, path)
    except FileExistsError as exc:
        raise Conflict(
            f"{path} is already published; published files are never overwritten"
        ) from exc
    os.unlink(temp)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _storage_errors(path: Path) -> Iterator[None]:
    """Translate a full disk into ``StorageFull``, chaining the OS error."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _FULL_ERRNOS:
            raise StorageFull(
                f"no space left to write {path} ({os.strerror(exc.errno)}); "
                "nothing already stored was changed"
            ) from exc
        raise


def _is_stale(path: str, name: str, now: float) -> bool:
    pid_text = name[len(TEMP_PREFIX) :].split("-", 1)[0]
    try:
        age = now - os.stat(path).st_mtime
    except FileNotFoundError:
        return False
    if age > STALE_AFTER_SECONDS or not pid_text.isdigit():
        return True
    return not _pid_alive(int(pid_text))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # The pid exists but belongs to another user.
        return True
    return True
