"""The demo's report: Markdown tables and PNG figures of what it measured.

The demo orchestrator fills one ``DemoResults`` and calls ``write_report``;
nothing here measures anything.  Figures are drawn on bare matplotlib
``Figure`` objects (the Agg canvas, no pyplot), so writing a report touches
no global plotting state and needs no display.

Files written to the output directory:

- ``report.md``: every number, in tables, with the figures linked;
- ``shares.png``: share of events at or above each edge, week by week, as
  served (pooled thick, each tenant thin), against the target;
- ``variants.png``: the same, pooled, for each way of serving the update;
- ``quality.png``: recall at each edge per model, and calibration (Brier
  score, ECE) of raw against posterior-corrected scores;
- ``serving.png``: requests and latency percentiles over the replay (when a
  timeline is given) and the lead time from upload to live.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, ScalarFormatter

from muse._evaluate import (
    ALL_TENANTS,
    Calibration,
    ShareRow,
    VariantResult,
    median_abs_relative_error,
)

__all__ = [
    "FIGURES",
    "DemoResults",
    "LeadTime",
    "ModelSummary",
    "ServingPoint",
    "ServingStats",
    "write_report",
]

logger = logging.getLogger("muse.report")

#: The figure files ``write_report`` writes, besides ``report.md``.
FIGURES = ("shares.png", "variants.png", "quality.png", "serving.png")

# Figures are read on screen and in a repository viewer: 100 dpi at these
# sizes keeps each file small and its labels legible.
_DPI = 100
_GRID_SIZE = (11.0, 7.5)
_WIDE_SIZE = (12.0, 4.5)


@dataclass(frozen=True)
class ModelSummary:
    """One model the demo trained.

    Attributes:
        name: label used throughout the report ("v1", "v2").
        description: the recipe in a few words.
        format: the MUSE model format.
        beta: share of genuine rows kept at training.
        train_rows: rows trained on.
        train_seconds: training time.
    """

    name: str
    description: str
    format: str
    beta: float
    train_rows: int
    train_seconds: float


@dataclass(frozen=True)
class LeadTime:
    """Seconds from v2's upload until v2 answers live, step by step.

    The shadow period is counted apart: it is waiting for traffic (enough
    scores to fit a mapping), not work, and its length is the operator's
    choice of sample size.

    Attributes:
        compile_s: model upload: import, compile, parity check.
        register_s: predictor declaration and shadow route.
        shadow_s: v2 scoring in shadow until the sample sufficed.
        fit_s: fitting and publishing v2's mapping.
        promote_s: the promotion call.
    """

    compile_s: float
    register_s: float
    shadow_s: float
    fit_s: float
    promote_s: float

    @property
    def work_s(self) -> float:
        """Every step but the shadow period."""
        return self.compile_s + self.register_s + self.fit_s + self.promote_s

    @property
    def total_s(self) -> float:
        """Upload to live, shadow period included."""
        return self.work_s + self.shadow_s


@dataclass(frozen=True)
class ServingPoint:
    """Serving figures over one interval of the replay.

    Attributes:
        t_s: interval end, seconds from the replay's start.
        requests: requests answered in the interval.
        errors: requests that failed in the interval.
        p50_ms, p99_ms, p999_ms: latency percentiles in milliseconds.
    """

    t_s: float
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    p999_ms: float


@dataclass(frozen=True)
class ServingStats:
    """How the server behaved during the replay.

    Attributes:
        requests: scoring requests sent.
        events: events scored.
        duration_s: replay wall time.
        p50_ms, p99_ms, p999_ms: request latency percentiles, milliseconds.
        errors: failed requests by error code (empty when none failed).
        lost_during_promotion: requests that failed or went unanswered
            between the promotion call and its completion.
        lead_time: upload-to-live timings of v2.
        promotion_s: when promotion happened, seconds from the replay's
            start; None when it did not.
        timeline: per-interval figures, oldest first; may be empty.
    """

    requests: int
    events: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    errors: Mapping[str, int]
    lost_during_promotion: int
    lead_time: LeadTime
    promotion_s: float | None = None
    timeline: tuple[ServingPoint, ...] = ()

    @property
    def error_count(self) -> int:
        """Failed requests, all codes together."""
        return sum(self.errors.values())


@dataclass(frozen=True)
class DemoResults:
    """Everything the demo measured, as the report shows it.

    Attributes:
        title: the report's heading.
        data_source: where the events came from (a path or "synthetic").
        curve: the reference curve, (edge, target share) pairs by edge.
        promotion_week: the week v2 went live; None if it never did.
        models: the models trained.
        served: weekly shares of the scores MUSE served (``weekly_shares``
            rows, pooled and per tenant).
        variants: each way of serving the update (``evaluate_variants``).
        variant_weeks: the weeks the variants' medians cover.
        recall: share of fraud at or above each edge of ``curve``, by
            label (e.g. "v1 served", "v2 served").
        calibration: calibration by label (e.g. "v1 raw",
            "v1 posterior-corrected").
        serving: server behaviour and lead time.
        ece_bins: the bins the calibration ECEs were computed with.
        notes: extra sentences for the end of the report.
    """

    title: str
    data_source: str
    curve: tuple[tuple[float, float], ...]
    promotion_week: int | None
    models: tuple[ModelSummary, ...]
    served: tuple[ShareRow, ...]
    variants: Mapping[str, VariantResult]
    variant_weeks: tuple[int, ...]
    recall: Mapping[str, tuple[float, ...]]
    calibration: Mapping[str, Calibration]
    serving: ServingStats
    ece_bins: int = 10
    notes: tuple[str, ...] = ()

    @property
    def edges(self) -> tuple[float, ...]:
        """The curve's edges, ascending."""
        return tuple(edge for edge, _ in self.curve)


