"""``muse demo``: a model update that no client notices, end to end.

The story, all through a real MUSE server started for the purpose, with
msgpack clients replaying transactions concurrently:

1. 24 tenants and one intent, ``card-fraud``, routed through ``*`` to one
   shared predictor.
2. v1 (XGBoost, shallow, first month, genuine rows undersampled to beta about
   0.05) goes live a week into the second month, once the rolling-window
   features are complete; after its first week of live traffic its mapping
   is fitted on its own scores.
3. The rest of the second month and the first days of the third are
   replayed live.
4. v2 (LightGBM, deeper, first two months, beta about 0.5) is uploaded and
   set as a shadow; after a week of shadow traffic its mapping is fitted
   from its shadow scores through the admin API.
5. v2 is promoted while traffic is flowing; the rest is replayed.

Then every variant is computed offline on the same events and the report
is written.  The timeline is relative to the data's first month.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trio

from muse._evaluate import evaluate_variants, median_abs_relative_error, weekly_shares
from muse._label_metrics import calibration, recall_at_edges
from muse._models import load_model
from muse._replay import Replayer, ReplayLog, plan_requests
from muse._report import DemoResults, LeadTime, ModelSummary, ServingStats, write_report
from muse._synthetic import FEATURES, generate_transactions, load_transactions
from muse._training import months_of, train_v1, train_v2, weeks_of
from muse._transform import DEFAULT_CURVE, QuantileMapping, posterior_correction
from muse.client import AsyncClient

__all__ = ["demo_main", "run_demo", "DemoSettings"]

log = logging.getLogger("muse.demo")

INTENT = "card-fraud"
TENANTS = tuple(f"bank-{i:02d}" for i in range(24))
# Timeline, in days of the third month: v2 arrives after this many days of it
# have been served by v1, then shadows for a week before its mapping is fit.
V2_UPLOAD_DAY = 3
SHADOW_DAYS = 7
# The features count over windows of up to 30 days that end a week before
# the event, so they are complete only from day 37 on: the first days of the
# second month are not replayed, and v1 goes live after them.
BURN_IN_DAYS = 7
# v1 serves unmapped for its first week; its mapping is fitted on that week.
WARMUP_DAYS = 7
# Targets the issue sets on the real data.
TARGET_OVERALL = 0.03
TARGET_TENANT_WEEK = 0.07
TARGET_LEAD_S = 60.0


@dataclass(frozen=True)
class DemoSettings:
    """What ``muse demo`` was asked to do."""

    data: Path | None = None
    out: Path = Path("demo-out")
    rows: int = 240_000
    concurrency: int = 8
    batch: int = 64
    seed: int = 0
    progress: bool = True


def demo_main(argv: list[str]) -> int:
    """``muse demo [--data FILE] [--out DIR] [--rows N] [--concurrency N]``."""
    parser = argparse.ArgumentParser(prog="muse demo", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="parquet laid out like the shared data")
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--rows", type=int, default=240_000, help="synthetic rows")
    parser.add_argument(
        "--speed", type=int, default=8,
        help="replay speed: concurrent client requests (default 8)",
    )
    parser.add_argument("--batch", type=int, default=64, help="events per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # One line per request is the server's access log's job, not the demo's.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = DemoSettings(
        args.data, args.out, args.rows, args.speed, args.batch, args.seed,
        not args.no_progress,
    )
    outcome = trio.run(run_demo, settings)
    print(summary(outcome.results))
    print(f"report: {outcome.report}")
    return 0


@dataclass(frozen=True)
class DemoOutcome:
    """What a demo run measured, and which version served its last events.

    Attributes:
        results: everything the report shows.
        refs: predictor ref of "v1" and "v2".
        last_served: the predictor ref that answered the replay's last request.
        report: path of the written report.
        events_planned: events the replay set out to send.
    """

    results: DemoResults
    refs: dict[str, str]
    last_served: str
    report: Path
    events_planned: int


async def run_demo(settings: DemoSettings) -> DemoOutcome:
    """Run the whole story and write the report; returns what it measured."""
    rows, source = _load(settings)
    timeline = _Timeline(rows)
    v1 = train_v1(rows, settings.seed)
    v2 = train_v2(rows, settings.seed)
    log.info("trained v1 (beta %.4f, %.1f s) and v2 (beta %.4f, %.1f s)",
             v1.beta, v1.seconds, v2.beta, v2.seconds)
    X = np.column_stack([np.asarray(rows[f], dtype=np.float64) for f in FEATURES])
    tenants = np.array([f"bank-{c % 24:02d}" for c in np.asarray(rows["CUSTOMER_ID"]).tolist()])
    replay = ReplayLog(np.full(len(X), np.nan), np.full(len(X), -1, dtype=np.int64))
    with tempfile.TemporaryDirectory(prefix="muse-demo-") as scratch:
        registry = Path(scratch) / "registry"
        with _server(Path(scratch)) as url:
            story = _Story(url, registry, X, tenants, replay, settings)
            await story.run(v1, v2, timeline)
        # The server's compiled libraries are reused for the offline scores.
        results = _results(settings, source, rows, X, tenants, timeline, story, v1, v2,
                           registry / "compiled")
    report = write_report(settings.out, results)
    last = int(replay.versions[timeline.after[-1]])
    planned = len(timeline.warmup) + len(timeline.measured)
    return DemoOutcome(results, dict(story.refs), replay.refs[last], report, planned)


class _Timeline:
    """Event indices of each phase, from the data's own time columns."""

    def __init__(self, rows: Any) -> None:
        months = months_of(rows)
        days = np.asarray(rows["TX_TIME_DAYS"], dtype=np.int64)
        if months.max() < 3:
            raise SystemExit("the demo needs four months of data or more")
        second = int(days[months == 1].min())
        third = int(days[months == 2].min())
        self.weeks = weeks_of(rows)
        live_from = second + BURN_IN_DAYS
        self.warmup = np.flatnonzero(
            (months == 1) & (days >= live_from) & (days < live_from + WARMUP_DAYS)
        )
        self.live = np.flatnonzero(
            ((months == 1) & (days >= live_from + WARMUP_DAYS))
            | ((months == 2) & (days < third + V2_UPLOAD_DAY))
        )
        shadow_end = third + V2_UPLOAD_DAY + SHADOW_DAYS
        self.shadow = np.flatnonzero((days >= third + V2_UPLOAD_DAY) & (days < shadow_end) & (months >= 2))
        self.after = np.flatnonzero((days >= shadow_end) & (months >= 2) & (months <= 3))
        self.measured = np.concatenate([self.live, self.shadow, self.after])
        if not all(len(p) for p in (self.warmup, self.live, self.shadow, self.after)):
            raise SystemExit("the data's months are too short for the demo's timeline")


