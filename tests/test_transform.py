"""Posterior correction and quantile mapping, through the public functions.

These run on whichever kernels ``muse._fast`` picked; ``test_fast.py`` reruns
this file with ``MUSE_PURE_PYTHON=1`` so both are covered.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import pickle
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from muse._errors import BadRequest, MappingFitError
from muse._transform import (
    DEFAULT_CURVE,
    QuantileMapping,
    posterior_correction,
    posterior_correction_margin,
)

TARGETS = tuple(DEFAULT_CURVE.values())
EDGES = tuple(DEFAULT_CURVE)


def uniform(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(n)


def at_or_above(mapping: QuantileMapping, sample: np.ndarray) -> list[int]:
    """How many sample scores map at or above each edge, counted."""
    mapped = mapping.apply(sample)
    return [int(np.count_nonzero(mapped >= edge)) for edge in mapping.edges]


# -- posterior correction -----------------------------------------------------


def test_posterior_correction_closed_form() -> None:
    assert posterior_correction(0.5, 0.5) == 1 / 3
    assert posterior_correction(0.75, 0.5) == pytest.approx(0.6, rel=1e-15)
    assert posterior_correction(0.9, 0.1) == pytest.approx(9 / 19, rel=1e-15)


def test_posterior_correction_identity_at_beta_one() -> None:
    scores = uniform(1000)

    assert np.array_equal(posterior_correction(scores, 1.0), scores)
    assert posterior_correction(0.123456789, 1) == 0.123456789


@pytest.mark.parametrize("beta", [1.0, 0.5, 1e-6])
def test_posterior_correction_fixes_zero_and_one(beta: float) -> None:
    assert posterior_correction(0.0, beta) == 0.0
    assert posterior_correction(1.0, beta) == 1.0


def test_posterior_correction_finite_and_strict_near_the_ends() -> None:
    k = np.arange(1, 1001, dtype=np.float64)
    scores = np.concatenate([k * 1e-300, 0.5 + k * 1e-6, 1.0 - k[::-1] * 2.0**-53])

    corrected = posterior_correction(scores, 1e-6)

    assert np.all(np.isfinite(corrected))
    assert np.all(np.diff(corrected) > 0)
    assert 0.0 < corrected[0] and corrected[-1] < 1.0


def test_posterior_correction_keeps_shape_and_type() -> None:
    grid = np.array([[0.0, 0.5], [0.25, 1.0]], dtype=np.float32)

    corrected = posterior_correction(grid, 0.5)

    assert corrected.shape == (2, 2) and corrected.dtype == np.float64
    assert corrected[0, 1] == 1 / 3
    assert isinstance(posterior_correction(0.5, 0.5), float)
    assert posterior_correction([0, 1], 0.5).tolist() == [0.0, 1.0]


@pytest.mark.parametrize(
    ("beta", "match"),
    [
        (0, r"beta must be in \(0, 1\], got 0\.0"),
        (1.5, r"beta must be in \(0, 1\], got 1\.5"),
        (-0.2, r"beta must be in \(0, 1\], got -0\.2"),
        (math.nan, r"beta must be in \(0, 1\], got nan"),
        ("0.5", r"beta must be a number in \(0, 1\], got '0\.5'"),
        (True, r"beta must be a number in \(0, 1\], got True"),
    ],
)
def test_posterior_correction_refuses_bad_beta(beta: Any, match: str) -> None:
    with pytest.raises(BadRequest, match=match):
        posterior_correction(0.5, beta)
    with pytest.raises(ValueError, match=match):
        posterior_correction_margin(0.0, beta)


@pytest.mark.parametrize(
    ("scores", "match"),
    [
        ([0.1, math.nan], "score at index 1 is nan, not in"),
        ([1.0, 1.25], "score at index 1 is 1.25, not in"),
        (math.nan, "score at index 0 is nan"),
        (["a"], "scores must be real numbers"),
    ],
)
def test_posterior_correction_refuses_bad_scores(scores: Any, match: str) -> None:
    with pytest.raises(BadRequest, match=match):
        posterior_correction(scores, 0.5)


def test_margin_form_agrees_with_probability_form() -> None:
    margins = np.linspace(-20.0, 20.0, 801)
    probabilities = 1.0 / (1.0 + np.exp(-margins))

    by_margin = posterior_correction_margin(margins, 0.1)
    by_probability = posterior_correction(probabilities, 0.1)

    np.testing.assert_allclose(by_margin, by_probability, rtol=1e-13, atol=0)
    assert posterior_correction_margin(0.0, 1.0) == 0.5


def test_margin_form_is_exact_where_probabilities_tie() -> None:
    margins = np.array([38.0, 40.0, 45.0])
    probabilities = 1.0 / (1.0 + np.exp(-margins))

    assert np.all(probabilities == 1.0)
    assert np.all(posterior_correction(probabilities, 1e-6) == 1.0)
    corrected = posterior_correction_margin(margins, 1e-6)
    assert np.all(np.diff(corrected) > 0) and corrected[-1] < 1.0
    # sigmoid(40 + log 1e-6) = 1 / (1 + 1e6 * e^-40), to double precision.
    assert corrected[1] == pytest.approx(1 / (1 + 1e6 * math.exp(-40.0)), rel=1e-15)


def test_margin_form_refuses_nan() -> None:
    with pytest.raises(BadRequest, match="margin at index 2 is NaN"):
        posterior_correction_margin([0.0, 1.0, math.nan], 0.5)


@settings(max_examples=80, deadline=None)
@given(
    scores=hnp.arrays(np.float64, st.integers(1, 300), elements=st.floats(0.0, 1.0)),
    beta=st.floats(0.0, 1.0, exclude_min=True),
)
def test_posterior_correction_monotone_finite_bounded(
    scores: np.ndarray, beta: float
) -> None:
    corrected = posterior_correction(np.sort(scores), beta)

    assert np.all(np.isfinite(corrected))
    assert np.all((corrected >= 0.0) & (corrected <= 1.0))
    assert np.all(np.diff(corrected) >= 0)


# -- fitting on clean samples -------------------------------------------------


def test_fit_meets_the_default_curve_exactly() -> None:
    sample = uniform(5000)

    mapping = QuantileMapping.fit(sample)

    assert at_or_above(mapping, sample) == [3500, 1750, 500, 250]
    assert mapping.achieved == TARGETS
    assert mapping.sample_size == 5000


def test_fit_rounds_to_the_nearest_count() -> None:
    sample = uniform(1237, seed=1)

    mapping = QuantileMapping.fit(sample)

    # 0.70 * 1237 = 865.9, 0.35 * 1237 = 432.95, 123.7, 61.85
    assert at_or_above(mapping, sample) == [866, 433, 124, 62]
    for achieved, target in zip(mapping.achieved, TARGETS, strict=True):
        assert abs(achieved - target) <= 1 / 1237


def test_fit_places_knots_midway_between_order_statistics() -> None:
    sample = uniform(5000, seed=2)
    ordered = np.sort(sample)

    mapping = QuantileMapping.fit(sample)

    for knot, count in zip(mapping.knots, [3500, 1750, 500, 250], strict=True):
        below, above = ordered[5000 - count - 1], ordered[5000 - count]
        assert below < knot <= above
        assert knot == pytest.approx(0.5 * (below + above), rel=1e-15, abs=0)


def test_fit_map_is_monotone_continuous_and_through_its_points() -> None:
    mapping = QuantileMapping.fit(uniform(5000, seed=3))
    grid = np.linspace(-0.5, 1.5, 200_001)

    mapped = mapping.apply(grid)

    assert np.all(np.diff(mapped) >= 0)
    # Continuous: no step bigger than the steepest piece allows.
    points = np.array([0.0, *mapping.knots, 1.0])
    values = np.array([0.0, *mapping.edges, 1.0])
    steepest = np.max(np.diff(values) / np.diff(points))
    assert np.max(np.diff(mapped)) <= steepest * (grid[1] - grid[0]) * (1 + 1e-9)
    assert mapping.apply(np.array(mapping.knots)).tolist() == list(mapping.edges)
    assert (mapping.apply(0.0), mapping.apply(1.0)) == (0.0, 1.0)


def test_fit_with_a_custom_curve() -> None:
    sample = uniform(2000, seed=4)

    mapping = QuantileMapping.fit(sample, [(0.9, 0.01), (0.5, 0.5)])

    assert mapping.curve == ((0.5, 0.5), (0.9, 0.01))
    assert at_or_above(mapping, sample) == [1000, 20]


def test_fit_logs_achieved_shares(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="muse.calibration"):
        mapping = QuantileMapping.fit(uniform(2000), tenant="acme")

    (record,) = caplog.records
    assert record.levelno == logging.INFO
    assert mapping.id[:12] in record.getMessage()
    assert "tenant acme" in record.getMessage()
    assert record.getMessage().endswith("achieved (0.7, 0.35, 0.1, 0.05)")


# -- degenerate samples -------------------------------------------------------


def test_tied_scores_map_to_one_value() -> None:
    sample = np.random.default_rng(5).integers(1, 100, 5000) / 100

    mapping = QuantileMapping.fit(sample)

    mapped = mapping.apply(sample)
    for value in np.unique(sample):
        assert np.unique(mapped[sample == value]).size == 1
    assert at_or_above(mapping, sample) == [round(a * 5000) for a in mapping.achieved]


def test_ties_get_the_nearest_reachable_share() -> None:
    sample = np.random.default_rng(6).integers(1, 100, 5000) / 100
    reachable = reachable_counts(sample)

    mapping = QuantileMapping.fit(sample)

    counts = at_or_above(mapping, sample)
    for count, target in zip(counts, TARGETS, strict=True):
        nearest = min(reachable, key=lambda c: abs(c - target * 5000))
        assert count == nearest


def cluster_sample() -> np.ndarray:
    """90 % of 10 000 scores at 0.3; 500 distinct below, 500 distinct above."""
    return np.concatenate(
        [np.linspace(0.05, 0.25, 500), np.full(9000, 0.3), np.linspace(0.35, 0.95, 500)]
    )


def test_constant_cluster_goes_to_the_nearest_edge(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sample = cluster_sample()

    with caplog.at_level(logging.INFO, logger="muse.calibration"):
        mapping = QuantileMapping.fit(sample)

    # 70 % cannot be cut out of the block: 95 % (the block and above) is
    # nearer than 5 %.  35 % is nearest 5 %; 10 % and 5 % then take the
    # next reachable counts down rather than collapse onto 5 %.
    assert mapping.achieved == (0.95, 0.05, 0.0499, 0.0498)
    assert at_or_above(mapping, sample) == [9500, 500, 499, 498]
    cluster = mapping.apply(0.3)
    assert EDGES[0] <= cluster < EDGES[1]
    assert mapping.knots[0] < 0.3 < mapping.knots[1]
    assert all(a < b for a, b in itertools.pairwise(mapping.knots))
    (record,) = caplog.records
    assert record.getMessage().endswith(
        "achieved (0.95, 0.05, 0.0499, 0.0498); off target by more than 1/n"
        " (tied scores) at edges [0.2, 0.5, 0.6, 0.8]"
    )


def test_cluster_at_the_top_goes_to_the_nearest_edge() -> None:
    # 40 % distinct below 0.5, then 60 % at 0.5: the targets 35 %, 10 % and
    # 5 % all fall inside the block.  It goes to edge 0.5 (60 % is nearest
    # 35 %), and the knots of edges 0.6 and 0.8 both sit above it.
    sample = np.concatenate([np.linspace(0.1, 0.4, 4000), np.full(6000, 0.5)])

    mapping = QuantileMapping.fit(sample)

    assert at_or_above(mapping, sample) == [7000, 6000, 0, 0]
    assert mapping.achieved == (0.7, 0.6, 0.0, 0.0)
    assert EDGES[1] <= mapping.apply(0.5) < EDGES[2]
    assert mapping.knots[1] < 0.5 < mapping.knots[2] < mapping.knots[3] < 1.0


def test_constant_sample_is_refused() -> None:
    with pytest.raises(
        MappingFitError,
        match="too few distinct scores: 1 distinct values in 5000 scores, need at"
        " least 9",
    ):
        QuantileMapping.fit(np.full(5000, 0.4))


@pytest.mark.parametrize(
    ("sample", "kwargs", "match"),
    [
        ([], {}, "empty sample: cannot fit a mapping on 0 scores"),
        (uniform(999), {}, "sample too small: 999 scores, need at least 1000"),
        (uniform(50), {"min_sample": 100}, "sample too small: 50 scores, need at"),
        (np.arange(2000) % 5 / 10 + 0.1, {}, "too few distinct scores: 5 distinct"),
        (uniform(2000), {"min_distinct": 5000}, "need at least 5000"),
        ([*uniform(1999), math.nan], {}, "1 scores that are NaN or outside"),
        ([*uniform(1999), 1.5], {}, r"first: index 1999, value 1\.5"),
        (["x"] * 2000, {}, "sample must be real numbers"),
    ],
)  # fmt: skip
def test_unfit_samples_are_refused(sample: Any, kwargs: Any, match: str) -> None:
    with pytest.raises(MappingFitError, match=match):
        QuantileMapping.fit(sample, **kwargs)


@pytest.mark.parametrize(
    ("curve", "match"),
    [
        ({}, "curve is empty"),
        ([(0.2, 0.7), (0.2, 0.5)], "curve edges must be strictly increasing"),
        ({0.0: 0.5}, "curve edges must be strictly increasing inside"),
        ({1.0: 0.5}, "curve edges must be strictly increasing inside"),
        ({0.2: 0.3, 0.5: 0.4}, "target shares must be strictly decreasing"),
        ({0.2: 1.0}, "target shares must be strictly decreasing inside"),
        ({0.2: 0.0}, "target shares must be strictly decreasing inside"),
        ({0.2: math.nan}, "target shares must be strictly decreasing"),
        ([(0.2,)], "curve must be .edge, target share. pairs"),
        ({0.2: "a"}, "curve target must be a number"),
    ],
)
def test_bad_curves_are_refused(curve: Any, match: str) -> None:
    with pytest.raises(MappingFitError, match=match):
        QuantileMapping.fit(uniform(2000), curve)


# -- applying -----------------------------------------------------------------


def test_apply_clamps_into_zero_one() -> None:
    mapping = QuantileMapping.fit(uniform(2000))

    mapped = mapping.apply([-math.inf, -3.0, 0.0, 1.0, 7.0, math.inf])

    assert mapped.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]


def test_apply_refuses_nan() -> None:
    mapping = QuantileMapping.fit(uniform(2000))

    with pytest.raises(BadRequest, match="index 2 is NaN"):
        mapping.apply(np.array([0.1, 0.2, math.nan]))
    with pytest.raises(ValueError, match="index 0 is NaN"):
        mapping.apply(math.nan)
    with pytest.raises(BadRequest, match="scores must be real numbers"):
        mapping.apply(np.array(["0.5"]))


def test_apply_keeps_shape_and_type() -> None:
    mapping = QuantileMapping.fit(uniform(2000))
    grid = uniform(12).reshape(3, 4)

    mapped = mapping.apply(grid)

    assert mapped.shape == (3, 4)
    assert np.array_equal(mapped.ravel(), mapping.apply(grid.ravel()))
    assert isinstance(mapping.apply(0.5), float)
    assert mapping.apply(np.float32(0.25)) == mapping.apply(float(np.float32(0.25)))


@settings(max_examples=80, deadline=None)
@given(scores=hnp.arrays(np.float64, st.integers(0, 300)))
def test_apply_monotone_finite_bounded_for_any_input(scores: np.ndarray) -> None:
    mapping = _shared_mapping()
    finite = np.sort(scores[~np.isnan(scores)])

    mapped = mapping.apply(finite)

    assert np.all(np.isfinite(mapped))
    assert np.all((mapped >= 0.0) & (mapped <= 1.0))
    assert np.all(np.diff(mapped) >= 0)


# -- metadata, storage and loading --------------------------------------------


def test_round_trip_through_json_is_exact() -> None:
    mapping = QuantileMapping.fit(uniform(3000), predictor="card-fraud@2", tenant="t1")
    scores = uniform(10_000, seed=9)

    loaded = QuantileMapping.from_dict(json.loads(json.dumps(mapping.to_dict())))

    assert loaded == mapping
    assert loaded.knots == mapping.knots and loaded.fitted_at == mapping.fitted_at
    assert np.array_equal(loaded.apply(scores), mapping.apply(scores))
    assert _plain(mapping.to_dict())


def test_pickle_round_trip() -> None:
    mapping = QuantileMapping.fit(uniform(3000))

    loaded = pickle.loads(pickle.dumps(mapping))

    assert loaded == mapping
    assert np.array_equal(loaded.apply(uniform(100)), mapping.apply(uniform(100)))


def test_id_is_a_stable_content_digest() -> None:
    sample = uniform(3000)

    first = QuantileMapping.fit(sample, tenant="t1")
    again = QuantileMapping.fit(sample, tenant="t1")
    other = QuantileMapping.fit(sample, tenant="t2")

    assert first.id == again.id != other.id
    assert len(first.id) == 64 and int(first.id, 16) >= 0


def test_load_refuses_knots_out_of_order() -> None:
    data = QuantileMapping.fit(uniform(3000)).to_dict()
    data["knots"][1], data["knots"][2] = data["knots"][2], data["knots"][1]

    with pytest.raises(MappingFitError, match="knots must be strictly increasing"):
        QuantileMapping.from_dict(data)


def test_load_refuses_altered_knots() -> None:
    data = QuantileMapping.fit(uniform(3000)).to_dict()
    data["knots"][0] = math.nextafter(data["knots"][0], 0.0)

    with pytest.raises(MappingFitError, match="does not match its content"):
        QuantileMapping.from_dict(data)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"knots": [0.1, 0.2, 0.3, 1.0]}, "knots must be strictly increasing inside"),
        ({"knots": [0.1, 0.2, 0.3]}, "needs 4 knots and achieved shares, got 3"),
        ({"knots": "0.1"}, "knots must be a list"),
        ({"knots": [0.1, 0.2, "x", 0.4]}, "knot must be a number, got 'x'"),
        ({"achieved": [0.7, 0.35, 0.1, 1.5]}, r"achieved shares must be in \[0, 1\]"),
        ({"sample_size": 0}, "sample_size must be a positive integer"),
        ({"sample_size": 3.5}, "sample_size must be a positive integer"),
        ({"tenant": 7}, "tenant must be a string or None"),
        ({"fitted_at": math.inf}, "fitted_at must be finite"),
        ({"format": "other/9"}, "mapping: format 'other/9'"),
        ({"curve": [[0.2, 0.7]]}, "needs 1 knots"),
        ({"extra": 1}, r"unknown \['extra'\]"),
        ({"id": "0" * 64}, "does not match its content"),
    ],
)
def test_load_refuses_bad_fields(change: dict[str, Any], match: str) -> None:
    data = {**QuantileMapping.fit(uniform(3000)).to_dict(), **change}

    with pytest.raises(MappingFitError, match=match):
        QuantileMapping.from_dict(data)


def test_load_refuses_missing_fields() -> None:
    data = QuantileMapping.fit(uniform(3000)).to_dict()
    del data["knots"]

    with pytest.raises(MappingFitError, match=r"missing \['knots'\]"):
        QuantileMapping.from_dict(data)
    with pytest.raises(MappingFitError, match="a mapping must be a dict, got list"):
        QuantileMapping.from_dict([])  # type: ignore[arg-type]


# -- properties of fit --------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(n=st.integers(200, 3000), seed=st.integers(0, 2**32 - 1))
def test_fit_reproduces_targets_within_one_over_n(n: int, seed: int) -> None:
    sample = np.random.default_rng(seed).random(n)

    mapping = QuantileMapping.fit(sample, min_sample=1)

    counts = at_or_above(mapping, sample)
    assert counts == [round(a * n) for a in mapping.achieved]
    assert all(abs(c / n - t) <= 1 / n for c, t in zip(counts, TARGETS, strict=True))


@settings(max_examples=80, deadline=None)
@given(
    pool=st.lists(st.floats(0.001, 0.999), min_size=4, max_size=12, unique=True),
    picks=st.lists(st.integers(0, 11), min_size=20, max_size=200),
)
def test_fit_on_tied_samples_is_optimal(pool: list[float], picks: list[int]) -> None:
    sample = np.array([pool[i % len(pool)] for i in picks])
    reachable = reachable_counts(sample)
    assume(len(reachable) >= len(TARGETS))
    n = sample.size

    mapping = QuantileMapping.fit(sample, min_sample=1, min_distinct=1)

    counts = at_or_above(mapping, sample)
    assert counts == [round(a * n) for a in mapping.achieved]
    assert all(c in reachable for c in counts)
    # Strictly decreasing, but for edges above the whole sample.
    assert all(a > b or a == b == 0 for a, b in itertools.pairwise(counts))
    wanted = [t * n for t in TARGETS]
    assert total_distance(counts, wanted) == pytest.approx(
        min(total_distance(c, wanted) for c in allowed_choices(reachable, 4))
    )
    if all(round(w) in reachable for w in wanted):
        for count, target in zip(counts, TARGETS, strict=True):
            assert abs(count / n - target) <= 1 / n


# -- helpers ------------------------------------------------------------------


def reachable_counts(sample: np.ndarray) -> set[int]:
    """Counts a knot can put at or above it, for samples inside (0, 1)."""
    values = np.unique(sample)
    return {0} | {int(np.count_nonzero(sample >= v)) for v in values}


def allowed_choices(reachable: set[int], edges: int) -> list[list[int]]:
    """Every count choice fit may make: strictly decreasing, then zeros."""
    positive = sorted((c for c in reachable if c > 0), reverse=True)
    return [
        [*head, *[0] * (edges - size)]
        for size in range(edges + 1)
        for head in itertools.combinations(positive, size)
    ]


def total_distance(counts: list[int], wanted: list[float]) -> float:
    return sum(abs(c - w) for c, w in zip(counts, wanted, strict=True))


_MAPPING: list[QuantileMapping] = []


def _shared_mapping() -> QuantileMapping:
    if not _MAPPING:
        _MAPPING.append(QuantileMapping.fit(uniform(2000, seed=11)))
    return _MAPPING[0]


def _plain(value: object) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or type(value) in (str, int, float)
