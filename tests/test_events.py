"""The compiled event readers (and their twins) against the general path.

``read_score_body`` may decline any body (the general path then decides),
but a body it accepts must give exactly what the general path gives: the
same intent, deadline, labels, matrix, and the same refusal with the same
message.  ``read_event_dicts`` is held to ``build_matrix`` the same way,
and ``matrix_flags`` to numpy.  Every test runs on the compiled module and
its pure-Python twin.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from muse._errors import ClientError, InvalidEvent
from muse._events import DecodedEvents, PackedEvents, read_score_call
from muse._fast import _events_reference
from muse._wire import (
    MSGPACK,
    build_matrix,
    decode_body,
    event_ids,
    parse_score_request,
)

_compiled: Any
try:
    from muse._fast import _events as _compiled
except ImportError:  # not built; the compiled cases skip and say so
    _compiled = None

FEATURES = ("amount", "hour", "count")
MAX_EVENTS = 64
Reader = Callable[[bytes, int], Any]


def _implementation(request: pytest.FixtureRequest, name: str) -> Any:
    """``name`` from the compiled kernel or from its pure-Python twin, as the
    fixture's parameter says.  The compiled cases skip, saying why, where the
    extension is not built; CI builds it and checks that it loads."""
    if request.param == "reference":
        return getattr(_events_reference, name)
    if _compiled is None:
        pytest.skip("muse._fast._events is not built (pip install -e .)")
    return getattr(_compiled, name)


@pytest.fixture(params=["compiled", "reference"])
def reader(request: pytest.FixtureRequest) -> Reader:
    return _implementation(request, "read_score_body")  # type: ignore[no-any-return]


def _pack(document: Any) -> bytes:
    return msgpack.packb(document, use_bin_type=True)  # type: ignore[no-any-return]


def _outcome(events: Any, flags: tuple[bool, bool]) -> Any:
    allow_missing, allow_infinity = flags
    try:
        matrix = events.matrix(
            FEATURES, allow_missing=allow_missing, allow_infinity=allow_infinity
        )
    except ClientError as exc:
        return type(exc), str(exc)
    return matrix.tolist()


def _general(body: bytes) -> Any:
    request = parse_score_request(
        decode_body(body, MSGPACK, max_events=MAX_EVENTS), max_events=MAX_EVENTS
    )
    deadline = request.deadline_ms
    return request.intent, deadline, DecodedEvents(request.events)


def _assert_same(reader: Reader, body: bytes) -> bool:
    """Compare the reader with the general path; False when it declined."""
    plain = reader(body, MAX_EVENTS)
    if plain is None:
        return False
    intent, deadline, labels, names, values = plain
    packed = PackedEvents(labels, names, values)
    want_intent, want_deadline, decoded = _general(body)

    assert intent == want_intent
    assert deadline == (None if want_deadline is None else float(want_deadline))
    assert labels == decoded.labels()
    assert [type(label) for label in labels] == [
        type(label) for label in decoded.labels()
    ]
    for flags in [(True, False), (True, True), (False, False), (False, True)]:
        got, want = _outcome(packed, flags), _outcome(decoded, flags)
        assert _nan_safe(got) == _nan_safe(want)
    return True


def _nan_safe(outcome: Any) -> Any:
    if isinstance(outcome, list):
        return [["nan" if math.isnan(v) else v for v in row] for row in outcome]
    return outcome


# -- accepted bodies ------------------------------------------------------------


def _event(i: int, **features: Any) -> dict[str, Any]:
    return {"id": f"tx-{i}", "features": features}


PLAIN = [
    {"intent": "card-fraud", "events": [_event(1, amount=1.5, hour=2.0, count=3.0)]},
    {
        "intent": "card-fraud",
        "deadline_ms": 25,
        "events": [_event(i, amount=float(i), hour=None, count=i) for i in range(20)],
    },
    # ids of every accepted kind: string, small and extreme integers, nil, none
    {
        "events": [
            {"id": 2**64 - 1, "features": {"amount": 1.0}},
            {"id": -(2**63), "features": {"hour": 2.0}},
            {"id": None, "features": {"count": 3.0}},
            {"features": {"amount": -0.0}},
            {"id": "ünïcode", "features": {"amount": 2**53}},
        ],
        "intent": "i",
        "deadline_ms": 0.5,
    },
    # names the model does not use, in any order, appearing late
    {
        "intent": "x",
        "events": [
            _event(0, amount=1.0),
            _event(1, zzz=1.0, count=2.0, hour=3.0, yyy=None, www=7),
        ],
    },
    # infinity and NaN: refused or missing as the flags say, same message
    {"intent": "x", "events": [_event(0, amount=math.inf, hour=math.nan)]},
    {"intent": "x", "events": [_event(0, amount=1.0), _event(1, hour=-math.inf)]},
    # no feature at all: the same refusal naming the event
    {"intent": "x", "events": [_event(0, amount=1.0), {"id": 7, "features": {}}]},
    {"intent": "x", "events": [_event(0, other=1.0)]},
]


@pytest.mark.parametrize("document", PLAIN)
def test_reader_accepts_plain_bodies_and_matches_the_general_path(
    reader: Reader, document: dict[str, Any]
) -> None:
    assert _assert_same(reader, _pack(document))


def test_reader_reads_float32_values_as_the_general_path_does(reader: Reader) -> None:
    body = _pack({"intent": "x", "events": [_event(0, amount=0.1)]})
    as_float32 = body.replace(
        b"\xcb" + np.float64(0.1).byteswap().tobytes(),
        b"\xca" + np.float32(0.1).byteswap().tobytes(),
    )

    assert _assert_same(reader, as_float32)
    assert reader(as_float32, MAX_EVENTS)[4][0, 0] == float(np.float32(0.1))


def test_reader_keeps_the_last_of_duplicate_feature_names(reader: Reader) -> None:
    # msgpack-python packs a dict, so duplicates are written by hand:
    # {"intent": "x", "events": [{"features": {"amount": 1.0, "amount": 2.0}}]}
    body = (
        b"\x82\xa6intent\xa1x\xa6events\x91\x81\xa8features\x82"
        + b"\xa6amount\xcb"
        + np.float64(1.0).byteswap().tobytes()
        + b"\xa6amount\xcb"
        + np.float64(2.0).byteswap().tobytes()
    )

    assert _assert_same(reader, body)
    assert reader(body, MAX_EVENTS)[4].tolist() == [[2.0]]


def test_reader_widens_for_names_beyond_the_first_event(reader: Reader) -> None:
    # The table is sized on the first event's one feature; later events
    # bring 40 more names, so it must widen and keep the rows already read.
    names = [f"f{i}" for i in range(40)]
    events = [{"id": "first", "features": {"amount": 1.0}}]
    events += [{"id": k, "features": {n: float(k) for n in names}} for k in range(5)]
    body = _pack({"intent": "x", "events": events})
    plain = reader(body, MAX_EVENTS)

    assert plain is not None
    labels, table_names, values = plain[2], plain[3], plain[4]
    assert labels == ["first", 0, 1, 2, 3, 4]
    assert table_names == ["amount", *names]
    assert values.shape == (6, 41)
    assert values[0, 0] == 1.0 and np.isnan(values[0, 1:]).all()
    assert np.isnan(values[1:, 0]).all()
    assert values[5, 1:].tolist() == [4.0] * 40


# -- declined bodies --------------------------------------------------------------


DECLINED = {
    "not a map": [1, 2],
    "unknown top-level field": {"intent": "x", "events": [_event(0)], "tenant": "b"},
    "no intent": {"events": [_event(0, amount=1.0)]},
    "empty intent": {"intent": "", "events": [_event(0, amount=1.0)]},
    "intent not a string": {"intent": 3, "events": [_event(0, amount=1.0)]},
    "no events": {"intent": "x"},
    "empty events": {"intent": "x", "events": []},
    "too many events": {"intent": "x", "events": [_event(0, a=1.0)] * 65},
    "event not a map": {"intent": "x", "events": [[1.0]]},
    "event without features": {"intent": "x", "events": [{"id": 1}]},
    "features not a map": {"intent": "x", "events": [{"features": [1.0]}]},
    "unknown event field": {"intent": "x", "events": [{"features": {}, "t": 1}]},
    "boolean value": {"intent": "x", "events": [_event(0, amount=True)]},
    "string value": {"intent": "x", "events": [_event(0, amount="1.0")]},
    "binary value": {"intent": "x", "events": [_event(0, amount=b"1")]},
    "nested value": {"intent": "x", "events": [_event(0, amount=[1.0])]},
    "inexact integer": {"intent": "x", "events": [_event(0, amount=2**53 + 1)]},
    "huge unsigned": {"intent": "x", "events": [_event(0, amount=2**64 - 1)]},
    "float id": {"intent": "x", "events": [{"id": 1.5, "features": {"a": 1.0}}]},
    "binary id": {"intent": "x", "events": [{"id": b"1", "features": {"a": 1.0}}]},
    "integer feature key": {"intent": "x", "events": [{"features": {1: 1.0}}]},
    "binary feature key": {"intent": "x", "events": [{"features": {b"a": 1.0}}]},
    "zero deadline": {"intent": "x", "events": [_event(0, a=1.0)], "deadline_ms": 0},
    "string deadline": {"intent": "x", "events": [_event(0)], "deadline_ms": "5"},
    "infinite deadline": {
        "intent": "x",
        "events": [_event(0, a=1.0)],
        "deadline_ms": math.inf,
    },
    "ext value": {
        "intent": "x",
        "events": [_event(0, amount=msgpack.ExtType(1, b"x"))],
    },
    "too many names": {
        "intent": "x",
        "events": [{"features": {f"n{i}": 1.0 for i in range(257)}}],
    },
}


@pytest.mark.parametrize("document", DECLINED.values(), ids=DECLINED.keys())
def test_reader_declines_what_it_does_not_read(
    reader: Reader, document: Any
) -> None:
    assert reader(_pack(document), MAX_EVENTS) is None


@pytest.mark.parametrize(
    "body",
    [
        # invalid UTF-8 in the intent, an id and a feature name
        b"\x82\xa6intent\xa2\xff\xfe\xa6events\x91\x81\xa8features\x81\xa1a\x01",
        b"\x82\xa6intent\xa1x\xa6events\x91\x82\xa2id\xa1\xff\xa8features\x80",
        b"\x82\xa6intent\xa1x\xa6events\x91\x81\xa8features\x81\xa1\xff\x01",
        # a duplicate top-level field, and a duplicate id
        b"\x83\xa6intent\xa1x\xa6intent\xa1y\xa6events\x91\x81\xa8features\x80",
        b"\x82\xa6intent\xa1x\xa6events\x91\x83\xa2id\x01\xa2id\x02\xa8features\x80",
    ],
    ids=["intent utf-8", "id utf-8", "name utf-8", "duplicate intent", "double id"],
)
def test_reader_declines_bad_strings_and_duplicate_fields(
    reader: Reader, body: bytes
) -> None:
    assert reader(body, MAX_EVENTS) is None


def test_reader_declines_every_truncation_and_trailing_bytes(reader: Reader) -> None:
    body = _pack(PLAIN[2])

    for end in range(len(body)):
        assert reader(body[:end], MAX_EVENTS) is None
    assert reader(body + b"\xc0", MAX_EVENTS) is None
    with pytest.raises(ClientError, match="more than one msgpack document"):
        read_score_call(body + b"\xc0", MSGPACK, max_events=MAX_EVENTS)


def test_read_score_call_uses_the_reader_and_falls_back() -> None:
    plain = read_score_call(_pack(PLAIN[0]), MSGPACK, max_events=MAX_EVENTS)
    unusual = read_score_call(
        _pack({"intent": "x", "events": [{"features": {"amount": 1.0}, "t": 1}]}),
        MSGPACK,
        max_events=MAX_EVENTS,
    )

    assert isinstance(plain.events, PackedEvents)
    assert isinstance(unusual.events, DecodedEvents)
    assert unusual.events.matrix(FEATURES)[0, 0] == 1.0


def test_packed_events_name_the_event_and_feature() -> None:
    events = PackedEvents(["tx-1", 1], ["hour", "amount"], np.array(
        [[1.0, 2.0], [3.0, math.inf]]
    ))

    with pytest.raises(InvalidEvent, match=r"event 1: feature 'amount' is inf"):
        events.matrix(FEATURES)


# -- any score-shaped document ------------------------------------------------------

_values = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.floats(width=32)
    | st.text(max_size=3)
    | st.binary(max_size=3)
)
_numbers = (
    st.none()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.floats(width=32)
    | st.integers(min_value=-(2**54), max_value=2**54)
)
_names = st.sampled_from([*FEATURES, "other", "ünï"]) | st.text(max_size=3)


def _documents_of(
    values: st.SearchStrategy[Any],
    intents: st.SearchStrategy[Any],
    ids: st.SearchStrategy[Any],
    deadlines: st.SearchStrategy[Any],
) -> st.SearchStrategy[Any]:
    return st.fixed_dictionaries(
        {
            "intent": intents,
            "events": st.lists(
                st.fixed_dictionaries(
                    {"features": st.dictionaries(_names, values, max_size=5)},
                    optional={"id": ids},
                ),
                min_size=1,
                max_size=MAX_EVENTS + 1,
            ),
        },
        optional={"deadline_ms": deadlines},
    )


# Mostly plain documents (which the reader must accept or decline
# correctly), and some with any value anywhere.
_documents = _documents_of(
    _numbers | st.text(max_size=2),
    st.just("card-fraud"),
    st.none() | st.text(max_size=3) | st.integers(-(2**63), 2**64 - 1),
    st.floats(min_value=0.001, max_value=1e6) | st.integers(1, 2**60),
) | _documents_of(_values, st.just("") | _values, _values, _values)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        # ``reader`` only picks a function; nothing in it is reset per test.
        HealthCheck.function_scoped_fixture,
    ],
)
@given(document=_documents)
def test_reader_agrees_with_the_general_path_on_any_document(
    reader: Reader, document: dict[str, Any]
) -> None:
    body = _pack(document)
    try:
        _general(body)
    except ClientError:
        # Whatever the general path refuses, the reader must decline.
        assert reader(body, MAX_EVENTS) is None
        return
    _assert_same(reader, body)


# -- matrix flags -------------------------------------------------------------------


@pytest.fixture(params=["compiled", "reference"])
def flags_of(request: pytest.FixtureRequest) -> Callable[[np.ndarray], int]:
    return _implementation(request, "matrix_flags")  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("rows", "want"),
    [
        ([[1.0, 2.0], [3.0, 4.0]], 0),
        ([[1.0, math.inf]], _events_reference.HAS_INFINITY),
        ([[-math.inf, math.nan]], 1 | 2),
        ([[1.0, math.nan], [2.0, 3.0]], _events_reference.HAS_MISSING),
        ([[1.0, 2.0], [math.nan, math.nan]], 2 | 4),
        ([[math.nan]], 2 | 4),
        ([[1e308, -1e308, 5e-324, -0.0]], 0),
    ],
)
def test_matrix_flags_name_what_a_model_may_refuse(
    flags_of: Callable[[np.ndarray], int], rows: list[list[float]], want: int
) -> None:
    assert flags_of(np.array(rows)) == want


def test_matrix_flags_refuse_other_layouts(
    flags_of: Callable[[np.ndarray], int],
) -> None:
    for bad in [np.zeros((2, 2), np.float32), np.zeros(3), np.zeros((3, 2)).T]:
        with pytest.raises(ValueError, match="C-contiguous float64 2-D"):
            flags_of(bad)


# -- events already decoded -----------------------------------------------------------


@pytest.fixture(params=["compiled", "reference"])
def dict_reader(request: pytest.FixtureRequest) -> Callable[..., Any]:
    return _implementation(request, "read_event_dicts")  # type: ignore[no-any-return]


def _decoded_events(document: dict[str, Any]) -> Any:
    # The events as an embedding application would pass them.
    return msgpack.unpackb(_pack(document), raw=False, strict_map_key=False)["events"]


def _build_outcome(events: Any, flags: tuple[bool, bool]) -> Any:
    try:
        return build_matrix(
            events, FEATURES, allow_missing=flags[0], allow_infinity=flags[1]
        ).tolist()
    except ClientError as exc:
        return type(exc), str(exc)


def _assert_dicts_match(reader: Callable[..., Any], events: Any) -> bool:
    """Compare ``read_event_dicts`` with ``build_matrix``; False if declined."""
    plain = reader(events, FEATURES)
    if plain is None:
        return False
    labels, matrix, flags = plain
    assert flags == _events_reference.matrix_flags(matrix)
    assert labels == event_ids(events)
    assert [type(label) for label in labels] == [type(i) for i in event_ids(events)]
    for row, event in zip(matrix, events, strict=True):
        for value, name in zip(row, FEATURES, strict=True):
            given = event["features"].get(name)
            assert (math.isnan(value) and (given is None or given != given)) or (
                value == given
            )
    for flags in [(True, True), (True, False), (False, True), (False, False)]:
        got = _outcome(DecodedEvents(events), flags)
        assert _nan_safe(got) == _nan_safe(_build_outcome(events, flags))
    return True


@pytest.mark.parametrize("document", PLAIN)
def test_dict_reader_accepts_plain_events_and_matches_build_matrix(
    dict_reader: Callable[..., Any], document: dict[str, Any]
) -> None:
    assert _assert_dicts_match(dict_reader, _decoded_events(document))


@pytest.mark.parametrize(
    "events",
    [
        "not a list",
        [[1.0]],
        [{"features": [1.0]}],
        [{"id": 1.5, "features": {"amount": 1.0}}],
        [{1: 0, "features": {"amount": 1.0}}],
        [{"features": {"amount": 1.0, 2: 3.0}}],
        [{"features": {"amount": True}}],
        [{"features": {"amount": "1"}}],
        [{"features": {"amount": 2**53 + 1}}],
        [{"features": {"amount": 2**70}}],
        [{"features": {"amount": np.float64(1.0)}}],
    ],
)
def test_dict_reader_declines_what_build_matrix_must_judge(
    dict_reader: Callable[..., Any], events: Any
) -> None:
    assert dict_reader(events, FEATURES) is None


def test_dict_reader_ignores_values_under_unused_names(
    dict_reader: Callable[..., Any],
) -> None:
    events = [{"id": "a", "features": {"amount": 1, "note": "text", "x": [1]}}]

    assert _assert_dicts_match(dict_reader, events)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(document=_documents)
def test_dict_reader_agrees_with_build_matrix_on_any_events(
    dict_reader: Callable[..., Any], document: dict[str, Any]
) -> None:
    events = _decoded_events(document)
    if not _assert_dicts_match(dict_reader, events):
        # Declined: the general path alone decides, as before.
        for flags in [(True, False), (False, False)]:
            got = _outcome(DecodedEvents(events), flags)
            assert _nan_safe(got) == _nan_safe(_build_outcome(events, flags))
