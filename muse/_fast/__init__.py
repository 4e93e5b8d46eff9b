"""Score kernels: compiled (``_mapping.pyx``, ``_events.pyx``) or their twins.

The compiled module is used unless ``MUSE_PURE_PYTHON=1`` is set, as
msgpack does with ``MSGPACK_PUREPYTHON``.  ``tests/test_fast.py`` runs each
kernel test on both and reruns ``tests/test_transform.py`` on the twin.
If the compiled module is missing (an install that skipped the build), the
twin is used and a warning says so: slower, same numbers.  The twin of
``_events.pyx`` (the plain scoring-body reader) is ``_events_reference.py``.

``IMPLEMENTATION`` names the one in use: ``"compiled"`` or ``"reference"``.
The tree-prediction kernel (``_treepredict``) is imported directly by its
users; it has no twin here.
"""

from __future__ import annotations

import logging
import os

__all__ = [
    "IMPLEMENTATION",
    "MappingTable",
    "correct_margin",
    "correct_margin_into",
    "correct_posterior",
    "correct_posterior_into",
    "HAS_EMPTY_ROW",
    "HAS_INFINITY",
    "HAS_MISSING",
    "matrix_flags",
    "read_event_dicts",
    "read_score_body",
]

logger = logging.getLogger("muse.fast")

IMPLEMENTATION = "compiled"
_pure = os.environ.get("MUSE_PURE_PYTHON", "") not in ("", "0")

if not _pure:
    try:
        from muse._fast._mapping import (
            MappingTable,
            correct_margin,
            correct_margin_into,
            correct_posterior,
            correct_posterior_into,
        )
        from muse._fast._events import (
            HAS_EMPTY_ROW,
            HAS_INFINITY,
            HAS_MISSING,
            matrix_flags,
            read_event_dicts,
            read_score_body,
        )
    except ImportError as exc:
        logger.warning(
            "compiled score kernels unavailable (%s); using the numpy twin", exc
        )
        _pure = True

if _pure:
    # The twin's class is not the stub's class, though the API is the same.
    from muse._fast._reference import (  # type: ignore[assignment]
        MappingTable,
        correct_margin,
        correct_margin_into,
        correct_posterior,
        correct_posterior_into,
    )
    from muse._fast._events_reference import (
        HAS_EMPTY_ROW,
        HAS_INFINITY,
        HAS_MISSING,
        matrix_flags,
        read_event_dicts,
        read_score_body,
    )

    IMPLEMENTATION = "reference"
