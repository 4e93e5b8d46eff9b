"""Request bodies in, validated values out; responses to bytes.  No I/O.

Everything here is sans-io in the manner of h11: the HTTP layer hands over
the content type and the body bytes, and gets back plain Python values or a
``ClientError`` that names what was wrong and where.  The same functions
serve the embedded engine, which skips only the byte decoding.

Decoding untrusted msgpack is bounded by the body's own size: no container
or string can declare more elements than there are bytes left to hold them,
so a header promising 2**32-1 elements fails at once instead of allocating.
A large scoring body has its ``events`` count read from the array header
before anything is decoded, so a batch over the limit is a 413 that costs
no more than reading a few headers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from muse._errors import BadRequest, InvalidEvent, PayloadTooLarge, UnsupportedMediaType
from muse._fast import HAS_EMPTY_ROW, HAS_INFINITY, HAS_MISSING, matrix_flags

__all__ = [
    "JSON",
    "MSGPACK",
    "REFUSED",
    "ScoreRequest",
    "build_matrix",
    "check_deadline",
    "check_matrix",
    "decode_body",
    "encode_body",
    "media_type",
    "parse_score_request",
]

MSGPACK = "application/msgpack"
JSON = "application/json"

# Every spelling of msgpack seen in the wild decodes alike.
_MSGPACK_TYPES = frozenset(
    {"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"}
)

# Integers beyond 2**53 have no exact float64; a feature value that would be
# silently rounded is refused instead.
_MAX_EXACT_INT = 2**53
# Below this many bytes a body cannot hold enough events for the count to be
# worth reading ahead: decoding it whole costs microseconds.
_PRESCAN_BYTES = 64 << 10


def media_type(content_type: str | None) -> str:
    """Normalise a Content-Type header to ``MSGPACK`` or ``JSON``.

    Args:
        content_type: the raw header value, or None when absent.

    Returns:
        ``MSGPACK`` or ``JSON``.

    Raises:
        UnsupportedMediaType: absent or not a type MUSE decodes.
    """
    if not content_type:
        raise UnsupportedMediaType(
            "Content-Type is required: application/msgpack or application/json"
        )
    base = content_type.split(";", 1)[0].strip().lower()
    if base in _MSGPACK_TYPES:
        return MSGPACK
    if base == JSON:
        return JSON
    raise UnsupportedMediaType(
        f"Content-Type {base!r} is not supported; "
        "send application/msgpack or application/json"
    )


def decode_body(body: bytes, kind: str, *, max_events: int | None = None) -> Any:
    """Decode a request body of a known media type, with size-derived limits.

    Args:
        body: the complete body.
        kind: ``MSGPACK`` or ``JSON`` (from ``media_type``).
        max_events: for a scoring body, the batch limit; a large msgpack
            body declaring more events is refused before it is decoded.

    Returns:
        The decoded value (msgpack arrays come back as lists).

    Raises:
        BadRequest: the bytes are not one valid document of that type.
        PayloadTooLarge: the body declares more than ``max_events`` events.
    """
    if not body:
        raise BadRequest("request body is empty")
    if kind == JSON:
        try:
            return json.loads(body)
        except RecursionError as exc:
            raise BadRequest("body is not valid JSON: nested too deeply") from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"body is not valid JSON: {exc}") from exc
    if max_events is not None and len(body) > _PRESCAN_BYTES:
        declared = _declared_events(body)
        # More events than bytes is not a batch, it is a broken body (400).
        if declared is not None and max_events < declared <= len(body):
            raise PayloadTooLarge(
                f"{declared} events in one request; the limit is {max_events}"
            )
    return _unpack(body)


def _unpack(body: bytes) -> Any:
    size = len(body)
    try:
        return msgpack.unpackb(body, raw=False, **_limits(size))
    except msgpack.ExtraData as exc:
        if body[:1] in (b"{", b"["):
            raise BadRequest(
                "body looks like JSON but is labelled msgpack; "
                "send Content-Type: application/json"
            ) from exc
        raise BadRequest("body holds more than one msgpack document") from exc
    except UnicodeDecodeError as exc:
        where = _bad_string(body)
        raise BadRequest(
            f"body has a string that is not valid UTF-8{where}: {exc}"
        ) from exc
    except msgpack.StackError as exc:
        raise BadRequest("body is not valid msgpack: nested too deeply") from exc
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # Unhashable keys (arrays or maps used as keys) surface as TypeError.
        # msgpack's FormatError (a reserved type byte) carries no message.
        reason = str(exc) or "a byte that starts no msgpack value"
        raise BadRequest(f"body is not valid msgpack: {reason}") from exc


def _limits(size: int) -> dict[str, Any]:
    # No container or string can hold more items than there are bytes left.
    return {
        "strict_map_key": False,
        "max_str_len": size,
        "max_bin_len": size,
        "max_array_len": size,
        "max_map_len": size // 2,
        "max_ext_len": size,
    }


def _declared_events(body: bytes) -> int | None:
    """The length the ``events`` array header declares, or None.

    Only headers and the values before ``events`` are read (skipped in C);
    anything unexpected returns None and is left to the full decode.
    """
    unpacker = msgpack.Unpacker(
        raw=False, max_buffer_size=len(body), **_limits(len(body))
    )
    unpacker.feed(body)
    try:
        for _ in range(unpacker.read_map_header()):
            if unpacker.unpack() == "events":
                return int(unpacker.read_array_header())
            unpacker.skip()
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    return None


def _bad_string(body: bytes) -> str:
    """Where the first invalid UTF-8 string sits, as `` at <path>`` or ''."""
    try:
        document = msgpack.unpackb(
            body, raw=False, unicode_errors="surrogateescape", **_limits(len(body))
        )
        path = _path_to_bad_string(document)
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError):
        return ""
    return " at body" + "".join(reversed(path)) if path else ""


def _path_to_bad_string(value: Any) -> list[str] | None:
    """Path segments, innermost first, to the first string with surrogates."""
    if isinstance(value, str):
        return [] if _has_surrogates(value) else None
    items: Any = ()
    if isinstance(value, list):
        items = enumerate(value)
    elif isinstance(value, dict):
        for key in value:
            if isinstance(key, str) and _has_surrogates(key):
                return [f" key {key!r}"]
        items = value.items()
    for key, item in items:
        found = _path_to_bad_string(item)
        if found is not None:
            found.append(f"[{key!r}]")
            return found
    return None


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def encode_body(value: Any, kind: str) -> bytes:
    """Encode a response body as msgpack or JSON."""
    if kind == JSON:
        return json.dumps(value, allow_nan=False, separators=(",", ":")).encode()
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class ScoreRequest:
    """A scoring request after structural validation.

    Attributes:
        intent: what the caller wants scored (e.g. ``card-fraud``).
        events: the events, each a mapping with ``features`` and maybe ``id``.
        deadline_ms: the caller's deadline in milliseconds, or None.
    """

    intent: str
    events: Sequence[Mapping[Any, Any]]
    deadline_ms: float | None


def parse_score_request(document: Any, *, max_events: int) -> ScoreRequest:
    """Check the shape of a decoded ``/v1/score`` body.

    Args:
        document: the decoded body.
        max_events: the batch limit; more events is a 413.

    Returns:
        The request; the events themselves are checked by ``build_matrix``.

    Raises:
        BadRequest: a field is absent or of the wrong type.
        PayloadTooLarge: more events than ``max_events``.
    """
    if not isinstance(document, dict):
        raise BadRequest(f"body must be a map, got {_type_name(document)}")
    _check_field_names(document, "body")
    unknown = sorted(set(document) - _SCORE_FIELDS)
    if unknown:
        # A misspelt option (say 'deadline') would otherwise be dropped
        # without a word.
        raise BadRequest(
            f"unknown field(s) {', '.join(map(repr, unknown))}; "
            f"a score request has {', '.join(sorted(_SCORE_FIELDS))}"
        )
    intent = document.get("intent")
    if not isinstance(intent, str) or not intent:
        raise BadRequest(f"'intent' must be a non-empty string, got {intent!r}")
    events = document.get("events")
    if not isinstance(events, list):
        raise BadRequest(f"'events' must be an array, got {_type_name(events)}")
    if not events:
        raise BadRequest("'events' is empty")
    if len(events) > max_events:
        raise PayloadTooLarge(
            f"{len(events)} events in one request; the limit is {max_events}"
        )
    deadline = document.get("deadline_ms")
    if deadline is not None:
        check_deadline(deadline)
    return ScoreRequest(intent, events, deadline)


def check_deadline(deadline_ms: Any) -> None:
    """Refuse a deadline that is not a positive, finite number of ms.

    Raises:
        BadRequest: naming the value.
    """
    if type(deadline_ms) not in (int, float) or not 0 < deadline_ms < math.inf:
        raise BadRequest(
            f"'deadline_ms' must be a positive number, got {deadline_ms!r}"
        )


def event_ids(events: Sequence[Mapping[Any, Any]]) -> list[Any]:
    """Each event's id, or its index in the request when it has none.

    Call it after ``build_matrix``, which has checked the ids' types.
    """
    return [_label(e, i) for i, e in enumerate(events)]


def build_matrix(
    events: Sequence[Any],
    feature_names: Sequence[str],
    *,
    allow_missing: bool = True,
    allow_infinity: bool = False,
) -> np.ndarray:
    """Turn events into a float64 matrix, one column per feature, NaN = missing.

    An absent feature, nil and NaN are the same "missing".  Booleans,
    strings, ext values and integers with no exact float64 are refused
    rather than guessed at, and so are keys that are not strings.

    Args:
        events: decoded events, each ``{"id": ..., "features": {...}}``.
        feature_names: the columns, in the model's order.
        allow_missing: whether the models can take a missing value.
        allow_infinity: whether the models' libraries accept infinity.

    Returns:
        A C-contiguous array of shape (len(events), len(feature_names)).

    Raises:
        InvalidEvent: naming the event and the feature at fault.
    """
    names = list(feature_names)
    rows: list[list[Any]] = []
    for row, event in enumerate(events):
        features = _features_of(event, row)
        if not _STR.issuperset(map(type, features)):
            _check_keys(features, event, row)
        values = list(map(features.get, names))
        # Nearly every client sends floats (and nil for missing): those rows
        # go to numpy as they are, which reads None as NaN.  Anything else
        # is checked value by value.
        if not _FLOAT_OR_NIL.issuperset(map(type, values)):
            values = [
                _coerce(value, event, row, name)
                if type(value) is not float and value is not None
                else value
                for value, name in zip(values, names)
            ]
        rows.append(values)
    matrix = np.array(rows, dtype=np.float64).reshape(len(rows), len(names))
    check_matrix(
        matrix,
        [_label(event, row) for row, event in enumerate(events)],
        names,
        allow_missing=allow_missing,
        allow_infinity=allow_infinity,
    )
    return matrix


def check_matrix(
    matrix: np.ndarray,
    labels: Sequence[Any],
    names: Sequence[str],
    *,
    allow_missing: bool,
    allow_infinity: bool,
) -> None:
    """Refuse model input the model cannot take, naming the event and feature.

    Args:
        matrix: one row per event, NaN for missing.
        labels: each event's id, or its index where it has none.
        names: the matrix's columns.
        allow_missing: whether the models can take a missing value.
        allow_infinity: whether the models' libraries accept infinity.

    Raises:
        InvalidEvent: an infinite value the library refuses, a missing value
            the model cannot take, or an event with none of the features.
    """
    flags = matrix_flags(matrix)
    if not flags & REFUSED[allow_missing, allow_infinity]:
        return
    if not allow_infinity and flags & HAS_INFINITY:
        _refuse(np.isinf(matrix), matrix, labels, names, "is {value!r}; this "
                "model's library does not accept infinity")
    missing = np.isnan(matrix)
    if not allow_missing and flags & HAS_MISSING:
        _refuse(missing, matrix, labels, names, "is missing and the model "
                "cannot take missing values")
    empty = missing.all(axis=1)
    if empty.any():
        # Every feature missing is a client bug (wrong names, wrong model),
        # not a transaction: scoring it would only return the trees' prior.
        row = int(np.flatnonzero(empty)[0])
        raise InvalidEvent(
            f"event {labels[row]} has none of the model's "
            f"features (expected {', '.join(names[:3])}, ...)",
            event=labels[row],
        )


_STR = frozenset({str})
# The ``matrix_flags`` bits that refuse a matrix, by (allow_missing,
# allow_infinity): an empty row always does.
REFUSED = {
    (True, True): HAS_EMPTY_ROW,
    (True, False): HAS_EMPTY_ROW | HAS_INFINITY,
    (False, True): HAS_EMPTY_ROW | HAS_MISSING,
    (False, False): HAS_EMPTY_ROW | HAS_MISSING | HAS_INFINITY,
}
_SCORE_FIELDS = frozenset({"intent", "events", "deadline_ms"})
_FLOAT_OR_NIL = frozenset({float, type(None)})


def _refuse(
    bad: np.ndarray,
    matrix: np.ndarray,
    labels: Sequence[Any],
    names: Sequence[str],
    problem: str,
) -> None:
    """Raise for the first flagged cell, naming its event and feature."""
    if not bad.any():
        return
    row, col = (int(i[0]) for i in np.nonzero(bad))
    raise InvalidEvent(
        f"event {labels[row]}: feature {names[col]!r} "
        + problem.format(value=float(matrix[row, col])),
        event=labels[row],
        feature=names[col],
    )


def _check_field_names(document: dict[Any, Any], where: str) -> None:
    # A field sent under a binary or integer key would otherwise just look
    # absent, and be silently defaulted.
    for key in document:
        if type(key) is not str:
            raise BadRequest(
                f"{where} has a key {key!r:.40} of type {_type_name(key)}; "
                "field names must be strings"
            )


def _features_of(event: Any, row: int) -> dict[Any, Any]:
    if not isinstance(event, dict):
        raise InvalidEvent(
            f"event at index {row} must be a map, got {_type_name(event)}",
            event=row,
        )
    for key in event:
        if type(key) is not str:
            raise InvalidEvent(
                f"event at index {row} has a key {key!r:.40} of type "
                f"{_type_name(key)}; field names must be strings",
                event=row,
            )
    ident = event.get("id")
    if ident is not None and (type(ident) not in (str, int)):
        raise InvalidEvent(
            f"event at index {row}: 'id' must be a string or an integer, "
            f"got {_type_name(ident)}",
            event=row,
        )
    features = event.get("features")
    if not isinstance(features, dict):
        raise InvalidEvent(
            f"event {_label(event, row)}: 'features' must be a map, "
            f"got {_type_name(features)}",
            event=_label(event, row),
        )
    return features


def _check_keys(features: dict[Any, Any], event: Any, row: int) -> None:
    for key in features:
        if type(key) is not str:
            raise InvalidEvent(
                f"event {_label(event, row)}: feature key {key!r} is "
                f"{_type_name(key)}, not a string",
                event=_label(event, row),
            )


def _coerce(value: Any, event: Any, row: int, name: str) -> float:
    # bool is an int subclass: test it first so True never becomes 1.0.
    if type(value) is int:
        if -_MAX_EXACT_INT <= value <= _MAX_EXACT_INT:
            return float(value)
        problem = f"integer {value} has no exact float64 value"
    elif isinstance(value, bool):
        problem = f"boolean {value!r} is not a number"
    else:
        problem = f"{_type_name(value)} {value!r:.40} is not a number"
    raise InvalidEvent(
        f"event {_label(event, row)}: feature {name!r}: {problem}",
        event=_label(event, row),
        feature=name,
    )


def _label(event: Any, row: int) -> Any:
    if isinstance(event, dict):
        ident = event.get("id")
        if type(ident) in (str, int):
            return ident
    return row


def _type_name(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, msgpack.ExtType):
        return f"ext type {value.code}"
    if isinstance(value, msgpack.Timestamp):
        return "timestamp"
    return {
        bool: "boolean",
        int: "integer",
        float: "float",
        str: "string",
        bytes: "binary",
        list: "array",
        tuple: "array",
        dict: "map",
    }.get(type(value), type(value).__name__)
