"""``muse bench``: measure one server, check SLOs, or run the comparison suite.

Three ways to run:

- ``muse bench --url URL --key KEY`` loads a running server;
- ``muse bench --registry DIR`` starts ``python -m muse serve`` on DIR (on
  an empty registry it installs the bench model first); with neither, a
  temporary registry is used;
- ``muse bench --compare --out DIR`` runs the whole suite against MLServer
  and FastAPI (see ``_suite``).

With ``--slo FILE`` the objectives in FILE are run and checked, and the exit
status is 1 when one fails.  Exit status 2 means the bench itself could not
run (bad arguments, a server that would not start).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

from muse._bench import _report
from muse._bench._http1 import parse_url
from muse._bench._muse import calibrate, prepare, start_muse
from muse._bench._peers import default_cache
from muse._bench._slo import SLO, SLOFileError, Verdict, evaluate, load_slos
from muse._bench._suite import (
    Subject,
    SuiteOptions,
    make_subject,
    measure,
    prepare_model,
    run_compare,
)
from muse._bench._workload import Workload, load_workload

__all__ = ["bench_main"]

log = logging.getLogger("muse.bench")

EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2
# As a shell reports a command killed by SIGINT.
EXIT_INTERRUPTED = 130


def _numbers(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def _integers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="muse bench",
        description="Latency and throughput of MUSE, SLO checks, and the comparison "
        "with MLServer and FastAPI.",
    )
    target = parser.add_argument_group("target (default: a temporary registry)")
    target.add_argument("--url", help="running MUSE server, e.g. http://127.0.0.1:8000")
    target.add_argument("--key", help="tenant bearer key for --url")
    target.add_argument("--registry", type=Path, help="start `muse serve` on DIR")
    target.add_argument("--intent", default="card-fraud", help="intent to score")
    load = parser.add_argument_group("load")
    load.add_argument(
        "--data", type=Path, help="transactions parquet (default: synthetic)"
    )
    load.add_argument("--batch", type=_integers, default=[1, 64], help="e.g. 1,64")
    load.add_argument(
        "--rate", type=_numbers, default=[], help="open-loop req/s, e.g. 200,500"
    )
    load.add_argument(
        "--connections", type=int, default=None, help="client connections"
    )
    load.add_argument("--duration", type=float, default=None, help="seconds per run")
    load.add_argument(
        "--processes", type=int, default=1, help="load-generator processes"
    )
    load.add_argument("--slo", type=Path, help="TOML objectives; exit 1 if one fails")
    suite = parser.add_argument_group("comparison suite")
    suite.add_argument("--compare", action="store_true", help="run the whole suite")
    suite.add_argument(
        "--out", type=Path, help="output directory (required with --compare)"
    )
    suite.add_argument(
        "--servers", default="muse,mlserver,fastapi", help="servers to compare"
    )
    suite.add_argument("--passes", type=int, default=3, help="passes per measurement")
    suite.add_argument("--quick", action="store_true", help="1 short pass (smoke test)")
    suite.add_argument(
        "--venv-cache", type=Path, default=None, help="peer venv directory"
    )
    suite.add_argument(
        "--peer-threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS for the peers' XGBoost (0: its default)",
    )
    suite.add_argument(
        "--fail-on-target", action="store_true", help="exit 1 when a target fails"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    return parser


def bench_main(argv: Sequence[str]) -> int:
    """Entry point of ``muse bench``.

    Args:
        argv: arguments after ``bench``.

    Returns:
        0 when everything ran (and every SLO held), 1 when an SLO (or, with
        ``--fail-on-target``, a target) failed, 2 when the bench could not
        run, 130 when interrupted (Ctrl-C).
    """
    parser = _parser()
    args = parser.parse_args(list(argv))
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.url and not args.key:
        parser.error("--url needs --key (a tenant's bearer key)")
    if args.compare and not args.out:
        parser.error("--compare needs --out DIR")
    with _terminate_as_exit():
        try:
            if args.compare:
                return _compare(args)
            return _single(args)
        except (SLOFileError, RuntimeError, OSError) as exc:
            print(f"muse bench: {exc}", file=sys.stderr)
            return EXIT_ERROR
        except KeyboardInterrupt:
            # Servers and load generators were stopped on the way out.
            print("muse bench: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED


@contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit, so servers we started are stopped."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _compare(args: argparse.Namespace) -> int:
    options = SuiteOptions(
        out=args.out,
        data=args.data,
        servers=tuple(s for s in args.servers.split(",") if s),
        passes=args.passes,
        batches=tuple(args.batch),
        processes=args.processes,
        peer_threads=args.peer_threads or None,
        cache=args.venv_cache or default_cache(),
        intent=args.intent,
    )
    if args.rate:
        options = replace(options, open_rates=tuple(args.rate))
    if args.duration:
        options = replace(options, duration_s=args.duration)
    if args.quick:
        options = replace(
            options,
            passes=1,
            duration_s=min(options.duration_s, 3.0),
            warmup_s=1.0,
            scaling_connections=(1, 16),
            scaling_duration_s=2.0,
        )
    targets = run_compare(options)
    print("\n".join(t.describe() for t in targets))
    if args.fail_on_target and not all(t.passed for t in targets):
        return EXIT_FAILED
    return EXIT_OK


def _single(args: argparse.Namespace) -> int:
    slos = load_slos(args.slo) if args.slo else []
    workload = load_workload(args.data)
    batches = sorted({*args.batch, *(s.batch for s in slos)})
    with ExitStack() as stack:
        subject = _target(args, workload, batches, stack)
        if slos:
            return _check_slos(subject, slos, args)
        _plain_runs(subject, args)
    return EXIT_OK


def _target(
    args: argparse.Namespace, workload: Workload, batches: list[int], stack: ExitStack
) -> Subject:
    """The server to load: --url, or a server we start on a registry."""
    if args.url:
        endpoint = parse_url(args.url)
        return make_subject(
            "target",
            endpoint,
            "muse",
            workload,
            key=args.key,
            intent=args.intent,
            batches=batches,
        )
    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="muse-bench-")))
    registry = args.registry or work / "registry"
    out = args.out or work
    server = stack.enter_context(start_muse(registry, out))
    admin_key = (registry / "admin.key").read_text().strip()
    _, key = prepare(
        server.endpoint,
        admin_key,
        lambda: prepare_model(workload, out),
        workload.feature_names,
        args.intent,
    )
    server.wait_ready("/readyz")
    events = tuple(workload.events(0, min(len(workload.ids), 4096)))
    calibrate(server.endpoint, admin_key, key, args.intent, events)
    return make_subject(
        "muse",
        server.endpoint,
        "muse",
        workload,
        key=key,
        intent=args.intent,
        batches=batches,
        server=server,
    )


def _check_slos(subject: Subject, slos: Sequence[SLO], args: argparse.Namespace) -> int:
    verdicts: list[Verdict] = []
    for slo in slos:
        _, result = measure(
            subject,
            slo.batch,
            slo.connections,
            slo.duration_s,
            slo.rate,
            args.processes,
        )
        verdicts += evaluate(slo, result)
    for verdict in verdicts:
        print(verdict.describe())
    failed = [v for v in verdicts if not v.passed]
    if failed:
        print(f"{len(failed)} of {len(verdicts)} SLO checks failed", file=sys.stderr)
        return EXIT_FAILED
    print(f"all {len(verdicts)} SLO checks passed")
    return EXIT_OK


def _plain_runs(subject: Subject, args: argparse.Namespace) -> None:
    """Closed loop per batch size, then open loop per rate; print the tables."""
    duration = args.duration or 5.0
    rows: list[dict[str, Any]] = []
    for batch in args.batch:
        connections = args.connections or 16
        row, _ = measure(
            subject, batch, connections, duration, processes=args.processes
        )
        rows.append(row)
    for rate in args.rate:
        connections = args.connections or 32
        row, _ = measure(subject, 1, connections, duration, rate, args.processes)
        rows.append(row)
    header = [f"- target: {subject.endpoint.url} ({subject.name})"]
    print(_report.markdown(rows, [], header))
