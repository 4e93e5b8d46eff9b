"""Golden rows: the check that refuses a model MUSE would score wrongly.

At import, ``muse._models.load_model`` predicts a set of golden rows with
the kernel it will serve and compares with what the model's own library
(xgboost, lightgbm, scikit-learn) predicts on the same rows; any difference
above ``PARITY_TOLERANCE`` in margin or probability raises ``ParityError``.
The rows and the expected values are kept with the model as npz bytes, so a
registry repeats the check on every load, even where the native library is
not installed.

Derived rows go where importers and compilers go wrong, around the model's
own split thresholds: each probed threshold t appears exactly, one float64
step and one float32 step either side (XGBoost compares in float32,
LightGBM in float64), and with its low 32 bits set (tl2cgen's "missing"
sentinel shared those bits).  Other rows carry NaNs, zeros and tiny values
(LightGBM reads |x| <= 1e-35 as 0), and infinities; a group the native
library refuses (scikit-learn refuses infinities) is left out.
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import treelite

from muse._compile import ZERO_THRESHOLD, Kernel
from muse._errors import ModelImportError, ParityError

__all__ = [
    "PARITY_TOLERANCE",
    "Golden",
    "Reference",
    "check_parity",
    "derive_golden",
    "given_golden",
]

log = logging.getLogger("muse.models")

FloatArray = npt.NDArray[np.float64]

#: Largest absolute difference, in margin and in probability, between our
#: predictions and the reference's on any golden row.
PARITY_TOLERANCE = 1e-6

# Thresholds probed (8 rows each) and sizes of the other groups: about
# 1,800 rows, 220 kB for 15 features, checked in milliseconds, and enough
# to reach most features of a 200-tree model many times.
_THRESHOLDS = 192
_BASE_ROWS = 64
_NAN_ROWS = 128
_SPECIAL_ROWS = 32
_LOW_WORD = np.uint64(0xFFFFFFFF)


@dataclass(frozen=True)
class Reference:
    """A library that predicts the model: ``predict(X) -> (margin, proba)``.

    Attributes:
        source: its name, kept with the golden rows.
        predict: margins and positive-class probabilities of X's rows.
        refusals: what it raises on rows it will not predict.
    """

    source: str
    predict: Callable[[FloatArray], tuple[FloatArray, FloatArray]]
    refusals: tuple[type[BaseException], ...] = ()


@dataclass(frozen=True)
class Golden:
    """Rows and the outputs a model must reproduce on them.

    Attributes:
        X: rows, shape (n, num_feature), read-only.
        margin: expected margins, shape (n,).
        proba: expected probabilities, or None when not given.
        source: where the expected values came from.
    """

    X: FloatArray
    margin: FloatArray
    proba: FloatArray | None
    source: str

    def to_bytes(self) -> bytes:
        """npz bytes (no pickles) that ``given_golden`` reads back."""
        arrays: dict[str, Any] = {"X": self.X, "margin": self.margin}
        if self.proba is not None:
            arrays["proba"] = self.proba
        arrays["source"] = np.array(self.source)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        return buffer.getvalue()


def given_golden(given: bytes | tuple[Any, ...], num_feature: int) -> Golden:
    """Golden rows from npz bytes or (X, margin[, probability]).

    Raises:
        ModelImportError: unreadable, inconsistent, or of the wrong width.
    """
    if isinstance(given, (bytes, bytearray, memoryview)):
        golden = _from_bytes(bytes(given))
    elif isinstance(given, (tuple, list)) and len(given) in (2, 3):
        proba = given[2] if len(given) == 3 else None
        golden = _checked(given[0], given[1], proba, "caller")
    else:
        raise ModelImportError(
            "golden must be npz bytes, (X, margin) or (X, margin, probability)"
        )
    if golden.X.ndim != 2 or golden.X.shape[1] != num_feature:
        raise ModelImportError(
            f"golden rows have shape {golden.X.shape}; the model reads "
            f"{num_feature} features"
        )
    return golden


def _from_bytes(data: bytes) -> Golden:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            names = arrays.files
            proba = arrays["proba"] if "proba" in names else None
            source = str(arrays["source"]) if "source" in names else "caller"
            return _checked(arrays["X"], arrays["margin"], proba, source)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise ModelImportError(f"golden rows unreadable: {exc}") from exc


def _checked(X: Any, margin: Any, proba: Any, source: str) -> Golden:
    rows = np.array(X, dtype=np.float64, order="C", ndmin=2)
    margins = np.array(margin, dtype=np.float64).reshape(-1)
    probas = None if proba is None else np.array(proba, np.float64).reshape(-1)
    lengths = {len(rows), len(margins), len(rows if probas is None else probas)}
    if len(lengths) != 1:
        raise ModelImportError(
            f"golden has {len(rows)} rows but {len(margins)} margins"
            + ("" if probas is None else f" and {len(probas)} probabilities")
        )
    for array in (rows, margins, probas):
        if array is not None:
            array.setflags(write=False)
    return Golden(rows, margins, probas, source)


def derive_golden(tl_model: treelite.Model, reference: Reference, seed: int) -> Golden:
    """Golden rows around the model's splits, expected values from reference.

    Args:
        tl_model: the model, for its thresholds.
        reference: the native library (or GTIL when none is installed).
        seed: makes the rows reproducible (derive it from the digest).
    """
    kept, margins, probas = [], [], []
    for group, rows in golden_rows(tl_model, seed):
        try:
            margin, proba = reference.predict(rows)
        except reference.refusals as exc:
            log.debug("%s refuses the %s golden rows: %s", reference.source, group, exc)
            continue
        kept.append(rows)
        margins.append(margin)
        probas.append(proba)
    if not kept:
        raise ModelImportError(f"{reference.source} predicts none of the golden rows")
    return _checked(
        np.vstack(kept),
        np.concatenate(margins),
        np.concatenate(probas),
        reference.source,
    )


def golden_rows(tl_model: treelite.Model, seed: int) -> list[tuple[str, FloatArray]]:
    """Named groups of rows: "finite", "nan", "inf" (see the module doc)."""
    rng = np.random.default_rng(seed)
    thresholds = _split_thresholds(tl_model)
    base = _base_rows(thresholds, rng)
    near = _threshold_rows(base, thresholds, rng)
    low = base.copy()
    finite = np.isfinite(low)
    low[finite] = (low[finite].view(np.uint64) | _LOW_WORD).view(np.float64)
    tiny = _sprinkle(base, _SPECIAL_ROWS, [0.0, -0.0, 1e-36, -ZERO_THRESHOLD], rng)
    nan = _sprinkle(base, _NAN_ROWS, [np.nan], rng)
    nan[0] = np.nan
    inf = _sprinkle(base, _SPECIAL_ROWS, [np.inf, -np.inf], rng)
    return [
        ("finite", np.vstack([base, near, low, tiny])),
        ("nan", nan),
        ("inf", inf),
    ]


def _sprinkle(
    base: FloatArray, count: int, values: list[float], rng: np.random.Generator
) -> FloatArray:
    """``count`` base rows with some cells, at least one a row, from values."""
    rows = base[rng.integers(0, len(base), count)]
    hit = rng.random(rows.shape) < 0.25
    hit[np.arange(count), rng.integers(0, rows.shape[1], count)] = True
    rows[hit] = rng.choice(values, size=int(hit.sum()))
    return rows


def _split_thresholds(tl_model: treelite.Model) -> list[FloatArray]:
    """Distinct finite numerical thresholds of each feature."""
    features, values = [np.empty(0, np.int64)], [np.empty(0)]
    for k in range(tl_model.num_tree):
        tree = tl_model.get_tree_accessor(k)
        numeric = tree.get_field("node_type") == 1
        features.append(tree.get_field("split_index")[numeric])
        values.append(tree.get_field("threshold")[numeric].astype(np.float64))
    feature, value = np.concatenate(features), np.concatenate(values)
    keep = np.isfinite(value)
    return [
        np.unique(value[keep & (feature == j)]) for j in range(tl_model.num_feature)
    ]


def _base_rows(thresholds: list[FloatArray], rng: np.random.Generator) -> FloatArray:
    """Rows near thresholds or anywhere in their range, feature by feature."""
    rows = np.zeros((_BASE_ROWS, len(thresholds)))
    for j, points in enumerate(thresholds):
        if len(points) == 0:
            continue
        spread = float(points[-1] - points[0]) or max(abs(float(points[0])), 1.0)
        jitter = rng.normal(0.0, 0.05 * spread, _BASE_ROWS)
        near = rng.choice(points, _BASE_ROWS) + jitter
        low, high = points[0] - 0.1 * spread, points[-1] + 0.1 * spread
        anywhere = rng.uniform(low, high, _BASE_ROWS)
        rows[:, j] = np.where(rng.random(_BASE_ROWS) < 0.5, near, anywhere)
    return rows


def _threshold_rows(
    base: FloatArray, thresholds: list[FloatArray], rng: np.random.Generator
) -> FloatArray:
    pairs = [(j, t) for j, points in enumerate(thresholds) for t in points]
    if not pairs:
        return np.empty((0, base.shape[1]))
    chosen = rng.choice(len(pairs), min(len(pairs), _THRESHOLDS), replace=False)
    rows = []
    for index in chosen:
        j, t = pairs[index]
        for value in _around(float(t)):
            row = base[rng.integers(0, len(base))].copy()
            row[j] = value
            rows.append(row)
    return np.array(rows)


def _around(t: float) -> list[float]:
    """t; one float64 and one float32 step either side; low word all ones."""
    with np.errstate(over="ignore"):
        t32 = np.float32(t)
    up32 = np.nextafter(t32, np.float32(np.inf))
    down32 = np.nextafter(t32, np.float32(-np.inf))
    values = [t, np.nextafter(t, np.inf), np.nextafter(t, -np.inf)]
    values += [float(t32), float(up32), float(down32)]
    for v in (t, float(down32)):
        if np.isfinite(v):
            bits = np.array([v]).view(np.uint64) | _LOW_WORD
            values.append(bits.view(np.float64)[0])
    return [float(v) for v in values]


def check_parity(kernel: Kernel, golden: Golden, label: str) -> None:
    """Refuse a kernel that does not reproduce the golden outputs.

    Raises:
        ParityError: naming the output, the count of rows off and the worst.
    """
    checks = [("margin", golden.margin, True), ("probability", golden.proba, False)]
    for what, expected, margin in checks:
        if expected is None or len(expected) == 0:
            continue
        got = kernel.run(golden.X, margin)
        close = np.isclose(
            got, expected, rtol=0.0, atol=PARITY_TOLERANCE, equal_nan=True
        )
        if close.all():
            continue
        gap = np.nan_to_num(np.abs(got - expected), nan=np.inf)
        worst = int(np.argmax(np.where(close, -1.0, gap)))
        raise ParityError(
            f"model {label}: {what} differs from {golden.source} on "
            f"{int((~close).sum())} of {len(close)} golden rows (tolerance "
            f"{PARITY_TOLERANCE:g}); row {worst}: got {got[worst]!r}, "
            f"expected {expected[worst]!r}"
        )