def write_report(out_dir: str | Path, results: DemoResults) -> Path:
    """Write ``report.md`` and the figures into a directory.

    Args:
        out_dir: the directory; created if missing, files in it replaced.
        results: what the demo measured.

    Returns:
        The path of ``report.md``.

    Raises:
        OSError: the directory or a file cannot be written.
    """
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    _save(_shares_figure(results), directory / FIGURES[0])
    _save(_variants_figure(results), directory / FIGURES[1])
    _save(_quality_figure(results), directory / FIGURES[2])
    _save(_serving_figure(results.serving), directory / FIGURES[3])
    path = directory / "report.md"
    path.write_text(_markdown(results), encoding="utf-8")
    logger.info("wrote the demo report to %s", path)
    return path


# -- Markdown -----------------------------------------------------------------


def _markdown(results: DemoResults) -> str:
    """The whole report text."""
    sections = [
        [f"# {results.title}", "", f"Events: {results.data_source}."],
        _models_section(results.models),
        _served_section(results),
        _variants_section(results),
        _quality_section(results),
        _serving_section(results.serving),
    ]
    if results.notes:
        sections.append(["## Notes", "", *[f"- {note}" for note in results.notes]])
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def _table(
    header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1
) -> list[str]:
    """A Markdown table: text columns first, left-aligned; numbers right."""
    align = [":---"] * text_columns + ["---:"] * (len(header) - text_columns)
    lines = [header, align, *rows]
    return ["| " + " | ".join(cells) + " |" for cells in lines]


def _models_section(models: Sequence[ModelSummary]) -> list[str]:
    rows = [
        [
            m.name,
            m.description,
            m.format,
            f"{m.beta:.4f}",
            f"{m.train_rows:,}",
            f"{m.train_seconds:.1f}",
        ]
        for m in models
    ]
    header = ["model", "recipe", "format", "beta", "training rows", "seconds"]
    return ["## Models", "", *_table(header, rows, text_columns=3)]


