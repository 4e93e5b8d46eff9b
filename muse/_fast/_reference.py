"""Pure-numpy twin of the compiled kernels in ``_mapping.pyx``.

Same API and the same floating-point operations, in the same order, so both
give the same numbers (bit for bit on x86-64, where the compiler does not
fuse multiply-adds; ``libm``'s ``exp`` and numpy's may differ by an ulp).
``muse._fast`` picks this module when ``MUSE_PURE_PYTHON=1`` or when the
compiled one is missing, as msgpack does with its ``fallback`` module.

``segment_table`` is shared: the compiled ``MappingTable`` builds its C
arrays from it, so the two cannot disagree on a knot, a slope or a cap.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "MappingTable",
    "correct_margin",
    "correct_margin_into",
    "correct_posterior",
    "correct_posterior_into",
    "segment_table",
]

#: One linear piece of the map: (x0, y0, slope, cap).
Segment = tuple[float, float, float, float]

# Two knots closer together than (edge gap) / DBL_MAX would give an infinite
# slope, and inf * 0 at the knot itself is NaN; the largest finite slope keeps
# the piece monotone and lets the cap do the rest.
_MAX_SLOPE = sys.float_info.max

_VECTOR_TYPES = (np.dtype(np.float64), np.dtype(np.float32))


def segment_table(
    knots: Sequence[float], edges: Sequence[float]
) -> tuple[tuple[float, ...], tuple[Segment, ...]]:
    """Check a knot/edge table and cut the map into linear pieces.

    The map runs through (0, 0), (knots[k], edges[k]) for each k, and (1, 1).
    A score x, first clamped into [0, 1], lies in piece
    ``s = #{b in bounds : x >= b}`` where ``bounds`` is the knots followed by
    1.0, and maps to ``min(y0 + slope * (x - x0), cap)``.  ``cap`` is the
    largest double below the y of the piece's right end, so rounding can never
    lift a score below a knot onto that knot's edge, and ``y0 + slope * d``
    with ``d >= 0`` is never below ``y0``: hence ``map(x) >= edges[k]`` exactly
    when ``x >= knots[k]``.  The last piece is the point (1, 1).

    Args:
        knots: raw-score knots, strictly increasing inside (0, 1).
        edges: mapped value at each knot, strictly increasing inside (0, 1).

    Returns:
        ``(bounds, segments)``: ``len(knots) + 1`` bounds and
        ``len(knots) + 2`` segments ``(x0, y0, slope, cap)``.

    Raises:
        ValueError: lengths differ or are zero, or a sequence is not strictly
            increasing inside (0, 1).
    """
    xs = [float(k) for k in knots]
    ys = [float(e) for e in edges]
    if not xs or len(xs) != len(ys):
        raise ValueError(
            f"need as many knots as edges, at least one: got {len(xs)} knots"
            f" and {len(ys)} edges"
        )
    for name, values in (("knots", xs), ("edges", ys)):
        points = [0.0, *values, 1.0]
        # Written as a negated `<` so NaN fails the check too.
        if not all(a < b for a, b in itertools.pairwise(points)):
            raise ValueError(
                f"{name} must be strictly increasing inside (0, 1), got {values!r}"
            )
    xs = [0.0, *xs, 1.0]
    ys = [0.0, *ys, 1.0]
    segments = [
        (
            xs[j],
            ys[j],
            min((ys[j + 1] - ys[j]) / (xs[j + 1] - xs[j]), _MAX_SLOPE),
            math.nextafter(ys[j + 1], -math.inf),
        )
        for j in range(len(xs) - 1)
    ]
    segments.append((1.0, 1.0, 0.0, 1.0))
    return tuple(xs[1:]), tuple(segments)


class MappingTable:
    """A piecewise-linear map through (0, 0), (knot, edge)..., (1, 1).

    Args:
        knots: raw-score knots, strictly increasing inside (0, 1).
        edges: mapped value at each knot, strictly increasing inside (0, 1).

    Raises:
        ValueError: as ``segment_table``.
    """

    __slots__ = ("_bounds", "_cap", "_slope", "_x0", "_y0", "edges", "knots")

    def __init__(self, knots: Sequence[float], edges: Sequence[float]) -> None:
        bounds, segments = segment_table(knots, edges)
        self.knots: tuple[float, ...] = tuple(float(k) for k in knots)
        self.edges: tuple[float, ...] = tuple(float(e) for e in edges)
        self._bounds = np.array(bounds)
        self._x0, self._y0, self._slope, self._cap = np.array(segments).T.copy()

    def __reduce__(self) -> tuple[Any, ...]:
        return (MappingTable, (self.knots, self.edges))

    def apply(
        self, scores: ArrayLike, out: NDArray[np.float64] | None = None
    ) -> NDArray[np.float64]:
        """Map scores; scores outside [0, 1] (infinities too) clamp to 0 or 1.

        Args:
            scores: real numbers, any shape; C-contiguous float64 and float32
                arrays are read in place, anything else is converted.
            out: float64 array of the same shape to write into, or None.

        Returns:
            ``out``, or a new float64 array of the scores' shape.

        Raises:
            TypeError: ``scores`` are not real numbers, or ``out`` is not a
                writeable C-contiguous float64 array.
            ValueError: shapes differ, or a score is NaN (the message names
                the first, by flat index).
        """
        x = _input(scores, "scores")
        result = _output(out, x)
        index = self.apply_into(x.reshape(-1), result.reshape(-1))
        if index >= 0:
            raise ValueError(f"score at index {index} is NaN")
        return result

    def apply_into(self, scores: Any, out: Any) -> int:
        """``apply`` for any 1-D buffers; returns the first NaN's index or -1."""
        x, result = _buffers(scores, out)
        nan = np.isnan(x)
        if nan.any():
            return int(np.argmax(nan))
        x = np.minimum(np.maximum(x, 0.0), 1.0)
        segment = np.searchsorted(self._bounds, x, side="right")
        mapped = self._y0[segment] + self._slope[segment] * (x - self._x0[segment])
        np.minimum(mapped, self._cap[segment], out=result)
        return -1


