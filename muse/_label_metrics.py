"""Metrics that need fraud labels: recall at each edge and calibration.

The demo uses them to show what the score stability work does not cost: a
model update still catches more fraud at each client threshold, and
posterior correction makes raw model outputs far better calibrated
(Brier score, expected calibration error).  ``muse._evaluate`` re-exports
everything here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "Calibration",
    "brier",
    "calibration",
    "expected_calibration_error",
    "frauds_caught_at_edges",
    "recall_at_edges",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Calibration:
    """How well scores match fraud frequencies.

    Attributes:
        brier: mean squared difference between score and label.
        ece: expected calibration error over equal-width bins.
        mean_score: the scores' mean.
        positive_rate: the labels' mean (the fraud rate).
        n: events measured.
    """

    brier: float
    ece: float
    mean_score: float
    positive_rate: float
    n: int


def frauds_caught_at_edges(
    scores: npt.ArrayLike, labels: npt.ArrayLike, edges: Iterable[float]
) -> IntArray:
    """How many frauds score at or above each edge.

    Args:
        scores: scores.
        labels: 1 for fraud, 0 for genuine.
        edges: thresholds.

    Returns:
        One count per edge, in the order given.

    Raises:
        ValueError: the arrays differ in length.
    """
    values, positive = _scores_and_labels(scores, labels)
    frauds = values[positive == 1.0]
    return np.array([np.count_nonzero(frauds >= edge) for edge in edges], np.int64)


def recall_at_edges(
    scores: npt.ArrayLike, labels: npt.ArrayLike, edges: Iterable[float]
) -> FloatArray:
    """Share of frauds scoring at or above each edge.

    Args:
        scores: scores.
        labels: 1 for fraud, 0 for genuine.
        edges: thresholds.

    Returns:
        One recall per edge, in the order given.

    Raises:
        ValueError: there is no fraud, or the arrays differ in length.
    """
    frauds = int(np.count_nonzero(np.asarray(labels)))
    if frauds == 0:
        raise ValueError("recall is undefined without any fraud label")
    return frauds_caught_at_edges(scores, labels, edges) / frauds


def brier(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Brier score: the mean of ``(score - label)**2``.

    Args:
        scores: probabilities.
        labels: 1 for fraud, 0 for genuine.

    Returns:
        The score (lower is better); NaN when empty.

    Raises:
        ValueError: the arrays differ in length.
    """
    values, positive = _scores_and_labels(scores, labels)
    if values.size == 0:
        return math.nan
    return float(np.mean((values - positive) ** 2))


def expected_calibration_error(
    scores: npt.ArrayLike, labels: npt.ArrayLike, bins: int = 10
) -> float:
    """Expected calibration error over equal-width score bins.

    The unit interval is cut into ``bins`` bins of equal width, each closed
    on the left and open on the right, except the last, which also holds
    1.0.  ECE is ``sum_b (n_b / n) * |mean score_b - fraud rate_b|`` over
    non-empty bins.  Equal-width bins put nearly every event of a rare
    class into the first bin, so the figure is dominated by how well the
    low scores' mean matches the low fraud rate: exactly what posterior
    correction fixes.

    Args:
        scores: probabilities in [0, 1].
        labels: 1 for fraud, 0 for genuine.
        bins: number of bins.

    Returns:
        The ECE (0 is perfect); NaN when empty.

    Raises:
        ValueError: ``bins`` < 1, or the arrays differ in length.
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    values, positive = _scores_and_labels(scores, labels)
    if values.size == 0:
        return math.nan
    which = np.clip(np.floor(values * bins).astype(np.int64), 0, bins - 1)
    score_sum = np.bincount(which, weights=values, minlength=bins)
    fraud_sum = np.bincount(which, weights=positive, minlength=bins)
    # |sum(score) - sum(label)| per bin is n_b times the per-bin gap.
    return float(np.sum(np.abs(score_sum - fraud_sum)) / values.size)


def calibration(
    scores: npt.ArrayLike, labels: npt.ArrayLike, bins: int = 10
) -> Calibration:
    """Brier score, ECE and means of one set of scores.

    Args:
        scores: probabilities.
        labels: 1 for fraud, 0 for genuine.
        bins: ECE bins (see ``expected_calibration_error``).

    Returns:
        The summary.
    """
    values, positive = _scores_and_labels(scores, labels)
    empty = values.size == 0
    return Calibration(
        brier=brier(values, positive),
        ece=expected_calibration_error(values, positive, bins),
        mean_score=math.nan if empty else float(values.mean()),
        positive_rate=math.nan if empty else float(positive.mean()),
        n=int(values.size),
    )


# -- helpers ------------------------------------------------------------------


def _scores_and_labels(
    scores: npt.ArrayLike, labels: npt.ArrayLike
) -> tuple[FloatArray, FloatArray]:
    """Scores as float64 and labels as 0.0/1.0, checked to match in length."""
    values = np.asarray(scores, dtype=np.float64)
    positive = (np.asarray(labels) != 0).astype(np.float64)
    check_lengths(values, positive, "labels")
    return values, positive


def check_lengths(scores: npt.NDArray[Any], other: npt.NDArray[Any], name: str) -> None:
    """Check that a per-event array matches the scores (shared with
    ``muse._evaluate``).

    Raises:
        ValueError: the shapes differ; the message names ``name``.
    """
    if scores.shape != other.shape:
        raise ValueError(
            f"{name} must match the scores' shape {scores.shape}, got {other.shape}"
        )
