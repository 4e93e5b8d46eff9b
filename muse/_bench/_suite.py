"""The comparison suite behind ``muse bench --compare``.

One run, one model file, one set of events, three servers side by side:
MUSE, MLServer (XGBoost runtime, defaults, one worker) and a hand-written
FastAPI endpoint.  All servers stay up for the whole run and passes are
interleaved (pass 1 of every server, then pass 2, ...), so a slow spell on
the shared machine hurts every server alike instead of one.  Steps:

1. load events, train (or reuse) the model, install peer venvs;
2. start every server, check each scores a 64-event batch like XGBoost does;
3. warm up; closed loop at batch 1 and 64 (median of ``passes``); open loop
   at each rate (median of ``passes``); scaling over connection counts;
4. stop the servers; run the embedded engine on MUSE's registry;
5. write ``results.json`` (median rows), ``passes.json`` (every pass),
   ``results.md`` and ``latency.png``, and print the targets.

A server that fails to start or to score is reported and left out; the
others are still measured.
"""

from __future__ import annotations

import dataclasses

import hashlib
import json
import logging
import math
import os
import platform
import shutil
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from muse._bench import _report
from muse._bench._embedded import EmbeddedSpec, run_embedded
from muse._bench._http1 import Endpoint
from muse._bench._loadgen import LoadResult, LoadSpec, new_histogram
from muse._bench._muse import calibrate, prepare, start_muse
from muse._bench._peers import (
    ManagedServer,
    default_cache,
    ensure_venvs,
    machine_busy_seconds,
    start_peer,
)
from muse._bench._workers import run_load
from muse._bench._workload import (
    Workload,
    load_workload,
    request_set,
    scores_from_body,
    train_model,
)

__all__ = [
    "Subject",
    "SuiteOptions",
    "make_subject",
    "measure",
    "prepare_model",
    "run_compare",
]

log = logging.getLogger("muse.bench")

# Scores may differ from XGBoost's own by float32 rounding of the inputs and
# of the tree sums, never by more.
PARITY_TOLERANCE = 1e-5
PARITY_EVENTS = 64


@dataclass(frozen=True)
class SuiteOptions:
    """What ``--compare`` runs; the defaults are the issue's suite.

    Attributes:
        out: output directory.
        data: transactions file, or None for synthetic events.
        servers: servers to compare ("muse", "mlserver", "fastapi").
        passes: passes per measurement (medians are reported).
        duration_s: length of each closed- and open-loop pass.
        warmup_s: unmeasured closed-loop load per server and batch.
        batches: batch sizes for closed loop.
        closed_connections: connections for maximum throughput.
        open_rates: offered rates (requests/s, single events).
        open_connections: connections available to the open-loop schedule.
        scaling_connections: connection counts for the scaling runs.
        scaling_duration_s: length of each scaling run (one pass).
        embedded_tasks: concurrent tasks of the embedded-engine run.
        processes: load-generator processes per run.
        peer_threads: OpenMP threads of the peers' XGBoost (None: its default;
            see ``_peers.start_peer``).
        cache: directory of the peers' venvs.
        intent: scoring intent routed in MUSE.
    """

    out: Path
    data: Path | None = None
    servers: tuple[str, ...] = ("muse", "mlserver", "fastapi")
    passes: int = 3
    duration_s: float = 6.0
    warmup_s: float = 2.0
    batches: tuple[int, ...] = (1, 64)
    closed_connections: int = 16
    open_rates: tuple[float, ...] = (200.0, 500.0, 1000.0)
    open_connections: int = 32
    scaling_connections: tuple[int, ...] = (1, 4, 16, 64)
    scaling_duration_s: float = 4.0
    embedded_tasks: int = 64
    processes: int = 1
    peer_threads: int | None = 1
    cache: Path = field(default_factory=default_cache)
    intent: str = "card-fraud"


@dataclass
class Subject:
    """A server under test and its pre-encoded requests per batch size.

    Attributes:
        name: "muse", "mlserver", "fastapi" (or "target" for --url).
        endpoint: where it listens.
        wire: its request format (see ``_workload.request_set``).
        key: bearer key carried by its requests ("" for none).
        requests: batch size -> encoded requests.
        server: the process, when the bench started it (for its CPU time).
        mapping: MUSE's fitted quantile mapping (``to_dict`` form), which
            the parity check applies to XGBoost's own prediction.
    """

    name: str
    endpoint: Endpoint
    wire: str
    key: str
    requests: dict[int, tuple[bytes, ...]]
    server: ManagedServer | None = None
    mapping: dict[str, Any] | None = None

    def cpu_seconds(self) -> float:
        """Server CPU seconds so far (NaN when the bench did not start it)."""
        return self.server.cpu_seconds() if self.server else math.nan


