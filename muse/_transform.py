"""The two-level score transformation: posterior correction, then mapping.

Level one undoes what negative subsampling did to a model.  A model trained
on every positive but only a share ``beta`` of the negatives overstates
risk; ``posterior_correction`` maps its score ``y`` back to
``beta*y / (beta*y + (1 - y))``, the score it would have given had it seen
every negative.  ``posterior_correction_margin`` does the same from the raw
margin, ``sigmoid(margin + log(beta))``, and stays exact where ``y`` has
already rounded to 1.

Level two makes scores mean the same across model versions: a curve
promises the share of events at or above each score edge (by default 5 % at
or above 0.8), and a ``QuantileMapping`` fitted on a sample of corrected
scores bends them piecewise-linearly so the sample meets that curve.

Fitting (``QuantileMapping.fit``):

1. Sort the sample.  A knot ``k`` with ``a[i-1] < k <= a[i]`` puts exactly
   ``n - i`` scores at or above it; tied scores leave no such gap inside
   their block, so shares that would cut a block are unreachable.
2. Choose one reachable count per edge, minimising the total distance to
   the target counts ``t * n`` (a small dynamic programme), with counts
   strictly decreasing as edges rise: two edges on one count would send
   the same events past both, which is how a tie block pushes everything
   above it to the top edge.  Only a count of 0 may repeat, its knots
   spread above the sample's maximum, since that moves no event.  When
   every target is reachable this is rounding, within 1/(2n); a block that
   holds several targets goes to the edge nearest its share, and the higher
   edges' knots sit above it.
3. Put each knot midway across its gap, so knots strictly increase.
4. The compiled map reaches ``edge_k`` exactly when ``x >= knot_k`` (see
   ``muse._fast._reference.segment_table``), so each edge gets its chosen
   count; fit counts the mapped sample anyway and reports ``achieved``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray

from muse import _fast
from muse._errors import BadRequest, InternalError, MappingFitError

__all__ = [
    "DEFAULT_CURVE",
    "DEFAULT_MIN_SAMPLE",
    "QuantileMapping",
    "posterior_correction",
    "posterior_correction_margin",
]

logger = logging.getLogger("muse.calibration")

#: Edge -> share of events promised at or above it.
DEFAULT_CURVE: dict[float, float] = {0.2: 0.70, 0.5: 0.35, 0.6: 0.10, 0.8: 0.05}

# Below about a thousand scores the top edge's 5 % rests on some fifty
# events, and a refit would move it by several percent on noise alone.
DEFAULT_MIN_SAMPLE = 1000

# Written into every stored mapping and its digest; bump it when the meaning
# of a stored field changes.
_FORMAT = "muse.quantile_mapping/1"
_FIELDS = frozenset(
    {"format", "id", "curve", "knots", "sample_size", "achieved",
     "predictor", "tenant", "fitted_at"}
)  # fmt: skip

# Knots live strictly inside (0, 1): 0 and 1 are the map's fixed ends.
_BELOW_ONE = math.nextafter(1.0, 0.0)

Curve = tuple[tuple[float, float], ...]
CurveLike = Mapping[float, float] | Iterable[tuple[float, float]]


# -- level one: posterior correction ----------------------------------------


@overload
def posterior_correction(scores: float, beta: float) -> float: ...
@overload
def posterior_correction(scores: ArrayLike, beta: float) -> NDArray[np.float64]: ...
def posterior_correction(scores: ArrayLike, beta: float) -> Any:
    """Undo the lift of training on a share ``beta`` of the negatives.

    ``T(y) = beta*y / (beta*y + (1 - y))``: the identity at ``beta == 1``
    (exactly), 0 and 1 fixed (exactly), never decreasing in ``y``, finite
    for every ``y`` in [0, 1] and every ``beta`` in (0, 1].

    Args:
        scores: a probability, or an array of them (any shape).
        beta: share of negatives kept at training, in (0, 1].

    Returns:
        A float for a scalar, else a float64 array of the input's shape.

    Raises:
        BadRequest: ``beta`` outside (0, 1]; a score NaN or outside [0, 1]
            (the message names the first, by flat index).
    """
    corrected = _corrected(_fast.correct_posterior, scores, beta)
    # T(y) <= y for every beta <= 1; the division can round one ulp above y
    # for beta within an ulp of 1, so the bound is enforced exactly.  The
    # minimum of two non-decreasing maps is still non-decreasing.
    if isinstance(corrected, float):
        return min(corrected, float(scores))  # type: ignore[arg-type]
    return np.minimum(corrected, np.asarray(scores, dtype=np.float64), out=corrected)


@overload
def posterior_correction_margin(margins: float, beta: float) -> float: ...
@overload
def posterior_correction_margin(
    margins: ArrayLike, beta: float
) -> NDArray[np.float64]: ...
def posterior_correction_margin(margins: ArrayLike, beta: float) -> Any:
    """``posterior_correction`` from the raw margin: ``sigmoid(m + log(beta))``.

    Equal to ``posterior_correction(sigmoid(m), beta)``, and better near 1:
    two margins of 40 and 41 both have ``sigmoid`` 1.0, yet stay apart here.

    Args:
        margins: a margin (log-odds), or an array of them; infinities allowed.
        beta: share of negatives kept at training, in (0, 1].

    Returns:
        A float for a scalar, else a float64 array of the input's shape.

    Raises:
        BadRequest: ``beta`` outside (0, 1], or a margin is NaN.
    """
    return _corrected(_fast.correct_margin, margins, beta)


def _corrected(kernel: Any, values: ArrayLike, beta: float) -> Any:
    checked = _beta(beta)
    try:
        return _scalar_or_array(kernel(values, checked))
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"posterior correction: {exc}") from exc


# -- level two: quantile mapping --------------------------------------------


@dataclass(frozen=True, kw_only=True)
class QuantileMapping:
    """A fitted map from corrected scores to scores that meet a curve.

    Construction checks every field (stored mappings load through it); fit
    new ones with ``fit``.

    Attributes:
        id: sha256 hex digest of the format, curve, knots, predictor and
            tenant; equal mappings have equal ids, refits included.
        curve: ``(edge, target share)`` pairs, edges increasing.
        knots: raw score mapped onto each edge, strictly increasing in (0, 1).
        sample_size: number of scores fitted on.
        achieved: share of the fit sample at or above each edge after mapping.
        predictor, tenant: what the mapping was fitted for; None for any.
        fitted_at: Unix time of the fit.

    Raises:
        MappingFitError: a field is invalid, or ``id`` does not match.
    """

    id: str
    curve: Curve
    knots: tuple[float, ...]
    sample_size: int
    achieved: tuple[float, ...]
    predictor: str | None
    tenant: str | None
    fitted_at: float
    _table: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        curve = _curve(self.curve)
        knots = tuple(_number(k, "knot") for k in self.knots)
        achieved = tuple(_number(a, "achieved share") for a in self.achieved)
        if len(knots) != len(curve) or len(achieved) != len(curve):
            raise MappingFitError(
                f"a {len(curve)}-edge curve needs {len(curve)} knots and achieved"
                f" shares, got {len(knots)} and {len(achieved)}"
            )
        if not _inside(knots):
            raise MappingFitError(
                f"knots must be strictly increasing inside (0, 1), got {list(knots)}"
            )
        if not all(0.0 <= a <= 1.0 for a in achieved):
            raise MappingFitError(f"achieved shares must be in [0, 1], got {achieved}")
        if not _is_real(self.sample_size, (int, np.integer)) or self.sample_size < 1:
            raise MappingFitError(
                f"sample_size must be a positive integer, got {self.sample_size!r}"
            )
        for name in ("predictor", "tenant"):
            if not isinstance(getattr(self, name), str | None):
                raise MappingFitError(f"{name} must be a string or None")
        if not math.isfinite(_number(self.fitted_at, "fitted_at")):
            raise MappingFitError(f"fitted_at must be finite, got {self.fitted_at!r}")
        digest = _digest(curve, knots, self.predictor, self.tenant)
        if self.id != digest:
            raise MappingFitError(
                f"mapping id {self.id!r} does not match its content (digest"
                f" {digest}): curve, knots or scope were altered"
            )
        for name, value in (
            ("curve", curve),
            ("knots", knots),
            ("achieved", achieved),
            ("sample_size", int(self.sample_size)),
            ("fitted_at", float(self.fitted_at)),
            ("_table", _fast.MappingTable(knots, [e for e, _ in curve])),
        ):
            object.__setattr__(self, name, value)

    @property
    def edges(self) -> tuple[float, ...]:
        """The curve's score edges, increasing."""
        return tuple(edge for edge, _ in self.curve)

    @classmethod
    def fit(
        cls,
        scores: ArrayLike,
        curve: CurveLike = DEFAULT_CURVE,
        *,
        min_sample: int = DEFAULT_MIN_SAMPLE,
        min_distinct: int | None = None,
        predictor: str | None = None,
        tenant: str | None = None,
    ) -> QuantileMapping:
        """Fit knots so the sample, once mapped, meets ``curve``.

        Each edge gets the reachable share nearest its target (see the
        module docstring); shares that ties make unreachable are logged.

        Args:
            scores: corrected scores, each in [0, 1] (any shape; flattened).
            curve: edge -> target share, or ``(edge, share)`` pairs; edges
                increasing and shares decreasing, all inside (0, 1).
            min_sample: refuse fewer scores than this.
            min_distinct: refuse fewer distinct scores; by default
                ``2 * len(curve) + 1``, room for each knot in its own gap.
            predictor: the predictor ref the mapping is for, or None.
            tenant: the tenant the mapping is for, or None for all.

        Returns:
            The fitted mapping.

        Raises:
            MappingFitError: invalid curve; empty sample, fewer than
                ``min_sample`` scores, fewer than ``min_distinct`` distinct
                values, a NaN, or a score outside [0, 1].
        """
        pairs = _curve(curve)
        ordered = _sorted_sample(scores, min_sample)
        n = ordered.shape[0]
        distinct = 1 + int(np.count_nonzero(ordered[1:] != ordered[:-1]))
        needed = 2 * len(pairs) + 1 if min_distinct is None else min_distinct
        if distinct < needed:
            raise MappingFitError(
                f"too few distinct scores: {distinct} distinct values in {n}"
                f" scores, need at least {needed}"
            )
        lower, upper = _knot_intervals(ordered)
        # Position i puts n - i scores at or above the knot: increasing counts.
        reachable = n - np.flatnonzero(lower < upper)[::-1]
        wanted = [target * n for _, target in pairs]
        counts = _choose_counts(reachable, wanted, _top_slots(ordered, len(pairs)))
        knots = _place_knots(lower, upper, counts)
        mapping = cls(
            id=_digest(pairs, knots, predictor, tenant),
            curve=pairs,
            knots=knots,
            sample_size=n,
            achieved=tuple(c / n for c in counts),
            predictor=predictor,
            tenant=tenant,
            fitted_at=time.time(),
        )
        # The kernel's guarantee, checked on the sample itself.
        mapped = mapping._table.apply(ordered)
        got = [int(np.count_nonzero(mapped >= edge)) for edge in mapping.edges]
        if got != counts:
            raise InternalError(
                f"mapping {mapping.id[:12]} puts {got} of {n} scores at or above"
                f" its edges, planned {counts}"
            )
        _log_fit(mapping, wanted, distinct)
        return mapping

    @overload
    def apply(self, scores: float) -> float: ...
    @overload
    def apply(self, scores: ArrayLike) -> NDArray[np.float64]: ...
    def apply(self, scores: ArrayLike) -> Any:
        """Map scores through the fitted curve.

        Continuous, never decreasing, 0 -> 0 and 1 -> 1; scores outside
        [0, 1] clamp to 0 or 1.  ``apply(x) >= edge_k`` exactly when
        ``x >= knot_k``.

        Args:
            scores: a score, or an array of them (any shape).

        Returns:
            A float for a scalar, else a float64 array of the input's shape.

        Raises:
            BadRequest: a score is NaN (the message names the first, by flat
                index), or the input is not numeric.
        """
        try:
            return _scalar_or_array(self._table.apply(scores))
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"quantile mapping {self.id[:12]}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """The mapping as plain JSON-safe data; floats round-trip exactly."""
        return {
            "format": _FORMAT,
            "id": self.id,
            "curve": [[edge, target] for edge, target in self.curve],
            "knots": list(self.knots),
            "sample_size": self.sample_size,
            "achieved": list(self.achieved),
            "predictor": self.predictor,
            "tenant": self.tenant,
            "fitted_at": self.fitted_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantileMapping:
        """Load a mapping written by ``to_dict``, checking all of it.

        Args:
            data: the dict, e.g. parsed from JSON.

        Returns:
            The mapping; ``from_dict(m.to_dict()) == m``.

        Raises:
            MappingFitError: a field is missing, unknown or invalid (knots
                out of order included), or the id does not match.
        """
        if not isinstance(data, Mapping):
            raise MappingFitError(
                f"a mapping must be a dict, got {type(data).__name__}"
            )
        if data.keys() != _FIELDS or data["format"] != _FORMAT:
            missing, unknown = _FIELDS - data.keys(), data.keys() - _FIELDS
            raise MappingFitError(
                f"not a {_FORMAT} mapping: format {data.get('format')!r}, missing"
                f" {sorted(missing)}, unknown {sorted(unknown)}"
            )
        return cls(
            id=data["id"],
            curve=_curve(_list(data["curve"], "curve")),
            knots=_list(data["knots"], "knots"),
            sample_size=data["sample_size"],
            achieved=_list(data["achieved"], "achieved"),
            predictor=data["predictor"],
            tenant=data["tenant"],
            fitted_at=_number(data["fitted_at"], "fitted_at"),
        )


# -- fitting ------------------------------------------------------------------


def _sorted_sample(scores: ArrayLike, min_sample: int) -> NDArray[np.float64]:
    sample = np.asarray(scores)
    # As the kernels: a plain cast would parse strings as numbers.
    if sample.dtype.kind == "b" or not np.can_cast(sample.dtype, np.float64):
        raise MappingFitError(f"sample must be real numbers, got dtype {sample.dtype}")
    sample = sample.astype(np.float64).reshape(-1)
    n = sample.shape[0]
    if n == 0:
        raise MappingFitError("empty sample: cannot fit a mapping on 0 scores")
    if n < min_sample:
        raise MappingFitError(
            f"sample too small: {n} scores, need at least {min_sample}"
        )
    bad = np.flatnonzero(~((sample >= 0.0) & (sample <= 1.0)))
    if bad.size:
        raise MappingFitError(
            f"sample has {bad.size} scores that are NaN or outside [0, 1]"
            f" (first: index {bad[0]}, value {float(sample[bad[0]])!r})"
        )
    return np.sort(sample)


def _knot_intervals(
    ordered: NDArray[np.float64],
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``(lower[i], upper[i]]``: where a knot puts ``n - i`` scores at or
    above it, inside (0, 1).  Empty within a block of ties."""
    lower = np.concatenate(([0.0], ordered))
    upper = np.concatenate((np.minimum(ordered, _BELOW_ONE), [_BELOW_ONE]))
    return lower, upper


