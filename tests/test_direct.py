"""The direct lane: which heads it takes, and serving beside hypercorn."""

from __future__ import annotations

import re
from pathlib import Path

import msgpack
import pytest
import trio
from _servers import (
    RawConnection,
    copy_registry,
    plain_events,
    request,
    score_request,
    serving,
)

from muse._direct import FALLBACK, MAX_HEAD, PlainHead, parse_head
from muse._server import ServerOptions

LIMIT = 1 << 20
BODY = b"\x81\xa6intent\xaacard-fraud"


def _head(*lines: str, request_line: str = "POST /v1/score HTTP/1.1") -> bytes:
    return ("\r\n".join([request_line, *lines]) + "\r\n\r\n").encode("latin-1")


PLAIN = (
    "Host: muse.test",
    "Content-Type: application/msgpack",
    "Authorization: Bearer k",
    f"Content-Length: {len(BODY)}",
)


# -- parse_head ------------------------------------------------------------------


def test_parse_head_reads_a_plain_scoring_request() -> None:
    head = _head(*PLAIN)

    parsed = parse_head(head + BODY + b"POST /v1/", LIMIT)

    assert parsed == PlainHead(
        len(head),
        len(BODY),
        {
            b"host": [b"muse.test"],
            b"content-type": [b"application/msgpack"],
            b"authorization": [b"Bearer k"],
            b"content-length": [str(len(BODY)).encode()],
        },
    )


@pytest.mark.parametrize("cut", [0, 1, 10, 26, 40, -1])
def test_parse_head_waits_for_the_rest_of_a_plain_head(cut: int) -> None:
    head = _head(*PLAIN)

    assert parse_head(head[: cut if cut >= 0 else len(head) - 1], LIMIT) is None


@pytest.mark.parametrize(
    "start",
    [b"G", b"GET /healthz", b"POST /v1/scores", b"POST /v1/score?x=1", b"PUT "],
)
def test_parse_head_leaves_other_requests_at_their_first_bytes(start: bytes) -> None:
    assert parse_head(start, LIMIT) is FALLBACK


@pytest.mark.parametrize(
    "lines",
    [
        pytest.param(PLAIN[:3] + ("Transfer-Encoding: chunked",), id="chunked"),
        pytest.param(PLAIN + ("Transfer-Encoding: chunked",), id="length-and-chunked"),
        pytest.param(PLAIN + ("Content-Length: 3",), id="two-lengths"),
        pytest.param(PLAIN + (f"Content-Length: {len(BODY)}",), id="same-length-twice"),
        pytest.param(PLAIN[:3] + ("Content-Length: +12",), id="signed-length"),
        pytest.param(PLAIN[:3] + ("Content-Length: 0x10",), id="hex-length"),
        pytest.param(PLAIN[:3] + ("Content-Length: 1 2",), id="spaced-length"),
        pytest.param(PLAIN[:3], id="no-length"),
        pytest.param(PLAIN[:3] + (f"Content-Length: {LIMIT + 1}",), id="over-limit"),
        pytest.param(PLAIN + ("Expect: 100-continue",), id="expect"),
        pytest.param(PLAIN + ("Connection: close",), id="connection-close"),
        pytest.param(PLAIN + ("Connection: upgrade",), id="connection-upgrade"),
        pytest.param(PLAIN + ("Upgrade: h2c",), id="upgrade"),
        pytest.param(PLAIN[1:], id="no-host"),
        pytest.param(PLAIN + ("Host: other.test",), id="two-hosts"),
        pytest.param(PLAIN + (" folded",), id="obs-fold"),
        pytest.param(PLAIN + ("X-Trace : 1",), id="space-before-colon"),
        pytest.param(PLAIN + ("X-Trace",), id="no-colon"),
        pytest.param(PLAIN + ("X-Trace: a\x00b",), id="nul-in-value"),
        pytest.param(PLAIN + ("X(Trace): 1",), id="bad-name"),
    ],
)
def test_parse_head_leaves_anything_unusual_to_hypercorn(
    lines: tuple[str, ...],
) -> None:
    assert parse_head(_head(*lines) + BODY, LIMIT) is FALLBACK


def test_parse_head_leaves_other_versions_and_empty_heads() -> None:
    assert (
        parse_head(_head(*PLAIN, request_line="POST /v1/score HTTP/1.0"), LIMIT)
        is FALLBACK
    )
    assert parse_head(b"POST /v1/score HTTP/1.1\r\n\r\n", LIMIT) is FALLBACK


def test_parse_head_gives_up_on_a_head_without_end() -> None:
    start = _head(*PLAIN)[:-4]
    filler = b"\r\nX-Pad: " + b"a" * MAX_HEAD

    assert parse_head(start, LIMIT) is None
    assert parse_head(start + filler, LIMIT) is FALLBACK


def test_parse_head_accepts_keep_alive_and_tolerates_optional_whitespace() -> None:
    head = _head(*PLAIN, "Connection: Keep-Alive", "X-Trace:\t  spaced \t")

    parsed = parse_head(head, LIMIT)

    assert isinstance(parsed, PlainHead)
    assert parsed.headers[b"x-trace"] == [b"spaced"]


# -- beside hypercorn ------------------------------------------------------------


def _lane_counts(metrics: bytes) -> dict[str, float]:
    found = re.findall(rb'muse_direct_lane_total\{what="(\w+)"\} ([0-9.e+]+)', metrics)
    return {what.decode(): float(value) for what, value in found}


async def _metrics(connection: RawConnection) -> dict[str, float]:
    reply = await connection.exchange(request("GET", "/metrics", content_type=None))
    assert reply.status == 200
    return _lane_counts(reply.body)


