"""How well served scores keep their promise, measured offline.

Clients keep fixed thresholds on MUSE's score.  The promise is the
reference curve: at each edge, a target share of events scores at or above
it (``DEFAULT_CURVE``: 5 % at or above 0.8, ...).  This module measures
how close served scores come to that promise, week by week and tenant by
tenant, and how a model update would have gone under each way of serving
the new model ("variants").  The label-based metrics the demo reports
(recall at each edge, Brier score, expected calibration error) live in
``muse._label_metrics`` and are re-exported here.

Everything here is numpy over whole arrays; nothing is served.  Operators
reach it through ``muse evaluate`` (``evaluate_main``), which scores a
parquet file of events offline with a registered predictor.

Tables are lists of ``ShareRow`` records: one row per (week, tenant, edge),
with tenant ``"*"`` for all tenants pooled and week None where time is not
split.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from muse._label_metrics import (
    Calibration,
    brier,
    calibration,
    check_lengths,
    expected_calibration_error,
    frauds_caught_at_edges,
    recall_at_edges,
)
from muse._transform import DEFAULT_CURVE, posterior_correction

__all__ = [
    "ALL_TENANTS",
    "TENANT_COUNT",
    "VARIANTS",
    "MappingChoice",
    "Calibration",
    "ScoreMapping",
    "ShareRow",
    "VariantResult",
    "apply_mapping",
    "brier",
    "calibration",
    "evaluate_main",
    "evaluate_mapping",
    "evaluate_variants",
    "expected_calibration_error",
    "format_share_table",
    "frauds_caught_at_edges",
    "median_abs_relative_error",
    "recall_at_edges",
    "relative_errors",
    "share_table",
    "shares_at_edges",
    "tenants_of",
    "variant_scores",
    "weekly_shares",
]

#: The tenant label of rows that pool every tenant.
ALL_TENANTS = "*"

#: Tenants are card issuers derived from customers, the same way everywhere.
TENANT_COUNT = 24

#: The ways of serving after a model update, as ``variant_scores`` names them.
VARIANTS: tuple[str, ...] = (
    "v1 kept",
    "v2 + stale v1 mapping",
    "v2 no mapping",
    "v2 + shadow-fitted mapping",
)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


class ScoreMapping(Protocol):
    """A fitted mapping as evaluated here (``QuantileMapping`` fits)."""

    @property
    def curve(self) -> tuple[tuple[float, float], ...]: ...

    def apply(self, scores: FloatArray) -> FloatArray: ...


#: One mapping for every tenant, or mappings by tenant with ``"*"`` as the
#: fallback for tenants without their own.
MappingChoice = ScoreMapping | Mapping[str, ScoreMapping]


@dataclass(frozen=True)
class ShareRow:
    """Observed share of events at or above one edge, against its target.

    Attributes:
        week: week number from the data's first day; None when not split.
        tenant: the tenant, or ``"*"`` for all tenants pooled.
        edge: the score threshold.
        target: the share the reference curve promises at this edge.
        observed: the share of the ``n`` events scoring at or above it.
        n: events counted.
    """

    week: int | None
    tenant: str
    edge: float
    target: float
    observed: float
    n: int

    @property
    def relative_error(self) -> float:
        """``(observed - target) / target``."""
        return (self.observed - self.target) / self.target


@dataclass(frozen=True)
class VariantResult:
    """How one serving variant kept the curve on the evaluated events.

    Attributes:
        name: one of ``VARIANTS``.
        rows: weekly shares, pooled (tenant ``"*"``) and per tenant.
        mare: median absolute relative error over pooled rows (every
            edge and summary week).
        mare_tenant_week: the same over per-tenant rows; NaN when no
            tenants were given.
    """

    name: str
    rows: tuple[ShareRow, ...]
    mare: float
    mare_tenant_week: float


# -- shares against the curve -------------------------------------------------


def shares_at_edges(scores: npt.ArrayLike, edges: Iterable[float]) -> FloatArray:
    """Share of scores at or above each edge.

    Args:
        scores: served scores.
        edges: thresholds; a curve mapping works too (its keys are used).

    Returns:
        One share per edge, in the order given; NaN for every edge when
        there are no scores.
    """
    values = np.asarray(scores, dtype=np.float64)
    thresholds = np.asarray(list(edges), dtype=np.float64)
    if values.size == 0:
        return np.full(thresholds.size, np.nan)
    ordered = np.sort(values)
    below = np.searchsorted(ordered, thresholds, side="left")
    return (values.size - below) / values.size


def relative_errors(observed: npt.ArrayLike, target: npt.ArrayLike) -> FloatArray:
    """``(observed - target) / target``, element by element.

    Args:
        observed: observed shares.
        target: target shares (nonzero).

    Returns:
        The relative errors, broadcast as numpy does.
    """
    goal = np.asarray(target, dtype=np.float64)
    return (np.asarray(observed, dtype=np.float64) - goal) / goal


def share_table(
    scores: npt.ArrayLike,
    curve: Mapping[float, float] | Iterable[tuple[float, float]],
    tenants: npt.ArrayLike | None = None,
) -> list[ShareRow]:
    """Shares at each edge of a curve, pooled and per tenant, time unsplit.

    Args:
        scores: served (mapped) scores.
        curve: edge -> target share, as a mapping or (edge, target) pairs.
        tenants: each event's tenant; None for the pooled rows only.

    Returns:
        Rows with week None: the pooled ones first, then each tenant's in
        sorted order; edges ascending within each.
    """
    values = np.asarray(scores, dtype=np.float64)
    week = np.zeros(values.size, dtype=np.int64)
    rows = weekly_shares(values, week, curve, tenants)
    return [_unweek(row) for row in rows]


def weekly_shares(
    scores: npt.ArrayLike,
    week_index: npt.ArrayLike,
    edges: Mapping[float, float] | Iterable[tuple[float, float]],
    tenants: npt.ArrayLike | None = None,
) -> list[ShareRow]:
    """Shares at each edge, week by week, pooled and per tenant.

    Args:
        scores: served scores.
        week_index: each event's week number.
        edges: the reference curve, edge -> target share (``DEFAULT_CURVE``
            or a mapping's ``curve`` pairs).
        tenants: each event's tenant; None for pooled rows only.

    Returns:
        Rows ordered by week, then the pooled tenant ``"*"`` before each
        tenant in sorted order, then edge ascending.  Weeks or tenant-weeks
        without events have no rows.

    Raises:
        ValueError: the arrays differ in length.
    """
    values = np.asarray(scores, dtype=np.float64)
    weeks = np.asarray(week_index, dtype=np.int64)
    curve = _curve_pairs(edges)
    check_lengths(values, weeks, "week_index")
    week_ids, week_codes = np.unique(weeks, return_inverse=True)
    if tenants is None:
        groups = _grouped_shares(values, week_codes, week_ids.size, curve)
        return _rows(groups, curve, week_ids, None)

    names = np.asarray(tenants).astype(str)
    check_lengths(values, names, "tenants")
    tenant_ids, tenant_codes = np.unique(names, return_inverse=True)
    # Code 0 within each week is the pooled group; tenants follow from 1.
    width = tenant_ids.size + 1
    codes = np.concatenate([week_codes * width, week_codes * width + 1 + tenant_codes])
    doubled = np.concatenate([values, values])
    groups = _grouped_shares(doubled, codes, week_ids.size * width, curve)
    return _rows(groups, curve, week_ids, tenant_ids)


def median_abs_relative_error(
    rows: Iterable[ShareRow],
    *,
    per_tenant: bool = False,
    weeks: Collection[int] | None = None,
) -> float:
    """Median of ``|observed - target| / target`` over edges and weeks.

    Args:
        rows: a share table (``weekly_shares`` or ``share_table``).
        per_tenant: summarise the per-tenant rows (every tenant-week and
            edge) instead of the pooled ones.
        weeks: only rows of these weeks; all rows when None.

    Returns:
        The median, or NaN when no row is selected.
    """
    errors = [
        abs(row.relative_error)
        for row in rows
        if (row.tenant != ALL_TENANTS) == per_tenant
        and (weeks is None or row.week in weeks)
    ]
    return float(np.median(errors)) if errors else math.nan


def format_share_table(rows: Sequence[ShareRow]) -> str:
    """A share table as plain aligned text, one line per row.

    Args:
        rows: the table.  The week column is left out when no row has one.

    Returns:
        Text with a header line, no trailing newline.
    """
    header = ("week", "tenant", "edge", "target", "observed", "rel_error", "n")
    body = [
        (
            "-" if row.week is None else str(row.week),
            row.tenant,
            f"{row.edge:.3f}",
            f"{row.target:.4f}",
            f"{row.observed:.4f}",
            f"{row.relative_error:+.3f}",
            str(row.n),
        )
        for row in rows
    ]
    lines: list[tuple[str, ...]] = [header, *body]
    if all(row.week is None for row in rows):
        lines = [line[1:] for line in lines]
    widths = [max(len(cell) for cell in column) for column in zip(*lines, strict=True)]
    return "\n".join(
        "  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True))
        for line in lines
    )


def tenants_of(customer_ids: npt.ArrayLike) -> npt.NDArray[np.str_]:
    """Each event's tenant: ``"bank-%02d" % (CUSTOMER_ID % 24)``.

    Args:
        customer_ids: integer ``CUSTOMER_ID`` values.

    Returns:
        Tenant names, one per event.
    """
    names = np.array([f"bank-{i:02d}" for i in range(TENANT_COUNT)])
    return names[np.asarray(customer_ids, dtype=np.int64) % TENANT_COUNT]


def evaluate_main(argv: Sequence[str]) -> int:
    """Run ``muse evaluate`` (implemented in ``muse._evaluate_cli``).

    Args:
        argv: the arguments after ``evaluate``.

    Returns:
        The exit status: 0 on success, 2 on bad arguments or input.
    """
    # Imported here: the command needs the registry and model loaders,
    # which users of the metrics alone should not pay for.
    from muse._evaluate_cli import evaluate_main as run

    return run(argv)


# -- mappings and variants ----------------------------------------------------


def apply_mapping(
    mapping: MappingChoice,
    scores: npt.ArrayLike,
    tenants: npt.ArrayLike | None = None,
) -> FloatArray:
    """Map scores, each tenant through its own mapping where it has one.

    Args:
        mapping: one mapping, or mappings by tenant with ``"*"`` as the
            fallback.
        scores: scores before mapping.
        tenants: each event's tenant; needed only with mappings by tenant.

    Returns:
        The mapped scores.

    Raises:
        ValueError: mappings by tenant without ``tenants``, or a tenant
            with no mapping and no ``"*"`` fallback.
    """
    values = np.ascontiguousarray(scores, dtype=np.float64)
    if not isinstance(mapping, Mapping):
        return np.asarray(mapping.apply(values), dtype=np.float64)
    if tenants is None:
        raise ValueError("mappings by tenant need each event's tenant")
    names = np.asarray(tenants).astype(str)
    check_lengths(values, names, "tenants")
    mapped = np.empty_like(values)
    for tenant in map(str, np.unique(names)):
        chosen = mapping.get(tenant, mapping.get(ALL_TENANTS))
        if chosen is None:
            raise ValueError(f"no mapping for tenant {tenant!r} and no '*' fallback")
        where = names == tenant
        mapped[where] = chosen.apply(np.ascontiguousarray(values[where]))
    return mapped


def evaluate_mapping(
    mapping: ScoreMapping,
    scores: npt.ArrayLike,
    tenants: npt.ArrayLike | None = None,
) -> list[ShareRow]:
    """Apply a mapping and compare the shares with its own curve.

    Args:
        mapping: the mapping (its ``curve`` gives edges and targets).
        scores: scores before mapping (posterior-corrected predictor output).
        tenants: each event's tenant; None for pooled rows only.

    Returns:
        ``share_table`` of the mapped scores: per edge the target, the
        observed share and (as a property) the relative error, pooled and
        per tenant.
    """
    mapped = mapping.apply(np.ascontiguousarray(scores, dtype=np.float64))
    return share_table(mapped, mapping.curve, tenants)


def variant_scores(
    v1_raw: npt.ArrayLike,
    v2_raw: npt.ArrayLike,
    *,
    beta_v1: float,
    beta_v2: float,
    mapping_v1: MappingChoice,
    mapping_v2: MappingChoice,
    tenants: npt.ArrayLike | None = None,
) -> dict[str, FloatArray]:
    """The score each serving variant would give the same events.

    Args:
        v1_raw: v1's raw probabilities (before posterior correction).
        v2_raw: v2's raw probabilities.
        beta_v1: share of genuine rows v1 was trained on.
        beta_v2: share of genuine rows v2 was trained on.
        mapping_v1: the mapping fitted on v1's corrected scores.
        mapping_v2: the mapping fitted on v2's corrected scores in shadow.
        tenants: each event's tenant; needed with mappings by tenant.

    Returns:
        Scores by variant name (``VARIANTS``): "v1 kept" (v1 and its
        mapping), "v2 + stale v1 mapping", "v2 no mapping" (posterior
        correction only) and "v2 + shadow-fitted mapping".
    """
    v1 = np.asarray(posterior_correction(np.asarray(v1_raw, np.float64), beta_v1))
    v2 = np.asarray(posterior_correction(np.asarray(v2_raw, np.float64), beta_v2))
    return {
        VARIANTS[0]: apply_mapping(mapping_v1, v1, tenants),
        VARIANTS[1]: apply_mapping(mapping_v1, v2, tenants),
        VARIANTS[2]: v2.astype(np.float64),
        VARIANTS[3]: apply_mapping(mapping_v2, v2, tenants),
    }


def evaluate_variants(
    v1_raw: npt.ArrayLike,
    v2_raw: npt.ArrayLike,
    week_index: npt.ArrayLike,
    *,
    beta_v1: float,
    beta_v2: float,
    mapping_v1: MappingChoice,
    mapping_v2: MappingChoice,
    tenants: npt.ArrayLike | None = None,
    curve: Mapping[float, float] = DEFAULT_CURVE,
    summary_weeks: Collection[int] | None = None,
) -> dict[str, VariantResult]:
    """Weekly shares and error summaries of every serving variant.

    Args:
        v1_raw: v1's raw probabilities on the evaluated events.
        v2_raw: v2's raw probabilities on the same events.
        week_index: each event's week number.
        beta_v1: v1's training beta.
        beta_v2: v2's training beta.
        mapping_v1: the mapping fitted on v1's corrected scores.
        mapping_v2: the mapping fitted on v2's corrected scores in shadow.
        tenants: each event's tenant; None for pooled figures only.
        curve: the reference curve the shares are held to.
        summary_weeks: weeks the error medians cover (e.g. those after the
            promotion); every week when None.

    Returns:
        A ``VariantResult`` per variant, keyed and ordered as ``VARIANTS``.
    """
    served = variant_scores(
        v1_raw,
        v2_raw,
        beta_v1=beta_v1,
        beta_v2=beta_v2,
        mapping_v1=mapping_v1,
        mapping_v2=mapping_v2,
        tenants=tenants,
    )
    results: dict[str, VariantResult] = {}
    for name, scores in served.items():
        rows = tuple(weekly_shares(scores, week_index, curve, tenants))
        results[name] = VariantResult(
            name=name,
            rows=rows,
            mare=median_abs_relative_error(rows, weeks=summary_weeks),
            mare_tenant_week=median_abs_relative_error(
                rows, per_tenant=True, weeks=summary_weeks
            ),
        )
    return results


# -- helpers ------------------------------------------------------------------


def _curve_pairs(
    curve: Mapping[float, float] | Iterable[tuple[float, float]],
) -> tuple[tuple[float, float], ...]:
    """A curve as (edge, target) pairs, edges ascending."""
    pairs = curve.items() if isinstance(curve, Mapping) else curve
    return tuple(sorted((float(edge), float(target)) for edge, target in pairs))


def _grouped_shares(
    scores: FloatArray,
    codes: IntArray,
    n_groups: int,
    curve: tuple[tuple[float, float], ...],
) -> tuple[FloatArray, IntArray]:
    """Per group: count of scores at or above each edge, and group size.

    Returns:
        ``(at_or_above[group, edge], size[group])``.
    """
    size = np.bincount(codes, minlength=n_groups).astype(np.int64)
    above = np.empty((n_groups, len(curve)))
    for j, (edge, _target) in enumerate(curve):
        above[:, j] = np.bincount(codes, weights=scores >= edge, minlength=n_groups)
    return above, size


def _rows(
    groups: tuple[FloatArray, IntArray],
    curve: tuple[tuple[float, float], ...],
    week_ids: IntArray,
    tenant_ids: npt.NDArray[np.str_] | None,
) -> list[ShareRow]:
    """Rows of non-empty groups; group ``w * width + t`` is week w, tenant t."""
    above, size = groups
    labels = [ALL_TENANTS] + ([] if tenant_ids is None else list(map(str, tenant_ids)))
    rows = []
    for group in np.flatnonzero(size):
        week, tenant = divmod(int(group), len(labels))
        n = int(size[group])
        for j, (edge, target) in enumerate(curve):
            rows.append(
                ShareRow(
                    week=int(week_ids[week]),
                    tenant=labels[tenant],
                    edge=edge,
                    target=target,
                    observed=float(above[group, j]) / n,
                    n=n,
                )
            )
    return rows


def _unweek(row: ShareRow) -> ShareRow:
    return ShareRow(None, row.tenant, row.edge, row.target, row.observed, row.n)
