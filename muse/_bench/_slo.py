"""Service-level objectives read from a small TOML file, checked against runs.

A file holds one objective as top-level keys, or several as ``[[slo]]``
tables.  Each says how to load the server and which limits must hold::

    [[slo]]
    name = "steady 500/s"
    rate = 500          # open loop, requests/s; leave out for closed loop
    batch = 1           # events per request
    duration_s = 10
    p99_ms = 5.0
    p999_ms = 20.0
    errors = 0

Limits are upper bounds (``p50_ms``, ``p90_ms``, ``p99_ms``, ``p999_ms``,
``max_ms``, ``errors``, ``error_rate``) or lower bounds (``min_rps``,
``min_events_per_s``).  Parsing is strict: an unknown key or a wrong type is
an error naming the objective and the key, because a misspelt limit that is
silently ignored is an SLO that always passes.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from muse._bench._loadgen import LoadResult

__all__ = ["SLO", "SLOFileError", "Verdict", "evaluate", "load_slos", "parse_slos"]

# Open loop needs enough connections that a few slow answers do not leave
# due requests waiting for a free one; closed loop uses the suite's figure.
DEFAULT_OPEN_CONNECTIONS = 32
DEFAULT_CLOSED_CONNECTIONS = 16
DEFAULT_DURATION_S = 10.0

# limit key -> (measured metric, True when the limit is an upper bound).
LIMITS: dict[str, tuple[str, bool]] = {
    "p50_ms": ("p50_ms", True),
    "p90_ms": ("p90_ms", True),
    "p99_ms": ("p99_ms", True),
    "p999_ms": ("p999_ms", True),
    "max_ms": ("max_ms", True),
    "errors": ("errors", True),
    "error_rate": ("error_rate", True),
    "min_rps": ("achieved_rps", False),
    "min_events_per_s": ("events_per_s", False),
}
_LOAD_KEYS = {"name", "rate", "batch", "duration_s", "connections"}


class SLOFileError(ValueError):
    """The SLO file is not valid TOML or names an unknown key or bad value."""


@dataclass(frozen=True)
class SLO:
    """One objective: a load to apply and the limits its result must meet.

    Attributes:
        name: label in the report.
        rate: open-loop offered rate (requests/s), or None for closed loop.
        batch: events per request.
        duration_s: length of the run.
        connections: client connections.
        limits: limit key (see ``LIMITS``) -> bound.
    """

    name: str
    rate: float | None
    batch: int
    duration_s: float
    connections: int
    limits: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """One limit checked against one measurement.

    Attributes:
        slo: the objective's name.
        limit: limit key, e.g. "p99_ms".
        bound: the limit's value.
        measured: what the run measured.
        passed: whether the limit held.
    """

    slo: str
    limit: str
    bound: float
    measured: float
    passed: bool

    def describe(self) -> str:
        """A one-line report, e.g. ``PASS steady: p99_ms 3.2 <= 5``."""
        sign = "<=" if LIMITS[self.limit][1] else ">="
        word = "PASS" if self.passed else "FAIL"
        return (
            f"{word} {self.slo}: {self.limit} {self.measured:.6g} {sign} {self.bound:g}"
        )


def load_slos(path: Path) -> list[SLO]:
    """Read and check an SLO file.

    Args:
        path: the TOML file.

    Returns:
        Its objectives, in file order.

    Raises:
        SLOFileError: unreadable, invalid TOML, or an invalid objective.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise SLOFileError(f"cannot read SLO file {path}: {exc}") from exc
    return parse_slos(text, str(path))


def parse_slos(text: str, origin: str = "<string>") -> list[SLO]:
    """Parse SLO TOML text.

    Args:
        text: the TOML document.
        origin: file name for messages.

    Returns:
        The objectives, in document order.

    Raises:
        SLOFileError: invalid TOML, no objective, or an invalid objective.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SLOFileError(f"{origin} is not valid TOML: {exc}") from exc
    tables = document.get("slo", [document] if document else [])
    if not isinstance(tables, list) or not tables:
        raise SLOFileError(f"{origin} defines no objective (expected [[slo]] tables)")
    return [_parse_one(table, i, origin) for i, table in enumerate(tables)]


def _parse_one(table: dict[str, Any], index: int, origin: str) -> SLO:
    name = str(table.get("name", f"slo-{index + 1}"))
    where = f"{origin}: objective {name!r}"
    unknown = set(table) - _LOAD_KEYS - set(LIMITS)
    if unknown:
        raise SLOFileError(
            f"{where}: unknown key(s) {sorted(unknown)}; "
            f"limits are {sorted(LIMITS)}, load keys {sorted(_LOAD_KEYS)}"
        )
    limits = {k: _number(table[k], k, where) for k in LIMITS if k in table}
    if not limits:
        raise SLOFileError(f"{where}: sets no limit (one of {sorted(LIMITS)})")
    rate = _number(table["rate"], "rate", where) if "rate" in table else None
    if rate is not None and rate <= 0:
        raise SLOFileError(f"{where}: rate must be > 0, got {rate:g}")
    default_connections = (
        DEFAULT_CLOSED_CONNECTIONS if rate is None else DEFAULT_OPEN_CONNECTIONS
    )
    return SLO(
        name=name,
        rate=rate,
        batch=_positive_int(table.get("batch", 1), "batch", where),
        duration_s=_number(
            table.get("duration_s", DEFAULT_DURATION_S), "duration_s", where
        ),
        connections=_positive_int(
            table.get("connections", default_connections), "connections", where
        ),
        limits=limits,
    )


def _number(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SLOFileError(f"{where}: {key} must be a number, got {value!r}")
    if math.isnan(value) or value < 0:
        raise SLOFileError(f"{where}: {key} must be >= 0, got {value!r}")
    return float(value)


def _positive_int(value: Any, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SLOFileError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def measurements(result: LoadResult) -> dict[str, float]:
    """The figures limits are checked against.

    Args:
        result: a load run.

    Returns:
        Metric name -> value (latencies in ms).
    """
    sent = result.ok + result.errors
    return {
        "p50_ms": result.percentile_ms(50),
        "p90_ms": result.percentile_ms(90),
        "p99_ms": result.percentile_ms(99),
        "p999_ms": result.percentile_ms(99.9),
        "max_ms": result.histogram.get_max_value() / 1000.0,
        "errors": float(result.errors),
        "error_rate": result.errors / sent if sent else 0.0,
        "achieved_rps": result.achieved_rps,
        "events_per_s": result.events_per_s,
    }


def evaluate(slo: SLO, result: LoadResult) -> list[Verdict]:
    """Check every limit of an objective against a run.

    A latency that could not be measured (no successful answer) fails.

    Args:
        slo: the objective.
        result: the run made for it.

    Returns:
        One verdict per limit, in ``LIMITS`` order.
    """
    measured = measurements(result)
    verdicts = []
    for key in (k for k in LIMITS if k in slo.limits):
        metric, upper = LIMITS[key]
        value, bound = measured[metric], slo.limits[key]
        passed = (value <= bound if upper else value >= bound) and not math.isnan(value)
        verdicts.append(Verdict(slo.name, key, bound, value, passed))
    return verdicts