def _top_slots(ordered: NDArray[np.float64], edges: int) -> int:
    """How many knots fit above the sample's maximum (up to ``edges``)."""
    # Non-negative doubles sort as their bit patterns: the difference of the
    # patterns counts the doubles in (maximum, largest double below 1].
    bits = np.array([ordered[-1] + 0.0, _BELOW_ONE]).view(np.int64)
    return int(min(max(bits[1] - bits[0], 0), edges))


def _choose_counts(
    reachable: NDArray[np.int64], wanted: Sequence[float], top_slots: int
) -> list[int]:
    """Reachable counts (increasing) nearest the wanted ones (decreasing).

    Minimises ``sum |count_k - wanted_k|`` over choices strictly decreasing
    in k, except that the last edges, up to ``top_slots`` of them, may all
    take count 0: for each number of those, ``_strictly_decreasing`` picks
    the rest.  Raises MappingFitError when no choice fits.
    """
    positive = reachable[reachable > 0]
    best: tuple[float, list[int]] | None = None
    for zeros in range(min(top_slots, len(wanted)) + 1):
        head = len(wanted) - zeros
        if head > positive.shape[0]:
            continue
        cost, counts = _strictly_decreasing(positive, wanted[:head])
        cost += sum(wanted[head:])
        # Strictly better only: ties keep the choice with fewer empty edges.
        if best is None or cost < best[0]:
            best = (cost, counts + [0] * zeros)
    if best is None:
        raise MappingFitError(
            f"too few distinct scores: only {reachable.shape[0]} shares are"
            f" reachable for {len(wanted)} edges"
        )
    return best[1]


