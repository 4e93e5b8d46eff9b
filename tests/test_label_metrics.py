"""Tests of the label-based metrics (muse._label_metrics), by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from muse._label_metrics import (
    brier,
    calibration,
    expected_calibration_error,
    frauds_caught_at_edges,
    recall_at_edges,
)
from muse._transform import posterior_correction


def test_frauds_caught_and_recall_at_edges() -> None:
    scores = [0.1, 0.3, 0.6, 0.9, 0.95]
    labels = [1, 0, 1, 1, 0]

    caught = frauds_caught_at_edges(scores, labels, [0.05, 0.2, 0.9, 0.95])
    recall = recall_at_edges(scores, labels, [0.05, 0.2, 0.9, 0.95])

    assert caught.tolist() == [3, 2, 1, 0]
    assert recall.tolist() == [1.0, 2 / 3, 1 / 3, 0.0]


def test_recall_needs_a_fraud() -> None:
    with pytest.raises(ValueError, match="without any fraud"):
        recall_at_edges([0.5], [0], [0.5])


def test_brier_by_hand() -> None:
    # (0.2 - 0)^2 + (0.8 - 1)^2 + (0.5 - 1)^2 = 0.04 + 0.04 + 0.25
    assert brier([0.2, 0.8, 0.5], [0, 1, 1]) == pytest.approx(0.33 / 3)
    assert math.isnan(brier([], []))


@pytest.mark.parametrize(
    ("bins", "expected"),
    [
        # Every score alone in its bin: gaps 0.05, 0.15, 0.85, 0.05.
        (10, (0.05 + 0.15 + 0.85 + 0.05) / 4),
        # [0.05, 0.15]: mean 0.1, rate 0; [0.85, 0.95]: mean 0.9, rate 0.5.
        (2, 0.5 * 0.1 + 0.5 * 0.4),
        # One bin: mean 0.5, rate 0.25.
        (1, 0.25),
    ],
)
def test_expected_calibration_error_by_hand(bins: int, expected: float) -> None:
    ece = expected_calibration_error([0.05, 0.15, 0.85, 0.95], [0, 0, 0, 1], bins)

    assert ece == pytest.approx(expected)


def test_expected_calibration_error_bin_edges() -> None:
    # 0.5 opens the upper bin and 1.0 belongs to the last one.
    assert expected_calibration_error([0.5, 1.0], [1, 1], bins=2) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="bins must be at least 1"):
        expected_calibration_error([0.5], [1], bins=0)


def test_posterior_correction_improves_calibration() -> None:
    """Undersampling inflates probabilities; correction recovers them."""
    rng = np.random.default_rng(11)
    beta = 0.05
    true = rng.beta(0.5, 60, 50_000)
    labels = (rng.random(true.size) < true).astype(np.int8)
    # What a perfect model trained on undersampled negatives would output.
    raw = true / (true + beta * (1 - true))

    corrected = posterior_correction(raw, beta)

    assert corrected == pytest.approx(true)
    before, after = calibration(raw, labels), calibration(corrected, labels)
    assert after.ece < before.ece / 5
    assert after.brier < before.brier
    assert after.positive_rate == before.positive_rate == labels.mean()
    assert after.mean_score == pytest.approx(true.mean())
    assert after.n == 50_000


def test_label_metrics_refuse_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="labels must match"):
        brier([0.1, 0.2], [1])
