"""Synthetic card transactions laid out like the real data set.

The real data (see ``shared/data/README.md``) comes from the simulator of the
*Reproducible Machine Learning for Credit Card Fraud Detection* handbook.
This module reproduces its shape, not its code, in a few vectorised numpy
passes so that tests and benchmarks get realistic rows in milliseconds:

- customers with a mean amount and a daily transaction rate; terminals on a
  ring, each customer using the terminals near its place on the ring;
- three fraud scenarios, labelled as in the real data: (1) any amount over
  220 is fraud; (2) compromised terminals: every transaction at one for 28
  days is fraud; (3) compromised customers: for 14 days a third of their
  transactions are fraud, with five times their usual amount;
- the 15 features computed exactly as named: customer counts and average
  amounts over 1/7/30 days up to and including the transaction, terminal
  counts and fraud rates over 1/7/30 days ending a week earlier (a fraud
  label is known only after a delay);
- a mild drift: amounts grow by ``drift`` per 30 days, and terminal
  compromises become more frequent, so a model retrained on later months
  scores differently.

The fraud rate comes out near the real one (0.6% to 0.9%, lower in the
first month while compromises accumulate).  Real data is read with
``load_transactions`` (needs pyarrow); ``to_frame`` turns either into a
pandas DataFrame.  Both are optional: numpy is enough for generation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "COLUMNS",
    "FEATURES",
    "ID_COLUMNS",
    "generate_transactions",
    "load_transactions",
    "tenant_of",
    "to_frame",
]

#: The 15 model features, in the order models are trained on.
FEATURES: tuple[str, ...] = (
    "TX_AMOUNT",
    "TX_DURING_WEEKEND",
    "TX_DURING_NIGHT",
    "CUSTOMER_ID_NB_TX_1DAY_WINDOW",
    "CUSTOMER_ID_NB_TX_7DAY_WINDOW",
    "CUSTOMER_ID_NB_TX_30DAY_WINDOW",
    "CUSTOMER_ID_AVG_AMOUNT_1DAY_WINDOW",
    "CUSTOMER_ID_AVG_AMOUNT_7DAY_WINDOW",
    "CUSTOMER_ID_AVG_AMOUNT_30DAY_WINDOW",
    "TERMINAL_ID_NB_TX_1DAY_WINDOW",
    "TERMINAL_ID_NB_TX_7DAY_WINDOW",
    "TERMINAL_ID_NB_TX_30DAY_WINDOW",
    "TERMINAL_ID_RISK_1DAY_WINDOW",
    "TERMINAL_ID_RISK_7DAY_WINDOW",
    "TERMINAL_ID_RISK_30DAY_WINDOW",
)
#: Identity, time and label columns.
ID_COLUMNS: tuple[str, ...] = (
    "TRANSACTION_ID",
    "TX_DATETIME",
    "CUSTOMER_ID",
    "TERMINAL_ID",
    "TX_TIME_SECONDS",
    "TX_TIME_DAYS",
    "TX_FRAUD",
    "TX_FRAUD_SCENARIO",
)
COLUMNS: tuple[str, ...] = ID_COLUMNS + FEATURES

# Column dtypes as in the real parquet file.
_INT8_COLUMNS = frozenset(
    {"TX_FRAUD", "TX_FRAUD_SCENARIO", "TX_DURING_WEEKEND", "TX_DURING_NIGHT"}
)

_DAY = 86_400
# Window lengths in days, and the delay before a fraud label is known: the
# terminal features look at [t - delay - window, t - delay).
_WINDOWS = (1, 7, 30)
_LABEL_DELAY_DAYS = 7
# Scenario constants of the handbook's simulator.
_LARGE_AMOUNT = 220.0
_TERMINAL_COMPROMISE_DAYS = 28
_CUSTOMER_COMPROMISE_DAYS = 14
_CUSTOMER_FRAUD_SHARE = 1 / 3
_CUSTOMER_FRAUD_FACTOR = 5.0
# Compromises per day per 10,000 terminals / customers in the real data
# (2 terminals and 3 customers a day for 10,000 and 5,000 of them).
_TERMINALS_COMPROMISED_PER_10K = 1.8
_CUSTOMERS_COMPROMISED_PER_10K = 6.0
# Terminals per customer, and terminals per customer in the real data.
_TERMINAL_RATIO = 2
_NEIGHBOURHOOD = 80
# Mean transactions per customer per day (rates are uniform on [0, 4)).
_MEAN_DAILY_RATE = 2.0


def tenant_of(customer_id: int | np.integer[Any]) -> str:
    """The tenant (card issuer) of a customer, as everywhere in MUSE.

    Args:
        customer_id: the ``CUSTOMER_ID`` value.

    Returns:
        ``"bank-%02d" % (customer_id % 24)``.
    """
    return f"bank-{int(customer_id) % 24:02d}"


def generate_transactions(
    n_rows: int = 200_000,
    *,
    seed: int = 0,
    n_days: int = 122,
    start: str = "2018-04-01",
    drift: float = 0.03,
) -> dict[str, np.ndarray]:
    """Generate card transactions ordered by time.

    Args:
        n_rows: exact number of rows returned.
        seed: seed of the generator; the same arguments give the same rows.
        n_days: days covered, from ``start`` (122 is April to July).
        start: first day, ISO format.
        drift: relative growth of amounts per 30 days.

    Returns:
        ``{column: ndarray}`` with ``COLUMNS`` as keys, in that order; see
        ``to_frame`` for a DataFrame.

    Raises:
        ValueError: ``n_rows`` or ``n_days`` is not positive.
    """
    if n_rows < 1 or n_days < 1:
        raise ValueError(f"n_rows and n_days must be positive, got {n_rows}, {n_days}")
    rng = np.random.default_rng(seed)
    # Draw about 10% more than asked, then thin uniformly: thinning keeps the
    # time span and the feature semantics (a customer's unseen transactions
    # still count in its windows, as for a sample of a real stream).
    n_customers = max(24, int(n_rows * 1.1 / (n_days * _MEAN_DAILY_RATE)) + 1)
    while True:
        rows = _simulate(rng, n_customers, n_days, drift)
        if len(rows["TX_TIME_SECONDS"]) >= n_rows:
            break
        n_customers = int(n_customers * 1.2) + 1
    keep = np.sort(rng.choice(len(rows["TX_TIME_SECONDS"]), n_rows, replace=False))
    return _layout({name: values[keep] for name, values in rows.items()}, start)


def load_transactions(
    path: str | os.PathLike[str],
    *,
    columns: tuple[str, ...] = COLUMNS,
) -> dict[str, np.ndarray]:
    """Read the real transactions file in the generator's layout.

    Args:
        path: the parquet file.
        columns: columns to read, in the order returned.

    Returns:
        ``{column: ndarray}`` with the real file's dtypes.

    Raises:
        ImportError: pyarrow is not installed.
        FileNotFoundError: ``path`` does not exist.
    """
    import pyarrow.parquet as pq

    table = pq.read_table(os.fspath(path), columns=list(columns))
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in columns}


def to_frame(data: Mapping[str, np.ndarray]) -> Any:
    """The generator's or loader's columns as a pandas DataFrame.

    Args:
        data: ``{column: ndarray}`` as returned here.

    Returns:
        A ``pandas.DataFrame`` with the columns in the same order.

    Raises:
        ImportError: pandas is not installed (it is optional).
    """
    import pandas as pd

    return pd.DataFrame(dict(data), columns=list(data))


def _simulate(
    rng: np.random.Generator, n_customers: int, n_days: int, drift: float
) -> dict[str, np.ndarray]:
    """Transactions with labels and features, sorted by time."""
    customer, seconds, amount = _draw_transactions(rng, n_customers, n_days, drift)
    n_terminals = n_customers * _TERMINAL_RATIO
    terminal = _draw_terminals(rng, customer, n_customers, n_terminals)
    order = np.argsort(seconds, kind="stable")
    customer, seconds = customer[order], seconds[order]
    amount, terminal = amount[order], terminal[order]

    scenario = np.where(amount > _LARGE_AMOUNT, 1, 0).astype(np.int8)
    days = seconds // _DAY
    _compromise_terminals(rng, terminal, days, scenario, n_terminals, n_days)
    _compromise_customers(rng, customer, days, amount, scenario, n_customers, n_days)
    fraud = (scenario > 0).astype(np.int8)

    rows = {
        "CUSTOMER_ID": customer,
        "TERMINAL_ID": terminal,
        "TX_TIME_SECONDS": seconds,
        "TX_AMOUNT": np.round(amount, 2),
        "TX_FRAUD": fraud,
        "TX_FRAUD_SCENARIO": scenario,
    }
    rows.update(_customer_features(customer, seconds, rows["TX_AMOUNT"]))
    rows.update(_terminal_features(terminal, seconds, fraud))
    return rows


def _draw_transactions(
    rng: np.random.Generator, n_customers: int, n_days: int, drift: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Customer, time (seconds from start) and amount of every transaction."""
    mean_amount = rng.uniform(5, 100, n_customers)
    daily_rate = rng.uniform(0, 2 * _MEAN_DAILY_RATE, n_customers)
    counts = rng.poisson(np.tile(daily_rate, n_days))  # day-major cells
    cell = np.repeat(np.arange(n_days * n_customers), counts)
    day, customer = np.divmod(cell, n_customers)

    # Spending centres on midday, sd 20,000 s; draws outside the day fold
    # back into it rather than being dropped, to keep counts as drawn.
    time_of_day = rng.normal(_DAY / 2, 20_000, len(cell))
    time_of_day = np.abs(time_of_day) % (2 * _DAY)
    time_of_day = np.where(time_of_day >= _DAY, 2 * _DAY - 1 - time_of_day, time_of_day)
    seconds = day * _DAY + time_of_day.astype(np.int64)

    # Centred on the second month, so the overall mean stays near the real
    # data's whatever the drift.
    mean = mean_amount[customer] * (1 + drift * (day / 30 - 2))
    amount = rng.normal(mean, mean / 2)
    negative = amount < 0
    amount[negative] = rng.uniform(0, 2 * mean[negative])
    return customer.astype(np.int64), seconds, amount


