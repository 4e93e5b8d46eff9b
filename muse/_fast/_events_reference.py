"""Pure-Python twin of ``_events.pyx``: the plain scoring body, or None.

Same contract as the compiled ``read_score_body``: the body is read only
when it has the plain shape (see that module), and None sends the caller to
the general decoder.  It decodes with msgpack into key-value pairs, so a
duplicate key is seen rather than silently kept last, then applies the same
rules value by value.  Arrays come back as tuples and maps as lists of
pairs, so an empty map and an empty array stay apart.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

__all__ = [
    "HAS_EMPTY_ROW",
    "HAS_INFINITY",
    "HAS_MISSING",
    "matrix_flags",
    "read_event_dicts",
    "read_score_body",
]

_MAX_NAMES = 256
_MAX_EXACT_INT = 2**53
_TOP = frozenset({"intent", "events", "deadline_ms"})
_EVENT = frozenset({"id", "features"})

PlainBody = tuple[str, float | None, list[Any], list[str], np.ndarray]


def read_score_body(body: bytes, max_events: int) -> PlainBody | None:
    """Read a plain msgpack scoring body, or return None (see ``_events.pyx``)."""
    try:
        document = msgpack.unpackb(
            body,
            raw=False,
            use_list=False,
            object_pairs_hook=list,
            strict_map_key=False,
        )
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    fields = _pairs(document, _TOP)
    if fields is None or "intent" not in fields or "events" not in fields:
        return None
    intent, deadline = fields["intent"], fields.get("deadline_ms")
    if type(intent) is not str or not intent:
        return None
    if deadline is not None:
        if type(deadline) not in (int, float) or not 0 < deadline < math.inf:
            return None
        if type(deadline) is int and abs(deadline) > _MAX_EXACT_INT:
            return None
        deadline = float(deadline)
    events = fields["events"]
    if type(events) is not tuple or not 0 < len(events) <= max_events:
        return None
    return _read_events(intent, deadline, events)


def _read_events(
    intent: str, deadline: float | None, events: tuple[Any, ...]
) -> PlainBody | None:
    names: dict[str, int] = {}
    rows: list[dict[int, float]] = []
    labels: list[Any] = []
    for row, event in enumerate(events):
        fields = _pairs(event, _EVENT)
        if fields is None or "features" not in fields:
            return None
        label = fields.get("id")
        if label is None:
            label = row
        elif type(label) not in (str, int):
            return None
        features = fields["features"]
        if type(features) is not list:  # pairs: it was a map
            return None
        values: dict[int, float] = {}
        for name, value in features:
            if type(name) is not str:
                return None
            if value is None:
                number = math.nan
            elif type(value) is float:
                number = value
            elif type(value) is int and abs(value) <= _MAX_EXACT_INT:
                number = float(value)
            else:
                return None
            if name not in names:
                if len(names) == _MAX_NAMES:
                    return None
                names[name] = len(names)
            values[names[name]] = number
        rows.append(values)
        labels.append(label)
    table = np.full((len(rows), len(names)), np.nan)
    for row, values in enumerate(rows):
        for col, number in values.items():
            table[row, col] = number
    return intent, deadline, labels, list(names), table


def _pairs(value: Any, allowed: frozenset[str]) -> dict[str, Any] | None:
    """A map's fields when every key is an allowed string, once; else None."""
    if type(value) is not list or any(type(p) is not tuple for p in value):
        return None
    fields: dict[str, Any] = {}
    for key, item in value:
        if type(key) is not str or key not in allowed or key in fields:
            return None
        fields[key] = item
    return fields


HAS_INFINITY = 1
HAS_MISSING = 2
HAS_EMPTY_ROW = 4


def matrix_flags(matrix: np.ndarray) -> int:
    """What a float64 matrix holds that a model may refuse (see ``_events.pyx``)."""
    if (
        matrix.dtype != np.float64
        or matrix.ndim != 2
        or not matrix.flags.c_contiguous
    ):
        raise ValueError("expected a C-contiguous float64 2-D array")
    missing = np.isnan(matrix)
    flags = HAS_INFINITY if np.isinf(matrix).any() else 0
    if missing.any():
        flags |= HAS_MISSING
    if missing.all(axis=1).any():
        flags |= HAS_EMPTY_ROW
    return flags


def read_event_dicts(
    events: Any, names: tuple[str, ...]
) -> tuple[list[Any], np.ndarray, int] | None:
    """Model input and its flags from plain event dicts, or None (see
    ``_events.pyx``)."""
    if type(events) not in (list, tuple):
        return None
    labels: list[Any] = []
    rows: list[list[float]] = []
    for row, event in enumerate(events):
        if type(event) is not dict or any(type(k) is not str for k in event):
            return None
        label = event.get("id")
        if label is None:
            label = row
        elif type(label) not in (str, int):
            return None
        features = event.get("features")
        if type(features) is not dict or any(type(k) is not str for k in features):
            return None
        values = []
        for name in names:
            value = features.get(name)
            if value is None:
                values.append(math.nan)
            elif type(value) is float:
                values.append(value)
            elif type(value) is int and abs(value) <= _MAX_EXACT_INT:
                values.append(float(value))
            else:
                return None
        labels.append(label)
        rows.append(values)
    matrix = np.array(rows, dtype=np.float64).reshape(len(rows), len(names))
    return labels, matrix, matrix_flags(matrix)