async def test_a_connection_moves_to_hypercorn_and_answers_stay_the_same(
    template: Path, tmp_path: Path, events: list[dict]
) -> None:
    deployment = copy_registry(template, tmp_path / "reg")
    scoring = score_request(deployment.keys["bank-01"], plain_events(events, 5))
    async with serving(tmp_path / "reg") as served:
        connection = await RawConnection.open(served.host, served.port)
        direct = await connection.exchange(scoring)
        # Another shape of request: the connection is hypercorn's from here.
        probe = await connection.exchange(request("GET", "/healthz", content_type=None))
        through_hypercorn = await connection.exchange(scoring)
        counts = await _metrics(connection)
        await connection.aclose()

    assert (direct.status, probe.status, through_hypercorn.status) == (200, 200, 200)
    assert direct.document() == through_hypercorn.document()
    assert direct.headers["content-type"] == through_hypercorn.headers["content-type"]
    assert len(direct.document()["results"]) == 5
    assert counts == {"requests": 1.0, "handovers": 1.0}


async def test_pipelined_requests_are_answered_in_order(
    template: Path, tmp_path: Path, events: list[dict]
) -> None:
    deployment = copy_registry(template, tmp_path / "reg")
    key = deployment.keys["bank-01"]
    batches = [plain_events(events, n, 10 * n) for n in (1, 3, 2)]
    async with serving(tmp_path / "reg") as served:
        connection = await RawConnection.open(served.host, served.port)
        await connection.send(b"".join(score_request(key, b) for b in batches))
        replies = [await connection.reply() for _ in batches]
        counts = await _metrics(connection)
        await connection.aclose()

    assert [r.status for r in replies] == [200, 200, 200]
    assert [[x["id"] for x in r.document()["results"]] for r in replies] == [
        [e["id"] for e in batch] for batch in batches
    ]
    assert counts["requests"] == 3.0


async def test_errors_on_the_lane_match_the_asgi_path(
    template: Path, tmp_path: Path, events: list[dict]
) -> None:
    deployment = copy_registry(template, tmp_path / "reg")
    key = deployment.keys["bank-01"]
    bad = [
        score_request("not-a-key", plain_events(events, 1)),
        score_request(key, plain_events(events, 1), intent="no-such-intent"),
        request("POST", "/v1/score", b"\xc1", key=key),
        request("POST", "/v1/score", b"{}", key=key, content_type="text/plain"),
        score_request(deployment.admin, plain_events(events, 1)),
    ]
    answers: dict[str, list[tuple[int, str | None]]] = {}
    for lane in (True, False):
        options = ServerOptions(direct_lane=lane)
        async with serving(tmp_path / "reg", options) as served:
            connection = await RawConnection.open(served.host, served.port)
            replies = [await connection.exchange(b) for b in bad]
            # The connection still serves after every refusal.
            good = await connection.exchange(
                score_request(key, plain_events(events, 1))
            )
            counts = await _metrics(connection)
            await connection.aclose()
        answers["lane" if lane else "hypercorn"] = [
            (r.status, r.error) for r in replies
        ]
        assert good.status == 200
        assert counts.get("requests", 0.0) == (len(bad) + 1 if lane else 0.0)

    assert answers["lane"] == answers["hypercorn"]
    assert [status for status, _ in answers["lane"]] == [401, 404, 400, 415, 403]


async def test_a_slow_body_on_the_lane_gets_408_and_the_connection_closes(
    template: Path, tmp_path: Path, events: list[dict]
) -> None:
    deployment = copy_registry(template, tmp_path / "reg")
    whole = score_request(deployment.keys["bank-01"], plain_events(events, 3))
    options = ServerOptions()
    options.limits.score_body_timeout = 0.3
    async with serving(tmp_path / "reg", options) as served:
        connection = await RawConnection.open(served.host, served.port)
        await connection.send(whole[:-5])
        reply = await connection.reply(timeout=5)
        rest = await connection.closed_by_server(timeout=5)

    assert reply.status == 408
    assert msgpack.unpackb(reply.body)["error"] == "request_timeout"
    assert reply.headers["connection"] == "close"
    assert rest == b""


async def test_stopping_closes_idle_lane_connections_and_answers_busy_ones(
    template: Path, tmp_path: Path, events: list[dict]
) -> None:
    deployment = copy_registry(template, tmp_path / "reg")
    scoring = score_request(deployment.keys["bank-01"], plain_events(events, 2))
    async with serving(tmp_path / "reg") as served:
        idle = await RawConnection.open(served.host, served.port)
        assert (await idle.exchange(scoring)).status == 200
        busy = await RawConnection.open(served.host, served.port)
        await busy.send(scoring)
        with trio.fail_after(5):
            while served.engine.statistics().requests < 2:
                await trio.sleep(0.001)
    # The block has ended: the server has stopped, after answering.
    with trio.fail_after(5):
        reply = await busy.reply()
        assert await idle.closed_by_server() == b""
    assert reply.status == 200


async def test_a_request_refused_on_its_head_is_answered_before_its_body(
    template: Path, tmp_path: Path
) -> None:
    copy_registry(template, tmp_path / "reg")
    declared = 4_000_000
    head = request(
        "POST",
        "/v1/score",
        None,
        key="not-a-key",
        headers=[("Content-Length", str(declared))],
    )
    async with serving(tmp_path / "reg") as served:
        connection = await RawConnection.open(served.host, served.port)
        await connection.send(head + b"\0" * 1000)
        # Answered at once, long before the 10 s body timeout: the server
        # neither waits for nor holds the other 3,999,000 bytes.
        with trio.fail_after(2):
            reply = await connection.reply()
            rest = await connection.closed_by_server()

    assert reply.status == 401
    assert msgpack.unpackb(reply.body)["error"] == "unauthorized"
    assert reply.headers["connection"] == "close"
    assert rest == b""
