"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The real card transactions live beside the repo, never inside it.  CI has
# them; a developer machine may not, and then real-data tests skip.
_DEFAULT_DATA = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "data"
    / "transactions-2018-04-to-07.parquet"
)


def _data_file() -> Path:
    return Path(os.environ.get("MUSE_DATA", _DEFAULT_DATA))


@pytest.fixture(scope="session")
def data_path() -> Path:
    """Path of the shared transactions file; skips the test where it is absent."""
    path = _data_file()
    if not path.is_file():
        pytest.skip(f"real transaction data not found at {path} (set MUSE_DATA)")
    return path


@pytest.fixture(scope="session")
def synthetic() -> dict:
    """Four months of synthetic transactions (fast, deterministic)."""
    from muse._synthetic import generate_transactions

    return generate_transactions(40_000, seed=7)


@pytest.fixture(scope="session")
def xgb_bytes(synthetic: dict) -> bytes:
    """A small XGBoost model (JSON) trained on the synthetic rows."""
    import numpy as np
    import xgboost as xgb

    from muse._synthetic import FEATURES

    X = np.column_stack([synthetic[f] for f in FEATURES]).astype(np.float64)
    y = synthetic["TX_FRAUD"]
    booster = xgb.train(
        {"max_depth": 3, "objective": "binary:logistic", "nthread": 2, "eta": 0.3},
        xgb.DMatrix(X, label=y, feature_names=list(FEATURES)),
        num_boost_round=30,
    )
    return bytes(booster.save_raw("json"))


@pytest.fixture(scope="session")
def lgb_bytes(synthetic: dict) -> bytes:
    """A small LightGBM model (text) trained on the synthetic rows."""
    import lightgbm as lgb
    import numpy as np

    from muse._synthetic import FEATURES

    X = np.column_stack([synthetic[f] for f in FEATURES]).astype(np.float64)
    booster = lgb.train(
        {"objective": "binary", "num_leaves": 15, "verbose": -1, "num_threads": 2},
        lgb.Dataset(X, label=synthetic["TX_FRAUD"], feature_name=list(FEATURES)),
        num_boost_round=30,
    )
    return booster.model_to_string().encode()


@pytest.fixture(scope="session")
def events(synthetic: dict) -> list[dict]:
    """The synthetic rows as scoring events, with their tenants."""
    from muse._synthetic import FEATURES, tenant_of

    columns = [synthetic[f].tolist() for f in FEATURES]
    out = []
    for i, (customer, tx) in enumerate(
        zip(synthetic["CUSTOMER_ID"].tolist(), synthetic["TRANSACTION_ID"].tolist())
    ):
        features = {f: float(col[i]) for f, col in zip(FEATURES, columns)}
        out.append({"id": int(tx), "tenant": tenant_of(customer), "features": features})
    return out


@pytest.fixture(scope="session")
def compiled_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One compile cache for the whole run: the same model bytes compile once."""
    return tmp_path_factory.mktemp("compiled")


@pytest.fixture
def registry_path(tmp_path: Path, compiled_cache: Path) -> Path:
    """A fresh registry directory whose compiled-library cache is shared."""
    path = tmp_path / "reg"
    path.mkdir()
    (path / "compiled").symlink_to(compiled_cache, target_is_directory=True)
    return path


@pytest.fixture(scope="session")
def template(
    tmp_path_factory: pytest.TempPathFactory,
    synthetic: dict,
    xgb_bytes: bytes,
    lgb_bytes: bytes,
) -> Path:
    """A deployed registry (see ``_servers.build_deployment``), built once."""
    from _servers import deployed_template

    return deployed_template(
        tmp_path_factory.mktemp("deployed"), synthetic, xgb_bytes, lgb_bytes
    )
