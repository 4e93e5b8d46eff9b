"""The demo's two model recipes, and the timeline helpers they share.

MUSE serves models; it does not train them.  The demo still needs two real
models whose score distributions differ the way a production retrain does,
so this module holds their recipes:

- ``train_v1``: a shallow XGBoost model on the first month, trained with the
  genuine transactions undersampled to about 5 %;
- ``train_v2``: a deeper LightGBM model on the first two months, with the
  genuine transactions undersampled to about 50 %.

Both keep every fraud and report the share of genuine rows they actually kept
(``beta``), which is what posterior correction needs to undo the
undersampling.  Rows come as any column container indexed by name (a pandas
DataFrame or a dict of arrays) laid out like the real data; see
``/work/shared/data/README.md``.

The timeline is relative: months and weeks count from the data's first day,
so any file of four months or more works, whatever its calendar dates.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from muse._synthetic import FEATURES

__all__ = [
    "FEATURES",
    "LABEL",
    "V1_BETA",
    "V2_BETA",
    "Columns",
    "TrainedModel",
    "feature_matrix",
    "month_index",
    "months_of",
    "train_v1",
    "train_v2",
    "undersample",
    "week_index",
    "weeks_of",
]

logger = logging.getLogger("muse.training")

#: The label column: 1 for fraud, 0 for genuine.
LABEL = "TX_FRAUD"

#: Share of genuine rows v1 keeps.  Heavy undersampling is what makes a
#: model's raw scores far too high, the case posterior correction is for.
V1_BETA = 0.05

#: Share of genuine rows v2 keeps: a different beta from v1's, so the two
#: models' raw score distributions differ for a reason besides the trees.
V2_BETA = 0.5

# One training thread by default.  Both libraries use OpenMP, whose threads
# spin while they wait; on two cores shared with other work (the server
# under test, other processes) two threads measured far slower than one:
# v2 on the real data took 39-70 s with two threads against 6-10 s with
# one, v1 3-12 s against 0.4 s.  On a quiet machine two threads gain
# little: both models trained in about 6 s together.
_THREADS = 1

# A calendar month, in days, for data that carries day numbers only.  Thirty
# keeps month boundaries on whole days; the drift against the calendar is
# about half a day a month, negligible for a four-month timeline.
_DAYS_PER_MONTH = 30

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


class Columns(Protocol):
    """Rows as columns indexed by name: a pandas DataFrame or a dict of arrays."""

    def __getitem__(self, key: str, /) -> Any: ...

    def __contains__(self, key: object, /) -> bool: ...


@dataclass(frozen=True)
class TrainedModel:
    """A trained model, ready to upload to MUSE.

    Attributes:
        format: the MUSE model format, "xgboost_json" or "lightgbm".
        data: the model file's bytes in that format.
        beta: share of genuine rows kept, ``kept_negatives / total_negatives``.
        feature_names: the model's input columns, in order.
        months: how many months, from the data's first day, it was trained on.
        n_positives: fraud rows trained on (all of them).
        n_negatives: genuine rows in those months, before undersampling.
        n_negatives_kept: genuine rows trained on.
        seconds: wall-clock training time, data preparation included.
    """

    format: str
    data: bytes
    beta: float
    feature_names: tuple[str, ...]
    months: int
    n_positives: int
    n_negatives: int
    n_negatives_kept: int
    seconds: float

    @property
    def n_rows(self) -> int:
        """Rows the model was trained on."""
        return self.n_positives + self.n_negatives_kept


def month_index(
    times: npt.ArrayLike, origin: np.datetime64 | int | None = None
) -> IntArray:
    """Month of each row, counted from the first one.

    Args:
        times: timestamps (datetime64 values or a pandas datetime column),
            or day numbers such as ``TX_TIME_DAYS``.
        origin: the timeline's first instant (a datetime64 or a day number);
            defaults to the earliest of ``times``.

    Returns:
        int64 month numbers, 0 for the origin's month.  Timestamps count in
        calendar months; day numbers count in blocks of 30 days.
    """
    values = np.asarray(times)
    if np.issubdtype(values.dtype, np.datetime64):
        months = values.astype("datetime64[M]").astype(np.int64)
        first = months.min() if origin is None else _month_of(origin)
        return (months - first).astype(np.int64)
    return _days_from_origin(values, origin) // _DAYS_PER_MONTH


def week_index(
    times: npt.ArrayLike, origin: np.datetime64 | int | None = None
) -> IntArray:
    """Week of each row, counted in 7-day blocks from the first day.

    Args:
        times: timestamps or day numbers, as for ``month_index``.
        origin: the timeline's first instant; defaults to the earliest of
            ``times``.  Weeks start at midnight of the origin's day.

    Returns:
        int64 week numbers, 0 for the first seven days.
    """
    return _days_from_origin(np.asarray(times), origin) // 7


def months_of(rows: Columns) -> IntArray:
    """Month of each row from its time column (see ``month_index``).

    Args:
        rows: columns holding ``TX_DATETIME`` or ``TX_TIME_DAYS``.

    Returns:
        int64 month numbers from the data's first day.

    Raises:
        KeyError: neither time column is present.
    """
    return month_index(_time_column(rows))


def weeks_of(rows: Columns) -> IntArray:
    """Week of each row from its time column (see ``week_index``).

    Args:
        rows: columns holding ``TX_DATETIME`` or ``TX_TIME_DAYS``.

    Returns:
        int64 week numbers from the data's first day.

    Raises:
        KeyError: neither time column is present.
    """
    return week_index(_time_column(rows))


def feature_matrix(
    rows: Columns,
    feature_names: tuple[str, ...] = FEATURES,
    index: IntArray | None = None,
) -> FloatArray:
    """The model input: one float64 column per feature, in order.

    Args:
        rows: columns indexed by name.
        feature_names: the columns to take, in order.
        index: positions of the rows to take; all rows when None.

    Returns:
        A C-contiguous float64 array of shape (rows, features).

    Raises:
        KeyError: a feature column is missing, naming it.
    """
    missing = [name for name in feature_names if name not in rows]
    if missing:
        raise KeyError(f"rows lack feature columns {missing}")
    X = np.empty((_length(rows, feature_names[0], index), len(feature_names)))
    for j, name in enumerate(feature_names):
        column = np.asarray(rows[name], dtype=np.float64)
        X[:, j] = column if index is None else column[index]
    return X


def undersample(
    labels: npt.ArrayLike, beta: float, rng: np.random.Generator
) -> tuple[IntArray, float]:
    """Keep every positive row and a random share ``beta`` of the negatives.

    Args:
        labels: 0/1 labels.
        beta: share of negatives to keep, in (0, 1].
        rng: the random source choosing which negatives stay.

    Returns:
        The kept row indices in ascending order, and the beta actually used:
        ``kept_negatives / total_negatives`` (``round(beta * total)`` kept,
        at least one).

    Raises:
        ValueError: ``beta`` is outside (0, 1] or there are no negatives.
    """
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must be in (0, 1], got {beta!r}")
    y = np.asarray(labels)
    negatives = np.flatnonzero(y == 0)
    if negatives.size == 0:
        raise ValueError("cannot undersample: no negative (genuine) rows")
    kept = max(1, int(round(beta * negatives.size)))
    chosen = rng.choice(negatives, size=kept, replace=False)
    indices = np.sort(np.concatenate([np.flatnonzero(y != 0), chosen]))
    return indices.astype(np.int64), kept / negatives.size


def train_v1(
    train_rows: Columns,
    seed: int,
    *,
    beta: float = V1_BETA,
    months: int = 1,
    rounds: int = 150,
    threads: int = _THREADS,
) -> TrainedModel:
    """The demo's first model: shallow XGBoost on the first month.

    Args:
        train_rows: rows laid out like the real data; rows after the first
            ``months`` months are ignored, so the whole file may be passed.
        seed: seeds the undersampling and XGBoost.
        beta: share of genuine rows to keep.
        months: how many months from the data's first day to train on.
        rounds: boosting rounds (trees).
        threads: training threads (see ``_THREADS`` for the default).

    Returns:
        The model as XGBoost JSON (``format="xgboost_json"``).

    Raises:
        ValueError: no rows fall in the training months, or they hold no
            fraud or no genuine row.
    """
    import xgboost as xgb

    started = time.perf_counter()
    X, y, counts, beta_used = _training_set(train_rows, months, beta, seed)
    matrix = xgb.DMatrix(X, label=y, feature_names=list(FEATURES), nthread=threads)
    params = {
        "objective": "binary:logistic",
        "max_depth": 3,
        "eta": 0.1,
        "tree_method": "hist",
        "nthread": threads,
        "seed": seed,
    }
    booster = xgb.train(params, matrix, num_boost_round=rounds)
    data = bytes(booster.save_raw(raw_format="json"))
    return _trained("xgboost_json", data, beta_used, months, counts, started)


def train_v2(
    train_rows: Columns,
    seed: int,
    *,
    beta: float = V2_BETA,
    months: int = 2,
    rounds: int = 200,
    threads: int = _THREADS,
) -> TrainedModel:
    """The demo's second model: deeper LightGBM on the first two months.

    Args:
        train_rows: rows laid out like the real data; rows after the first
            ``months`` months are ignored, so the whole file may be passed.
        seed: seeds the undersampling and LightGBM.
        beta: share of genuine rows to keep.
        months: how many months from the data's first day to train on.
        rounds: boosting rounds.
        threads: training threads (see ``_THREADS`` for the default).

    Returns:
        The model as LightGBM text (``format="lightgbm"``).

    Raises:
        ValueError: no rows fall in the training months, or they hold no
            fraud or no genuine row.
    """
    import lightgbm as lgb

    started = time.perf_counter()
    X, y, counts, beta_used = _training_set(train_rows, months, beta, seed)
    # 63 bins and column-wise histograms keep ~300k rows to seconds; the
    # AUC cost is in the third decimal.
    params: dict[str, Any] = {
        "objective": "binary",
        "num_leaves": 63,
        "learning_rate": 0.05,
        "min_data_in_leaf": 100,
        "max_bin": 63,
        "force_col_wise": True,
        "num_threads": threads,
        "seed": seed,
        "deterministic": True,
        "verbose": -1,
    }
    dataset = lgb.Dataset(
        X, label=y, feature_name=list(FEATURES), params={"max_bin": 63, "verbose": -1}
    )
    booster = lgb.train(params, dataset, num_boost_round=rounds)
    data = booster.model_to_string().encode()
    return _trained("lightgbm", data, beta_used, months, counts, started)


def _training_set(
    rows: Columns, months: int, beta: float, seed: int
) -> tuple[FloatArray, npt.NDArray[np.float64], tuple[int, int, int], float]:
    """Rows of the first ``months`` months, genuine ones undersampled.

    Returns:
        The feature matrix, the labels, (positives, negatives, negatives
        kept) and the beta actually used.
    """
    in_window = np.flatnonzero(months_of(rows) < months)
    labels = np.asarray(rows[LABEL])[in_window]
    positives = int(np.count_nonzero(labels))
    if positives == 0 or positives == labels.size:
        raise ValueError(
            f"the first {months} month(s) hold {labels.size} rows, "
            f"{positives} of them fraud; training needs both classes"
        )
    kept, beta_used = undersample(labels, beta, np.random.default_rng(seed))
    X = feature_matrix(rows, FEATURES, in_window[kept])
    y = (labels[kept] != 0).astype(np.float64)
    negatives = labels.size - positives
    counts = (positives, negatives, kept.size - positives)
    return X, y, counts, beta_used


def _trained(
    format: str,
    data: bytes,
    beta: float,
    months: int,
    counts: tuple[int, int, int],
    started: float,
) -> TrainedModel:
    """Bundle a trained model and log how it was made."""
    positives, negatives, kept = counts
    seconds = time.perf_counter() - started
    logger.info(
        "trained %s on %d months: %d fraud + %d of %d genuine rows "
        "(beta %.4f) in %.1f s",
        format,
        months,
        positives,
        kept,
        negatives,
        beta,
        seconds,
    )
    return TrainedModel(
        format=format,
        data=data,
        beta=beta,
        feature_names=FEATURES,
        months=months,
        n_positives=positives,
        n_negatives=negatives,
        n_negatives_kept=kept,
        seconds=seconds,
    )


def _length(rows: Columns, name: str, index: IntArray | None) -> int:
    """How many rows ``feature_matrix`` returns."""
    return len(np.asarray(rows[name])) if index is None else len(index)


def _time_column(rows: Columns) -> npt.NDArray[Any]:
    """The rows' timestamps, or their day numbers when there are none."""
    for name in ("TX_DATETIME", "TX_TIME_DAYS"):
        if name in rows:
            return np.asarray(rows[name])
    raise KeyError("rows have no time column (TX_DATETIME or TX_TIME_DAYS)")


def _days_from_origin(
    values: npt.NDArray[Any], origin: np.datetime64 | int | None
) -> IntArray:
    """Whole days elapsed since the origin's day (midnight for timestamps)."""
    days: IntArray
    if np.issubdtype(values.dtype, np.datetime64):
        days = values.astype("datetime64[D]").astype(np.int64)
        if origin is not None and not isinstance(origin, np.datetime64):
            raise TypeError("timestamps need a timestamp origin, got a day number")
    else:
        days = np.floor(values.astype(np.float64)).astype(np.int64)
        if isinstance(origin, np.datetime64):
            raise TypeError("day numbers need a day-number origin, got a timestamp")
    if origin is None:
        first = int(days.min())
    elif isinstance(origin, np.datetime64):
        first = int(origin.astype("datetime64[D]").astype(np.int64))
    else:
        first = int(origin)
    return days - first


def _month_of(origin: np.datetime64 | int) -> np.int64:
    """Calendar month number (months since 1970-01) of a timestamp origin."""
    if not isinstance(origin, np.datetime64):
        raise TypeError("timestamps need a timestamp origin, got a day number")
    return np.int64(origin.astype("datetime64[M]").astype(np.int64))
