"""Tests of the demo report writer (muse._report)."""

from __future__ import annotations

from pathlib import Path

import pytest

from muse._evaluate import Calibration, ShareRow, VariantResult
from muse._report import (
    FIGURES,
    DemoResults,
    LeadTime,
    ModelSummary,
    ServingPoint,
    ServingStats,
    write_report,
)

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_CURVE = ((0.5, 0.35), (0.8, 0.05))


def _rows(observed: dict[str, list[tuple[float, float]]]) -> tuple[ShareRow, ...]:
    """Weekly rows from per-tenant lists of (share at 0.5, share at 0.8)."""
    rows = []
    for tenant, weeks in observed.items():
        for week, shares in enumerate(weeks):
            for (edge, target), share in zip(_CURVE, shares, strict=True):
                rows.append(ShareRow(week, tenant, edge, target, share, 100))
    return tuple(rows)


def _results(timeline: tuple[ServingPoint, ...] = ()) -> DemoResults:
    served = _rows(
        {
            "*": [(0.35, 0.05), (0.42, 0.06), (0.35, 0.04)],
            "bank-00": [(0.30, 0.05), (0.40, 0.07), (0.36, 0.05)],
            "bank-01": [(0.40, 0.05), (0.44, 0.05), (0.34, 0.03)],
        }
    )
    variants = {
        "v2 + stale v1 mapping": VariantResult(
            "v2 + stale v1 mapping", (), 0.8125, 0.9
        ),
        "v2 + shadow-fitted mapping": VariantResult(
            "v2 + shadow-fitted mapping", served, 0.0312, 0.0871
        ),
    }
    lead = LeadTime(
        compile_s=3.25, register_s=0.5, shadow_s=60.0, fit_s=0.75, promote_s=0.5
    )
    serving = ServingStats(
        requests=12_345,
        events=98_760,
        duration_s=61.5,
        p50_ms=1.75,
        p99_ms=12.5,
        p999_ms=31.25,
        errors={"overloaded": 3},
        lost_during_promotion=0,
        lead_time=lead,
        promotion_s=30.0 if timeline else None,
        timeline=timeline,
    )
    return DemoResults(
        title="MUSE demo",
        data_source="synthetic",
        curve=_CURVE,
        promotion_week=1,
        models=(
            ModelSummary("v1", "XGBoost depth 3", "xgboost_json", 0.05, 15_321, 2.5),
            ModelSummary("v2", "LightGBM 63 leaves", "lightgbm", 0.5, 294_759, 25.0),
        ),
        served=served,
        variants=variants,
        variant_weeks=(1, 2),
        recall={"v1 served": (0.625, 0.5), "v2 served": (0.75, 0.5625)},
        calibration={
            "v1 raw": Calibration(0.04321, 0.06125, 0.067, 0.0087, 1000),
            "v1 posterior-corrected": Calibration(
                0.00812, 0.00213, 0.009, 0.0087, 1000
            ),
        },
        serving=serving,
        notes=("Synthetic data: figures are illustrative.",),
    )


def test_lead_time_counts_the_shadow_apart() -> None:
    lead = LeadTime(
        compile_s=3.25, register_s=0.5, shadow_s=60.0, fit_s=0.75, promote_s=0.5
    )

    assert lead.work_s == 5.0
    assert lead.total_s == 65.0


@pytest.mark.parametrize("with_timeline", [False, True])
def test_write_report_writes_markdown_and_valid_pngs(
    tmp_path: Path, with_timeline: bool
) -> None:
    timeline = (
        (
            ServingPoint(10.0, 2000, 0, 1.5, 10.0, 20.0),
            ServingPoint(20.0, 2100, 3, 1.8, 14.0, 40.0),
        )
        if with_timeline
        else ()
    )

    path = write_report(tmp_path / "out", _results(timeline))

    assert path == tmp_path / "out" / "report.md"
    for name in FIGURES:
        data = (tmp_path / "out" / name).read_bytes()
        assert data.startswith(_PNG_MAGIC) and len(data) > 1000, name


def test_report_holds_the_measured_numbers(tmp_path: Path) -> None:
    text = write_report(tmp_path, _results()).read_text(encoding="utf-8")

    expected = [
        "# MUSE demo",
        "| v1 | XGBoost depth 3 | xgboost_json | 0.0500 | 15,321 | 2.5 |",
        "| 1 (promotion) | 0.4200 | 0.0600 |",
        # Pooled errors over the three weeks: 0, 0 | 0.2, 0.2 | 0, 0.2.
        "| all weeks | 0.1000 |",
        "| before promotion | 0.0000 |",
        "| from promotion on | 0.2000 |",
        "| v2 + stale v1 mapping | 0.8125 | 0.9000 |",
        "| v2 + shadow-fitted mapping | 0.0312 | 0.0871 |",
        "Same events, weeks 1, 2.",
        "| v2 served | 0.7500 | 0.5625 |",
        "| v1 posterior-corrected | 0.00812 | 0.00213 |",
        "| latency p99.9 | 31.25 ms |",
        "| errors | 3 (overloaded: 3) |",
        "| requests lost during promotion | 0 |",
        "| **work, shadow excluded** | **5.00** |",
        "| shadow (waiting for a sample) | 60.00 |",
        "| **upload to live** | **65.00** |",
        "- Synthetic data: figures are illustrative.",
    ]
    for line in expected:
        assert line in text, line
    for name in FIGURES:
        assert f"]({name})" in text