def _draw_terminals(
    rng: np.random.Generator,
    customer: np.ndarray,
    n_customers: int,
    n_terminals: int,
) -> np.ndarray:
    """Each customer pays at terminals around its own place on a ring."""
    home = rng.integers(0, n_terminals, n_customers)
    reach = min(_NEIGHBOURHOOD, n_terminals) // 2
    offset = rng.integers(-reach, reach + 1, len(customer))
    terminal: np.ndarray = (home[customer] + offset) % n_terminals
    return terminal.astype(np.int64)


def _compromise_terminals(
    rng: np.random.Generator,
    terminal: np.ndarray,
    days: np.ndarray,
    scenario: np.ndarray,
    n_terminals: int,
    n_days: int,
) -> None:
    """Scenario 2: all transactions at a compromised terminal are fraud."""
    base = _TERMINALS_COMPROMISED_PER_10K * n_terminals / 10_000
    # Compromises grow 5% a month: part of the drift between months.
    rate = base * (1 + 0.05 * np.arange(n_days) / 30)
    active = _compromised(rng, rate, n_terminals, _TERMINAL_COMPROMISE_DAYS)
    scenario[active[terminal, days]] = 2


def _compromise_customers(
    rng: np.random.Generator,
    customer: np.ndarray,
    days: np.ndarray,
    amount: np.ndarray,
    scenario: np.ndarray,
    n_customers: int,
    n_days: int,
) -> None:
    """Scenario 3: a share of a compromised customer's payments are fraud."""
    rate = np.full(n_days, _CUSTOMERS_COMPROMISED_PER_10K * n_customers / 10_000)
    active = _compromised(rng, rate, n_customers, _CUSTOMER_COMPROMISE_DAYS)
    exposed = active[customer, days]
    hit = exposed & (rng.random(len(customer)) < _CUSTOMER_FRAUD_SHARE)
    amount[hit] *= _CUSTOMER_FRAUD_FACTOR
    scenario[hit] = 3


