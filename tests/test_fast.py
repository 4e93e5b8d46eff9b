"""The score kernels, compiled and pure-numpy, held to the same tests.

Every test takes ``kernels``, parametrized over the compiled module and its
numpy twin, so one run covers both whatever ``MUSE_PURE_PYTHON`` says.  The
last test reruns ``test_transform.py`` with the twin selected.
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import muse._fast
from muse._fast import _reference

_compiled: ModuleType | None
try:
    from muse._fast import _mapping as _compiled
except ImportError:  # not built; the compiled cases skip and say so
    _compiled = None

KNOTS = (0.25, 0.5, 0.75)
EDGES = (0.5, 0.75, 0.875)
BELOW = -math.inf


@pytest.fixture(params=["compiled", "reference"])
def kernels(request: pytest.FixtureRequest) -> ModuleType:
    if request.param == "reference":
        return _reference
    if _compiled is None:
        pytest.skip("muse._fast._mapping is not built (pip install -e .)")
    return _compiled


def test_compiled_kernels_selected_unless_pure_python_asked() -> None:
    pure = os.environ.get("MUSE_PURE_PYTHON", "") not in ("", "0")

    assert muse._fast.IMPLEMENTATION == ("reference" if pure else "compiled")


# -- mapping table ------------------------------------------------------------


def test_mapping_passes_through_its_points_exactly(kernels: ModuleType) -> None:
    table = kernels.MappingTable(KNOTS, EDGES)

    mapped = table.apply(np.array([0.0, *KNOTS, 1.0]))

    assert mapped.tolist() == [0.0, *EDGES, 1.0]


def test_mapping_is_linear_between_points(kernels: ModuleType) -> None:
    table = kernels.MappingTable(KNOTS, EDGES)

    mapped = table.apply(np.array([0.125, 0.375, 0.625, 0.875]))

    # Slopes 2, 1, 0.5 and 0.5, all exact in binary.
    assert mapped.tolist() == [0.25, 0.625, 0.8125, 0.9375]


def test_mapping_clamps_outside_zero_one(kernels: ModuleType) -> None:
    table = kernels.MappingTable(KNOTS, EDGES)

    mapped = table.apply(np.array([-math.inf, -3.0, -0.0, 1.5, math.inf]))

    assert mapped.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("knot", [1e-300, 0.3, 0.5, 1 - 2**-52])
def test_mapping_reaches_an_edge_exactly_at_its_knot(
    kernels: ModuleType, knot: float
) -> None:
    table = kernels.MappingTable([knot], [0.8])
    below = math.nextafter(knot, BELOW)

    mapped = table.apply(np.array([below, knot, math.nextafter(knot, 2.0)]))

    assert mapped[0] < 0.8 <= mapped[1] <= mapped[2]


def test_mapping_separates_adjacent_knots(kernels: ModuleType) -> None:
    # Two knots one ulp apart: the slope between them is huge, and still
    # each edge is reached exactly at its own knot and not before.
    knot = 0.5
    table = kernels.MappingTable([knot, math.nextafter(knot, 1.0)], [0.2, 0.9])
    scores = np.array([math.nextafter(knot, 0.0), knot, math.nextafter(knot, 1.0)])

    mapped = table.apply(scores)

    assert mapped[0] < 0.2 <= mapped[1] < 0.9 <= mapped[2]


def test_mapping_float32_equals_float64_of_the_same_values(
    kernels: ModuleType,
) -> None:
    table = kernels.MappingTable(KNOTS, EDGES)
    scores = np.random.default_rng(3).random(1000).astype(np.float32)

    assert np.array_equal(table.apply(scores), table.apply(scores.astype(np.float64)))


def test_mapping_writes_into_out(kernels: ModuleType) -> None:
    table = kernels.MappingTable(KNOTS, EDGES)
    out = np.full(2, 7.0)

    result = table.apply(np.array([0.25, 1.0]), out)

    assert result is out
    assert out.tolist() == [0.5, 1.0]


def test_mapping_empty_input(kernels: ModuleType) -> None:
    table = kernels.MappingTable(KNOTS, EDGES)

    assert table.apply(np.empty(0)).shape == (0,)
    assert table.apply_into(np.empty(0), np.empty(0)) == -1


def test_mapping_nan_raises_naming_the_first(kernels: ModuleType) -> None:
    table = kernels.MappingTable(KNOTS, EDGES)
    scores = np.array([0.1, 0.2, math.nan, 0.3, math.nan])

    with pytest.raises(ValueError, match="score at index 2 is NaN"):
        table.apply(scores)
    with pytest.raises(ValueError, match="score at index 3 is NaN"):
        table.apply(np.array([[0.1, 0.2], [0.3, math.nan]], dtype=np.float32))


def test_mapping_into_reports_the_first_nan(kernels: ModuleType) -> None:
    table = kernels.MappingTable(KNOTS, EDGES)
    scores = np.array([0.1, math.nan, 0.3], dtype=np.float32)

    assert table.apply_into(scores, np.empty(3)) == 1
    assert table.apply_into(scores[::2].copy(), np.empty(2)) == -1


def test_mapping_into_matches_apply_on_any_buffer(kernels: ModuleType) -> None:
    table = kernels.MappingTable(KNOTS, EDGES)
    scores = np.random.default_rng(4).random(5000)
    out = np.empty(5000)

    assert table.apply_into(scores.data, out.data) == -1
    assert np.array_equal(out, table.apply(scores))


@pytest.mark.parametrize(
    "scores",
    [
        [0.125, 0.375],
        np.array([0.125, 0.375], dtype=np.float32),
        np.array([0.125, 9.0, 0.375])[::2],
        np.array([0.125, 0.375], dtype=">f8"),
        np.array([0, 1], dtype=np.int64),
    ],
)
def test_mapping_converts_other_real_numbers(
    kernels: ModuleType, scores: object
) -> None:
    table = kernels.MappingTable(KNOTS, EDGES)
    expected = table.apply(np.asarray(scores, dtype=np.float64).copy())

    assert np.array_equal(table.apply(scores), expected)


def test_mapping_keeps_the_shape(kernels: ModuleType) -> None:
    table = kernels.MappingTable(KNOTS, EDGES)
    grid = np.array([[0.125, 0.375], [0.625, 0.875]])

    assert table.apply(grid).tolist() == [[0.25, 0.625], [0.8125, 0.9375]]
    assert table.apply(0.125).shape == ()
    assert float(table.apply(0.125)) == 0.25


@pytest.mark.parametrize(
    ("scores", "out", "error", "match"),
    [
        (["0.5"], None, TypeError, "scores must be real numbers, got dtype <U3"),
        ([True], None, TypeError, "scores must be real numbers, got dtype bool"),
        ([0.5j], None, TypeError, "scores must be real numbers, got dtype complex"),
        ([0.5, None], None, TypeError, "scores must be real numbers, got dtype object"),
        (np.zeros(2), np.zeros(2, dtype=np.float32), TypeError, "out must be"),
        (np.zeros(2), np.zeros(4)[::2], TypeError, "out must be"),
        (
            np.zeros(2),
            np.zeros(3),
            ValueError,
            r"out has shape \(3,\), expected \(2,\)",
        ),
    ],
)
def test_mapping_refuses_what_is_not_a_number(
    kernels: ModuleType, scores: object, out: object, error: type, match: str
) -> None:
    table = kernels.MappingTable(KNOTS, EDGES)

    with pytest.raises(error, match=match):
        table.apply(scores, out)
    with pytest.raises(error, match=match.replace("scores", "(scores|margins)")):
        kernels.correct_margin(scores, 0.5, out)


@pytest.mark.parametrize(
    ("knots", "edges", "match"),
    [
        ([0.5, 0.5], [0.2, 0.6], "knots must be strictly increasing"),
        ([0.6, 0.5], [0.2, 0.6], "knots must be strictly increasing"),
        ([0.0, 0.5], [0.2, 0.6], "knots must be strictly increasing"),
        ([0.5, 1.0], [0.2, 0.6], "knots must be strictly increasing"),
        ([0.5, math.nan], [0.2, 0.6], "knots must be strictly increasing"),
        ([0.4, 0.5], [0.6, 0.2], "edges must be strictly increasing"),
        ([0.4, 0.5], [0.2], "need as many knots as edges"),
        ([], [], "need as many knots as edges"),
    ],
)
def test_mapping_table_refuses_bad_points(
    kernels: ModuleType, knots: list[float], edges: list[float], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        kernels.MappingTable(knots, edges)


def test_mapping_table_pickles(kernels: ModuleType) -> None:
    table = kernels.MappingTable(KNOTS, EDGES)

    copy = pickle.loads(pickle.dumps(table))

    assert (copy.knots, copy.edges) == (KNOTS, EDGES)
    assert copy.apply(np.array([0.375])).tolist() == [0.625]


@pytest.mark.skipif(_compiled is None, reason="muse._fast._mapping is not built")
def test_compiled_table_without_init_refuses_to_run() -> None:
    assert _compiled is not None
    table = _compiled.MappingTable.__new__(_compiled.MappingTable)

    with pytest.raises(ValueError, match="__init__ did not complete"):
        table.apply(np.array([0.5]))
    with pytest.raises(ValueError, match="__init__ did not complete"):
        table.apply_into(np.array([0.5]), np.empty(1))


@settings(max_examples=60, deadline=None)
@given(
    knots=st.lists(
        st.floats(0.0, 1.0, exclude_min=True, exclude_max=True),
        min_size=1, max_size=6, unique=True,
    ),
    scores=hnp.arrays(np.float64, st.integers(0, 200)),
)  # fmt: skip
def test_mapping_is_monotone_and_bounded_for_any_input(
    knots: list[float], scores: np.ndarray
) -> None:
    scores = scores[~np.isnan(scores)]
    knots = sorted(knots)
    edges = [(j + 1) / (len(knots) + 1) for j in range(len(knots))]
    for kernels in _available():
        table = kernels.MappingTable(knots, edges)

        mapped = table.apply(np.sort(scores))

        assert np.all((mapped >= 0.0) & (mapped <= 1.0))
        assert np.all(np.diff(mapped) >= 0.0)
        for knot, edge in zip(knots, edges, strict=True):
            assert np.array_equal(mapped >= edge, np.sort(scores) >= knot)


# -- posterior correction -----------------------------------------------------


@pytest.mark.parametrize(
    ("y", "beta", "expected"),
    [(0.5, 0.5, 1 / 3), (0.75, 0.5, 0.6), (0.8, 0.25, 0.5), (0.9, 0.1, 9 / 19)],
)
def test_posterior_closed_form(
    kernels: ModuleType, y: float, beta: float, expected: float
) -> None:
    corrected = kernels.correct_posterior(np.array([y]), beta)

    assert corrected[0] == pytest.approx(expected, rel=1e-15)


def test_posterior_one_third_is_exact(kernels: ModuleType) -> None:
    assert kernels.correct_posterior(np.array([0.5]), 0.5)[0] == 1 / 3


@pytest.mark.parametrize("beta", [1.0, 0.3, 1e-6])
def test_posterior_fixes_zero_and_one(kernels: ModuleType, beta: float) -> None:
    assert kernels.correct_posterior(np.array([0.0, 1.0]), beta).tolist() == [0.0, 1.0]


def test_posterior_identity_at_beta_one(kernels: ModuleType) -> None:
    scores = np.random.default_rng(5).random(10_000)

    assert np.array_equal(kernels.correct_posterior(scores, 1.0), scores)


def test_posterior_keeps_extremes_apart_at_tiny_beta(kernels: ModuleType) -> None:
    k = np.arange(1, 2001, dtype=np.float64)
    near_one = 1.0 - k * 2.0**-53  # adjacent doubles below 1
    near_zero = k * 1e-300

    high = kernels.correct_posterior(near_one[::-1].copy(), 1e-6)
    low = kernels.correct_posterior(near_zero, 1e-6)

    assert np.all(np.diff(high) > 0) and np.all(high < 1.0)
    assert np.all(np.diff(low) > 0) and np.all(low > 0.0)


@pytest.mark.parametrize(
    ("scores", "match"),
    [
        ([0.2, math.nan], "score at index 1 is nan, not in"),
        ([[0.2, 0.3], [0.4, 2.0]], "score at index 3 is 2.0, not in"),
        ([1.5], "score at index 0 is 1.5, not in"),
        ([0.0, -1e-300], "score at index 1 is -1e-300, not in"),
    ],
)
def test_posterior_refuses_scores_outside_zero_one(
    kernels: ModuleType, scores: list[float], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        kernels.correct_posterior(np.array(scores), 0.5)


@pytest.mark.parametrize("beta", [0.0, -0.5, 1.5, math.nan])
def test_posterior_refuses_beta_outside_zero_one(
    kernels: ModuleType, beta: float
) -> None:
    with pytest.raises(ValueError, match=r"beta must be in \(0, 1\], got"):
        kernels.correct_posterior(np.array([0.5]), beta)
    with pytest.raises(ValueError, match=r"beta must be in \(0, 1\], got"):
        kernels.correct_margin(np.array([0.5]), beta)


def test_posterior_into_reports_the_first_bad_score(kernels: ModuleType) -> None:
    scores = np.array([0.5, 0.25, 2.0, math.nan])

    assert kernels.correct_posterior_into(scores, 0.5, np.empty(4)) == 2
    assert kernels.correct_posterior_into(scores[:2].copy(), 0.5, np.empty(2)) == -1


@settings(max_examples=60, deadline=None)
@given(
    scores=hnp.arrays(np.float64, st.integers(1, 200), elements=st.floats(0.0, 1.0)),
    beta=st.floats(0.0, 1.0, exclude_min=True),
)
def test_posterior_is_monotone_finite_and_bounded(
    scores: np.ndarray, beta: float
) -> None:
    ordered = np.sort(scores)
    for kernels in _available():
        corrected = kernels.correct_posterior(ordered, beta)

        assert np.all(np.isfinite(corrected))
        assert np.all((corrected >= 0.0) & (corrected <= 1.0))
        assert np.all(np.diff(corrected) >= 0.0)


# -- margin form --------------------------------------------------------------


def test_margin_form_agrees_with_the_probability_form(kernels: ModuleType) -> None:
    margins = np.linspace(-30.0, 30.0, 6001)
    probabilities = 1.0 / (1.0 + np.exp(-margins))

    for beta in (1.0, 0.5, 0.01, 1e-6):
        by_margin = kernels.correct_margin(margins, beta)
        by_probability = kernels.correct_posterior(probabilities, beta)

        # Rounding y near 1 costs (1 - y) its low digits, and the correction
        # multiplies that relative error by up to 1 / beta.
        rtol = 8 * np.finfo(np.float64).eps / beta
        np.testing.assert_allclose(by_margin, by_probability, rtol=rtol, atol=0)


def test_margin_form_keeps_saturated_scores_apart(kernels: ModuleType) -> None:
    margins = np.array([40.0, 41.0, 50.0])

    corrected = kernels.correct_margin(margins, 1e-6)

    assert np.all(np.diff(corrected) > 0) and corrected[-1] < 1.0


def test_margin_form_infinities_and_nan(kernels: ModuleType) -> None:
    corrected = kernels.correct_margin(np.array([-math.inf, math.inf]), 0.5)

    assert corrected.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="margin at index 1 is NaN"):
        kernels.correct_margin(np.array([0.0, math.nan]), 0.5)
    assert kernels.correct_margin_into(np.array([math.nan]), 0.5, np.empty(1)) == 0


# -- the two implementations agree --------------------------------------------


@pytest.mark.skipif(_compiled is None, reason="muse._fast._mapping is not built")
def test_compiled_and_reference_agree() -> None:
    rng = np.random.default_rng(6)
    scores = rng.random(100_000)
    knots, edges = sorted(rng.random(5)), (0.2, 0.5, 0.6, 0.8, 0.9)
    margins = rng.normal(0.0, 8.0, 100_000)
    assert _compiled is not None

    pairs = [
        (_compiled.MappingTable(knots, edges).apply(scores),
         _reference.MappingTable(knots, edges).apply(scores), 1),
        (_compiled.correct_posterior(scores, 0.01),
         _reference.correct_posterior(scores, 0.01), 1),
        # libm's exp and numpy's may differ by an ulp, doubled by 1/(1+e).
        (_compiled.correct_margin(margins, 0.01),
         _reference.correct_margin(margins, 0.01), 4),
    ]  # fmt: skip

    for compiled, reference, ulps in pairs:
        np.testing.assert_array_max_ulp(compiled, reference, maxulp=ulps)


@pytest.mark.slow
@pytest.mark.skipif(
    muse._fast.IMPLEMENTATION == "reference", reason="this run already uses the twin"
)
def test_transform_suite_passes_on_the_numpy_twin() -> None:
    root = Path(__file__).parents[1]
    env = {**os.environ, "MUSE_PURE_PYTHON": "1"}

    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(root / "tests" / "test_transform.py")],
        cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip

    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def _available() -> list[ModuleType]:
    return [_reference] if _compiled is None else [_compiled, _reference]