def _strictly_decreasing(
    reachable: NDArray[np.int64], wanted: Sequence[float]
) -> tuple[float, list[int]]:
    """Strictly decreasing counts from ``reachable`` nearest ``wanted``.

    ``cost[p]`` is the best total for the edges so far with the last one on
    ``reachable[p]``; the edge before sits above p, the cheapest such by
    ``_suffix_min``.  Returns ``(total distance, counts)``.
    """
    if not wanted:
        return 0.0, []
    cost = np.abs(reachable - wanted[0])
    choices = []
    for target in wanted[1:]:
        best, where = _suffix_min(cost)
        before = np.append(best[1:], np.inf)
        choices.append(np.append(where[1:], -1))
        cost = before + np.abs(reachable - target)
    position = int(np.argmin(cost))
    total = float(cost[position])
    positions = [position]
    for where in reversed(choices):
        position = int(where[position])
        positions.append(position)
    return total, [int(reachable[p]) for p in reversed(positions)]


def _suffix_min(
    values: NDArray[np.float64],
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """For each p: min of ``values[p:]`` and the first position holding it."""
    backwards = values[::-1]
    best = np.minimum.accumulate(backwards)
    # The latest record seen walking backwards is the first position forwards.
    latest = np.maximum.accumulate(
        np.where(backwards == best, np.arange(values.shape[0]), 0)
    )
    return best[::-1], (values.shape[0] - 1 - latest)[::-1]


def _place_knots(
    lower: NDArray[np.float64], upper: NDArray[np.float64], counts: list[int]
) -> tuple[float, ...]:
    """Knots for the chosen counts: each gap's knots spread evenly across it."""
    n = lower.shape[0] - 1
    knots: list[float] = []
    for count in dict.fromkeys(counts):
        position = n - count
        knots += _spread(
            float(lower[position]), float(upper[position]), counts.count(count)
        )
    return tuple(knots)


def _spread(lower: float, upper: float, many: int) -> list[float]:
    """``many`` strictly increasing knots in ``(lower, upper]``, evenly spaced."""
    width = upper - lower
    knots = [lower + width * ((j + 1) / (many + 1)) for j in range(many)]
    points = [lower, *knots]
    if all(a < b for a, b in itertools.pairwise(points)) and knots[-1] <= upper:
        return knots
    # A gap only a few doubles wide: rounding merged knots, so step by ulps
    # (the gap has room, or the count would not have been offered).
    knots = [math.nextafter(lower, 1.0)]
    while len(knots) < many:
        knots.append(math.nextafter(knots[-1], 1.0))
    return knots


def _log_fit(mapping: QuantileMapping, wanted: Sequence[float], distinct: int) -> None:
    n = mapping.sample_size
    missed = [
        edge
        for edge, want, share in zip(
            mapping.edges, wanted, mapping.achieved, strict=True
        )
        if abs(share * n - want) > 1.0
    ]
    logger.info(
        "fitted mapping %s (predictor %s, tenant %s) on %d scores, %d distinct:"
        " edges %s, target shares %s, achieved %s%s",
        mapping.id[:12], mapping.predictor, mapping.tenant, n, distinct,
        mapping.edges, tuple(t for _, t in mapping.curve), mapping.achieved,
        f"; off target by more than 1/n (tied scores) at edges {missed}"
        if missed else "",
    )  # fmt: skip


# -- checking -----------------------------------------------------------------


def _curve(curve: Any) -> Curve:
    """A curve as sorted ``(edge, target)`` pairs, checked."""
    items = curve.items() if isinstance(curve, Mapping) else curve
    try:
        pairs = sorted((_number(e, "curve edge"), _number(t, "curve target"))
                       for e, t in items)  # fmt: skip
    except (TypeError, ValueError) as exc:
        raise MappingFitError(
            f"curve must be (edge, target share) pairs: {exc}"
        ) from exc
    if not pairs:
        raise MappingFitError("curve is empty: give at least one edge")
    edges = [e for e, _ in pairs]
    if not _inside(edges):
        raise MappingFitError(
            f"curve edges must be strictly increasing inside (0, 1), got {edges}"
        )
    targets = [t for _, t in pairs]
    if not _inside(targets[::-1]):
        raise MappingFitError(
            "curve target shares must be strictly decreasing inside (0, 1) as"
            f" edges rise, got {targets}"
        )
    return tuple(pairs)


def _inside(values: Sequence[float]) -> bool:
    """Strictly increasing inside (0, 1); a negated ``<``, so NaN fails."""
    points = [0.0, *values, 1.0]
    return all(a < b for a, b in itertools.pairwise(points))


def _digest(
    curve: Curve, knots: tuple[float, ...], predictor: str | None, tenant: str | None
) -> str:
    # float.hex is exact and canonical; JSON with sorted keys and no spaces
    # makes the text, hence the digest, stable across Python versions.
    content = {
        "format": _FORMAT,
        "curve": [[edge.hex(), target.hex()] for edge, target in curve],
        "knots": [knot.hex() for knot in knots],
        "predictor": predictor,
        "tenant": tenant,
    }
    text = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _beta(beta: object) -> float:
    if type(beta) is not float and not _is_real(beta):
        raise BadRequest(f"beta must be a number in (0, 1], got {beta!r}")
    value = float(beta)  # type: ignore[arg-type]
    if not 0.0 < value <= 1.0:
        raise BadRequest(f"beta must be in (0, 1], got {value!r}")
    return value


def _scalar_or_array(values: NDArray[np.float64]) -> Any:
    # The kernels keep the input's shape; a scalar came in as 0-d.
    return float(values) if values.ndim == 0 else values


def _number(value: object, what: str) -> float:
    if not _is_real(value):
        raise MappingFitError(f"{what} must be a number, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _list(value: object, what: str) -> tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        raise MappingFitError(f"{what} must be a list, got {type(value).__name__}")
    return tuple(value)


def _is_real(
    value: object, kinds: tuple[type, ...] = (int, float, np.integer, np.floating)
) -> bool:
    return isinstance(value, kinds) and not isinstance(value, (bool, np.bool_))
