"""The demo's synthetic run, end to end through a real server process."""

from __future__ import annotations

from pathlib import Path

import pytest

from muse._demo import DemoSettings, run_demo
from muse._evaluate import median_abs_relative_error


@pytest.mark.slow
async def test_demo_update_goes_unnoticed_on_synthetic_data(tmp_path: Path) -> None:
    settings = DemoSettings(
        out=tmp_path / "report", rows=100_000, concurrency=4, progress=False
    )
    outcome = await run_demo(settings)
    results = outcome.results
    serving = results.serving

    assert serving.error_count == 0
    assert serving.lost_during_promotion == 0
    assert serving.events == outcome.events_planned > 60_000
    assert outcome.last_served == outcome.refs["v2"]
    assert results.promotion_week is not None
    assert serving.lead_time.work_s < 60

    # After the promotion a fixed threshold alerts on the target share; on
    # 100k synthetic rows a week holds ~5,000 events, so allow sampling noise.
    after = median_abs_relative_error(results.served, weeks=results.variant_weeks)
    assert after <= 0.15
    fitted = results.variants["v2 + shadow-fitted mapping"].mare
    stale = results.variants["v2 + stale v1 mapping"].mare
    unmapped = results.variants["v2 no mapping"].mare
    assert fitted * 3 < stale
    assert fitted * 3 < unmapped
    # What clients were served is exactly the shadow-fitted variant.
    assert after == pytest.approx(fitted)
    assert outcome.report.read_text().count("|") > 20


@pytest.mark.slow
@pytest.mark.realdata
async def test_demo_meets_the_targets_on_the_real_transactions(
    tmp_path: Path, data_path: Path
) -> None:
    outcome = await run_demo(
        DemoSettings(data=data_path, out=tmp_path / "report", progress=False)
    )
    results = outcome.results
    serving = results.serving

    assert serving.error_count == 0
    assert serving.lost_during_promotion == 0
    assert serving.events == outcome.events_planned
    assert outcome.last_served == outcome.refs["v2"]
    assert serving.lead_time.work_s < 60
    weeks = results.variant_weeks
    assert median_abs_relative_error(results.served, weeks=weeks) <= 0.03
    assert median_abs_relative_error(results.served, per_tenant=True, weeks=weeks) <= 0.07
    assert results.variants["v2 + stale v1 mapping"].mare > 0.2
    assert results.variants["v2 no mapping"].mare > 0.5