def _served_section(results: DemoResults) -> list[str]:
    """Pooled weekly shares as served, and the error summaries."""
    pooled = {(r.week, r.edge): r for r in results.served if r.tenant == ALL_TENANTS}
    weeks = sorted({week for week, _ in pooled if week is not None})
    header = ["week"] + [f"≥ {e:g} (target {t:.2f})" for e, t in results.curve]
    rows = []
    for week in weeks:
        marker = " (promotion)" if week == results.promotion_week else ""
        cells = [_share(pooled.get((week, edge))) for edge in results.edges]
        rows.append([f"{week}{marker}", *cells])
    before, after = _split_weeks(weeks, results.promotion_week)
    summary = [
        ["all weeks", *_errors(results.served, None)],
        ["before promotion", *_errors(results.served, before)],
        ["from promotion on", *_errors(results.served, after)],
    ]
    return [
        "## Score stability as served",
        "",
        "Share of events at or above each edge, all tenants pooled.",
        "",
        *_table(header, rows),
        "",
        "Median absolute relative error, |observed - target| / target, "
        "over edges and weeks:",
        "",
        *_table(["weeks", "pooled", "per tenant-week"], summary),
        "",
        f"![shares per week]({FIGURES[0]})",
    ]


def _variants_section(results: DemoResults) -> list[str]:
    weeks = ", ".join(str(week) for week in results.variant_weeks) or "all"
    rows = [
        [name, _number(v.mare), _number(v.mare_tenant_week)]
        for name, v in results.variants.items()
    ]
    header = ["variant", "median abs rel error, pooled", "per tenant-week"]
    return [
        "## What each way of serving the update would have given",
        "",
        f"Same events, weeks {weeks}.",
        "",
        *_table(header, rows),
        "",
        f"![variants per week]({FIGURES[1]})",
    ]


def _quality_section(results: DemoResults) -> list[str]:
    recall_header = ["scores"] + [f"recall ≥ {edge:g}" for edge in results.edges]
    recall_rows = [
        [label, *(f"{value:.4f}" for value in values)]
        for label, values in results.recall.items()
    ]
    calibration_rows = [
        [
            label,
            f"{c.brier:.5f}",
            f"{c.ece:.5f}",
            f"{c.mean_score:.5f}",
            f"{c.positive_rate:.5f}",
            f"{c.n:,}",
        ]
        for label, c in results.calibration.items()
    ]
    calibration_header = ["scores", "Brier", "ECE", "mean score", "fraud rate", "n"]
    return [
        "## Fraud caught and calibration",
        "",
        *_table(recall_header, recall_rows),
        "",
        f"ECE uses {results.ece_bins} equal-width bins over [0, 1].",
        "",
        *_table(calibration_header, calibration_rows),
        "",
        f"![recall and calibration]({FIGURES[2]})",
    ]


def _serving_section(serving: ServingStats) -> list[str]:
    errors = ", ".join(f"{code}: {n}" for code, n in sorted(serving.errors.items()))
    lead = serving.lead_time
    rows = [
        ["requests", f"{serving.requests:,}"],
        ["events scored", f"{serving.events:,}"],
        ["duration", f"{serving.duration_s:.1f} s"],
        ["latency p50", f"{serving.p50_ms:.2f} ms"],
        ["latency p99", f"{serving.p99_ms:.2f} ms"],
        ["latency p99.9", f"{serving.p999_ms:.2f} ms"],
        ["errors", f"{serving.error_count}" + (f" ({errors})" if errors else "")],
        ["requests lost during promotion", f"{serving.lost_during_promotion}"],
    ]
    steps = [
        ["compile (upload, import, parity check)", f"{lead.compile_s:.2f}"],
        ["register predictor and shadow route", f"{lead.register_s:.2f}"],
        ["fit mapping", f"{lead.fit_s:.2f}"],
        ["promote", f"{lead.promote_s:.2f}"],
        ["**work, shadow excluded**", f"**{lead.work_s:.2f}**"],
        ["shadow (waiting for a sample)", f"{lead.shadow_s:.2f}"],
        ["**upload to live**", f"**{lead.total_s:.2f}**"],
    ]
    return [
        "## Serving",
        "",
        *_table(["measure", "value"], rows),
        "",
        "Lead time of v2, upload to live:",
        "",
        *_table(["step", "seconds"], steps),
        "",
        f"![serving]({FIGURES[3]})",
    ]


