"""Tests of ``muse evaluate`` (muse._evaluate_cli) on a real registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd  # type: ignore[import-untyped]  # no pandas-stubs in the venv
import pytest

from muse._evaluate import evaluate_main, tenants_of
from muse._models import load_model
from muse._predictor import Predictor
from muse._registry import Registry
from muse._synthetic import generate_transactions
from muse._training import FEATURES, feature_matrix, train_v1
from muse._transform import QuantileMapping

# The module's registry compiles a model: a few seconds, once.
pytestmark = pytest.mark.slow

_SPEC = {
    "name": "card-fraud",
    "nodes": [
        {"id": "xgb", "kind": "model", "model": "fraud-xgb@1"},
        {"id": "pc", "kind": "posterior_correction", "input": "xgb"},
        {"id": "qm", "kind": "quantile_map", "input": "pc"},
    ],
    "output": "qm",
}


class _Setup:
    """A registry holding one model, one predictor and its global mapping."""

    def __init__(self, root: Path) -> None:
        rows = generate_transactions(20_000, seed=3)
        trained = train_v1(rows, seed=0, rounds=20)
        self.registry_path = root / "registry"
        registry = Registry(self.registry_path)
        model = load_model(
            trained.data,
            "xgboost_json",
            list(FEATURES),
            trained.beta,
            cache_dir=registry.compiled_dir,
            name="fraud-xgb",
        )
        meta = {
            "format": model.format,
            "feature_names": list(model.feature_names),
            "beta": model.beta,
            "digest": model.digest,
        }
        registry.put_model("fraud-xgb", model.to_bytes(), meta)
        registry.put_predictor("card-fraud", _SPEC)
        predictor = Predictor.from_spec(_SPEC, {"fraud-xgb@1": model}, version=1)
        corrected = predictor.score(feature_matrix(rows), {"fraud-xgb@1": model})
        self.mapping = QuantileMapping.fit(corrected, predictor="card-fraud@1")
        registry.put_mapping(self.mapping)
        self.events = root / "events.parquet"
        pd.DataFrame(rows).to_parquet(self.events)
        self.tenants = tenants_of(rows["CUSTOMER_ID"])

    def argv(self, *extra: str, events: Path | None = None) -> list[str]:
        return [
            "--registry",
            str(self.registry_path),
            "--predictor",
            "card-fraud@1",
            "--events",
            str(events or self.events),
            *extra,
        ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> _Setup:
    return _Setup(tmp_path_factory.mktemp("evaluate"))


def _pooled(output: str) -> dict[float, float]:
    """Observed share by edge from the pooled rows of the printed table."""
    shares = {}
    for line in output.splitlines():
        cells = line.split()
        if len(cells) == 6 and cells[0] == "*":
            shares[float(cells[1])] = float(cells[3])
    return shares


def test_evaluate_prints_the_shares_the_mapping_was_fitted_to(
    setup: _Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    status = evaluate_main(setup.argv("--mapping", setup.mapping.id))

    out = capsys.readouterr().out
    assert status == 0
    assert f"mapping:   {setup.mapping.id}" in out
    assert "events:    20000" in out
    # Scored on the very events it was fitted on: the shares it achieved.
    expected = {
        round(edge, 3): round(achieved, 4)
        for (edge, _), achieved in zip(
            setup.mapping.curve, setup.mapping.achieved, strict=True
        )
    }
    assert _pooled(out) == expected
    assert sum(line.split()[:1] == ["bank-00"] for line in out.splitlines()) == 4


def test_evaluate_scope_global_finds_the_latest_mapping(
    setup: _Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    assert evaluate_main(setup.argv("--scope", "global")) == 0

    assert f"mapping:   {setup.mapping.id}" in capsys.readouterr().out


def test_evaluate_scope_tenant_keeps_its_events_only(
    setup: _Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    assert evaluate_main(setup.argv("--scope", "bank-03")) == 0

    out = capsys.readouterr().out
    assert f"events:    {np.count_nonzero(setup.tenants == 'bank-03')}" in out
    assert "bank-04" not in out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--registry": "missing"}, "no registry directory"),
        ({"--predictor": "card-fraud"}, "expected a reference"),
        ({"--predictor": "nope@1"}, "nope"),
        ({"--events": "missing.parquet"}, "missing.parquet"),
    ],
)
def test_evaluate_bad_input_exits_2_with_a_reason(
    setup: _Setup,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, str],
    message: str,
) -> None:
    argv = setup.argv()
    for flag, value in change.items():
        argv[argv.index(flag) + 1] = (
            value if flag == "--predictor" else str(tmp_path / value)
        )

    assert evaluate_main(argv) == 2

    assert message in capsys.readouterr().err


def test_evaluate_refuses_events_without_a_feature(
    setup: _Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = tmp_path / "partial.parquet"
    frame: Any = pd.read_parquet(setup.events).drop(columns=["TX_AMOUNT"])
    frame.to_parquet(events)

    assert evaluate_main(setup.argv(events=events)) == 2

    assert "lacks feature columns ['TX_AMOUNT']" in capsys.readouterr().err


def test_evaluate_bad_arguments_exit_2(
    setup: _Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    both = setup.argv("--mapping", setup.mapping.id, "--scope", "global")

    assert evaluate_main(both) == 2
    assert evaluate_main(["--registry", "x"]) == 2
    assert "required" in capsys.readouterr().err