def measure(
    subject: Subject,
    batch: int,
    connections: int,
    duration_s: float,
    rate: float | None = None,
    processes: int = 1,
    mode: str | None = None,
) -> tuple[dict[str, Any], LoadResult]:
    """One load run against a subject.

    Args:
        subject: the server.
        batch: events per request (must be in ``subject.requests``).
        connections: client connections.
        duration_s: run length.
        rate: open-loop rate, or None for closed loop.
        processes: load-generator processes.
        mode: row mode; defaults to "open" or "closed".

    Returns:
        The single-pass row, and the raw result (for SLO checks).
    """
    spec = LoadSpec(
        subject.endpoint, subject.requests[batch], batch, connections, duration_s, rate
    )
    cpu0, machine0 = subject.cpu_seconds(), machine_busy_seconds()
    result = run_load(spec, processes)
    elapsed = result.elapsed_s
    server_cpu = (subject.cpu_seconds() - cpu0) / elapsed
    machine_cpu = (machine_busy_seconds() - machine0) / elapsed
    row = _report.row_from_result(
        subject.name, mode or spec.mode, result, server_cpu, machine_cpu
    )
    log.info(
        "%s %s batch=%d conns=%d rate=%s: %.0f req/s, p50 %.2f ms, p99 %.2f ms, "
        "%d errors",
        subject.name,
        row["mode"],
        batch,
        connections,
        rate,
        row["achieved_rps"],
        row["p50_ms"],
        row["p99_ms"],
        row["errors"],
    )
    return row, result


def prepare_model(workload: Workload, out: Path) -> Path:
    """Train the suite's model into ``out/model.json``, or reuse it.

    The model is reused when it was trained from the same workload source
    and training rows (recorded beside it), so repeated runs skip training.

    Args:
        workload: events and training rows.
        out: output directory.

    Returns:
        The model file.
    """
    path = out / "model.json"
    stamp = out / "model.stamp"
    digest = hashlib.sha256(workload.train_X.tobytes() + workload.train_y.tobytes())
    signature = f"{workload.source}\n{digest.hexdigest()}\n"
    if path.is_file() and stamp.is_file() and stamp.read_text() == signature:
        return path
    train_model(workload, path)
    stamp.write_text(signature)
    return path


def run_compare(options: SuiteOptions) -> list[_report.Target]:
    """Run the whole suite and write its files.

    Args:
        options: the suite.

    Returns:
        The checked targets.
    """
    out = options.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    workload = load_workload(options.data)
    model = prepare_model(workload, out)
    peers = [s for s in options.servers if s != "muse"]
    venvs = ensure_venvs(peers, options.cache) if peers else {}
    notes: list[str] = []
    rows: list[dict[str, Any]] = []
    embedded: EmbeddedSpec | None = None
    with ExitStack() as stack:
        subjects = []
        for name in options.servers:
            subject, spec = _start_subject(
                name, stack, workload, model, venvs, options, notes
            )
            if subject is not None:
                subjects.append(subject)
            embedded = embedded or spec
        rows += _measure_all(subjects, options)
    if embedded is not None:
        # Like every other figure, the median of ``passes`` runs: one run
        # moved by a tenth between suites on this shared machine.
        for _ in range(options.passes):
            rows += _embedded_rows(embedded, notes)
    medians = _report.median_rows(rows)
    targets = _report.evaluate_targets(medians, options.open_rates)
    header = _header(options, workload, model, notes, time.time() - started)
    _write(out, rows, medians, targets, header)
    return targets


def _start_subject(
    name: str,
    stack: ExitStack,
    workload: Workload,
    model: Path,
    venvs: dict[str, Path],
    options: SuiteOptions,
    notes: list[str],
) -> tuple[Subject | None, EmbeddedSpec | None]:
    """Start one server and check its scores; None (with a note) on failure."""
    try:
        if name == "muse":
            subject, embedded = _start_muse(stack, workload, model, options)
        else:
            server = stack.enter_context(
                start_peer(
                    name,
                    venvs[name],
                    model,
                    options.out.resolve(),
                    options.peer_threads,
                )
            )
            subject = make_subject(
                name,
                server.endpoint,
                server.wire,
                workload,
                batches=options.batches,
                server=server,
            )
            embedded = None
        notes.append(f"{name}: {_check_parity(subject, workload, model)}")
        return subject, embedded
    except Exception as exc:  # noqa: BLE001 - reported; the others still run
        log.error("%s left out: %s", name, exc)
        notes.append(f"{name}: LEFT OUT, {type(exc).__name__}: {exc}")
        return None, None