def _compromised(
    rng: np.random.Generator, daily_rate: np.ndarray, n_victims: int, duration: int
) -> np.ndarray:
    """Boolean (victim, day) table: compromised that day.

    Args:
        rng: the generator.
        daily_rate: expected new compromises per day.
        n_victims: how many terminals or customers may be hit.
        duration: days a compromise lasts, its first day included.

    Returns:
        Array of shape ``(n_victims, len(daily_rate))``.
    """
    n_days = len(daily_rate)
    # Deterministic counts (fractional rates accumulate from day to day), as
    # the handbook's "two terminals a day": Poisson counts over only a few
    # hundred terminals would swing the fraud rate from seed to seed.
    due = np.floor(np.cumsum(daily_rate) + rng.random()).astype(np.int64)
    start = np.repeat(np.arange(n_days), np.diff(due, prepend=0))
    victim = rng.integers(0, n_victims, len(start))
    day = start[:, None] + np.arange(duration)[None, :]
    inside = day < n_days
    active = np.zeros((n_victims, n_days), dtype=bool)
    active[np.broadcast_to(victim[:, None], day.shape)[inside], day[inside]] = True
    return active


def _customer_features(
    customer: np.ndarray, seconds: np.ndarray, amount: np.ndarray
) -> dict[str, np.ndarray]:
    """Counts and mean amounts over (t - window, t], this transaction included."""
    order, keys = _group_by_time(customer, seconds)
    amount_sum = np.concatenate(([0.0], np.cumsum(amount[order])))
    position = np.arange(len(order))
    features: dict[str, np.ndarray] = {}
    for window in _WINDOWS:
        first = np.searchsorted(keys, keys - window * _DAY, side="right")
        count = position + 1 - first
        total = amount_sum[position + 1] - amount_sum[first]
        features[f"CUSTOMER_ID_NB_TX_{window}DAY_WINDOW"] = _unsort(order, count)
        features[f"CUSTOMER_ID_AVG_AMOUNT_{window}DAY_WINDOW"] = _unsort(
            order, total / count
        )
    return features


