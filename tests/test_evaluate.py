"""Tests of the offline metrics and serving variants (muse._evaluate).

Numbers are worked out by hand on arrays of a few elements.  Mappings are
either real ``QuantileMapping`` fits or ``_Scale``, a mapping whose output
is easy to compute by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest

from muse._evaluate import (
    VARIANTS,
    ShareRow,
    apply_mapping,
    evaluate_mapping,
    evaluate_variants,
    format_share_table,
    median_abs_relative_error,
    relative_errors,
    share_table,
    shares_at_edges,
    tenants_of,
    variant_scores,
    weekly_shares,
)
from muse._transform import DEFAULT_CURVE, QuantileMapping

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class _Scale:
    """A mapping that multiplies scores by a constant, capped at 1."""

    factor: float
    curve: tuple[tuple[float, float], ...] = ((0.5, 0.5),)

    def apply(self, scores: FloatArray) -> FloatArray:
        return np.minimum(scores * self.factor, 1.0)


# -- shares --------------------------------------------------------------------


def test_shares_at_edges_counts_scores_at_or_above() -> None:
    shares = shares_at_edges([0.1, 0.2, 0.5, 0.9], [0.2, 0.5, 0.6, 0.8])

    assert shares.tolist() == [0.75, 0.5, 0.25, 0.25]


def test_shares_at_edges_takes_a_curve_and_an_empty_input() -> None:
    assert shares_at_edges([0.85], DEFAULT_CURVE).tolist() == [1.0, 1.0, 1.0, 1.0]
    assert np.isnan(shares_at_edges([], [0.5, 0.8])).all()


def test_relative_errors_divide_by_target() -> None:
    errors = relative_errors([0.75, 0.35, 0.0], [0.5, 0.35, 0.05])

    assert errors.tolist() == [0.5, 0.0, -1.0]


def test_weekly_shares_pools_then_splits_by_tenant() -> None:
    rows = weekly_shares(
        scores=[0.1, 0.9, 0.5, 0.7],
        week_index=[0, 0, 1, 1],
        edges={0.5: 0.5},
        tenants=["a", "b", "a", "a"],
    )

    got = [(r.week, r.tenant, r.observed, r.n) for r in rows]
    # Week 1 has no event of tenant b, so no row for it.
    assert got == [
        (0, "*", 0.5, 2),
        (0, "a", 0.0, 1),
        (0, "b", 1.0, 1),
        (1, "*", 1.0, 2),
        (1, "a", 1.0, 2),
    ]
    assert all(r.edge == 0.5 and r.target == 0.5 for r in rows)


def test_weekly_shares_orders_edges_and_skips_tenants_when_none() -> None:
    rows = weekly_shares([0.3, 0.9], [4, 4], [(0.8, 0.05), (0.2, 0.7)])

    assert [(r.week, r.tenant, r.edge, r.observed) for r in rows] == [
        (4, "*", 0.2, 1.0),
        (4, "*", 0.8, 0.5),
    ]
    assert rows[1].relative_error == pytest.approx(9.0)


def test_weekly_shares_refuses_arrays_of_different_lengths() -> None:
    with pytest.raises(ValueError, match="week_index must match"):
        weekly_shares([0.1, 0.2], [0], {0.5: 0.5})
    with pytest.raises(ValueError, match="tenants must match"):
        weekly_shares([0.1, 0.2], [0, 0], {0.5: 0.5}, ["a"])


def test_median_abs_relative_error_pooled_per_tenant_and_by_week() -> None:
    rows = weekly_shares(
        [0.1, 0.9, 0.5, 0.7], [0, 0, 1, 1], {0.5: 0.5}, ["a", "b", "a", "a"]
    )

    # Pooled errors: week 0 |0.5-0.5|/0.5 = 0, week 1 |1-0.5|/0.5 = 1.
    assert median_abs_relative_error(rows) == 0.5
    assert median_abs_relative_error(rows, weeks={1}) == 1.0
    # Every tenant-week is at 0 or 1 against 0.5: all errors are 1.
    assert median_abs_relative_error(rows, per_tenant=True) == 1.0
    assert math.isnan(median_abs_relative_error(rows, weeks={7}))


def test_share_table_has_no_week() -> None:
    rows = share_table([0.2, 0.6], {0.5: 0.5}, ["x", "y"])

    assert [(r.week, r.tenant, r.observed) for r in rows] == [
        (None, "*", 0.5),
        (None, "x", 0.0),
        (None, "y", 1.0),
    ]


def test_format_share_table_aligns_columns() -> None:
    rows = [
        ShareRow(None, "*", 0.8, 0.05, 0.06, 1000),
        ShareRow(3, "bank-07", 0.2, 0.7, 0.63, 12),
    ]

    text = format_share_table(rows)

    lines = text.splitlines()
    assert len(lines) == 3 and len({len(line) for line in lines}) == 1
    assert lines[0].split() == [
        "week",
        "tenant",
        "edge",
        "target",
        "observed",
        "rel_error",
        "n",
    ]
    assert lines[1].split() == ["-", "*", "0.800", "0.0500", "0.0600", "+0.200", "1000"]
    assert lines[2].split() == [
        "3",
        "bank-07",
        "0.200",
        "0.7000",
        "0.6300",
        "-0.100",
        "12",
    ]


def test_format_share_table_leaves_out_an_unused_week_column() -> None:
    text = format_share_table(share_table([0.2, 0.6], {0.5: 0.5}))

    assert text.splitlines() == [
        "tenant   edge  target  observed  rel_error  n",
        "     *  0.500  0.5000    0.5000     +0.000  2",
    ]


def test_tenants_of_derives_issuers_from_customers() -> None:
    assert tenants_of([0, 25, 47]).tolist() == ["bank-00", "bank-01", "bank-23"]


# -- mappings and variants -----------------------------------------------------


def test_apply_mapping_by_tenant_falls_back_to_star() -> None:
    mappings = {"a": _Scale(2.0), "*": _Scale(0.5)}

    mapped = apply_mapping(mappings, [0.1, 0.2, 0.3], ["a", "b", "a"])

    assert mapped.tolist() == pytest.approx([0.2, 0.1, 0.6])


def test_apply_mapping_by_tenant_needs_tenants_and_a_fallback() -> None:
    with pytest.raises(ValueError, match="need each event's tenant"):
        apply_mapping({"a": _Scale(2.0)}, [0.1])
    with pytest.raises(ValueError, match="no mapping for tenant 'b'"):
        apply_mapping({"a": _Scale(2.0)}, [0.1, 0.2], ["a", "b"])


def test_evaluate_mapping_compares_with_the_mapping_curve() -> None:
    mapping = _Scale(2.0, curve=((0.5, 0.5), (0.8, 0.25)))

    rows = evaluate_mapping(mapping, [0.1, 0.3, 0.45, 0.2], ["x", "y", "x", "y"])

    # Mapped: x -> [0.2, 0.9], y -> [0.6, 0.4].
    assert [(r.tenant, r.edge, r.observed) for r in rows] == [
        ("*", 0.5, 0.5),
        ("*", 0.8, 0.25),
        ("x", 0.5, 0.5),
        ("x", 0.8, 0.5),
        ("y", 0.5, 0.5),
        ("y", 0.8, 0.0),
    ]
    assert [r.relative_error for r in rows] == [0.0, 0.0, 0.0, 1.0, 0.0, -1.0]


# v2's raw outputs chosen so that posterior correction with beta 0.5,
# y / (2 - y), gives round numbers: 0.25, 0.5, 2/3, 0.75.
_V1_RAW = [0.1, 0.2, 0.3, 0.4]
_V2_RAW = [0.4, 2 / 3, 0.8, 6 / 7]


def test_variant_scores_by_hand() -> None:
    served = variant_scores(
        _V1_RAW,
        _V2_RAW,
        beta_v1=1.0,
        beta_v2=0.5,
        mapping_v1=_Scale(2.0),
        mapping_v2=_Scale(0.8),
    )

    assert list(served) == list(VARIANTS)
    assert served["v1 kept"] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert served["v2 no mapping"] == pytest.approx([0.25, 0.5, 2 / 3, 0.75])
    assert served["v2 + stale v1 mapping"] == pytest.approx([0.5, 1.0, 1.0, 1.0])
    assert served["v2 + shadow-fitted mapping"] == pytest.approx(
        [0.2, 0.4, 1.6 / 3, 0.6]
    )


def test_evaluate_variants_summarises_pooled_and_tenant_errors() -> None:
    results = evaluate_variants(
        _V1_RAW,
        _V2_RAW,
        [0, 0, 0, 0],
        beta_v1=1.0,
        beta_v2=0.5,
        mapping_v1=_Scale(2.0),
        mapping_v2=_Scale(0.8),
        tenants=["a", "b", "a", "b"],
        curve={0.45: 0.5},
    )

    summary = {name: (r.mare, r.mare_tenant_week) for name, r in results.items()}
    # The edge sits between served values, so rounding cannot move a score
    # across it.  Shares at 0.45 (pooled; a; b): v1 kept 1/2; 1/2; 1/2.
    # Stale: 1; 1; 1.
    # No mapping: 3/4; 1/2; 1.  Shadow-fitted: 1/2; 1/2; 1/2.
    assert summary == {
        "v1 kept": (0.0, 0.0),
        "v2 + stale v1 mapping": (1.0, 1.0),
        "v2 no mapping": (0.5, 0.5),
        "v2 + shadow-fitted mapping": (0.0, 0.0),
    }
    assert len(results["v1 kept"].rows) == 3


def test_evaluate_variants_without_tenants_has_nan_tenant_error() -> None:
    results = evaluate_variants(
        _V1_RAW,
        _V2_RAW,
        [0, 0, 1, 1],
        beta_v1=1.0,
        beta_v2=0.5,
        mapping_v1=_Scale(2.0),
        mapping_v2=_Scale(0.8),
        curve={0.45: 0.5},
        summary_weeks={1},
    )

    stale = results["v2 + stale v1 mapping"]
    assert stale.mare == 1.0
    assert math.isnan(stale.mare_tenant_week)


def test_shadow_fitted_mapping_restores_the_curve_where_stale_fails() -> None:
    """A retrained model's scores drift; only a mapping fitted on them holds."""
    rng = np.random.default_rng(7)
    v1_fit, v1_now = rng.beta(1, 30, 20_000), rng.beta(1, 30, 20_000)
    v2_fit, v2_now = rng.beta(1, 6, 20_000), rng.beta(1, 6, 20_000)
    mapping_v1 = QuantileMapping.fit(v1_fit)
    mapping_v2 = QuantileMapping.fit(v2_fit)
    weeks = np.repeat(np.arange(4), 5_000)

    results = evaluate_variants(
        v1_now,
        v2_now,
        weeks,
        beta_v1=1.0,
        beta_v2=1.0,
        mapping_v1=mapping_v1,
        mapping_v2=mapping_v2,
    )

    assert results["v1 kept"].mare < 0.1
    assert results["v2 + shadow-fitted mapping"].mare < 0.1
    assert results["v2 + stale v1 mapping"].mare > 0.5
    assert results["v2 no mapping"].mare > 0.5


def test_label_metrics_are_reexported() -> None:
    import muse._evaluate as evaluate
    import muse._label_metrics as label_metrics

    for name in label_metrics.__all__:
        assert getattr(evaluate, name) is getattr(label_metrics, name)
        assert name in evaluate.__all__
