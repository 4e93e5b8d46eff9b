"""Bad input, bad framing, slow clients and overload, over real sockets.

Every test runs the real server on a loopback port (in this process, or as
``python -m muse serve`` where memory or signals matter) and speaks raw
HTTP/1.1 where framing matters, so nothing between the test and hypercorn
repairs what the test sends.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import statistics
import struct
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import trio
from _servers import (
    plain_events,
    HEAVY_FEATURES,
    HEAVY_INTENT,
    INTENT,
    ConnectionClosed,
    LoadGenerator,
    RawConnection,
    Reply,
    Served,
    ServerProcess,
    chunked,
    copy_registry,
    open_fds,
    record_figure,
    request,
    score_request,
    serving,
)

from muse._http import HttpLimits
from muse._quota import QuotaPolicy
from muse._server import ServerOptions
from muse._synthetic import FEATURES

# Bad inputs tried, by kind, across this module (reported as a figure).
TRIED: Counter[str] = Counter()


@pytest.fixture
def registry(template: Path, tmp_path: Path) -> Path:
    copy_registry(template, tmp_path / "reg")
    return tmp_path / "reg"


@pytest.fixture(scope="module", autouse=True)
def report_inputs_tried() -> Any:
    yield
    if TRIED:
        record_figure("bad_inputs_tried", dict(TRIED))


def _keys(registry: Path) -> dict[str, str]:
    return json.loads((registry / "deployment.json").read_text())["keys"]


async def _open(served: Served) -> RawConnection:
    return await RawConnection.open(served.host, served.port)


async def _good_on(connection: RawConnection, key: str, events: list[dict]) -> Reply:
    return await connection.exchange(score_request(key, plain_events(events, 2)))


async def _recovers(served: Served, key: str, events: list[dict]) -> None:
    """A valid request on a new connection succeeds."""
    fresh = await _open(served)
    reply = await _good_on(fresh, key, events)
    assert reply.status == 200, reply.document()
    await fresh.aclose()


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def _closes(reply: Reply) -> bool:
    return reply.headers.get("connection", "").lower() == "close"


# -- decoding and validation --------------------------------------------------


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _body(events: list[Any], **extra: Any) -> dict[str, Any]:
    return {"intent": INTENT, "events": events, **extra}


def _bad_bodies(features: dict[str, float]) -> list[tuple[str, bytes, int, str]]:
    """(kind, msgpack body, status, text the detail must contain)."""

    def event(**changes: Any) -> dict[str, Any]:
        return {"id": "tx-9", "features": {**features, **changes}}

    prefix = b"\x82" + _pack("intent") + _pack(INTENT) + _pack("events")
    billion = prefix + b"\xdd" + (10**9).to_bytes(4, "big") + b"\x80"
    bad_utf8_key = (
        prefix
        + b"\x91\x81"
        + _pack("features")
        + b"\x81\xa2\xff\xfe\xcb"
        + struct.pack(">d", 1.0)
    )
    return [
        (
            "array_header_2^32-1",
            b"\xdd\xff\xff\xff\xff\x01\x02\x03",
            400,
            "max_array_len",
        ),
        ("map_header_2^32-1", b"\xdf\xff\xff\xff\xff\xa1a\x01", 400, "max_map_len"),
        ("str_header_2^32-1", b"\xdb\xff\xff\xff\xffab", 400, "not valid msgpack"),
        ("events_declaring_a_billion", billion, 400, "not valid msgpack"),
        ("truncated", _pack(_body([event()]))[:-5], 400, "not valid msgpack"),
        ("trailing_bytes", _pack(_body([event()])) + b"\x00", 400, "more than one"),
        ("json_labelled_msgpack", json.dumps(_body([event()])).encode(), 400, "JSON"),
        ("nested_too_deep", b"\x91" * 100_000, 400, "nested too deeply"),
        ("not_a_map", _pack([1, 2, 3]), 400, "must be a map"),
        ("empty_body", b"", 400, "empty"),
        ("reserved_byte", b"\xc1", 400, "not valid msgpack"),
        ("invalid_utf8_key", bad_utf8_key, 400, "key '\\udcff\\udcfe'"),
        (
            "invalid_utf8_value",
            b"\x82\xa6intent\xa2\xff\xfe\xa6events\x90",
            400,
            "body['intent']",
        ),
        (
            "binary_top_key",
            _pack({b"intent": INTENT, "events": [event()]}),
            400,
            "b'intent'",
        ),
        ("int_top_key", _pack({**_body([event()]), 7: "x"}), 400, "key 7"),
        ("int_event_key", _pack(_body([{**event(), 3: 1}])), 400, "key 3"),
        (
            "binary_event_key",
            _pack(_body([{b"features": features}])),
            400,
            "b'features'",
        ),
        (
            "int_feature_key",
            _pack(_body([{"features": {**features, 5: 1.0}}])),
            400,
            "key 5",
        ),
        ("boolean_value", _pack(_body([event(TX_AMOUNT=True)])), 400, "TX_AMOUNT"),
        ("string_value", _pack(_body([event(TX_AMOUNT="57.1")])), 400, "TX_AMOUNT"),
        ("binary_value", _pack(_body([event(TX_AMOUNT=b"\x01")])), 400, "TX_AMOUNT"),
        (
            "ext_value",
            _pack(_body([event(TX_AMOUNT=msgpack.ExtType(5, b"xy"))])),
            400,
            "ext type 5",
        ),
        (
            "timestamp_value",
            _pack(_body([event(TX_AMOUNT=msgpack.Timestamp(1, 0))])),
            400,
            "timestamp",
        ),
        ("array_value", _pack(_body([event(TX_AMOUNT=[1.0])])), 400, "TX_AMOUNT"),
        ("map_value", _pack(_body([event(TX_AMOUNT={"a": 1})])), 400, "TX_AMOUNT"),
        (
            "uint64_max",
            _pack(_body([event(TX_AMOUNT=2**64 - 1)])),
            400,
            "18446744073709551615",
        ),
        (
            "int64_min",
            _pack(_body([event(TX_AMOUNT=-(2**63))])),
            400,
            "-9223372036854775808",
        ),
        (
            "int_2^53+1",
            _pack(_body([event(TX_AMOUNT=2**53 + 1)])),
            400,
            "no exact float64",
        ),
        (
            "id_of_wrong_type",
            _pack(_body([{"id": [1], "features": features}])),
            400,
            "'id'",
        ),
        (
            "features_not_a_map",
            _pack(_body([{"id": "a", "features": [1.0]}])),
            400,
            "'features'",
        ),
        ("event_not_a_map", _pack(_body([7])), 400, "must be a map"),
        (
            "events_not_an_array",
            _pack({"intent": INTENT, "events": {}}),
            400,
            "'events'",
        ),
        ("events_empty", _pack(_body([])), 400, "empty"),
        ("intent_missing", _pack({"events": [event()]}), 400, "'intent'"),
        (
            "intent_not_a_string",
            _pack({"intent": 5, "events": [event()]}),
            400,
            "'intent'",
        ),
        (
            "deadline_nan",
            _pack(_body([event()], deadline_ms=math.nan)),
            400,
            "deadline_ms",
        ),
        (
            "deadline_negative",
            _pack(_body([event()], deadline_ms=-1)),
            400,
            "deadline_ms",
        ),
        (
            "deadline_boolean",
            _pack(_body([event()], deadline_ms=True)),
            400,
            "deadline_ms",
        ),
        (
            "over_event_limit",
            _pack(_body([{"features": {}}] * 4097)),
            413,
            "limit is 4096",
        ),
        (
            "over_event_limit_large_body",
            _pack(_body([event()] * 4097)),
            413,
            "limit is 4096",
        ),
    ]


async def test_bad_bodies_get_a_4xx_naming_the_problem_and_serving_goes_on(
    registry: Path, events: list[dict], caplog: pytest.LogCaptureFixture
) -> None:
    key = _keys(registry)["bank-01"]
    features = events[0]["features"]
    async with serving(registry) as served:
        connection = await _open(served)
        for kind, body, status, mention in _bad_bodies(features):
            TRIED[f"body:{kind}"] += 1
            started = time.perf_counter()
            reply = await connection.exchange(
                request("POST", "/v1/score", body, key=key)
            )
            seconds = time.perf_counter() - started

            assert (reply.status, kind) == (status, kind), reply.document()
            assert mention in reply.detail, (kind, reply.detail)
            # Refused from headers or size limits, never after a long decode.
            assert seconds < 1.0, (kind, seconds)
            # The same keep-alive connection carries on.
            assert (await _good_on(connection, key, events)).status == 200, kind
        await _recovers(served, key, events)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_special_numbers_follow_the_rules(
    registry: Path, events: list[dict]
) -> None:
    key = _keys(registry)["bank-01"]
    features = dict(events[0]["features"])
    async with serving(registry) as served:
        loaded = served.engine.router.serving.predictors[
            json.loads((registry / "deployment.json").read_text())["live"]
        ]
        connection = await _open(served)

        async def score(value: Any) -> Reply:
            TRIED["value:special_number"] += 1
            event = {"id": "x", "features": {**features, "TX_AMOUNT": value}}
            return await connection.exchange(score_request(key, [event]))

        absent = {k: v for k, v in features.items() if k != "TX_AMOUNT"}
        missing = await connection.exchange(
            score_request(key, [{"id": "x", "features": absent}])
        )
        nil, nan = await score(None), await score(math.nan)
        exact = await score(2**53)
        infinite = await score(math.inf)

    assert missing.status == nil.status == nan.status == exact.status == 200
    # NaN and nil mean missing: the same score as leaving the feature out.
    assert nil.document()["results"] == missing.document()["results"]
    assert nan.document()["results"] == missing.document()["results"]
    if loaded.allow_infinity:
        assert infinite.status == 200
    else:
        assert infinite.status == 400
        assert "TX_AMOUNT" in infinite.detail and "infinity" in infinite.detail


@pytest.mark.parametrize(
    "content_type",
    [
        "application/msgpack",
        "application/x-msgpack",
        "application/vnd.msgpack",
        "application/msgpack; charset=utf-8",
        "APPLICATION/MSGPACK",
        "Application/X-MsgPack ; charset=binary",
    ],
)
async def test_every_msgpack_spelling_decodes_alike(
    registry: Path, events: list[dict], content_type: str
) -> None:
    key = _keys(registry)["bank-01"]
    body = msgpack.packb(_body(plain_events(events, 3)))
    async with serving(registry) as served:
        connection = await _open(served)
        plain = await connection.exchange(request("POST", "/v1/score", body, key=key))
        spelled = await connection.exchange(
            request("POST", "/v1/score", body, key=key, content_type=content_type)
        )
    TRIED["content_type:spelling"] += 1
    assert plain.status == spelled.status == 200
    assert spelled.document() == plain.document()


async def test_content_type_problems(registry: Path, events: list[dict]) -> None:
    key = _keys(registry)["bank-01"]
    document = _body(plain_events(events, 2))
    packed, text = msgpack.packb(document), json.dumps(document).encode()
    cases = [
        ("json", text, [("Content-Type", "application/json")], 200, None),
        (
            "msgpack_labelled_json",
            packed,
            [("Content-Type", "application/json")],
            400,
            "JSON",
        ),
        ("text_plain", packed, [("Content-Type", "text/plain")], 415, "text/plain"),
        ("absent", packed, [], 415, "required"),
        (
            "duplicate_same",
            packed,
            [("Content-Type", "application/msgpack")] * 2,
            200,
            None,
        ),
        (
            "duplicate_conflicting",
            packed,
            [
                ("Content-Type", "application/msgpack"),
                ("Content-Type", "application/json"),
            ],
            400,
            "conflicting content-type",
        ),
    ]
    async with serving(registry) as served:
        for kind, body, headers, status, mention in cases:
            TRIED[f"content_type:{kind}"] += 1
            connection = await _open(served)
            reply = await connection.exchange(
                request(
                    "POST",
                    "/v1/score",
                    body,
                    key=key,
                    content_type=None,
                    headers=headers,
                )
            )
            assert reply.status == status, (kind, reply.document())
            if mention:
                assert mention in reply.detail, (kind, reply.detail)
            if not _closes(reply):
                assert (await _good_on(connection, key, events)).status == 200
            await connection.aclose()
        await _recovers(served, key, events)


# -- framing ------------------------------------------------------------------


def _smuggled(key: str, events: list[dict]) -> bytes:
    return score_request(key, plain_events(events, 1))


async def test_ambiguous_or_broken_framing_closes_the_connection(
    registry: Path, events: list[dict]
) -> None:
    key = _keys(registry)["bank-01"]
    good = msgpack.packb(_body(plain_events(events, 1)))
    smuggled = _smuggled(key, events)
    head = "POST /v1/score HTTP/1.1\r\nHost: t\r\nContent-Type: application/msgpack\r\n"
    head += f"Authorization: Bearer {key}\r\n"
    cases: list[tuple[str, bytes, int]] = [
        (
            "content_length_and_chunked",
            (
                head
                + f"Content-Length: {len(good)}\r\nTransfer-Encoding: chunked\r\n\r\n"
            ).encode()
            + chunked(good, 64)
            + smuggled,
            400,
        ),
        (
            "chunked_and_content_length_zero",
            (head + "Transfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n").encode()
            + b"0\r\n\r\n"
            + smuggled,
            400,
        ),
        (
            "bad_chunk_size",
            (head + "Transfer-Encoding: chunked\r\n\r\n").encode()
            + b"zz\r\nhello\r\n"
            + smuggled,
            400,
        ),
        (
            "chunk_size_overflow",
            (head + "Transfer-Encoding: chunked\r\n\r\n").encode()
            + b"fffffffffffffffffffff\r\nhello\r\n"
            + smuggled,
            400,
        ),
        (
            "chunk_without_crlf",
            (head + "Transfer-Encoding: chunked\r\n\r\n").encode()
            + b"5\r\nhelloXX"
            + smuggled,
            400,
        ),
        (
            "content_length_short",
            (head + f"Content-Length: {len(good) - 7}\r\n\r\n").encode()
            + good
            + b"\x00" * 30,
            400,
        ),
        (
            "conflicting_content_lengths",
            (head + "Content-Length: 5\r\nContent-Length: 6\r\n\r\n").encode()
            + b"hello!"
            + smuggled,
            400,
        ),
        (
            "content_length_not_a_number",
            (head + "Content-Length: 1x\r\n\r\n").encode(),
            400,
        ),
        (
            "gzip_transfer_encoding",
            (head + "Transfer-Encoding: gzip\r\n\r\n").encode(),
            501,
        ),
        (
            "header_too_large",
            (head + "X-Pad: " + "a" * 100_000 + "\r\n\r\n").encode(),
            431,
        ),
        (
            "garbage_request_line",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
            400,
        ),
    ]
    async with serving(registry) as served:
        for kind, raw, status in cases:
            TRIED[f"framing:{kind}"] += 1
            before = served.engine.statistics().requests
            connection = await _open(served)
            await connection.send(raw)
            replies = []
            try:
                while True:
                    replies.append(await connection.reply())
            except ConnectionClosed:
                pass
            except trio.TooSlowError:
                raise AssertionError(f"{kind}: connection left open") from None
            assert replies, kind
            assert replies[-1].status == status, (kind, [r.status for r in replies])
            # Nothing after the bad request reached a handler: no request was
            # scored (the smuggled one would have been).
            assert served.engine.statistics().requests == before, kind
            await connection.aclose()
            await _recovers(served, key, events)


@pytest.mark.parametrize("lane", [True, False])
async def test_a_request_pipelined_after_connection_close_ends_the_connection_quietly(
    registry: Path, lane: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # RFC 9112 forbids a request after "Connection: close".  h11 reports the
    # extra bytes as a protocol error while the first request is still being
    # answered, and hypercorn then closes the connection, so whether the
    # first answer gets out is a race; what must hold is that the connection
    # ends, nothing but whole answers come out, and nothing is logged as an
    # error.
    closing = request(
        "GET", "/healthz", content_type=None, headers=[("Connection", "close")]
    )
    after = request("GET", "/healthz", content_type=None)
    TRIED["framing:pipelined_after_close"] += 1
    seen = []
    async with serving(registry, ServerOptions(direct_lane=lane)) as served:
        for _ in range(10):
            connection = await _open(served)
            await connection.send(closing + after)
            rest = await connection.closed_by_server()
            seen.append(rest.split(b"\r\n", 1)[0])
        # The server is itself afterwards.
        connection = await _open(served)
        assert (await connection.exchange(after)).status == 200
    assert set(seen) <= {b"", b"HTTP/1.1 200 ", b"HTTP/1.1 400 "}, seen
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_body_shorter_than_declared(registry: Path, events: list[dict]) -> None:
    key = _keys(registry)["bank-01"]
    good = msgpack.packb(_body(plain_events(events, 1)))
    head = request(
        "POST",
        "/v1/score",
        None,
        key=key,
        headers=[("Content-Length", str(len(good) + 50))],
    )
    options = ServerOptions(limits=HttpLimits(score_body_timeout=0.5))
    async with serving(registry, options) as served:
        # The client says it is done (half-close): h11 answers 400 at once.
        TRIED["framing:content_length_long_then_eof"] += 1
        connection = await _open(served)
        await connection.send(head + good)
        await connection.stream.send_eof()
        assert (await connection.reply()).status == 400
        await connection.closed_by_server()

        # The client just stops: the body timeout answers 408 and closes.
        TRIED["framing:content_length_long_then_silence"] += 1
        connection = await _open(served)
        started = time.perf_counter()
        await connection.send(head + good)
        reply = await connection.reply()
        assert reply.status == 408 and _closes(reply)
        assert 0.4 < time.perf_counter() - started < 3.0
        await connection.closed_by_server()
        await _recovers(served, key, events)


# -- body limits --------------------------------------------------------------


async def _send_and_collect(
    connection: RawConnection, head: bytes, body_parts: list[bytes]
) -> tuple[Reply, int]:
    """Send a head and then body parts while reading the reply; returns the
    reply and how many body bytes went out before the server stopped us."""
    sent = 0
    got: list[Reply] = []

    async def write() -> None:
        nonlocal sent
        try:
            await connection.send(head)
            for part in body_parts:
                await connection.send(part)
                sent += len(part)
                if got:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        got.append(await connection.reply())
    return got[0], sent


@pytest.mark.parametrize("route", ["/v1/score", "/v1/models/big"])
async def test_chunked_body_over_the_limit_is_refused_as_it_arrives(
    registry: Path, events: list[dict], route: str, caplog: pytest.LogCaptureFixture
) -> None:
    keys = json.loads((registry / "deployment.json").read_text())
    key = keys["keys"]["bank-01"] if route == "/v1/score" else keys["admin"]
    limit = 64 << 10
    options = ServerOptions(limits=HttpLimits(score_body=limit, admin_body=limit))
    piece = b"\x00" * 8192
    # 64 MB: more than loopback socket buffers can swallow unread.
    parts = [f"{len(piece):x}\r\n".encode() + piece + b"\r\n"] * 8192
    head = request(
        "PUT" if "models" in route else "POST",
        route,
        None,
        key=key,
        headers=[("Transfer-Encoding", "chunked")],
    )
    async with serving(registry, options) as served:
        fds_before, rss_before = open_fds(), _rss_kb()
        for _ in range(20):
            TRIED["limit:chunked_over_limit"] += 1
            connection = await _open(served)
            reply, sent = await _send_and_collect(connection, head, parts)
            assert reply.status == 413, reply.document()
            assert f"limit of {limit} bytes" in reply.detail
            # Refused long before the 64 MB were written.
            assert sent < 16 << 20
            await connection.closed_by_server()
            await connection.aclose()
        await trio.sleep(0.05)
        # No connection was left wedged behind its unread body, and none of
        # the 20 x 64 MB was kept.
        assert open_fds() <= fds_before + 2
        assert _rss_kb() < rss_before + 32_000
        await _recovers(served, keys["keys"]["bank-01"], events)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_limits_are_per_route(registry: Path, events: list[dict]) -> None:
    keys = json.loads((registry / "deployment.json").read_text())
    options = ServerOptions(
        limits=HttpLimits(score_body=16 << 10, admin_body=256 << 10)
    )
    body = msgpack.packb({"data": b"\x00" * (100 << 10), "format": "xgboost_json"})
    async with serving(registry, options) as served:
        connection = await _open(served)
        admin = await connection.exchange(
            request("PUT", "/v1/models/blob", body, key=keys["admin"])
        )
        score = await connection.exchange(
            request("POST", "/v1/score", body, key=keys["keys"]["bank-01"])
        )
    TRIED["limit:per_route"] += 2
    assert admin.status == 400 and admin.error == "model_import"
    assert score.status == 413 and "16384" in score.detail


async def test_expect_100_continue(registry: Path, events: list[dict]) -> None:
    keys = json.loads((registry / "deployment.json").read_text())
    key = keys["keys"]["bank-01"]
    body = msgpack.packb(_body(plain_events(events, 2)))
    options = ServerOptions(limits=HttpLimits(score_body=len(body) + 10))
    expect = [("Expect", "100-continue")]
    async with serving(registry, options) as served:
        # Within the limit: 100 Continue, then the answer once the body is in.
        connection = await _open(served)
        await connection.send(
            request(
                "POST",
                "/v1/score",
                None,
                key=key,
                headers=[*expect, ("Content-Length", str(len(body)))],
            )
        )
        assert (await connection.reply()).status == 100
        await connection.send(body)
        assert (await connection.reply()).status == 200
        # Same connection, over the limit: 413 instead of 100.
        await connection.send(
            request(
                "POST",
                "/v1/score",
                None,
                key=key,
                headers=[*expect, ("Content-Length", "999999")],
            )
        )
        refused = await connection.reply()
        assert refused.status == 413, refused.document()
        # A wrong key: 401, and no 100 either.
        other = await _open(served)
        await other.send(
            request(
                "POST",
                "/v1/score",
                None,
                key="nope",
                headers=[*expect, ("Content-Length", str(len(body)))],
            )
        )
        assert (await other.reply()).status == 401
        # The admin route, over its limit.
        admin = await _open(served)
        await admin.send(
            request(
                "PUT",
                "/v1/models/x",
                None,
                key=keys["admin"],
                headers=[*expect, ("Content-Length", str(1 << 30))],
            )
        )
        assert (await admin.reply()).status == 413
        await _recovers(served, key, events)
    TRIED["limit:expect_100"] += 4


# -- slow clients and connection counts ---------------------------------------


async def _seconds_until_closed(connection: RawConnection, drip: bytes = b"") -> float:
    """Seconds until the server closes, writing ``drip`` a byte at a time."""
    started = time.perf_counter()

    async def write() -> None:
        for byte in drip:
            await trio.sleep(0.1)
            try:
                await connection.send(bytes([byte]))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        await connection.closed_by_server(timeout=10)
        nursery.cancel_scope.cancel()
    return time.perf_counter() - started


async def test_slow_clients_are_closed_by_the_header_timeout(
    registry: Path, events: list[dict]
) -> None:
    key = _keys(registry)["bank-01"]
    options = ServerOptions(
        header_timeout=0.6,
        keep_alive_timeout=1.5,
        limits=HttpLimits(score_body_timeout=0.6),
    )
    slow_head = score_request(key, plain_events(events, 1))
    async with serving(registry, options) as served:
        # Sends nothing at all.
        silent = await _seconds_until_closed(await _open(served))
        # One byte every 0.1 s: each byte does not buy more time.
        dribbling = await _seconds_until_closed(await _open(served), slow_head)
        # Idle after a response: the keep-alive timeout applies ...
        connection = await _open(served)
        assert (await _good_on(connection, key, events)).status == 200
        idle = await _seconds_until_closed(connection)
        # The same after an admin request, which quart answers.
        connection = await _open(served)
        admin = json.loads((registry / "deployment.json").read_text())["admin"]
        listing = await connection.exchange(
            request("GET", "/v1/models", None, key=admin, content_type=None)
        )
        assert listing.status == 200
        admin_idle = await _seconds_until_closed(connection)
        # ... until a first byte arrives; then the head has header_timeout.
        connection = await _open(served)
        assert (await _good_on(connection, key, events)).status == 200
        await connection.send(b"P")
        second_head = await _seconds_until_closed(connection, slow_head[1:])
        # A body that trickles in gets 408 once its time is up.
        connection = await _open(served)
        body = msgpack.packb(_body(plain_events(events, 1)))
        started = time.perf_counter()
        await connection.send(
            request(
                "POST",
                "/v1/score",
                None,
                key=key,
                headers=[("Content-Length", str(len(body)))],
            )
        )

        async def trickle() -> None:
            for byte in body:
                await trio.sleep(0.1)
                try:
                    await connection.send(bytes([byte]))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            slow_body = await connection.reply()
            nursery.cancel_scope.cancel()
        slow_body_seconds = time.perf_counter() - started
        await _recovers(served, key, events)
    TRIED["slow:client"] += 6
    assert 0.5 < silent < 1.4, silent
    assert 0.5 < dribbling < 1.4, dribbling
    assert 1.4 < idle < 2.5, idle
    assert 1.4 < admin_idle < 2.5, admin_idle
    assert 0.5 < second_head < 1.4, second_head
    assert slow_body.status == 408 and 0.5 < slow_body_seconds < 1.4


async def test_long_requests_are_not_cut_by_the_header_timeout(
    registry: Path, synthetic: dict
) -> None:
    import xgboost as xgb

    admin = json.loads((registry / "deployment.json").read_text())["admin"]
    X = np.column_stack([synthetic[f] for f in FEATURES])[:3000]
    booster = xgb.train(
        {"max_depth": 4, "objective": "binary:logistic", "nthread": 1, "seed": 5},
        xgb.DMatrix(
            X, label=synthetic["TX_FRAUD"][:3000], feature_names=list(FEATURES)
        ),
        num_boost_round=40,
    )
    body = msgpack.packb(
        {"data": bytes(booster.save_raw("json")), "format": "xgboost_json", "beta": 0.5}
    )
    options = ServerOptions(header_timeout=0.05, keep_alive_timeout=0.05)
    async with serving(registry, options) as served:
        connection = await _open(served)
        started = time.perf_counter()
        reply = await connection.exchange(
            request("PUT", "/v1/models/fresh", body, key=admin)
        )
        seconds = time.perf_counter() - started
    # Compiling took far longer than either timeout, and the answer came.
    assert reply.status == 201, reply.document()
    assert seconds > 0.1


async def test_connection_cap_holds_new_connections_in_the_backlog(
    registry: Path, events: list[dict]
) -> None:
    key = _keys(registry)["bank-01"]
    options = ServerOptions(max_connections=8, header_timeout=30)
    async with serving(registry, options) as served:
        idle = [await _open(served) for _ in range(8)]
        await trio.sleep(0.1)
        fds = open_fds()
        waiting = await _open(served)
        await waiting.send(score_request(key, plain_events(events, 1)))
        with pytest.raises(trio.TooSlowError):
            await waiting.reply(timeout=0.5)
        # Beyond the cap, a connection costs the server no descriptor.
        assert open_fds() <= fds + 1
        await idle.pop().aclose()
        reply = await waiting.reply(timeout=5)
        assert reply.status == 200
        for connection in idle:
            await connection.aclose()


def _fd_budget() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Both ends of every connection live in this process, plus headroom.
    return max(0, min(1000, (soft - 300) // 2))


async def _latencies(connection: RawConnection, payload: bytes, n: int) -> list[float]:
    seconds = []
    for _ in range(n):
        started = time.perf_counter()
        reply = await connection.exchange(payload)
        seconds.append(time.perf_counter() - started)
        assert reply.status == 200
    return seconds


@pytest.mark.slow
async def test_idle_connections_do_not_slow_normal_traffic(
    registry: Path, events: list[dict]
) -> None:
    idle_count = _fd_budget()
    if idle_count < 200:
        pytest.skip(f"RLIMIT_NOFILE too low for {idle_count} idle connections")
    key = _keys(registry)["bank-01"]
    options = ServerOptions(header_timeout=60, keep_alive_timeout=60)
    payload = score_request(key, plain_events(events, 8))
    async with serving(registry, options) as served:
        client = await _open(served)
        await _latencies(client, payload, 50)  # warm up
        before = await _latencies(client, payload, 300)
        idle = []
        for i in range(idle_count):
            idle.append(await _open(served))
            if i % 3 == 0:
                await idle[-1].send(b"POST /v1/sco")  # a head that never ends
        await trio.sleep(0.2)
        during = await _latencies(client, payload, 300)
        # The idle connections are all still open.
        for connection in idle[::50]:
            with pytest.raises(trio.TooSlowError):
                await connection.closed_by_server(timeout=0.001)
        fresh = await _open(served)
        assert (await fresh.exchange(payload)).status == 200
        for connection in idle:
            await connection.aclose()

    p50 = (statistics.median(before), statistics.median(during))
    p99 = (np.percentile(before, 99), np.percentile(during, 99))
    record_figure(
        "idle_connections",
        {
            "idle": idle_count,
            "p50_ms_before": round(p50[0] * 1e3, 3),
            "p50_ms_during": round(p50[1] * 1e3, 3),
            "p99_ms_before": round(p99[0] * 1e3, 3),
            "p99_ms_during": round(p99[1] * 1e3, 3),
        },
    )
    assert p50[1] < 2 * p50[0] + 0.002
    assert p99[1] < 3 * p99[0] + 0.010


# -- clients that leave -------------------------------------------------------


async def test_client_leaving_mid_request_is_cancelled_and_counted(
    registry: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = _keys(registry)["bank-01"]
    rng = np.random.default_rng(3)
    rows = 60_000
    big = [
        {"features": {HEAVY_FEATURES[0]: float(a), HEAVY_FEATURES[1]: float(b)}}
        for a, b in rng.uniform(0, 1e5, size=(rows, 2))
    ]
    one = [{"features": {HEAVY_FEATURES[0]: 5.0, HEAVY_FEATURES[1]: 7.0}}]
    cycles = 5
    options = ServerOptions(limits=HttpLimits(score_body=16 << 20))
    async with serving(
        registry, options, max_events=rows, deadline_ms=60_000
    ) as served:
        engine = served.engine
        heavy = await _open(served)
        for cycle in range(cycles):
            threaded = engine.live_scorer.statistics().threaded_calls
            await heavy.send(score_request(key, big, intent=HEAVY_INTENT))
            # Wait until the big batch is in the scorer's worker thread ...
            with trio.fail_after(10):
                while engine.live_scorer.statistics().threaded_calls == threaded:
                    await trio.sleep(0.001)
            # ... queue a small request behind it, and leave.
            leaver = await _open(served)
            await leaver.send(score_request(key, one, intent=HEAVY_INTENT))
            with trio.fail_after(10):
                while engine.statistics().live_queue == 0:
                    await trio.sleep(0.0005)
            await leaver.aclose()
            with trio.fail_after(10):
                while engine.statistics().aborted <= cycle:
                    await trio.sleep(0.001)
            assert (await heavy.reply(timeout=30)).status == 200

        stats = engine.statistics()
        scorer = engine.live_scorer.statistics()
        # Capacity is back: nothing queued, and a new request is served.
        assert stats.live_queue == 0
        fresh = await _open(served)
        assert (
            await fresh.exchange(score_request(key, one, intent=HEAVY_INTENT))
        ).status == 200
    assert stats.aborted == cycles
    # The abandoned jobs were skipped, not scored for nobody.
    assert scorer.skipped_cancelled == cycles
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# -- overload and quotas ------------------------------------------------------


async def test_tenant_over_quota_gets_429_while_others_are_served(
    registry: Path, events: list[dict]
) -> None:
    keys = _keys(registry)
    quotas = {"bank-01": QuotaPolicy(rate=20, burst=100)}
    batch = plain_events(events, 20)
    async with serving(registry, quotas=quotas) as served:
        greedy, polite = await _open(served), await _open(served)
        statuses: dict[str, list[int]] = {"bank-01": [], "bank-02": []}
        refused: Reply | None = None
        for _ in range(15):
            reply = await greedy.exchange(score_request(keys["bank-01"], batch))
            statuses["bank-01"].append(reply.status)
            if reply.status == 429:
                refused = reply
            other = await polite.exchange(score_request(keys["bank-02"], batch))
            statuses["bank-02"].append(other.status)
    assert statuses["bank-01"][:5] == [200] * 5
    assert statuses["bank-01"].count(429) >= 8
    assert set(statuses["bank-02"]) == {200}
    assert refused is not None and refused.error == "quota_exceeded"
    assert "bank-01" in refused.detail
    assert int(refused.headers["retry-after"]) >= 1


@pytest.mark.slow
async def test_overload_is_shed_fast_and_recovers_at_once(
    template: Path, tmp_path: Path, events: list[dict]
) -> None:
    deployment = copy_registry(template, tmp_path / "reg")
    key = deployment.keys["bank-01"]
    payload = score_request(key, plain_events(events, 64))
    clients, seconds, cap = 64, 3.0, 60_000
    config = {"server": {"max_score_requests": 8}}
    with ServerProcess(tmp_path / "reg", tmp_path, config) as server:
        server.start()
        host, port = server.host_port
        rss_before = server.rss_kb()
        probe = await RawConnection.open(host, port)
        before = await _latencies(probe, payload, 100)
        load = LoadGenerator(
            host, port, payload, tmp_path, clients=clients, seconds=seconds, cap=cap
        )
        # One probe request every 10 ms while the storm lasts: what a client
        # that is not itself part of the storm sees.
        seen: dict[int, list[float]] = {200: [], 503: []}
        while load.running():
            started = time.perf_counter()
            reply = await probe.exchange(payload, timeout=30)
            seen.setdefault(reply.status, []).append(time.perf_counter() - started)
            await trio.sleep(0.01)
        storm = load.result()
        rss_peak = server.peak_rss_kb()
        after = await _latencies(probe, payload, 100)
        fds = server.open_fds()

    def ms(values: list[float], q: float) -> float:
        return round(float(np.percentile(values, q)) * 1e3, 2) if values else 0.0

    record_figure(
        "overload",
        {
            "clients": clients,
            "seconds": seconds,
            "requests": storm["sent"],
            "answered": storm["answered"],
            "lost": storm["sent"] - storm["answered"],
            "by_status": storm["by_status"],
            "probe_by_status": {str(k): len(v) for k, v in seen.items()},
            "probe_p50_ms_200": ms(seen[200], 50),
            "probe_p99_ms_200": ms(seen[200], 99),
            "probe_p50_ms_503": ms(seen[503], 50),
            "probe_p99_ms_503": ms(seen[503], 99),
            "p50_ms_before": ms(before, 50),
            "p50_ms_after": ms(after, 50),
            "rss_kb_before": rss_before,
            "peak_rss_kb": rss_peak,
        },
    )
    # Every request got an answer: served, refused at once (503), or, for
    # the odd one admitted but not scored within its deadline, 504.
    assert storm["answered"] == storm["sent"] and storm["failures"] == 0
    assert set(storm["by_status"]) <= {"200", "503", "504"}
    assert storm["by_status"].get("503", 0) > storm["by_status"].get("200", 0) > 0
    assert storm["retry_after"] == storm["by_status"]["503"]
    # Nobody waits long: the wait is the event loop's round over every busy
    # connection, not a queue of work growing behind the storm.
    all_seen = seen[200] + seen[503]
    assert np.percentile(all_seen, 50) < 0.15
    assert np.percentile(all_seen, 99) < 1.0
    # Memory stays bounded, and the server is itself again at once.
    assert rss_peak < rss_before + 200_000
    assert statistics.median(after) < 3 * statistics.median(before) + 0.005
    assert fds < 200
