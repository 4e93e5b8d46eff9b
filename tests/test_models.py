"""Tests for muse/_models.py and muse/_golden.py: import, fidelity traps,
golden rows, parity.

Every expected value comes from the native library (xgboost, lightgbm,
scikit-learn) on the same rows; nothing is mocked.
"""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import treelite

from muse._errors import BadRequest, ModelImportError, ParityError
from muse._models import PARITY_TOLERANCE, _float32_thresholds, load_model

xgb = pytest.importorskip("xgboost")
lgb = pytest.importorskip("lightgbm")
ensemble = pytest.importorskip("sklearn.ensemble")

#: A double whose low 32 bits are all ones: tl2cgen's "missing" sentinel.
LOW_WORD_VALUE = 35.87499999999999
LOW_WORD = np.uint64(0xFFFFFFFF)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("compiled")


def _data(
    n: int = 4000, seed: int = 0, nan: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    y = (X[:, 0] + X[:, 1] * X[:, 2] + rng.normal(size=n) > 0).astype(int)
    holes = rng.random(n) < nan
    X[holes, 3] = np.nan
    y[holes] = 1  # missingness is informative: the default branch matters
    return X, y


def _xgboost(X: np.ndarray, y: np.ndarray, rounds: int = 20, **params: Any) -> Any:
    options = {"objective": "binary:logistic", "max_depth": 3, "nthread": 1, **params}
    return xgb.train(options, xgb.DMatrix(X, y), num_boost_round=rounds)


def _lightgbm(X: np.ndarray, y: np.ndarray, rounds: int = 20, **params: Any) -> Any:
    options = {"objective": "binary", "num_leaves": 8, "verbose": -1, "num_threads": 1}
    return lgb.train({**options, **params}, lgb.Dataset(X, y), num_boost_round=rounds)


def _assert_margins(model: Any, native_margin: np.ndarray, X: np.ndarray) -> None:
    np.testing.assert_allclose(
        model.predict_margin(X), native_margin, rtol=0, atol=PARITY_TOLERANCE
    )


@pytest.fixture(scope="module")
def xgb_booster() -> Any:
    return _xgboost(*_data())


@pytest.fixture(scope="module")
def xgb_model(xgb_booster: Any, cache: Path) -> Any:
    return load_model(xgb_booster, "xgboost", cache_dir=cache)


# --- real data ---------------------------------------------------------------

FEATURES = [
    "TX_AMOUNT",
    "TX_DURING_WEEKEND",
    "TX_DURING_NIGHT",
    *(f"CUSTOMER_ID_NB_TX_{d}DAY_WINDOW" for d in (1, 7, 30)),
    *(f"CUSTOMER_ID_AVG_AMOUNT_{d}DAY_WINDOW" for d in (1, 7, 30)),
    *(f"TERMINAL_ID_NB_TX_{d}DAY_WINDOW" for d in (1, 7, 30)),
    *(f"TERMINAL_ID_RISK_{d}DAY_WINDOW" for d in (1, 7, 30)),
]


@pytest.fixture(scope="session")
def real(data_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """April-trained XGBoost and LightGBM models, May rows, low-word rows."""
    pd = pytest.importorskip("pandas")
    frame = pd.read_parquet(
        data_path, columns=[*FEATURES, "TX_DATETIME", "TX_FRAUD", "TRANSACTION_ID"]
    )
    month = frame["TX_DATETIME"].dt.month.to_numpy()
    X = np.ascontiguousarray(frame[FEATURES].to_numpy(np.float64))
    y = frame["TX_FRAUD"].to_numpy()
    rng = np.random.default_rng(4)
    april = rng.choice(np.flatnonzero(month == 4), 40_000, replace=False)
    small = april[:20_000]  # XGBoost trains slower; half the rows will do
    boosters = {
        "xgboost": _xgboost(
            X[small],
            y[small],
            rounds=200,
            max_depth=5,
            nthread=2,
            max_bin=64,
        ),
        "lightgbm": _lightgbm(
            X[april],
            y[april],
            rounds=200,
            num_leaves=63,
            num_threads=2,
            deterministic=True,
            seed=4,
        ),
    }
    cache = tmp_path_factory.mktemp("real-compiled")
    models = {
        kind: load_model(booster, kind, FEATURES, cache_dir=cache, name=f"real-{kind}")
        for kind, booster in boosters.items()
    }
    low = ((X.view(np.uint64) & LOW_WORD) == LOW_WORD).any(axis=1)
    may = X[month == 5]
    holed = may[rng.choice(len(may), 50_000, replace=False)]
    holed[rng.random(holed.shape) < 0.1] = np.nan
    ids = frame["TRANSACTION_ID"].to_numpy()
    return {
        "boosters": boosters,
        "models": models,
        "may": may,
        "holed": holed,
        "low": X[low],
        "row_324717": X[ids == 324717],
    }


def _native(kind: str, booster: Any, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if kind == "xgboost":
        return (
            booster.inplace_predict(X, predict_type="margin"),
            booster.inplace_predict(X, predict_type="value"),
        )
    return booster.predict(X, raw_score=True), booster.predict(X)


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["xgboost", "lightgbm"])
@pytest.mark.parametrize("rows", ["may", "holed", "low", "row_324717"])
def test_real_data_parity_with_native(
    kind: str, rows: str, real: dict[str, Any]
) -> None:
    X = real[rows]
    model, booster = real["models"][kind], real["boosters"][kind]

    margin, proba = _native(kind, booster, X)

    assert len(X) > 0 and model.backend == "compiled"
    np.testing.assert_allclose(
        model.predict_margin(X), margin, rtol=0, atol=PARITY_TOLERANCE
    )
    np.testing.assert_allclose(model.predict(X), proba, rtol=0, atol=PARITY_TOLERANCE)


@pytest.mark.realdata
@pytest.mark.slow
def test_real_data_has_the_low_word_rows(real: dict[str, Any]) -> None:
    assert len(real["low"]) == 3418
    assert real["models"]["lightgbm"].num_trees == 200
    assert real["models"]["xgboost"].num_trees >= 200


# --- the tl2cgen sentinel ----------------------------------------------------


def test_low_word_value_is_not_missing(cache: Path, tmp_path: Path) -> None:
    assert np.array(LOW_WORD_VALUE).view(np.uint64) & LOW_WORD == LOW_WORD
    rng = np.random.default_rng(3)
    X = rng.uniform(0, 60, size=(4000, 1))
    booster = _lightgbm(X, (X[:, 0] > 30).astype(int), rounds=5, num_leaves=2)
    model = load_model(booster, "lightgbm", cache_dir=cache)
    row = np.array([[LOW_WORD_VALUE]])

    ours, native = model.predict(row), booster.predict(row)

    np.testing.assert_allclose(ours, native, rtol=0, atol=PARITY_TOLERANCE)
    assert ours[0] > 0.5  # 35.87 > 30: the positive side, not the default one
    # tl2cgen unpatched reads the same value as missing (0 here, so negative).
    tl2cgen = pytest.importorskip("tl2cgen")
    if shutil.which("gcc") is None:
        pytest.skip("no gcc to build tl2cgen's unpatched library")
    (tmp_path / "m.txt").write_text(booster.model_to_string())
    tl_model = treelite.frontend.load_lightgbm_model(tmp_path / "m.txt")
    tl2cgen.export_lib(tl_model, toolchain="gcc", libpath=str(tmp_path / "raw.so"))
    raw = tl2cgen.Predictor(str(tmp_path / "raw.so"), nthread=1)
    assert raw.predict(tl2cgen.DMatrix(row)).ravel()[0] < 0.5


# --- fidelity traps ----------------------------------------------------------


@pytest.mark.parametrize(
    "estimator",
    [
        "RandomForestClassifier",
        "ExtraTreesClassifier",
        "HistGradientBoostingClassifier",
    ],
)
def test_sklearn_trained_with_nans_keeps_missing_direction(
    estimator: str, cache: Path
) -> None:
    X, y = _data(seed=5, nan=0.2)
    options = (
        {"max_iter": 15}
        if estimator.startswith("Hist")
        else {"n_estimators": 15, "max_depth": 6}
    )
    fitted = getattr(ensemble, estimator)(random_state=0, **options).fit(X, y)
    model = load_model(fitted, "sklearn", cache_dir=cache)
    test, _ = _data(n=2000, seed=6, nan=0.5)

    ours = model.predict(test)

    np.testing.assert_allclose(
        ours, fitted.predict_proba(test)[:, 1], rtol=0, atol=1e-9
    )
    holes = np.isnan(test[:, 3])
    assert ours[holes].mean() > ours[~holes].mean()  # learned: NaN means fraud
    assert model.format == "treelite"


def test_sklearn_float32_thresholds_match_sklearn(cache: Path) -> None:
    X, y = _data(seed=7, nan=0.0)
    fitted = ensemble.GradientBoostingClassifier(n_estimators=25, random_state=0).fit(
        X, y
    )
    model = load_model(fitted, "sklearn", cache_dir=cache)
    thresholds = np.concatenate(
        [
            tree.tree_.threshold[tree.tree_.feature >= 0]
            for tree in fitted.estimators_[:, 0]
        ]
    )
    features = np.concatenate(
        [
            tree.tree_.feature[tree.tree_.feature >= 0]
            for tree in fitted.estimators_[:, 0]
        ]
    )
    probes: list[np.ndarray] = []
    for j, t in zip(features, thresholds, strict=True):
        for value in _neighbours(float(t)):
            row = X[len(probes) % len(X)].copy()
            row[j] = value
            probes.append(row)
    rows = np.array(probes)

    np.testing.assert_allclose(
        model.predict_margin(rows), fitted.decision_function(rows), rtol=0, atol=1e-12
    )


def _neighbours(t: float) -> list[float]:
    t32 = np.float32(t)
    return [
        t,
        float(np.nextafter(t, np.inf)),
        float(np.nextafter(t, -np.inf)),
        float(t32),
        float(np.nextafter(t32, np.float32(np.inf))),
        float(np.nextafter(t32, np.float32(-np.inf))),
    ]


def test_float32_thresholds_send_every_double_the_float32_way() -> None:
    rng = np.random.default_rng(8)
    t = np.concatenate(
        [rng.normal(size=500) * 10.0 ** rng.integers(-5, 5, 500), [0.0, -0.0]]
    )
    t32 = t.astype(np.float32)
    probes = [t, np.nextafter(t, np.inf), np.nextafter(t, -np.inf)]
    for side in (np.inf, -np.inf):
        step = np.nextafter(t32, np.float32(side)).astype(np.float64)
        mid = (t32.astype(np.float64) + step) / 2
        probes += [step, mid, np.nextafter(mid, np.inf), np.nextafter(mid, -np.inf)]

    moved = _float32_thresholds(t)

    for x in probes:
        np.testing.assert_array_equal(x <= moved, x.astype(np.float32) <= t)


def test_xgboost_base_score_survives_in_margins(cache: Path) -> None:
    X, y = _data(seed=9)
    booster = _xgboost(X, y, base_score=0.3)
    model = load_model(booster, "xgboost", cache_dir=cache)

    margin = booster.inplace_predict(X, predict_type="margin")

    np.testing.assert_array_equal(model.predict_margin(X), margin.astype(np.float64))
    assert abs(float(np.median(margin)) - math.log(0.3 / 0.7)) < 3.0


def test_lightgbm_initial_score_survives_in_margins(cache: Path) -> None:
    X, y = _data(seed=10)
    y[np.random.default_rng(0).random(len(y)) < 0.7] = 0  # imbalanced: init far from 0
    booster = _lightgbm(X, y, boost_from_average=True)
    model = load_model(booster, "lightgbm", cache_dir=cache)

    _assert_margins(model, booster.predict(X, raw_score=True), X)
    assert booster.predict(X[:1], raw_score=True, num_iteration=1)[0] < -0.3


def _stump_rows(t: float) -> np.ndarray:
    return np.array(_neighbours(t))[:, None]


def test_xgboost_split_threshold_edges_follow_float32(cache: Path) -> None:
    X = np.random.default_rng(11).normal(size=(3000, 1))
    booster = _xgboost(X, (X[:, 0] > 0.3).astype(int), rounds=1, max_depth=1)
    model = load_model(booster, "xgboost", cache_dir=cache)
    tree = json.loads(booster.save_raw("json"))["learner"]["gradient_booster"]["model"]
    t = float(tree["trees"][0]["split_conditions"][0])
    rows = _stump_rows(t)

    ours = model.predict_margin(rows)

    np.testing.assert_array_equal(
        ours, booster.inplace_predict(rows, predict_type="margin")
    )
    below = float(np.nextafter(np.float32(t), np.float32(-np.inf)))
    assert ours[rows[:, 0] == t][0] != ours[rows[:, 0] == below][0]


def test_lightgbm_split_threshold_edges_follow_float64(cache: Path) -> None:
    X = np.random.default_rng(12).normal(size=(3000, 1))
    booster = _lightgbm(X, (X[:, 0] > 0.3).astype(int), rounds=1, num_leaves=2)
    model = load_model(booster, "lightgbm", cache_dir=cache)
    t = float(booster.dump_model()["tree_info"][0]["tree_structure"]["threshold"])
    rows = _stump_rows(t)

    ours = model.predict_margin(rows)

    np.testing.assert_array_equal(ours, booster.predict(rows, raw_score=True))
    assert ours[0] != ours[1]  # t goes left, the next double right


@pytest.mark.parametrize("kind", ["xgboost", "lightgbm"])
def test_absent_none_nan_are_missing_and_zero_is_a_number(
    kind: str, cache: Path
) -> None:
    X, y = _data(seed=13, nan=0.3)
    booster = _xgboost(X, y) if kind == "xgboost" else _lightgbm(X, y)
    model = load_model(booster, kind, cache_dir=cache)
    base = [0.4, -0.2, 1.1]

    nan, none, zero = (model.predict([[*base, v]])[0] for v in (np.nan, None, 0.0))

    assert nan == none and zero != nan
    expected = _native(kind, booster, np.array([[*base, np.nan], [*base, 0.0]]))[1]
    np.testing.assert_allclose([nan, zero], expected, rtol=0, atol=PARITY_TOLERANCE)
    assert not model.zero_as_missing


def _zero_missing_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(14)
    X = rng.normal(size=(6000, 3))
    zeros = rng.random(len(X)) < 0.3
    X[zeros, 0] = 0.0
    # Zeros are fraud, so the best default branch is the high side of splits
    # whose threshold is above 0: there LightGBM and treelite disagree.
    y = ((X[:, 0] > 0.5) | zeros).astype(int)
    return X, y


def test_lightgbm_zero_as_missing_matches_lightgbm(cache: Path, tmp_path: Path) -> None:
    X, y = _zero_missing_data()
    booster = _lightgbm(X, y, zero_as_missing=True)
    model = load_model(booster, "lightgbm", cache_dir=cache)
    rows = np.repeat(X[:200], 5, axis=0)
    rows[0::5, 0], rows[1::5, 0], rows[2::5, 0] = 0.0, -0.0, 1e-36
    rows[3::5, 0] = np.nan

    ours = model.predict_margin(rows)

    assert model.zero_as_missing
    np.testing.assert_allclose(
        ours, booster.predict(rows, raw_score=True), rtol=0, atol=1e-12
    )
    np.testing.assert_array_equal(ours[0::5], ours[3::5])  # 0 is missing like NaN
    # Without MUSE's rewrite, treelite sends those zeros the other way.
    (tmp_path / "m.txt").write_text(booster.model_to_string())
    plain = treelite.frontend.load_lightgbm_model(tmp_path / "m.txt")
    gtil = treelite.gtil.predict(plain, rows[0::5], pred_margin=True).ravel()
    assert np.abs(gtil - booster.predict(rows[0::5], raw_score=True)).max() > 0.1


@pytest.mark.parametrize("kind", ["xgboost", "lightgbm"])
def test_infinity_follows_the_native_library(kind: str, cache: Path) -> None:
    X, y = _data(seed=15)
    booster = _xgboost(X, y) if kind == "xgboost" else _lightgbm(X, y)
    model = load_model(booster, kind, cache_dir=cache)
    rows = np.repeat(X[:20], 3, axis=0)
    rows[0::3, 0], rows[1::3, 1], rows[2::3, 2] = np.inf, -np.inf, 1e300

    _assert_margins(model, _native(kind, booster, rows)[0], rows)


# --- golden rows and parity --------------------------------------------------


def test_derived_golden_rows_cover_the_edges(xgb_model: Any) -> None:
    X, margin = xgb_model.golden

    assert xgb_model.golden_source == "xgboost" and len(X) == len(margin) > 500
    assert np.isnan(X).any(axis=1).sum() >= 100
    assert np.isinf(X).any()
    finite = X[np.isfinite(X)]
    assert ((finite.view(np.uint64) & LOW_WORD) == LOW_WORD).sum() > 100
    tl_model = treelite.Model.deserialize_bytes(
        treelite.frontend.from_xgboost_ubjson(xgb_model.to_bytes()).serialize_bytes()
    )
    thresholds = tl_model.get_tree_accessor(0).get_field("threshold")[:1]
    assert np.isin(thresholds.astype(np.float64), X).all()


def test_golden_bytes_round_trip(xgb_model: Any, cache: Path) -> None:
    data = xgb_model.golden_bytes()

    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        assert set(arrays.files) == {"X", "margin", "proba", "source"}
    again = load_model(
        xgb_model.to_bytes(), xgb_model.format, golden=data, cache_dir=cache
    )

    assert again.digest == xgb_model.digest and again.golden_source == "xgboost"
    np.testing.assert_array_equal(again.golden[1], xgb_model.golden[1])


def test_altered_golden_values_refuse_the_model(xgb_model: Any, cache: Path) -> None:
    X, margin = xgb_model.golden
    altered = margin.copy()
    altered[7] += 1e-4

    with pytest.raises(
        ParityError, match=r"margin differs from caller on 1 of .* row 7"
    ):
        load_model(
            xgb_model.to_bytes(), "xgboost", golden=(X, altered), cache_dir=cache
        )


def test_altered_golden_bytes_refuse_the_model(xgb_model: Any, cache: Path) -> None:
    with np.load(io.BytesIO(xgb_model.golden_bytes()), allow_pickle=False) as arrays:
        stored = {name: arrays[name] for name in arrays.files}
    stored["proba"] = stored["proba"] * 0.99
    buffer = io.BytesIO()
    np.savez(buffer, **stored)

    with pytest.raises(ParityError, match="probability differs from xgboost"):
        load_model(
            xgb_model.to_bytes(), "xgboost", golden=buffer.getvalue(), cache_dir=cache
        )


def test_golden_of_the_wrong_width_is_refused(xgb_model: Any, cache: Path) -> None:
    with pytest.raises(ModelImportError, match="golden rows have shape"):
        load_model(
            xgb_model.to_bytes(),
            "xgboost",
            golden=(np.zeros((3, 2)), np.zeros(3)),
            cache_dir=cache,
        )


def test_sklearn_model_reloads_from_treelite_bytes(cache: Path) -> None:
    pd = pytest.importorskip("pandas")
    X, y = _data(seed=16)
    frame = pd.DataFrame(X, columns=["amount", "night", "count", "risk"])
    fitted = ensemble.RandomForestClassifier(
        n_estimators=10, max_depth=5, random_state=0
    )
    model = load_model(fitted.fit(frame, y), "sklearn", cache_dir=cache)

    again = load_model(
        model.to_bytes(), "treelite", golden=model.golden_bytes(), cache_dir=cache
    )
    plain = load_model(model.to_bytes(), "treelite", cache_dir=cache)

    assert (
        again.feature_names
        == model.feature_names
        == ("amount", "night", "count", "risk")
    )
    assert again.golden_source == "sklearn" and plain.golden_source == "gtil"
    np.testing.assert_array_equal(again.predict(X), model.predict(X))


# --- import and validation ---------------------------------------------------


@pytest.mark.parametrize("raw_format", ["json", "ubj"])
def test_xgboost_format_is_sniffed(
    raw_format: str, xgb_booster: Any, cache: Path
) -> None:
    data = bytes(xgb_booster.save_raw(raw_format=raw_format))

    model = load_model(data, "xgboost", cache_dir=cache)

    assert model.format == f"xgboost_{raw_format}"
    other = "xgboost_ubj" if raw_format == "json" else "xgboost_json"
    with pytest.raises(ModelImportError, match="but the bytes are"):
        load_model(data, other, cache_dir=cache)


def test_model_files_load_from_a_path(
    xgb_booster: Any, tmp_path: Path, cache: Path
) -> None:
    path = tmp_path / "model.json"
    xgb_booster.save_model(path)

    assert load_model(path, "xgboost_json", cache_dir=cache).num_trees == 20
    with pytest.raises(ModelImportError, match="cannot read"):
        load_model(tmp_path / "absent.json", "xgboost_json", cache_dir=cache)


@pytest.mark.parametrize(
    ("source", "format", "message"),
    [
        (b"{}", "parquet", "unknown model format"),
        (b"not json", "xgboost", "no leading"),
        (b"hello", "lightgbm", "not a LightGBM text model"),
        (b"\xff\xfe", "lightgbm", "not"),
        (b"garbage", "treelite", "not a treelite checkpoint"),
        (3.5, "lightgbm", "takes a path, bytes or a lightgbm.Booster"),
        ("xgb-model", "sklearn", "fitted RandomForest"),
    ],
)
def test_unreadable_sources_are_refused(
    source: Any, format: str, message: str, cache: Path
) -> None:
    with pytest.raises(ModelImportError, match=message):
        load_model(source, format, cache_dir=cache)


def test_multiclass_and_regression_are_refused(cache: Path) -> None:
    X, y = _data(seed=17)
    multi = xgb.train(
        {"objective": "multi:softprob", "num_class": 3, "nthread": 1},
        xgb.DMatrix(X, y + (X[:, 0] > 1)),
        num_boost_round=2,
    )
    regression = xgb.train(
        {"objective": "reg:squarederror", "nthread": 1}, xgb.DMatrix(X, y), 2
    )

    with pytest.raises(ModelImportError, match="binary classifiers only.*3 class"):
        load_model(multi, "xgboost", cache_dir=cache)
    with pytest.raises(ModelImportError, match="binary classifiers only.*'identity'"):
        load_model(regression, "xgboost", cache_dir=cache)


def test_lightgbm_linear_trees_are_refused(cache: Path) -> None:
    X, y = _data(seed=18, nan=0.0)
    booster = _lightgbm(X, y, rounds=2, linear_tree=True)

    with pytest.raises(ModelImportError, match="linear trees"):
        load_model(booster, "lightgbm", cache_dir=cache)


def test_feature_names_come_from_the_model_file(cache: Path) -> None:
    X, y = _data(seed=19)
    names = ["amount", "night", "count", "risk"]
    booster = xgb.train(
        {"objective": "binary:logistic", "nthread": 1},
        xgb.DMatrix(X, y, feature_names=names),
        num_boost_round=3,
    )

    assert load_model(booster, "xgboost", cache_dir=cache).feature_names == tuple(names)
    assert load_model(
        booster, "xgboost", names, cache_dir=cache
    ).feature_names == tuple(names)
    with pytest.raises(
        ModelImportError, match="has 3 names; the model reads 4 features"
    ):
        load_model(booster, "xgboost", names[:3], cache_dir=cache)
    with pytest.raises(ModelImportError, match=r"feature_names\[1\] is 'day'.*'night'"):
        load_model(
            booster, "xgboost", ["amount", "day", "count", "risk"], cache_dir=cache
        )


def test_feature_names_default_or_given(cache: Path) -> None:
    X, y = _data(seed=20)
    booster = _lightgbm(X, y, rounds=3)  # LightGBM names them Column_0...

    assert load_model(booster, "lightgbm", cache_dir=cache).feature_names == (
        "f0",
        "f1",
        "f2",
        "f3",
    )
    given = load_model(booster, "lightgbm", ["a", "b", "c", "d"], cache_dir=cache)
    assert given.feature_names == ("a", "b", "c", "d") and given.num_features == 4
    with pytest.raises(ModelImportError, match="has 5 names; the model reads 4"):
        load_model(booster, "lightgbm", list("abcde"), cache_dir=cache)


@pytest.mark.parametrize("beta", [0.0, -0.5, 1.5, math.nan, "half"])
def test_beta_outside_the_unit_interval_is_refused(
    beta: Any, xgb_booster: Any, cache: Path
) -> None:
    with pytest.raises(BadRequest, match=r"beta must be .*\(0, 1\]"):
        load_model(xgb_booster, "xgboost", beta=beta, cache_dir=cache)


def test_beta_belongs_to_the_model(xgb_booster: Any, cache: Path) -> None:
    assert load_model(xgb_booster, "xgboost", beta=0.05, cache_dir=cache).beta == 0.05


@pytest.mark.parametrize("rows", [np.zeros(4), np.zeros((2, 3)), [["a"] * 4]])
def test_predict_refuses_rows_of_the_wrong_shape(rows: Any, xgb_model: Any) -> None:
    with pytest.raises(BadRequest, match="expects a 2-D array of rows of 4 numbers"):
        xgb_model.predict(rows)


def test_predict_of_no_rows_is_empty(xgb_model: Any) -> None:
    assert xgb_model.predict(np.zeros((0, 4))).shape == (0,)


def test_load_logs_one_info_line(
    xgb_booster: Any, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="muse.models"):
        model = load_model(xgb_booster, "xgboost", cache_dir=cache, name="fraud-xgb")

    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1
    assert "fraud-xgb" in infos[0] and model.digest[:12] in infos[0]
    assert "20 trees" in infos[0] and "compile cache hit" in infos[0]


def test_data_frame_columns_are_read_by_name(xgb_bytes: bytes, synthetic: dict) -> None:
    import pandas as pd

    from muse import load_model
    from muse._errors import BadRequest
    from muse._synthetic import FEATURES

    model = load_model(xgb_bytes, "xgboost_json")
    frame = pd.DataFrame({f: synthetic[f][:50] for f in FEATURES})
    expected = model.predict(frame.to_numpy())
    shuffled = frame[list(reversed(FEATURES))]
    np.testing.assert_array_equal(model.predict(shuffled), expected)
    with pytest.raises(BadRequest, match="needs columns"):
        model.predict(frame.drop(columns=["TX_AMOUNT"]))