def correct_posterior(
    scores: ArrayLike, beta: float, out: NDArray[np.float64] | None = None
) -> NDArray[np.float64]:
    """``beta*y / (beta*y + (1 - y))``, as ``1 / (1 + (1 - y) / (beta*y))``.

    Every step of the second form is a monotone rounding of a monotone
    function, so the result never decreases as ``y`` grows, and 0 and 1 map
    to exactly 0 and 1.  ``beta == 1`` copies the scores unchanged.

    Args:
        scores: real numbers in [0, 1], any shape (as ``MappingTable.apply``).
        beta: share of negatives kept at training, in (0, 1].
        out: float64 array of the same shape to write into, or None.

    Returns:
        ``out``, or a new float64 array of the scores' shape.

    Raises:
        TypeError: as ``MappingTable.apply``.
        ValueError: ``beta`` is outside (0, 1], shapes differ, or a score is
            NaN or outside [0, 1] (the message names the first, by flat
            index).
    """
    x = _input(scores, "scores")
    result = _output(out, x)
    index = correct_posterior_into(x.reshape(-1), beta, result.reshape(-1))
    if index >= 0:
        value = float(x.reshape(-1)[index])
        raise ValueError(f"score at index {index} is {value!r}, not in [0, 1]")
    return result


def correct_posterior_into(scores: Any, beta: float, out: Any) -> int:
    """``correct_posterior`` for any 1-D buffers; returns the first bad index or -1."""
    _check_beta(beta)
    y, result = _buffers(scores, out)
    bad = ~((y >= 0.0) & (y <= 1.0))
    if bad.any():
        return int(np.argmax(bad))
    if beta == 1.0:
        result[...] = y
        return -1
    # y == 0 (or beta * y underflowing) divides by zero: r is inf, T is 0.
    with np.errstate(divide="ignore", over="ignore"):
        np.divide(1.0 - y, beta * y, out=result)
    result += 1.0
    np.divide(1.0, result, out=result)
    return -1


def correct_margin(
    margins: ArrayLike, beta: float, out: NDArray[np.float64] | None = None
) -> NDArray[np.float64]:
    """``sigmoid(margin + log(beta))``: the corrected score from a raw margin.

    Exact where the probability has already rounded to 1: a margin of 40
    still tells events apart that ``sigmoid`` would tie.

    Args:
        margins: real numbers, any shape; infinities allowed.
        beta: share of negatives kept at training, in (0, 1].
        out: float64 array of the same shape to write into, or None.

    Returns:
        ``out``, or a new float64 array of the margins' shape.

    Raises:
        TypeError: as ``MappingTable.apply``.
        ValueError: ``beta`` is outside (0, 1], shapes differ, or a margin
            is NaN (the message names the first, by flat index).
    """
    x = _input(margins, "margins")
    result = _output(out, x)
    index = correct_margin_into(x.reshape(-1), beta, result.reshape(-1))
    if index >= 0:
        raise ValueError(f"margin at index {index} is NaN")
    return result


def correct_margin_into(margins: Any, beta: float, out: Any) -> int:
    """``correct_margin`` for any 1-D buffers; returns the first NaN's index or -1."""
    _check_beta(beta)
    z, result = _buffers(margins, out)
    nan = np.isnan(z)
    if nan.any():
        return int(np.argmax(nan))
    with np.errstate(over="ignore"):
        np.exp(-(z + math.log(beta)), out=result)
    result += 1.0
    np.divide(1.0, result, out=result)
    return -1


def _check_beta(beta: float) -> None:
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must be in (0, 1], got {beta!r}")


def _input(values: object, name: str) -> NDArray[Any]:
    # As the compiled entry points: float64 and float32 arrays in place,
    # other real numbers converted, strings and the like refused.
    array = values if isinstance(values, np.ndarray) else np.asarray(values)
    if array.dtype in _VECTOR_TYPES and array.flags.c_contiguous:
        return array
    if array.dtype.kind == "b" or not np.can_cast(array.dtype, np.float64, "safe"):
        raise TypeError(f"{name} must be real numbers, got dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.float64)


def _output(out: object, like: NDArray[Any]) -> NDArray[np.float64]:
    if out is None:
        return np.empty(like.shape)
    if (
        not isinstance(out, np.ndarray)
        or out.dtype != np.float64
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        raise TypeError("out must be a writeable C-contiguous float64 array")
    if out.shape != like.shape:
        raise ValueError(f"out has shape {out.shape}, expected {like.shape}")
    return out


def _buffers(values: Any, out: Any) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    x = np.asarray(values)
    result = np.asarray(out)
    if x.ndim != 1 or x.dtype not in _VECTOR_TYPES:
        raise TypeError("input must be a 1-D float64 or float32 buffer")
    if result.ndim != 1 or result.dtype != np.float64:
        raise TypeError("out must be a 1-D float64 buffer")
    if result.shape[0] != x.shape[0]:
        raise ValueError(f"out has length {result.shape[0]}, expected {x.shape[0]}")
    return x.astype(np.float64, copy=False), result