def _terminal_features(
    terminal: np.ndarray, seconds: np.ndarray, fraud: np.ndarray
) -> dict[str, np.ndarray]:
    """Counts and fraud rates over (t - delay - window, t - delay]."""
    order, keys = _group_by_time(terminal, seconds)
    fraud_sum = np.concatenate(([0], np.cumsum(fraud[order], dtype=np.int64)))
    delayed = keys - _LABEL_DELAY_DAYS * _DAY
    last = np.searchsorted(keys, delayed, side="right")
    features: dict[str, np.ndarray] = {}
    for window in _WINDOWS:
        first = np.searchsorted(keys, delayed - window * _DAY, side="right")
        count = last - first
        frauds = fraud_sum[last] - fraud_sum[first]
        risk = np.divide(frauds, count, out=np.zeros(len(count)), where=count > 0)
        features[f"TERMINAL_ID_NB_TX_{window}DAY_WINDOW"] = _unsort(order, count)
        features[f"TERMINAL_ID_RISK_{window}DAY_WINDOW"] = _unsort(order, risk)
    return features


def _group_by_time(
    group: np.ndarray, seconds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Order rows by (group, time); keys make windows one searchsorted away.

    Each group's times are offset far beyond any window, so a window's start
    found by ``searchsorted`` never falls into the previous group.
    """
    span = int(seconds.max()) + 100 * _DAY
    keys = group.astype(np.int64) * span + seconds
    order = np.argsort(keys, kind="stable")
    return order, keys[order]


def _unsort(order: np.ndarray, values: np.ndarray) -> np.ndarray:
    result = np.empty(len(order), dtype=np.float64)
    result[order] = values
    return result


def _layout(rows: dict[str, np.ndarray], start: str) -> dict[str, np.ndarray]:
    """Add ids and calendar columns; order and type columns as the real file."""
    seconds = rows["TX_TIME_SECONDS"]
    origin = np.datetime64(start, "s")
    moment = origin + seconds.astype("timedelta64[s]")
    # 1970-01-01 was a Thursday: day 0 of numpy's week count is Thursday.
    weekday = (moment.astype("datetime64[D]").astype(np.int64) + 3) % 7
    hour = (moment - moment.astype("datetime64[D]")).astype(np.int64) // 3600
    rows = dict(rows)
    rows["TRANSACTION_ID"] = np.arange(len(seconds), dtype=np.int64)
    rows["TX_DATETIME"] = moment.astype("datetime64[ns]")
    rows["TX_TIME_DAYS"] = seconds // _DAY
    rows["TX_DURING_WEEKEND"] = (weekday >= 5).astype(np.int8)
    rows["TX_DURING_NIGHT"] = (hour <= 6).astype(np.int8)
    data: dict[str, np.ndarray] = {}
    for name in COLUMNS:
        values = rows[name]
        if name in _INT8_COLUMNS:
            values = values.astype(np.int8)
        elif name in FEATURES:
            values = values.astype(np.float64)
        data[name] = values
    return data
