"""The synthetic card-transaction generator, and the real-data loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from muse._synthetic import (
    COLUMNS,
    FEATURES,
    generate_transactions,
    load_transactions,
    tenant_of,
    to_frame,
)

ROWS = 60_000


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    return generate_transactions(ROWS, seed=3)


def months(data: dict[str, np.ndarray]) -> np.ndarray:
    return data["TX_DATETIME"].astype("datetime64[M]")


def test_schema_matches_the_real_layout(data: dict[str, np.ndarray]) -> None:
    assert tuple(data) == COLUMNS
    assert len(FEATURES) == 15 and FEATURES[0] == "TX_AMOUNT"
    assert FEATURES[-1] == "TERMINAL_ID_RISK_30DAY_WINDOW"
    assert all(len(values) == ROWS for values in data.values())
    assert data["TX_DATETIME"].dtype == np.dtype("datetime64[ns]")
    for name in ("TX_FRAUD", "TX_FRAUD_SCENARIO", "TX_DURING_WEEKEND"):
        assert data[name].dtype == np.int8
    for name in FEATURES[3:]:
        assert data[name].dtype == np.float64
    assert not any(np.isnan(data[name]).any() for name in FEATURES)


def test_rows_are_ordered_by_time_over_four_months(
    data: dict[str, np.ndarray],
) -> None:
    seconds = data["TX_TIME_SECONDS"]

    assert np.all(np.diff(seconds) >= 0)
    np.testing.assert_array_equal(data["TRANSACTION_ID"], np.arange(ROWS))
    np.testing.assert_array_equal(data["TX_TIME_DAYS"], seconds // 86_400)
    assert [str(m) for m in np.unique(months(data))] == [
        "2018-04",
        "2018-05",
        "2018-06",
        "2018-07",
    ]
    # 2018-04-01 was a Sunday.
    assert data["TX_DURING_WEEKEND"][data["TX_TIME_DAYS"] == 0].all()


def test_fraud_rate_and_scenarios(data: dict[str, np.ndarray]) -> None:
    fraud, scenario = data["TX_FRAUD"], data["TX_FRAUD_SCENARIO"]

    assert 0.005 <= fraud.mean() <= 0.011
    np.testing.assert_array_equal(fraud, scenario > 0)
    assert set(np.unique(scenario)) == {0, 1, 2, 3}


def test_scenarios_carry_signal(data: dict[str, np.ndarray]) -> None:
    scenario, amount = data["TX_FRAUD_SCENARIO"], data["TX_AMOUNT"]
    genuine = scenario == 0

    assert (amount[scenario == 1] > 220).all()
    risk = data["TERMINAL_ID_RISK_7DAY_WINDOW"]
    assert risk[scenario == 2].mean() > 20 * risk[genuine].mean()
    ratio = amount / data["CUSTOMER_ID_AVG_AMOUNT_30DAY_WINDOW"]
    assert np.median(ratio[scenario == 3]) > 2 * np.median(ratio[genuine])


def test_customer_windows_count_this_transaction(
    data: dict[str, np.ndarray],
) -> None:
    one = data["CUSTOMER_ID_NB_TX_1DAY_WINDOW"]
    seven = data["CUSTOMER_ID_NB_TX_7DAY_WINDOW"]
    thirty = data["CUSTOMER_ID_NB_TX_30DAY_WINDOW"]

    assert (one >= 1).all() and (seven >= one).all() and (thirty >= seven).all()
    assert (data["TERMINAL_ID_NB_TX_1DAY_WINDOW"] >= 0).all()
    risk = data["TERMINAL_ID_RISK_30DAY_WINDOW"]
    assert ((risk >= 0) & (risk <= 1)).all()


def test_amounts_drift_between_months(data: dict[str, np.ndarray]) -> None:
    month = months(data)
    first = np.median(data["TX_AMOUNT"][month == month[0]])
    last = np.median(data["TX_AMOUNT"][month == month[-1]])

    assert last > 1.05 * first


def test_same_seed_same_rows_other_seed_other_rows() -> None:
    first = generate_transactions(5_000, seed=11)
    again = generate_transactions(5_000, seed=11)
    other = generate_transactions(5_000, seed=12)

    for name in COLUMNS:
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first["TX_AMOUNT"], other["TX_AMOUNT"])


def test_tenant_of() -> None:
    assert tenant_of(0) == "bank-00"
    assert tenant_of(25) == "bank-01"
    assert tenant_of(np.int64(4999)) == "bank-07"


def test_every_tenant_appears(data: dict[str, np.ndarray]) -> None:
    tenants = {tenant_of(c) for c in np.unique(data["CUSTOMER_ID"])}

    assert len(tenants) == 24


def test_to_frame() -> None:
    pd = pytest.importorskip("pandas")

    frame = to_frame(generate_transactions(1_000, seed=1))

    assert isinstance(frame, pd.DataFrame)
    assert tuple(frame.columns) == COLUMNS and len(frame) == 1_000


def test_rejects_empty_requests() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        generate_transactions(0)


@pytest.mark.realdata
def test_load_transactions_has_the_generators_layout(data_path: Path) -> None:
    pytest.importorskip("pyarrow")

    real = load_transactions(data_path)
    synthetic = generate_transactions(1_000)

    assert tuple(real) == COLUMNS
    for name in COLUMNS:
        assert real[name].dtype == synthetic[name].dtype, name
    assert len(real["TX_FRAUD"]) == 1_169_723
