"""The sans-io request layer: media types, bounded decoding, event checks."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest

from muse._errors import BadRequest, InvalidEvent, PayloadTooLarge, UnsupportedMediaType
from muse._wire import (
    JSON,
    MSGPACK,
    build_matrix,
    decode_body,
    encode_body,
    event_ids,
    media_type,
    parse_score_request,
)

FEATURES = ("a", "b", "c")


@pytest.mark.parametrize(
    "header",
    [
        "application/msgpack",
        "application/x-msgpack",
        "application/vnd.msgpack",
        "Application/MSGPACK",
        "application/msgpack; charset=utf-8",
        " application/x-msgpack ;charset=binary",
    ],
)
def test_media_type_accepts_every_msgpack_spelling(header: str) -> None:
    assert media_type(header) == MSGPACK


def test_media_type_json_and_refusals() -> None:
    assert media_type("application/json; charset=UTF-8") == JSON
    with pytest.raises(UnsupportedMediaType, match="text/plain"):
        media_type("text/plain")
    with pytest.raises(UnsupportedMediaType, match="required"):
        media_type(None)


def test_decode_body_round_trips_msgpack_and_json() -> None:
    value = {"intent": "x", "events": [{"id": 1, "features": {"a": 1.5}}]}
    assert decode_body(encode_body(value, MSGPACK), MSGPACK) == value
    assert decode_body(encode_body(value, JSON), JSON) == value


def test_decode_body_refuses_huge_declared_array_fast() -> None:
    # An array header declaring 2**32-1 elements followed by three bytes.
    body = b"\xdd\xff\xff\xff\xff" + b"\x01\x02\x03"
    with pytest.raises(BadRequest, match="not valid msgpack"):
        decode_body(body, MSGPACK)


def test_decode_body_refuses_billion_event_map_value() -> None:
    body = b"\x82\xa6intent\xa1x\xa6events\xdd\x3b\x9a\xca\x00" + b"\xc0" * 8
    with pytest.raises(BadRequest, match="not valid msgpack"):
        decode_body(body, MSGPACK)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"", "empty"),
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb(1) + msgpack.packb(2), "more than one"),
        (b"\xa2\xff\xfe", "UTF-8"),
        (b'{"intent": "x"}', "looks like JSON"),
    ],
)
def test_decode_body_errors(body: bytes, match: str) -> None:
    with pytest.raises(BadRequest, match=match):
        decode_body(body, MSGPACK)


def test_decode_body_array_key_is_a_bad_request() -> None:
    body = b"\x81\x91\x01\x02"  # {[1]: 2}
    with pytest.raises(BadRequest, match="not valid msgpack"):
        decode_body(body, MSGPACK)


def test_parse_score_request_shape() -> None:
    request = parse_score_request(
        {"intent": "card-fraud", "events": [{"features": {}}], "deadline_ms": 50},
        max_events=10,
    )
    assert request.intent == "card-fraud"
    assert request.deadline_ms == 50


@pytest.mark.parametrize(
    ("document", "error", "match"),
    [
        ([], BadRequest, "must be a map"),
        ({"events": [{}]}, BadRequest, "'intent'"),
        ({"intent": "x", "events": {}}, BadRequest, "'events' must be an array"),
        ({"intent": "x", "events": []}, BadRequest, "empty"),
        ({"intent": "x", "events": [{}] * 11}, PayloadTooLarge, "limit is 10"),
        ({"intent": "x", "events": [{}], "deadline_ms": -1}, BadRequest, "deadline"),
        ({"intent": "x", "events": [{}], "deadline_ms": True}, BadRequest, "deadline"),
    ],
)
def test_parse_score_request_errors(document: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        parse_score_request(document, max_events=10)


def test_build_matrix_orders_columns_and_marks_missing() -> None:
    events = [
        {"id": "e1", "features": {"c": 3.0, "a": 1, "b": None}},
        {"id": "e2", "features": {"a": math.nan, "b": 0.0}},
    ]
    matrix = build_matrix(events, FEATURES)
    assert matrix.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(matrix[0], [1.0, np.nan, 3.0])
    np.testing.assert_array_equal(matrix[1], [np.nan, 0.0, np.nan])
    assert event_ids(events) == ["e1", "e2"]


def test_build_matrix_ignores_unknown_string_keys() -> None:
    matrix = build_matrix([{"features": {"a": 1.0, "zzz": "text"}}], FEATURES)
    np.testing.assert_array_equal(matrix[0], [1.0, np.nan, np.nan])


@pytest.mark.parametrize(
    ("features", "match"),
    [
        ({"a": True}, "feature 'a': boolean"),
        ({"a": "1.0"}, "feature 'a': string"),
        ({"a": b"\x00"}, "feature 'a': binary"),
        ({"a": [1.0]}, "feature 'a': array"),
        ({"a": msgpack.ExtType(5, b"x")}, "feature 'a': ext type 5"),
        ({"a": msgpack.Timestamp(1, 0)}, "feature 'a': timestamp"),
        ({"a": 2**64 - 1}, "no exact float64"),
        ({"a": -(2**63)}, "no exact float64"),
        ({"a": math.inf}, "infinity"),
        ({1: 1.0}, "key 1 is integer"),
        ({b"a": 1.0}, "key b'a' is binary"),
        ({(1, 2): 1.0}, "key \\(1, 2\\) is array"),
    ],
)
def test_build_matrix_names_the_event_and_feature(features: dict, match: str) -> None:
    with pytest.raises(InvalidEvent, match=match) as caught:
        build_matrix([{"id": "tx-9", "features": features}], FEATURES)
    assert caught.value.event == "tx-9"
    assert "tx-9" in caught.value.detail


def test_build_matrix_infinity_allowed_when_the_library_takes_it() -> None:
    matrix = build_matrix(
        [{"features": {"a": -math.inf}}], FEATURES, allow_infinity=True
    )
    assert matrix[0, 0] == -math.inf


def test_build_matrix_missing_refused_for_models_without_missing_support() -> None:
    with pytest.raises(InvalidEvent, match="feature 'b' is missing"):
        build_matrix(
            [{"features": {"a": 1.0, "c": 2.0}}], FEATURES, allow_missing=False
        )


@pytest.mark.parametrize(
    ("event", "match"),
    [
        (5, "event at index 0 must be a map"),
        ({"features": [1, 2]}, "'features' must be a map"),
        ({"id": 1.5, "features": {}}, "'id' must be a string or an integer"),
        ({"id": True, "features": {}}, "'id' must be a string or an integer"),
    ],
)
def test_build_matrix_event_shape_errors(event: object, match: str) -> None:
    with pytest.raises(InvalidEvent, match=match):
        build_matrix([event], FEATURES)


def test_event_ids_default_to_the_index() -> None:
    assert event_ids([{"features": {}}, {"id": 7, "features": {}}]) == [0, 7]


def test_an_event_with_none_of_the_features_is_refused() -> None:
    with pytest.raises(InvalidEvent, match="tx-5 has none of the model's features"):
        build_matrix([{"id": "tx-5", "features": {"amount": 1.0}}], FEATURES)


def test_unknown_score_request_fields_are_refused() -> None:
    document = {"intent": "x", "events": [{"features": {"a": 1.0}}], "deadline": 5}
    with pytest.raises(BadRequest, match="unknown field.*'deadline'"):
        parse_score_request(document, max_events=10)
