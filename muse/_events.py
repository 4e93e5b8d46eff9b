"""One request's events, on their way to becoming model input.  No I/O.

A scoring request reaches the engine in one of two forms:

- ``DecodedEvents``: events as Python mappings, from an embedding
  application, a JSON body, or a msgpack body of unusual shape (plain dicts
  are read by the compiled ``read_event_dicts``);
- ``PackedEvents``: a table read straight from a plain msgpack body by the
  compiled reader in ``muse/_fast/_events.pyx`` (nearly every request).

Both give the engine the same three things: how many events, each event's
label (its id, or its index where it has none) and, for a predictor's
feature list, a float64 matrix with NaN for missing.  Both refuse the same
events with the same messages: the checks on values already in a matrix
(infinity, missing, no features at all) are one function, ``check_matrix``,
and a packed body is only accepted where the general decoder would have
given the same values (see ``_events.pyx``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from muse._fast import read_event_dicts, read_score_body
from muse._wire import (
    MSGPACK,
    REFUSED,
    build_matrix,
    check_matrix,
    decode_body,
    event_ids,
    parse_score_request,
)

__all__ = [
    "DecodedEvents",
    "EventBatch",
    "PackedEvents",
    "ScoreCall",
    "read_score_call",
]


class EventBatch(Protocol):
    """The events of one request."""

    def __len__(self) -> int: ...

    def labels(self) -> list[Any]:
        """Each event's id, or its index in the request where it has none."""
        ...

    def matrix(
        self,
        feature_names: Sequence[str],
        *,
        allow_missing: bool = True,
        allow_infinity: bool = False,
    ) -> np.ndarray:
        """Model input: one row per event, one column per feature, NaN = missing.

        Raises:
            InvalidEvent: naming the event and feature at fault.
        """
        ...


class DecodedEvents:
    """Events as mappings: ``{"id": ..., "features": {name: value}}`` each.

    Plain events (dicts of floats, nil and exact integers) are read by the
    compiled ``read_event_dicts``; anything else goes through
    ``build_matrix``, which coerces or refuses it value by value.
    """

    __slots__ = ("_events", "_labels")

    def __init__(self, events: Sequence[Mapping[str, Any]]) -> None:
        self._events = events
        self._labels: list[Any] | None = None

    def __len__(self) -> int:
        return len(self._events)

    def labels(self) -> list[Any]:
        if self._labels is None:
            self._labels = event_ids(self._events)
        return self._labels

    def matrix(
        self,
        feature_names: Sequence[str],
        *,
        allow_missing: bool = True,
        allow_infinity: bool = False,
    ) -> np.ndarray:
        names = tuple(feature_names)
        plain = read_event_dicts(self._events, names)
        if plain is None:
            return build_matrix(
                self._events,
                names,
                allow_missing=allow_missing,
                allow_infinity=allow_infinity,
            )
        self._labels, matrix, flags = plain
        if flags & REFUSED[allow_missing, allow_infinity]:
            # Refused: find the culprit and name it.
            check_matrix(
                matrix,
                self._labels,
                names,
                allow_missing=allow_missing,
                allow_infinity=allow_infinity,
            )
        return matrix


class PackedEvents:
    """Events as a table: ``values[i, j]`` is feature ``names[j]`` of event i.

    Args:
        labels: each event's id, or its index where it has none.
        names: the feature names the events carry, in table order.
        values: float64, shape (events, names), NaN where absent or nil.
    """

    __slots__ = ("_cache", "_labels", "_names", "_values")

    def __init__(
        self, labels: list[Any], names: list[str], values: np.ndarray
    ) -> None:
        self._labels = labels
        self._names = tuple(names)
        self._values = values
        # A live predictor and its shadows usually share one feature list.
        self._cache: tuple[tuple[str, ...], np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self._labels)

    def labels(self) -> list[Any]:
        return self._labels

    def matrix(
        self,
        feature_names: Sequence[str],
        *,
        allow_missing: bool = True,
        allow_infinity: bool = False,
    ) -> np.ndarray:
        names = tuple(feature_names)
        if self._cache is not None and self._cache[0] == names:
            selected = self._cache[1]
        else:
            selected = self._select(names)
            self._cache = (names, selected)
        check_matrix(
            selected,
            self._labels,
            names,
            allow_missing=allow_missing,
            allow_infinity=allow_infinity,
        )
        return selected

    def _select(self, names: tuple[str, ...]) -> np.ndarray:
        if names == self._names:
            # The client sent the model's features in the model's order.
            return self._values
        columns = {name: col for col, name in enumerate(self._names)}
        out = np.full((len(self._labels), len(names)), np.nan)
        for col, name in enumerate(names):
            source = columns.get(name)
            if source is not None:
                out[:, col] = self._values[:, source]
        return out


@dataclass(frozen=True, slots=True)
class ScoreCall:
    """A ``/v1/score`` body, read and checked for shape.

    Attributes:
        intent: what to score.
        events: the events.
        deadline_ms: the caller's deadline, or None for the default.
    """

    intent: str
    events: EventBatch
    deadline_ms: float | None


def read_score_call(body: bytes, kind: str, *, max_events: int) -> ScoreCall:
    """Decode a scoring body: the compiled reader first, the general path else.

    Raises:
        BadRequest, PayloadTooLarge, UnsupportedMediaType: as ``decode_body``
            and ``parse_score_request`` do.
    """
    if kind == MSGPACK:
        plain = read_score_body(body, max_events)
        if plain is not None:
            intent, deadline, labels, names, values = plain
            return ScoreCall(intent, PackedEvents(labels, names, values), deadline)
    request = parse_score_request(
        decode_body(body, kind, max_events=max_events), max_events=max_events
    )
    return ScoreCall(
        request.intent, DecodedEvents(request.events), request.deadline_ms
    )