def _start_muse(
    stack: ExitStack, workload: Workload, model: Path, options: SuiteOptions
) -> tuple[Subject, EmbeddedSpec]:
    registry = options.out.resolve() / "muse-registry"
    # Always a fresh registry: the suite's MUSE serves the suite's model only.
    shutil.rmtree(registry, ignore_errors=True)
    server = stack.enter_context(start_muse(registry, options.out.resolve()))
    admin_key = (registry / "admin.key").read_text().strip()
    tenant, key = prepare(
        server.endpoint,
        admin_key,
        lambda: model,
        workload.feature_names,
        options.intent,
    )
    server.wait_ready("/readyz")
    events = tuple(workload.events(0, min(len(workload.ids), 4096)))
    mapping = calibrate(server.endpoint, admin_key, key, options.intent, events)
    subject = make_subject(
        "muse",
        server.endpoint,
        "muse",
        workload,
        key=key,
        intent=options.intent,
        batches=options.batches,
        server=server,
    )
    subject = dataclasses.replace(subject, mapping=mapping)
    embedded = EmbeddedSpec(
        registry, tenant, options.intent, events, tasks=options.embedded_tasks
    )
    return subject, embedded


def make_subject(
    name: str,
    endpoint: Endpoint,
    wire: str,
    workload: Workload,
    *,
    key: str = "",
    intent: str = "card-fraud",
    batches: Sequence[int] = (1, 64),
    server: ManagedServer | None = None,
) -> Subject:
    """Encode the workload for a server and wrap both as a subject.

    Args:
        name: label in the report.
        endpoint: where the server listens.
        wire: its request format.
        workload: the events.
        key: bearer key (MUSE).
        intent: scoring intent (MUSE).
        batches: batch sizes to encode.
        server: the process, when the bench started it.

    Returns:
        The subject.
    """
    requests = {
        b: request_set(wire, workload, b, key=key, intent=intent).encoded(endpoint)
        for b in sorted(set(batches))
    }
    return Subject(name, endpoint, wire, key, requests, server)


def _check_parity(subject: Subject, workload: Workload, model: Path) -> str:
    """Score one batch and compare with XGBoost's own prediction.

    Returns:
        A one-line note for the report.

    Raises:
        RuntimeError: the server answered non-2xx or scores are off.
    """
    import xgboost

    wire = subject.wire
    body_set = request_set(wire, workload, PARITY_EVENTS, key=subject.key)
    response = httpx.post(
        subject.endpoint.url + body_set.path,
        content=body_set.bodies[0],
        headers=body_set.headers,
        timeout=60,
    )
    if response.status_code >= 300:
        raise RuntimeError(
            f"answered {response.status_code}: {response.content[:300]!r}"
        )
    booster = xgboost.Booster()
    booster.load_model(str(model))
    expected = booster.inplace_predict(workload.X[:PARITY_EVENTS].astype(np.float32))
    what = "XGBoost's"
    if subject.mapping is not None:
        # MUSE serves the full path: posterior correction at beta 1 is the
        # identity, then its fitted mapping, applied here offline.
        from muse import QuantileMapping

        expected = QuantileMapping.from_dict(subject.mapping).apply(expected)
        what = "XGBoost's through MUSE's fitted mapping"
    got = np.asarray(scores_from_body(wire, response.content))
    worst = float(np.max(np.abs(got - expected)))
    if not worst <= PARITY_TOLERANCE:
        raise RuntimeError(f"scores differ from {what} by up to {worst:.3g}")
    return f"scores match {what} within {worst:.1e} on {PARITY_EVENTS} events"


@dataclass(frozen=True)
class _Run:
    """One measurement to make on every subject."""

    batch: int
    connections: int
    duration_s: float
    rate: float | None
    mode: str


