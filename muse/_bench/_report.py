"""Turn bench measurements into rows, medians, targets, a table and a plot.

A *row* is a plain dict (it goes to ``results.json`` as is) with at least
``server, batch, mode, offered_rps, achieved_rps, events_per_s, p50_ms,
p99_ms, p999_ms, errors``; also ``connections``, the CPU the load generator
and the server used (in cores), and ``passes``.  Modes: ``closed`` (maximum
throughput), ``open`` (fixed offered rate), ``scaling`` (closed loop at
several connection counts) and ``embedded`` (engine without HTTP).

Every comparison is a ratio to MUSE measured in the same run; the targets
of the issue are checked here and printed with PASS/FAIL and the ratio,
whatever it is.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muse._bench._loadgen import LoadResult

__all__ = [
    "Target",
    "evaluate_targets",
    "markdown",
    "median_rows",
    "plot_latency",
    "row_from_result",
]

Row = dict[str, Any]

# Figures a row's median is taken over; errors are summed instead, so that
# an error in any pass shows.
_MEDIAN_FIELDS = (
    "achieved_rps",
    "events_per_s",
    "p50_ms",
    "p99_ms",
    "p999_ms",
    "loadgen_cpu",
    "server_cpu",
    "other_cpu",
)
_KEY_FIELDS = ("server", "mode", "batch", "connections", "offered_rps")
# The targets.
SINGLE_VS_MLSERVER = 2.0
SINGLE_VS_FASTAPI = 1.0
BATCH_EVENTS_PER_S = 70_000.0
BATCH_VS_MLSERVER = 2.0
EMBEDDED_EVENTS_PER_S = 50_000.0


def row_from_result(
    server: str, mode: str, result: LoadResult, server_cpu: float, machine_cpu: float
) -> Row:
    """One pass of one measurement as a row.

    Args:
        server: "muse", "mlserver", "fastapi", ...
        mode: "closed", "open" or "scaling".
        result: the load run.
        server_cpu: cores the server used on average during the run.
        machine_cpu: cores busy machine-wide on average during the run; what
            neither the server nor the load generator used went to others.

    Returns:
        The row (one pass).
    """
    spec = result.spec
    return {
        "server": server,
        "mode": mode,
        "batch": spec.events_per_request,
        "connections": spec.connections,
        "offered_rps": spec.rate_rps,
        "achieved_rps": result.achieved_rps,
        "events_per_s": result.events_per_s,
        "p50_ms": result.percentile_ms(50),
        "p99_ms": result.percentile_ms(99),
        "p999_ms": result.percentile_ms(99.9),
        "errors": result.errors,
        "loadgen_cpu": result.loadgen_cpu_share,
        "server_cpu": server_cpu,
        "other_cpu": _other(machine_cpu, server_cpu, result.loadgen_cpu_share),
        # Answers by status code, so errors can be told apart (503 shed, 504
        # past deadline...); failed connections have no status and are only
        # in ``errors``.
        "statuses": {str(code): n for code, n in sorted(result.statuses.items())},
        "passes": 1,
    }


def _other(machine: float, server: float, loadgen: float) -> float:
    """Cores used by neither the server nor the load generator (NaN unknown)."""
    other = machine - server - loadgen
    # Sampling the counters at slightly different moments can dip below 0.
    return other if math.isnan(other) else max(0.0, other)


def median_rows(rows: Iterable[Row]) -> list[Row]:
    """Collapse passes of the same measurement into one row of medians.

    Args:
        rows: single-pass rows.

    Returns:
        One row per (server, mode, batch, connections, offered_rps), in first
        seen order; ``errors`` is the sum over passes, ``passes`` the count,
        ``pass_events_per_s`` the per-pass throughputs.
    """
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in _KEY_FIELDS), []).append(row)
    merged = []
    for group in groups.values():
        row = dict(group[0])
        for name in _MEDIAN_FIELDS:
            values = [r[name] for r in group if not _is_nan(r[name])]
            row[name] = statistics.median(values) if values else math.nan
        row["errors"] = sum(r["errors"] for r in group)
        row["statuses"] = _summed(r.get("statuses", {}) for r in group)
        row["passes"] = len(group)
        row["pass_events_per_s"] = [r["events_per_s"] for r in group]
        merged.append(row)
    return merged


def _summed(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for count in counts:
        for key, n in count.items():
            total[key] = total.get(key, 0) + n
    return total


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _find(rows: Sequence[Row], server: str, mode: str, **where: Any) -> Row | None:
    for row in rows:
        same = row["server"] == server and row["mode"] == mode
        if same and all(row.get(k) == v for k, v in where.items()):
            return row
    return None


@dataclass(frozen=True)
class Target:
    """One target of the issue, checked.

    Attributes:
        name: what is compared.
        measured: the ratio or figure; NaN when it could not be measured.
        goal: the threshold.
        higher_is_better: True for ">= goal", False for "<= goal".
        unit: "x" for ratios, else the figure's unit.
        note: why the figure alone does not decide, e.g. errors; printed.
        verdict: the decision when the figure alone cannot make it (set
            together with ``note``), else None.
    """

    name: str
    measured: float
    goal: float
    higher_is_better: bool
    unit: str
    note: str = ""
    verdict: bool | None = None

    @property
    def passed(self) -> bool:
        """Whether it was met; an unmeasured target fails."""
        if self.verdict is not None:
            return self.verdict
        if math.isnan(self.measured):
            return False
        if self.higher_is_better:
            return self.measured >= self.goal
        return self.measured <= self.goal

    def describe(self) -> str:
        """E.g. ``PASS single-event req/s, MUSE / MLServer: 4.10x (target >= 2x)``."""
        word = "PASS" if self.passed else "FAIL"
        sign = ">=" if self.higher_is_better else "<="
        figure = (
            "not measured"
            if math.isnan(self.measured)
            else _figure(self.measured, self.unit)
        )
        goal = _figure(self.goal, self.unit)
        note = f"; {self.note}" if self.note else ""
        return f"{word}  {self.name}: {figure} (target {sign} {goal}){note}"


def _figure(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:,.0f} {unit}"


def _ratio(numerator: Row | None, denominator: Row | None, field: str) -> float:
    if numerator is None or denominator is None:
        return math.nan
    bottom = denominator[field]
    return numerator[field] / bottom if bottom else math.nan


def evaluate_targets(rows: Sequence[Row], open_rates: Sequence[float]) -> list[Target]:
    """Check the issue's targets on median rows.

    Args:
        rows: median rows of one run.
        open_rates: the open-loop rates measured.

    Returns:
        The targets in the issue's order.
    """
    muse1 = _find(rows, "muse", "closed", batch=1)
    muse64 = _find(rows, "muse", "closed", batch=64)
    targets = [
        Target(
            "single-event events/s, MUSE / MLServer",
            _ratio(muse1, _find(rows, "mlserver", "closed", batch=1), "events_per_s"),
            SINGLE_VS_MLSERVER,
            True,
            "x",
        ),
        Target(
            "single-event events/s, MUSE / FastAPI",
            _ratio(muse1, _find(rows, "fastapi", "closed", batch=1), "events_per_s"),
            SINGLE_VS_FASTAPI,
            True,
            "x",
        ),
        Target(
            "64-event requests, MUSE events/s",
            muse64["events_per_s"] if muse64 else math.nan,
            BATCH_EVENTS_PER_S,
            True,
            "events/s",
        ),
        Target(
            "64-event events/s, MUSE / MLServer",
            _ratio(muse64, _find(rows, "mlserver", "closed", batch=64), "events_per_s"),
            BATCH_VS_MLSERVER,
            True,
            "x",
        ),
    ]
    for rate in open_rates:
        targets.extend(_open_targets(rows, rate))
    embedded = _find(rows, "muse-embedded", "embedded")
    targets.append(
        Target(
            "embedded engine, single events from 64 tasks",
            embedded["events_per_s"] if embedded else math.nan,
            EMBEDDED_EVENTS_PER_S,
            True,
            "events/s",
        )
    )
    return targets


def _open_targets(rows: Sequence[Row], rate: float) -> list[Target]:
    """MUSE's p50 and p99 at a rate over the best peer's (<= 1.0 passes).

    A server that failed requests at a rate did not sustain it: a peer with
    errors cannot be the best peer there, and MUSE with errors fails (its
    percentiles leave the failed requests out).
    """
    muse = _find(rows, "muse", "open", offered_rps=rate)
    peers = [
        r
        for r in rows
        if r["mode"] == "open"
        and r["offered_rps"] == rate
        and r["server"] != "muse"
        and r["errors"] == 0
    ]
    targets = []
    for field in ("p50_ms", "p99_ms"):
        best = min(peers, key=lambda r: r[field], default=None)
        label = best["server"] if best else "no peer without errors"
        name = f"open loop {rate:g}/s {field[:-3]}, MUSE / best peer ({label})"
        note, verdict = _open_verdict(muse, best)
        targets.append(
            Target(name, _ratio(muse, best, field), 1.0, False, "x", note, verdict)
        )
    return targets


def _open_verdict(muse: Row | None, best: Row | None) -> tuple[str, bool | None]:
    """A note and forced verdict where errors decide an open-loop target."""
    if muse is not None and muse["errors"]:
        return f"MUSE failed {muse['errors']} requests at this rate", False
    if muse is not None and best is None:
        return "every peer failed requests at this rate, MUSE none", True
    return "", None


def _ms(value: float) -> str:
    return "-" if _is_nan(value) else f"{value:.2f}"


def _cores(row: Row, field: str) -> str:
    value = row.get(field, math.nan)
    return "-" if _is_nan(value) else f"{value:.2f}"


def _versus(row: Row, base: Row | None, field: str) -> str:
    ratio = _ratio(row, base, field)
    return "-" if math.isnan(ratio) else f"{ratio:.2f}x"


def markdown(
    rows: Sequence[Row], targets: Sequence[Target], header: Sequence[str]
) -> str:
    """The run as Markdown: tables per mode, ratios to MUSE, then targets.

    Args:
        rows: median rows.
        targets: checked targets.
        header: lines describing the run (workload, model, machine...).

    Returns:
        The document.
    """
    lines = ["# MUSE bench", "", *header, ""]
    lines += _closed_table(rows, "closed", "Maximum throughput (closed loop)")
    lines += _open_table(rows)
    lines += _closed_table(
        rows, "scaling", "Scaling with connections (closed loop, single events)"
    )
    embedded = [r for r in rows if r["mode"] == "embedded"]
    if embedded:
        lines += ["## Embedded engine (no HTTP)", ""]
        for row in embedded:
            lines.append(
                f"- {row['connections']} tasks, batch {row['batch']}: "
                f"{row['events_per_s']:,.0f} events/s, p50 {_ms(row['p50_ms'])} ms, "
                f"p99 {_ms(row['p99_ms'])} ms, {row['server_cpu']:.2f} cores"
            )
        lines.append("")
    if targets:
        lines += ["## Targets", ""]
        lines += [f"- {t.describe()}" for t in targets]
        lines.append("")
    return "\n".join(lines)


def _closed_table(rows: Sequence[Row], mode: str, title: str) -> list[str]:
    chosen = [r for r in rows if r["mode"] == mode]
    if not chosen:
        return []
    lines = [
        f"## {title}",
        "",
        (
            "| server | batch | conns | req/s | events/s | vs MUSE | p50 ms | p99 ms "
            "| p99.9 ms | errors | loadgen cores | server cores | other cores |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in chosen:
        base = _find(
            rows, "muse", mode, batch=row["batch"], connections=row["connections"]
        )
        lines.append(
            f"| {row['server']} | {row['batch']} | {row['connections']} "
            f"| {row['achieved_rps']:,.0f} | {row['events_per_s']:,.0f} "
            f"| {_versus(row, base, 'events_per_s')} | {_ms(row['p50_ms'])} "
            f"| {_ms(row['p99_ms'])} | {_ms(row['p999_ms'])} | {row['errors']} "
            f"| {_cores(row, 'loadgen_cpu')} | {_cores(row, 'server_cpu')} "
            f"| {_cores(row, 'other_cpu')} |"
        )
    return [*lines, ""]


def _open_table(rows: Sequence[Row]) -> list[str]:
    chosen = [r for r in rows if r["mode"] == "open"]
    if not chosen:
        return []
    lines = [
        "## Latency at fixed offered rates (open loop, single events)",
        "",
        "Latency runs from each request's scheduled send time, so queueing counts.",
        "",
        (
            "| server | offered/s | achieved/s | p50 ms | p99 ms | p99.9 ms "
            "| p50 vs MUSE | p99 vs MUSE | errors | loadgen cores | server cores "
            "| other cores |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in chosen:
        base = _find(rows, "muse", "open", offered_rps=row["offered_rps"])
        lines.append(
            f"| {row['server']} | {row['offered_rps']:g} | {row['achieved_rps']:,.0f} "
            f"| {_ms(row['p50_ms'])} | {_ms(row['p99_ms'])} | {_ms(row['p999_ms'])} "
            f"| {_versus(row, base, 'p50_ms')} | {_versus(row, base, 'p99_ms')} "
            f"| {row['errors']} | {_cores(row, 'loadgen_cpu')} "
            f"| {_cores(row, 'server_cpu')} | {_cores(row, 'other_cpu')} |"
        )
    return [*lines, ""]


def plot_latency(rows: Sequence[Row], path: Path) -> Path | None:
    """Plot p50/p99/p99.9 against offered rate, one line per server.

    Args:
        rows: median rows (the open-loop ones are plotted).
        path: PNG file to write.

    Returns:
        ``path``, or None when there is no open-loop row to plot.
    """
    chosen = [r for r in rows if r["mode"] == "open"]
    if not chosen:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servers = list(dict.fromkeys(r["server"] for r in chosen))
    figure, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharey=True)
    for axis, (field, title) in zip(
        axes, (("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9"))
    ):
        for server in servers:
            points = sorted(
                (r["offered_rps"], r[field], r["errors"])
                for r in chosen
                if r["server"] == server
            )
            xs = [p[0] for p in points]
            line = axis.plot(xs, [p[1] for p in points], marker="o", label=server)[0]
            failed = [(x, y) for x, y, errors in points if errors]
            if failed:
                # Hollow markers: that server failed requests at that rate.
                axis.scatter(
                    *zip(*failed), s=120, facecolors="none", edgecolors=line.get_color()
                )
        axis.set_title(f"{title} latency")
        axis.set_xlabel("offered rate (requests/s)")
        axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms (from scheduled send)")
    axes[0].legend()
    figure.suptitle("Open loop, single events; circled points had errors")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