class _Story:
    """The server-side steps, all through the HTTP API."""

    def __init__(self, url: str, registry: Path, X: np.ndarray, tenants: np.ndarray,
                 replay: ReplayLog, settings: DemoSettings) -> None:
        self.url, self.registry, self.X, self.tenants = url, registry, X, tenants
        self.replay, self.settings = replay, settings
        self.mappings: dict[str, dict[str, Any]] = {}
        self.refs: dict[str, str] = {}
        self.lead: LeadTime | None = None
        self.promotion_s: float | None = None
        self.promotion_window: tuple[float, float] = (0.0, 0.0)

    async def run(self, v1: Any, v2: Any, timeline: _Timeline) -> None:
        admin_key = (self.registry / "admin.key").read_text().strip()
        async with AsyncClient(self.url, admin_key, timeout=300) as admin:
            keys = {t: await admin.create_tenant(t) for t in TENANTS}
            self.refs["v1"] = await self._deploy(admin, "fraud-v1", v1)
            await admin.put_route("*", INTENT, self.refs["v1"])
            replayer = Replayer(self.url, keys, self.X, FEATURES, self.replay,
                                concurrency=self.settings.concurrency)
            await self._replay(replayer, timeline.warmup, "warm-up (v1, unmapped)")
            self.mappings["v1"] = await admin.fit_mapping(self.refs["v1"], source="live")
            await self._replay(replayer, timeline.live, "live (v1)")
            started = time.perf_counter()
            self.refs["v2"] = await self._deploy(admin, "fraud-v2", v2)
            compiled = time.perf_counter()
            await admin.put_route("*", INTENT, self.refs["v1"], [self.refs["v2"]])
            registered = time.perf_counter()
            await self._replay(replayer, timeline.shadow, "shadow (v2)")
            shadowed = time.perf_counter()
            self.mappings["v2"] = await admin.fit_mapping(self.refs["v2"], source="shadow")
            fitted = time.perf_counter()
            promote_s = await self._replay_with_promotion(admin, replayer, timeline.after)
            self.lead = LeadTime(compiled - started, registered - compiled,
                                 shadowed - registered, fitted - shadowed, promote_s)

    async def _deploy(self, admin: AsyncClient, name: str, trained: Any) -> str:
        model = await admin.put_model(name, trained.data, trained.format,
                                      feature_names=list(FEATURES), beta=trained.beta)
        spec = {"nodes": [
            {"id": "model", "kind": "model", "model": model["ref"]},
            {"id": "corrected", "kind": "posterior_correction", "input": "model"},
            {"id": "mapped", "kind": "quantile_map", "input": "corrected"},
        ], "output": "mapped"}
        return str((await admin.put_predictor("fraud", spec))["ref"])

    async def _replay(self, replayer: Replayer, indices: np.ndarray, label: str) -> None:
        requests = plan_requests(self.tenants, indices, self.settings.batch)
        log.info("replaying %s: %d events in %d requests", label, len(indices), len(requests))
        with _progress(len(indices), label, self.settings.progress) as bar:
            await replayer.run(requests, on_answer=bar)

    async def _replay_with_promotion(self, admin: AsyncClient, replayer: Replayer,
                                     indices: np.ndarray) -> float:
        requests = plan_requests(self.tenants, indices, self.settings.batch)
        promote_after = self.replay.sent + max(1, len(requests) // 20)
        took = 0.0

        async def promote() -> None:
            nonlocal took
            await replayer.wait_sent(promote_after)
            start = time.perf_counter()
            await admin.promote("*", INTENT, self.refs["v2"])
            end = time.perf_counter()
            took = end - start
            origin = self.replay.origin
            self.promotion_s = start - origin
            self.promotion_window = (start - origin, end - origin)
            log.info("promoted %s under load in %.1f ms", self.refs["v2"], took * 1000)

        log.info("replaying the rest (%d events), promoting v2 on the way", len(indices))
        with _progress(len(indices), "promotion and after", self.settings.progress) as bar:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(promote)
                await replayer.run(requests, on_answer=bar)
        return took


def _results(settings: DemoSettings, source: str, rows: Any, X: np.ndarray,
             tenants: np.ndarray, timeline: _Timeline, story: _Story,
             v1: Any, v2: Any, cache_dir: Path) -> DemoResults:
    replay = story.replay
    measured = timeline.measured
    weeks = timeline.weeks
    curve = tuple(sorted(DEFAULT_CURVE.items()))
    v2_code = replay.refs.index(story.refs["v2"])
    promoted_events = measured[replay.versions[measured] == v2_code]
    promotion_week = int(weeks[promoted_events].min()) if len(promoted_events) else None
    after_weeks = sorted({int(w) for w in weeks[timeline.after]} - {promotion_week})
    raw = {name: load_model(m.data, m.format, list(FEATURES), m.beta, cache_dir=cache_dir)
           .predict(X[measured])
           for name, m in (("v1", v1), ("v2", v2))}
    mapping_v1 = QuantileMapping.from_dict(story.mappings["v1"])
    mapping_v2 = QuantileMapping.from_dict(story.mappings["v2"])
    variants = evaluate_variants(
        raw["v1"], raw["v2"], weeks[measured], beta_v1=v1.beta, beta_v2=v2.beta,
        mapping_v1=mapping_v1, mapping_v2=mapping_v2, tenants=tenants[measured],
        summary_weeks=after_weeks,
    )
    labels = np.asarray(rows["TX_FRAUD"])[measured]
    after = np.isin(weeks[measured], after_weeks)
    served = weekly_shares(replay.scores[measured], weeks[measured], curve, tenants[measured])
    edges = [e for e, _ in curve]
    recall = {
        "v1 (mapped)": tuple(recall_at_edges(mapping_v1.apply(posterior_correction(raw["v1"][after], v1.beta)), labels[after], edges)),
        "v2 (mapped)": tuple(recall_at_edges(mapping_v2.apply(posterior_correction(raw["v2"][after], v2.beta)), labels[after], edges)),
    }
    quality = {}
    for name, model in (("v1", v1), ("v2", v2)):
        quality[f"{name} raw"] = calibration(raw[name][after], labels[after])
        quality[f"{name} posterior-corrected"] = calibration(
            posterior_correction(raw[name][after], model.beta), labels[after])
    return DemoResults(
        title="MUSE demo: a model update that no client notices",
        data_source=source,
        curve=curve,
        promotion_week=promotion_week,
        models=(
            ModelSummary("v1", "XGBoost, depth 3, first month, undersampled", v1.format, v1.beta, v1.n_rows, v1.seconds),
            ModelSummary("v2", "LightGBM, 63 leaves, first two months, undersampled", v2.format, v2.beta, v2.n_rows, v2.seconds),
        ),
        served=tuple(served),
        variants=variants,
        variant_weeks=tuple(after_weeks),
        recall=recall,
        calibration=quality,
        serving=_serving(story),
        notes=(f"Served-share medians cover weeks {after_weeks[0]} to {after_weeks[-1]}, "
               f"after the promotion week {promotion_week}." if after_weeks else "",),
    )


def _serving(story: _Story) -> ServingStats:
    replay = story.replay
    start, end = story.promotion_window
    lost = sum(1 for s, e, ok in replay.spans if not ok and e >= start and s <= end)
    assert story.lead is not None
    return ServingStats(
        requests=replay.sent, events=replay.events,
        duration_s=max(e for _, e, _ in replay.spans) if replay.spans else 0.0,
        p50_ms=replay.percentile_ms(50), p99_ms=replay.percentile_ms(99),
        p999_ms=replay.percentile_ms(99.9), errors=dict(replay.errors),
        lost_during_promotion=lost + (replay.sent - replay.answered - sum(replay.errors.values())),
        lead_time=story.lead, promotion_s=story.promotion_s,
    )


def summary(results: DemoResults) -> str:
    """The lines ``muse demo`` prints at the end."""
    served_after = median_abs_relative_error(results.served, weeks=results.variant_weeks)
    tenant_after = median_abs_relative_error(results.served, per_tenant=True, weeks=results.variant_weeks)
    serving = results.serving
    # The share targets are set for the real transactions; a small synthetic
    # sample has more sampling noise per week and tenant than they allow.
    real = not results.data_source.startswith("synthetic")

    def _verdict(ok: bool) -> str:
        if not real:
            return "real-data target"
        return "PASS" if ok else "FAIL"

    lines = [
        f"data: {results.data_source}",
        f"requests {serving.requests}, events {serving.events}, errors {serving.error_count}, "
        f"lost during promotion {serving.lost_during_promotion}",
        f"latency p50 {serving.p50_ms:.2f} ms, p99 {serving.p99_ms:.2f} ms, p99.9 {serving.p999_ms:.2f} ms",
        f"lead time v2 upload -> live, shadow excluded: {serving.lead_time.work_s:.1f} s "
        f"(target < {TARGET_LEAD_S:.0f} s: {_verdict(serving.lead_time.work_s < TARGET_LEAD_S)})",
        f"served after promotion: weekly overall share median |rel. error| {served_after:.1%} "
        f"(target <= {TARGET_OVERALL:.0%}: {_verdict(served_after <= TARGET_OVERALL)}), "
        f"tenant-week {tenant_after:.1%} (target <= {TARGET_TENANT_WEEK:.0%}: "
        f"{_verdict(tenant_after <= TARGET_TENANT_WEEK)})",
        "variants (median |rel. error| overall / tenant-week, weeks after promotion):",
    ]
    for name, variant in results.variants.items():
        lines.append(f"  {name:28s} {variant.mare:7.1%} / {variant.mare_tenant_week:7.1%}")
    return "\n".join(lines)



def _load(settings: DemoSettings) -> tuple[Any, str]:
    if settings.data is not None:
        return load_transactions(settings.data), str(settings.data)
    return generate_transactions(settings.rows, seed=settings.seed), f"synthetic ({settings.rows} rows)"


class _server:
    """``muse serve`` in a child process on a free loopback port."""

    def __init__(self, scratch: Path) -> None:
        self._registry = scratch / "registry"
        self._log_path = scratch / "server.log"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> str:
        self._log = self._log_path.open("wb")
        command = [sys.executable, "-m", "muse", "serve", "--registry", str(self._registry),
                   "--bind", "127.0.0.1:0"]
        self._process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = self._log_path.read_text(errors="replace")
            for line in text.splitlines():
                if "listening on http://" in line:
                    url = line.split("listening on ", 1)[1].split(";", 1)[0]
                    log.info("server up at %s (log: %s)", url, self._log_path)
                    return url
            if self._process.poll() is not None:
                raise SystemExit(f"the server exited early:\n{text}")
            time.sleep(0.05)
        raise SystemExit("the server did not start within 60 s")

    def __exit__(self, *exc: object) -> None:
        assert self._process is not None
        self._process.terminate()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
        self._log.close()


class _progress:
    """A tqdm bar when asked for and installed; otherwise nothing."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self._bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, desc=label, unit="ev", leave=False)

    def __enter__(self) -> Any:
        bar = self._bar
        return (lambda n: bar.update(n)) if bar is not None else None

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
