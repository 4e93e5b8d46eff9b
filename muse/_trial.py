"""Import an uploaded model in a child process before the server does.

The native parsers (xgboost's, LightGBM's, treelite's) read bytes that an
admin uploaded, and a malformed file can crash them: an out-of-range split
index in an XGBoost JSON model segfaults libxgboost.  A crash there must
refuse one upload, not take every tenant's scoring down, so each upload is
first imported, compiled and checked against its golden rows in a child
process.  The server repeats the import only after the child succeeded; the
child's compiled library is already in the shared cache by then.

Run as ``python -m muse._trial``: a msgpack request on stdin, exit 0 when
the model loads, 2 with a msgpack ``{"code", "detail"}`` on stdout when it
is refused with a MuseError.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack

from muse._errors import (
    InternalError,
    ModelImportError,
    MuseError,
    ParityError,
    StorageFull,
)

__all__ = ["check_in_child"]

# A child that imports, compiles and checks a large ensemble on a busy
# machine needs minutes, not hours; past this it is treated as hung.
TIMEOUT_S = 900.0
_ERRORS = {cls.code: cls for cls in (ModelImportError, ParityError, StorageFull)}


def check_in_child(
    data: bytes,
    format: str,
    feature_names: list[str] | None,
    beta: float,
    cache_dir: Path,
    golden: Any = None,
) -> None:
    """Load the model in a child process; raise what it was refused with.

    Raises:
        ModelImportError: the child crashed, hung or could not read the model.
        ParityError: compiled predictions differ on the golden rows.
        StorageFull: the disk filled while compiling.
    """
    request = msgpack.packb(
        {
            "data": data,
            "format": format,
            "feature_names": feature_names,
            "beta": beta,
            "cache_dir": str(cache_dir),
            "golden": golden,
        },
        use_bin_type=True,
    )
    try:
        done = subprocess.run(
            [sys.executable, "-m", "muse._trial"],
            input=request,
            capture_output=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        raise ModelImportError(
            f"importing the model did not finish within {TIMEOUT_S:g} s"
        ) from exc
    if done.returncode == 0:
        return
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        raise ModelImportError(
            f"importing the model crashed a native library ({name}); "
            "the file is malformed and was refused"
        )
    if done.returncode == 2:
        answer = msgpack.unpackb(done.stdout, raw=False)
        error = _ERRORS.get(answer.get("code"), ModelImportError)
        raise error(str(answer.get("detail")))
    tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:]
    raise ModelImportError(f"importing the model failed: {' '.join(tail)}")


def _main() -> int:
    # Native libraries print to file descriptor 1 (tl2cgen does); keep the
    # real stdout for the answer and send their chatter to stderr.
    answer = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    from muse._models import load_model

    request = msgpack.unpackb(sys.stdin.buffer.read(), raw=False)
    try:
        load_model(
            request["data"],
            request["format"],
            request["feature_names"],
            request["beta"],
            cache_dir=Path(request["cache_dir"]),
            golden=request["golden"],
        )
    except MuseError as exc:
        answer.write(msgpack.packb({"code": exc.code, "detail": exc.detail}))
        answer.flush()
        return 2
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which refuses
        error = InternalError(f"{type(exc).__name__}: {exc}")
        answer.write(msgpack.packb({"code": "model_import", "detail": error.detail}))
        answer.flush()
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