def _share(row: ShareRow | None) -> str:
    return "" if row is None else f"{row.observed:.4f}"


def _number(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def _errors(rows: Sequence[ShareRow], weeks: set[int] | None) -> list[str]:
    """Median absolute relative errors, pooled and per tenant-week."""
    if weeks is not None and not weeks:
        return ["n/a", "n/a"]
    return [
        _number(median_abs_relative_error(rows, weeks=weeks)),
        _number(median_abs_relative_error(rows, per_tenant=True, weeks=weeks)),
    ]


def _split_weeks(
    weeks: Sequence[int], promotion: int | None
) -> tuple[set[int], set[int]]:
    """Weeks before the promotion week, and from it on."""
    if promotion is None:
        return set(weeks), set()
    return {w for w in weeks if w < promotion}, {w for w in weeks if w >= promotion}


# -- figures ------------------------------------------------------------------


def _save(figure: Figure, path: Path) -> None:
    figure.savefig(path, dpi=_DPI)


def _edge_grid(results: DemoResults, title: str) -> tuple[Figure, list[Axes]]:
    """One panel per edge, two columns, weeks on the x axis."""
    rows = math.ceil(len(results.curve) / 2)
    figure = Figure(figsize=_GRID_SIZE, layout="constrained")
    axes = list(figure.subplots(rows, 2, squeeze=False).ravel())
    figure.suptitle(title)
    for ax, (edge, target) in zip(axes, results.curve, strict=False):
        ax.axhline(target, color="black", linestyle="--", linewidth=1, label="target")
        if results.promotion_week is not None:
            ax.axvline(
                results.promotion_week, color="tab:red", linewidth=1, label="promotion"
            )
        ax.set_title(f"share of events with score ≥ {edge:g}")
        ax.set_xlabel("week")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[len(results.curve) :]:
        ax.set_visible(False)
    return figure, axes


def _series(
    rows: Sequence[ShareRow], tenant: str, edge: float
) -> tuple[list[int], list[float]]:
    """Weeks and observed shares of one tenant at one edge, by week."""
    points = sorted(
        (r.week, r.observed)
        for r in rows
        if r.tenant == tenant and r.edge == edge and r.week is not None
    )
    return [week for week, _ in points], [share for _, share in points]


def _shares_figure(results: DemoResults) -> Figure:
    figure, axes = _edge_grid(results, "Served score: share at or above each edge")
    tenants = sorted({r.tenant for r in results.served} - {ALL_TENANTS})
    for ax, (edge, _target) in zip(axes, results.curve, strict=False):
        for i, tenant in enumerate(tenants):
            weeks, shares = _series(results.served, tenant, edge)
            ax.plot(
                weeks,
                shares,
                color="tab:blue",
                linewidth=0.6,
                alpha=0.35,
                label="each tenant" if i == 0 else None,
            )
        weeks, shares = _series(results.served, ALL_TENANTS, edge)
        ax.plot(
            weeks,
            shares,
            color="tab:blue",
            linewidth=2.2,
            marker="o",
            markersize=3,
            label="all tenants",
        )
    # Every panel has the same lines: one legend is enough.
    axes[0].legend(fontsize="small")
    return figure


def _variants_figure(results: DemoResults) -> Figure:
    figure, axes = _edge_grid(results, "Each way of serving the update (all tenants)")
    for ax, (edge, _target) in zip(axes, results.curve, strict=False):
        for name, variant in results.variants.items():
            weeks, shares = _series(variant.rows, ALL_TENANTS, edge)
            ax.plot(
                weeks,
                shares,
                marker="o",
                markersize=3,
                label=f"{name} (MARE {_number(variant.mare)})",
            )
    axes[0].legend(fontsize="small")
    return figure


def _quality_figure(results: DemoResults) -> Figure:
    figure = Figure(figsize=_WIDE_SIZE, layout="constrained")
    recall_ax, brier_ax, ece_ax = figure.subplots(1, 3)
    _grouped_bars(recall_ax, results.recall, [f"≥ {e:g}" for e in results.edges])
    recall_ax.set_title("fraud caught (recall) at each edge")
    recall_ax.set_ylim(0, 1)
    labels = list(results.calibration)
    colours = [f"C{i}" for i in range(len(labels))]
    brier_ax.bar(labels, [c.brier for c in results.calibration.values()], color=colours)
    brier_ax.set_title("Brier score (lower is better)")
    ece_ax.bar(labels, [c.ece for c in results.calibration.values()], color=colours)
    ece_ax.set_title(f"ECE, {results.ece_bins} bins (lower is better)")
    for ax in (brier_ax, ece_ax):
        ax.tick_params(axis="x", labelrotation=20, labelsize="small")
    return figure


def _grouped_bars(
    ax: Axes, values: Mapping[str, Sequence[float]], groups: Sequence[str]
) -> None:
    """Bars of each label's values, side by side within each group."""
    width = 0.8 / max(1, len(values))
    for i, (label, series) in enumerate(values.items()):
        offset = (i - (len(values) - 1) / 2) * width
        positions = [g + offset for g in range(len(groups))]
        ax.bar(positions, list(series), width=width, label=label)
    ax.set_xticks(range(len(groups)), groups)
    ax.legend(fontsize="small")


def _serving_figure(serving: ServingStats) -> Figure:
    figure = Figure(figsize=_WIDE_SIZE, layout="constrained")
    timeline_ax, lead_ax = figure.subplots(1, 2, width_ratios=[2, 1])
    if serving.timeline:
        _timeline(timeline_ax, serving)
    else:
        names = ["p50", "p99", "p99.9"]
        values = [serving.p50_ms, serving.p99_ms, serving.p999_ms]
        timeline_ax.bar(names, values, color=["C0", "C1", "C3"])
        timeline_ax.set_ylabel("latency (ms)")
        timeline_ax.set_title("request latency over the replay")
    _lead_time(lead_ax, serving.lead_time)
    return figure


def _timeline(ax: Axes, serving: ServingStats) -> None:
    """Latency percentiles over time, request rate on a second axis."""
    points = serving.timeline
    t = [p.t_s for p in points]
    ax.plot(t, [p.p50_ms for p in points], label="p50")
    ax.plot(t, [p.p99_ms for p in points], label="p99")
    ax.plot(t, [p.p999_ms for p in points], label="p99.9")
    errors = [(p.t_s, p.p999_ms) for p in points if p.errors]
    if errors:
        ax.scatter(
            *zip(*errors, strict=True),
            color="tab:red",
            marker="x",
            label="errors",
            zorder=3,
        )
    if serving.promotion_s is not None:
        ax.axvline(serving.promotion_s, color="tab:red", linewidth=1, label="promotion")
    ax.set_xlabel("seconds into the replay")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.set_title("request latency and rate")
    rate_ax = ax.twinx()
    rate_ax.plot(
        t,
        [p.requests for p in points],
        color="grey",
        linewidth=0.8,
        alpha=0.6,
        label="requests / interval",
    )
    rate_ax.set_ylabel("requests per interval")
    ax.legend(fontsize="small", loc="upper left")


def _lead_time(ax: Axes, lead: LeadTime) -> None:
    """Work steps stacked in one bar; the shadow period in its own bar."""
    left = 0.0
    steps = [
        ("compile", lead.compile_s),
        ("register", lead.register_s),
        ("fit", lead.fit_s),
        ("promote", lead.promote_s),
    ]
    for i, (name, seconds) in enumerate(steps):
        ax.barh("work", seconds, left=left, color=f"C{i}", label=name)
        left += seconds
    ax.barh("shadow", lead.shadow_s, color="lightgrey", hatch="//", label="shadow")
    ax.set_xlabel("seconds")
    ax.set_title(f"v2 upload to live: {lead.total_s:.1f} s ({lead.work_s:.1f} s work)")
    ax.legend(fontsize="small")
