"""Tests for the benchmark harness: schedule, framing, percentiles, SLOs, load.

Load tests run the real load generator against a trivial HTTP server on
loopback (an asyncio server in a thread), with no mocks, and check that
every request sent was answered and counted.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np
import pytest

from muse._bench._http1 import (
    Endpoint,
    ResponseFormatError,
    ResponseParser,
    encode_request,
    parse_url,
)
from muse._bench._loadgen import (
    LoadResult,
    LoadSpec,
    new_histogram,
    run_load_here,
    schedule_offsets,
)
from muse._bench._peers import _write_template
from muse._bench._report import (
    Target,
    evaluate_targets,
    markdown,
    median_rows,
    plot_latency,
)
from muse._bench._slo import SLOFileError, evaluate, load_slos, parse_slos
from muse._bench._workers import run_load
from muse._bench._workload import (
    Workload,
    load_workload,
    request_set,
    scores_from_body,
)

EXAMPLE_SLO = Path(__file__).resolve().parents[1] / "bench" / "slo.example.toml"


# -- schedule -----------------------------------------------------------------


def test_schedule_offsets_whole_schedule() -> None:
    offsets = schedule_offsets(200, 0.5)

    assert len(offsets) == 100
    assert offsets[0] == 0.0
    assert offsets[1] == pytest.approx(0.005)
    assert offsets[-1] == pytest.approx(0.495)


def test_schedule_offsets_shares_interleave_and_cover() -> None:
    whole = schedule_offsets(1000, 1.0)
    shares = [schedule_offsets(1000, 1.0, k, 3) for k in range(3)]

    assert [len(s) for s in shares] == [334, 333, 333]
    assert sorted(x for s in shares for x in s) == whole
    assert shares[1][:2] == [pytest.approx(0.001), pytest.approx(0.004)]


def test_schedule_offsets_rounds_request_count() -> None:
    assert len(schedule_offsets(3, 0.5)) == 2  # round(1.5) is 2
    assert len(schedule_offsets(500, 0.001)) == 0  # round(0.5) is 0


# -- HTTP/1.1 framing -----------------------------------------------------------


def test_encode_request_bytes() -> None:
    endpoint = Endpoint("127.0.0.1", 8000, "/api")

    raw = encode_request("POST", endpoint, "/v1/score", b"xyz", {"X-A": "1"})

    assert raw == (
        b"POST /api/v1/score HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
        b"Content-Length: 3\r\nX-A: 1\r\n\r\nxyz"
    )


def test_parse_url() -> None:
    assert parse_url("http://127.0.0.1:9000/") == Endpoint("127.0.0.1", 9000, "")
    assert parse_url("http://localhost/x/") == Endpoint("localhost", 80, "/x")
    with pytest.raises(ValueError, match="expected an http://host:port URL"):
        parse_url("https://127.0.0.1:9000")


def test_parser_content_length_split_anywhere() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    for cut in range(1, len(raw)):
        parser = ResponseParser()

        first, second = parser.feed(raw[:cut]), parser.feed(raw[cut:])

        assert first + second == [200]
        assert parser.idle


def test_parser_several_responses_in_one_read() -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"
        b"HTTP/1.1 204 No Content\r\n\r\n"
    )

    assert ResponseParser().feed(raw) == [200, 503, 204]


def test_parser_chunked_with_trailer() -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\nabcd\r\n3;ext=1\r\nefg\r\n0\r\nX-Trailer: 1\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nz"
    )
    parser = ResponseParser()

    statuses = [
        s for byte in range(len(raw)) for s in parser.feed(raw[byte : byte + 1])
    ]

    assert statuses == [200, 201]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"SMTP nonsense\r\n\r\n", "bad status line"),
        (b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n", "bad status code"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n", "neither Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
    ],
)
def test_parser_rejects_unframeable(raw: bytes, message: str) -> None:
    with pytest.raises(ResponseFormatError, match=message):
        ResponseParser().feed(raw)


# -- percentiles --------------------------------------------------------------------


def _result(
    latencies_us: list[int], *, errors: int = 0, elapsed: float = 1.0
) -> LoadResult:
    spec = LoadSpec(Endpoint("127.0.0.1", 1), (b"",), 1, 1, 1.0)
    result = LoadResult(
        spec=spec, ok=len(latencies_us), errors=errors, elapsed_s=elapsed
    )
    for value in latencies_us:
        result.histogram.record_value(value)
    return result


def test_hdr_percentiles_on_known_values() -> None:
    result = _result(list(range(1, 1001)))

    assert result.percentile_ms(50) == 0.5
    assert result.percentile_ms(99) == 0.99
    assert result.percentile_ms(99.9) == 0.999
    assert result.percentile_ms(100) == 1.0


def test_hdr_percentiles_keep_three_digits_at_large_values() -> None:
    result = _result([12_345_678] * 10 + [1_000] * 90)

    assert result.percentile_ms(50) == 1.0
    assert result.percentile_ms(99) == pytest.approx(12_345.678, rel=1e-3)


def test_percentile_of_empty_result_is_nan() -> None:
    assert math.isnan(_result([]).percentile_ms(50))


def test_merge_wire_adds_histograms_and_counts() -> None:
    a, b = _result([100] * 3, errors=1), _result([300] * 1, errors=2, elapsed=2.0)

    a.merge_wire(b.to_wire())

    assert (a.ok, a.errors, a.elapsed_s) == (4, 3, 2.0)
    assert a.percentile_ms(50) == 0.1
    assert a.percentile_ms(100) == 0.3
    assert a.achieved_rps == 2.0


# -- SLOs --------------------------------------------------------------------------


def test_example_slo_file_parses() -> None:
    slos = load_slos(EXAMPLE_SLO)

    steady = slos[0]
    assert steady.rate == 500.0
    assert steady.batch == 1
    assert steady.limits == {"p99_ms": 5.0, "p999_ms": 20.0, "errors": 0.0}
    assert steady.connections == 32


def test_slo_top_level_objective_and_defaults() -> None:
    (slo,) = parse_slos("p99_ms = 5\nerrors = 0\n")

    assert slo.name == "slo-1"
    assert slo.rate is None
    assert (slo.batch, slo.duration_s, slo.connections) == (1, 10.0, 16)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[slo]]\np99 = 5\n", r"unknown key\(s\) \['p99'\]"),
        ("[[slo]]\nrate = 100\n", "sets no limit"),
        ("[[slo]]\np99_ms = '5'\n", "p99_ms must be a number"),
        ("[[slo]]\np99_ms = 5\nbatch = 0\n", "batch must be a positive integer"),
        ("[[slo]]\np99_ms = 5\nrate = 0\n", "rate must be > 0"),
        ("p99_ms = [", "not valid TOML"),
        ("", "defines no objective"),
    ],
)
def test_slo_parse_errors(text: str, message: str) -> None:
    with pytest.raises(SLOFileError, match=message):
        parse_slos(text)


def test_slo_evaluate_exact_numbers() -> None:
    (slo,) = parse_slos(
        "[[slo]]\nname = 's'\nrate = 500\np50_ms = 0.5\np99_ms = 0.9\n"
        "errors = 0\nmin_rps = 1000\n"
    )
    result = _result(list(range(1, 1001)), errors=1, elapsed=1.0)

    verdicts = {v.limit: v for v in evaluate(slo, result)}

    assert [v.limit for v in evaluate(slo, result)] == [
        "p50_ms",
        "p99_ms",
        "errors",
        "min_rps",
    ]
    assert (verdicts["p50_ms"].measured, verdicts["p50_ms"].passed) == (0.5, True)
    assert (verdicts["p99_ms"].measured, verdicts["p99_ms"].passed) == (0.99, False)
    assert (verdicts["errors"].measured, verdicts["errors"].passed) == (1.0, False)
    assert (verdicts["min_rps"].measured, verdicts["min_rps"].passed) == (1000.0, True)
    assert verdicts["p99_ms"].describe() == "FAIL s: p99_ms 0.99 <= 0.9"
    assert verdicts["min_rps"].describe() == "PASS s: min_rps 1000 >= 1000"


def test_slo_latency_without_answers_fails() -> None:
    (slo,) = parse_slos("p99_ms = 100\n")

    (verdict,) = evaluate(slo, _result([]))

    assert not verdict.passed


# -- rows, targets, report ----------------------------------------------------------


def _row(server: str, mode: str, batch: int = 1, **figures: float) -> dict[str, object]:
    row: dict[str, object] = {
        "server": server,
        "mode": mode,
        "batch": batch,
        "connections": 16,
        "offered_rps": None,
        "achieved_rps": 0.0,
        "events_per_s": 0.0,
        "p50_ms": 1.0,
        "p99_ms": 2.0,
        "p999_ms": 3.0,
        "errors": 0,
        "loadgen_cpu": 0.1,
        "server_cpu": 1.0,
        "other_cpu": 0.0,
        "passes": 1,
    }
    row.update(figures)
    return row


def test_median_rows_takes_medians_and_sums_errors() -> None:
    rows = [
        _row("muse", "closed", events_per_s=v, p99_ms=p, errors=e)
        for v, p, e in ((100.0, 5.0, 0), (300.0, 1.0, 2), (200.0, 9.0, 1))
    ]
    rows[1]["statuses"] = {"200": 5, "503": 2}
    rows[2]["statuses"] = {"200": 4, "504": 1}

    (merged,) = median_rows(rows)

    assert merged["events_per_s"] == 200.0
    assert merged["p99_ms"] == 5.0
    assert merged["errors"] == 3
    assert merged["passes"] == 3
    assert merged["pass_events_per_s"] == [100.0, 300.0, 200.0]
    assert merged["statuses"] == {"200": 9, "503": 2, "504": 1}


def test_targets_ratios_and_verdicts() -> None:
    rows = [
        _row("muse", "closed", 1, events_per_s=10_000.0),
        _row("mlserver", "closed", 1, events_per_s=4_000.0),
        _row("fastapi", "closed", 1, events_per_s=12_500.0),
        _row("muse", "closed", 64, events_per_s=80_000.0),
        _row("mlserver", "closed", 64, events_per_s=50_000.0),
        _row("muse", "open", offered_rps=200.0, p50_ms=1.0, p99_ms=4.0),
        _row("mlserver", "open", offered_rps=200.0, p50_ms=2.0, p99_ms=3.0),
        _row("fastapi", "open", offered_rps=200.0, p50_ms=0.5, p99_ms=1.0, errors=7),
        _row("muse-embedded", "embedded", events_per_s=60_000.0),
    ]

    targets = evaluate_targets(rows, [200.0])

    measured = [(round(t.measured, 3), t.passed) for t in targets]
    assert measured == [
        (2.5, True),  # 10,000 / 4,000 vs MLServer
        (0.8, False),  # 10,000 / 12,500 vs FastAPI
        (80_000.0, True),
        (1.6, False),  # 80,000 / 50,000
        (0.5, True),  # p50 1.0 vs MLServer's 2.0: FastAPI had errors
        (1.333, False),  # p99 4.0 vs 3.0
        (60_000.0, True),
    ]
    assert targets[0].describe() == (
        "PASS  single-event events/s, MUSE / MLServer: 2.50x (target >= 2.00x)"
    )


def test_open_loop_errors_decide_targets() -> None:
    rows = [
        _row("muse", "open", offered_rps=500.0, p50_ms=1.0, p99_ms=2.0, errors=3),
        _row("fastapi", "open", offered_rps=500.0, p50_ms=2.0, p99_ms=4.0),
        _row("muse", "open", offered_rps=900.0, p50_ms=9.0, p99_ms=9.0),
        _row("fastapi", "open", offered_rps=900.0, p50_ms=1.0, p99_ms=1.0, errors=1),
    ]

    at_500, _, at_900, _ = evaluate_targets(rows, [500.0, 900.0])[4:8]

    assert (at_500.measured, at_500.passed) == (0.5, False)
    assert at_500.describe().endswith("; MUSE failed 3 requests at this rate")
    assert at_900.passed
    assert "no peer without errors" in at_900.name


def test_unmeasured_target_fails() -> None:
    target = Target("x", math.nan, 2.0, True, "x")

    assert not target.passed
    assert "not measured" in target.describe()


def test_markdown_and_plot(tmp_path: Path) -> None:
    rows = [
        _row("muse", "closed", events_per_s=1000.0, achieved_rps=1000.0),
        _row("fastapi", "closed", events_per_s=500.0, achieved_rps=500.0),
        _row("muse", "open", offered_rps=200.0, p99_ms=2.0),
        _row("fastapi", "open", offered_rps=200.0, p99_ms=3.0, errors=1),
        _row("muse", "open", offered_rps=500.0, p99_ms=2.5),
    ]

    document = markdown(rows, evaluate_targets(rows, [200.0]), ["- run: test"])
    png = plot_latency(rows, tmp_path / "latency.png")

    assert "| fastapi | 1 | 16 | 500 | 500 | 0.50x |" in document
    assert "| 1.50x | 1 |" in document  # fastapi p99 vs MUSE at 200/s
    assert "FAIL  single-event events/s, MUSE / MLServer: not measured" in document
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- workload encodings -----------------------------------------------------------


def _workload(rows: int = 8) -> Workload:
    names = ("A", "B")
    X = np.arange(rows * 2, dtype=np.float64).reshape(rows, 2) / 4
    X[1, 1] = math.nan
    ids = tuple(f"e{i}" for i in range(rows))
    return Workload(names, ids, X, X, np.zeros(rows, dtype=np.int8), "test")


def test_request_set_muse_body_and_headers() -> None:
    requests = request_set("muse", _workload(), 2, key="k1", intent="fraud")

    assert requests.path == "/v1/score"
    assert requests.headers["Authorization"] == "Bearer k1"
    assert len(requests.bodies) == 4
    body = msgpack.unpackb(requests.bodies[0])
    assert body == {
        "intent": "fraud",
        "events": [
            {"id": "e0", "features": {"A": 0.0, "B": 0.25}},
            {"id": "e1", "features": {"A": 0.5}},  # NaN left out: missing
        ],
    }


def test_request_set_v2_rejects_missing_values() -> None:
    with pytest.raises(ValueError, match="cannot carry missing"):
        request_set("v2", _workload(), 2)


def test_request_set_v2_shape_and_scores() -> None:
    workload = _workload()
    workload.X[1, 1] = 1.0

    body = json.loads(request_set("v2", workload, 4, model_name="m").bodies[1])
    answer = json.dumps({"outputs": [{"name": "predict", "data": [0.25, 0.5]}]})

    assert body["inputs"][0]["shape"] == [4, 2]
    assert body["inputs"][0]["data"][:2] == [2.0, 2.25]
    assert scores_from_body("v2", answer.encode()) == [0.25, 0.5]


def test_request_set_unknown_wire() -> None:
    with pytest.raises(ValueError, match="unknown wire format 'grpc'"):
        request_set("grpc", _workload(), 1)


# -- the load generator against a trivial server --------------------------------------


@dataclass
class TrivialServer:
    """HTTP/1.1 keep-alive server answering every request; counts them.

    ``fail_every``: every n-th request gets a 503.  ``close_every``: the
    connection is dropped instead of answering every n-th request.
    """

    fail_every: int = 0
    close_every: int = 0
    received: int = 0
    answered: int = 0
    port: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                with self._lock:
                    self.received += 1
                    n = self.received
                if self.close_every and n % self.close_every == 0:
                    break
                status = (
                    b"503 Busy"
                    if self.fail_every and n % self.fail_every == 0
                    else b"200 OK"
                )
                # Counted before writing: once written, the client may finish
                # and the test read the count before this thread runs again.
                with self._lock:
                    self.answered += 1
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


@pytest.fixture
def trivial() -> Iterator[TrivialServer]:
    server = TrivialServer()
    yield from _serve(server)


def _serve(server: TrivialServer) -> Iterator[TrivialServer]:
    """Run the server on its own event loop in a thread while the test runs."""
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def main() -> None:
        listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        server.port = listener.sockets[0].getsockname()[1]
        ready.set()
        await stop.wait()
        listener.close()

    thread = threading.Thread(
        target=loop.run_until_complete, args=(main(),), daemon=True
    )
    thread.start()
    assert ready.wait(5)
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(5)
        loop.close()


def _spec(server: TrivialServer, **options: object) -> LoadSpec:
    endpoint = Endpoint("127.0.0.1", server.port)
    requests = tuple(
        encode_request("POST", endpoint, "/x", b"b" * n) for n in (1, 10, 100)
    )
    return LoadSpec(endpoint, requests, 1, **options)  # type: ignore[arg-type]


def test_closed_loop_counts_every_request(trivial: TrivialServer) -> None:
    result = run_load_here(_spec(trivial, connections=4, duration_s=0.3))

    assert result.ok > 5
    assert result.errors == 0
    assert result.ok == trivial.received == trivial.answered
    assert result.histogram.get_total_count() == result.ok
    assert result.statuses == {200: result.ok}
    assert result.elapsed_s >= 0.3


def test_open_loop_sends_exactly_the_schedule(trivial: TrivialServer) -> None:
    result = run_load_here(_spec(trivial, connections=4, duration_s=0.5, rate_rps=200))

    assert result.ok == 100 == trivial.received
    assert result.errors == 0
    # The last request is due at 0.495 s: the run cannot end before it.
    assert result.elapsed_s >= 0.495


def test_open_loop_counts_non_2xx_as_errors() -> None:
    for server in _serve(TrivialServer(fail_every=4)):
        result = run_load_here(
            _spec(server, connections=2, duration_s=0.2, rate_rps=200)
        )

        assert (result.ok, result.errors) == (30, 10)
        assert result.statuses == {200: 30, 503: 10}
        assert result.histogram.get_total_count() == 30


def test_dropped_connections_count_as_errors_and_reconnect() -> None:
    for server in _serve(TrivialServer(close_every=5)):
        result = run_load_here(
            _spec(server, connections=2, duration_s=0.2, rate_rps=200)
        )

        assert result.ok + result.errors == 40 == server.received
        assert result.errors == 8
        assert result.ok == server.answered


def test_connection_refused_is_an_error() -> None:
    server = TrivialServer(port=1)  # nothing listens on port 1

    with pytest.raises(OSError):
        run_load_here(_spec(server, connections=1, duration_s=0.1))


def test_run_load_in_two_processes_merges(trivial: TrivialServer) -> None:
    result = run_load(
        _spec(trivial, connections=4, duration_s=0.5, rate_rps=100), processes=2
    )

    assert result.ok == 50 == trivial.received
    assert result.errors == 0
    assert result.loadgen_cpu_s > 0


def test_run_load_reports_child_failure() -> None:
    spec = _spec(TrivialServer(port=1), connections=1, duration_s=0.1)

    with pytest.raises(RuntimeError, match="load generator failed: .*Error"):
        run_load(spec)


def test_new_histogram_range() -> None:
    histogram = new_histogram()

    assert histogram.record_value(60_000_000)
    assert not histogram.record_value(120_000_000)


# -- real data and peer templates ---------------------------------------------------


@pytest.mark.realdata
def test_workload_from_real_data(data_path: Path) -> None:
    workload = load_workload(data_path, n_events=128, n_train=1000)

    assert workload.X.shape == (128, 15)
    assert workload.train_X.shape == (1000, 15)
    assert workload.feature_names[0] == "TX_AMOUNT"
    assert workload.ids[0].startswith("tx-")
    assert set(np.unique(workload.train_y)) <= {0, 1}


def test_mlserver_settings_template(tmp_path: Path) -> None:
    ports = {"http_port": 18080, "grpc_port": 18081, "metrics_port": 18082}

    _write_template("settings.json", tmp_path / "settings.json", ports)
    _write_template("model-settings.json", tmp_path / "m.json", {"model_name": "m1"})

    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings == {"host": "127.0.0.1", **ports}
    model = json.loads((tmp_path / "m.json").read_text())
    assert model["name"] == "m1"
    assert model["implementation"] == "mlserver_xgboost.XGBoostModel"