def _plan(o: SuiteOptions) -> list[_Run]:
    """Every measured run in order: passes interleaved, then scaling."""
    runs: list[_Run] = []
    for _ in range(o.passes):
        runs += [
            _Run(b, o.closed_connections, o.duration_s, None, "closed")
            for b in o.batches
        ]
        runs += [
            _Run(1, o.open_connections, o.duration_s, r, "open") for r in o.open_rates
        ]
    runs += [
        _Run(1, c, o.scaling_duration_s, None, "scaling") for c in o.scaling_connections
    ]
    return runs


def _measure_all(subjects: Sequence[Subject], o: SuiteOptions) -> list[dict[str, Any]]:
    """Warm every subject up, then make every planned run on each in turn."""
    for subject in subjects:
        for batch in o.batches:
            measure(subject, batch, o.closed_connections, o.warmup_s)
    rows = []
    for run in _plan(o):
        for subject in subjects:
            row, _ = measure(
                subject,
                run.batch,
                run.connections,
                run.duration_s,
                run.rate,
                o.processes,
                run.mode,
            )
            rows.append(row)
    return rows


def _embedded_rows(spec: EmbeddedSpec, notes: list[str]) -> list[dict[str, Any]]:
    """The in-process engine run as a row (none, with a note, if it fails)."""
    from hdrh.histogram import HdrHistogram

    try:
        figures = run_embedded(spec)
    except Exception as exc:  # noqa: BLE001 - reported; HTTP figures stand alone
        log.error("embedded run failed: %s", exc)
        notes.append(f"muse-embedded: FAILED, {exc}")
        return []
    histogram = new_histogram()
    histogram.add(HdrHistogram.decode(figures["histogram"]))
    return [
        {
            "server": "muse-embedded",
            "mode": "embedded",
            "batch": spec.batch,
            "connections": spec.tasks,
            "offered_rps": None,
            "achieved_rps": figures["calls"] / figures["elapsed_s"],
            "events_per_s": figures["events_per_s"],
            "p50_ms": histogram.get_value_at_percentile(50) / 1000.0,
            "p99_ms": histogram.get_value_at_percentile(99) / 1000.0,
            "p999_ms": histogram.get_value_at_percentile(99.9) / 1000.0,
            "errors": figures["errors"],
            "loadgen_cpu": 0.0,
            "server_cpu": figures["cpu_cores"],
            "other_cpu": math.nan,
            "passes": 1,
        }
    ]


def _header(
    options: SuiteOptions,
    workload: Workload,
    model: Path,
    notes: Sequence[str],
    seconds: float,
) -> list[str]:
    digest = hashlib.sha256(model.read_bytes()).hexdigest()[:12]
    return [
        (
            f"- run: {time.strftime('%Y-%m-%d %H:%M:%S')}, {seconds:.0f} s, "
            f"{os.cpu_count()} cores, Python {platform.python_version()}"
        ),
        f"- events: {len(workload.ids)} from {workload.source}",
        (
            f"- model: {model.name} (sha256 {digest}), 200 trees of depth 6, "
            f"{len(workload.feature_names)} features, the same file for every server"
        ),
        (
            f"- passes: {options.passes} x {options.duration_s:g} s (medians; errors "
            f"summed), closed loop {options.closed_connections} connections, open loop "
            f"up to {options.open_connections}, {options.processes} load-generator "
            "process(es)"
        ),
        (
            "- the load generator shares the machine with the servers: its CPU "
            "share is in the 'loadgen cores' column; 'other cores' is CPU used by "
            "processes outside the bench during the run (a busy neighbour)"
        ),
        "- peers' XGBoost OpenMP threads: "
        + (
            "library default"
            if options.peer_threads is None
            else f"OMP_NUM_THREADS={options.peer_threads}"
        ),
        *(f"- {note}" for note in notes),
    ]


def _write(
    out: Path,
    passes: list[dict[str, Any]],
    medians: list[dict[str, Any]],
    targets: Sequence[_report.Target],
    header: Sequence[str],
) -> None:
    (out / "results.json").write_text(json.dumps(_jsonable(medians), indent=1))
    (out / "passes.json").write_text(json.dumps(_jsonable(passes), indent=1))
    document = _report.markdown(medians, targets, header)
    (out / "results.md").write_text(document)
    _report.plot_latency(medians, out / "latency.png")
    print(document)
    print(f"wrote {out / 'results.json'}, results.md, latency.png")


def _jsonable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with NaN as null, since JSON has no NaN."""
    return [
        {
            k: None if isinstance(v, float) and math.isnan(v) else v
            for k, v in row.items()
        }
        for row in rows
    ]
