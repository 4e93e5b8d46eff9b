"""Predictor DAGs: declaration, validation, evaluation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from muse._errors import BadRequest, NotFound, PredictorSpecError
from muse._predictor import Predictor, mapping_for, parse_spec, split_ref, validate


@dataclasses.dataclass(frozen=True)
class ColumnModel:
    """A real, tiny model: its score is its first feature times ``scale``.

    Scores are known exactly, so DAG arithmetic can be checked to the bit.
    """

    feature_names: tuple[str, ...]
    beta: float = 1.0
    scale: float = 1.0
    digest: str = "column-model"

    def predict_margin(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, dtype=np.float64)[:, 0] * self.scale

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.predict_margin(X)


@dataclasses.dataclass(frozen=True)
class ShiftMapping:
    """A stand-in quantile mapping adding a constant (the real one is fitted)."""

    id: str
    shift: float = 10.0

    def apply(self, scores: np.ndarray) -> np.ndarray:
        return scores + self.shift


MODELS: dict[str, ColumnModel] = {
    "a@1": ColumnModel(("f1", "f2"), beta=0.1),
    "b@2": ColumnModel(("f3", "f1"), beta=0.5, scale=0.5),
    "c@1": ColumnModel(("f2",), beta=0.2),
}


def spec(*nodes: dict[str, Any], output: Any, **extra: Any) -> dict[str, Any]:
    return {"name": "card-fraud", "nodes": list(nodes), "output": output, **extra}


def model(node_id: str, ref: str) -> dict[str, Any]:
    return {"id": node_id, "kind": "model", "model": ref}


ENSEMBLE = spec(
    model("a", "a@1"),
    model("b", "b@2"),
    {"id": "avg", "kind": "weighted_mean", "inputs": ["a", "b"], "weights": [1, 3]},
    {"id": "qm", "kind": "quantile_map", "input": "avg"},
    output="qm",
)

ENSEMBLE_TOML = """
name = "card-fraud"
output = "qm"

[[nodes]]
id = "a"
kind = "model"
model = "a@1"

[[nodes]]
id = "b"
kind = "model"
model = "b@2"

[[nodes]]
id = "avg"
kind = "weighted_mean"
inputs = ["a", "b"]
weights = [1, 3]

[[nodes]]
id = "qm"
kind = "quantile_map"
input = "avg"
"""


def build(declaration: Any, version: int = 0) -> Predictor:
    return Predictor.from_spec(declaration, MODELS, version=version)


# -- declaration ------------------------------------------------------------


def test_parse_spec_reads_dict_toml_json_and_files(tmp_path: Path) -> None:
    toml_file = tmp_path / "p.toml"
    toml_file.write_text(ENSEMBLE_TOML)
    json_file = tmp_path / "p.json"
    json_file.write_text(json.dumps(ENSEMBLE))

    sources = [ENSEMBLE, ENSEMBLE_TOML, json.dumps(ENSEMBLE), toml_file, json_file]

    digests = {build(source).digest for source in sources}
    assert digests == {build(ENSEMBLE).digest}
    assert parse_spec(ENSEMBLE) == ENSEMBLE
    assert parse_spec(ENSEMBLE) is not ENSEMBLE


def test_parse_spec_names_the_bad_syntax() -> None:
    with pytest.raises(PredictorSpecError, match="not valid TOML"):
        parse_spec("name = ")
    with pytest.raises(PredictorSpecError, match="not valid JSON"):
        parse_spec('{"name": ')


def test_predictor_attributes() -> None:
    predictor = build(ENSEMBLE, version=3)

    assert predictor.ref == "card-fraud@3"
    assert predictor.model_refs == ("a@1", "b@2")
    assert predictor.feature_names == ("f1", "f2", "f3")
    assert predictor.has_quantile_map
    assert predictor.fixed_mapping is None
    assert predictor.spec == ENSEMBLE


def test_predictor_is_immutable() -> None:
    predictor = build(ENSEMBLE)

    predictor.spec["nodes"].clear()

    assert predictor.spec == ENSEMBLE
    with pytest.raises(dataclasses.FrozenInstanceError):
        predictor.version = 2  # type: ignore[misc]


def test_declared_features_set_order_and_may_extend() -> None:
    declared = ["f3", "extra", "f2", "f1"]

    predictor = build({**ENSEMBLE, "features": declared})

    assert predictor.feature_names == tuple(declared)


def test_split_ref() -> None:
    assert split_ref("fraud-xgb@12") == ("fraud-xgb", 12)
    for bad in ("fraud", "fraud@0", "fraud@01", "@1", "a/b@1"):
        with pytest.raises(BadRequest, match="name@version|positive"):
            split_ref(bad)


# -- validation ---------------------------------------------------------------

PC_OVER_AVG = {"id": "pc", "kind": "posterior_correction", "input": "avg"}
AVG = {"id": "avg", "kind": "mean", "inputs": ["a", "b"]}
INVALID = {
    "unknown kind": (
        spec(
            model("a", "a@1"), {"id": "x", "kind": "median", "input": "a"}, output="x"
        ),
        "node 'x': unknown kind 'median'",
    ),
    "kind not a string": (
        spec(model("a", "a@1"), {"id": "x", "kind": ["mean"], "input": "a"}, output="x"),
        r"node 'x': unknown kind \['mean'\]",
    ),
    "duplicate id": (
        spec(model("a", "a@1"), model("a", "b@2"), output="a"),
        "node 'a': duplicate node id",
    ),
    "cycle": (
        spec(
            model("a", "a@1"),
            {"id": "m1", "kind": "mean", "inputs": ["a", "m2"]},
            {"id": "m2", "kind": "mean", "inputs": ["m1"]},
            output="m2",
        ),
        r"node 'm\d': is part of a cycle: (m1 -> m2 -> m1|m2 -> m1 -> m2)",
    ),
    "dangling input": (
        spec(
            model("a", "a@1"),
            {"id": "m", "kind": "mean", "inputs": ["a", "zz"]},
            output="m",
        ),
        "node 'm': input 'zz' is not a node",
    ),
    "unknown output": (
        spec(model("a", "a@1"), output="zz"),
        "node 'zz': is named as the output",
    ),
    "two outputs": (
        spec(model("a", "a@1"), model("b", "b@2"), output=["a", "b"]),
        "exactly one node id",
    ),
    "unreferenced node": (
        spec(model("a", "a@1"), model("b", "b@2"), output="a"),
        "node 'b': is not used by the output 'a'",
    ),
    "unregistered model": (
        spec(model("a", "zz@9"), output="a"),
        "node 'a': model zz@9 is not registered",
    ),
    "malformed model ref": (
        spec(model("a", "a-1"), output="a"),
        "node 'a': 'model'.*name@version",
    ),
    "missing feature": (
        spec(
            model("a", "a@1"),
            model("b", "b@2"),
            AVG,
            output="avg",
            features=["f1", "f2"],
        ),
        r"node 'b': model b@2 needs features \['f3'\]",
    ),
    "declared feature twice": (
        spec(model("a", "a@1"), output="a", features=["f1", "f2", "f1"]),
        "'features' is incompatible",
    ),
    "weights not positive": (
        spec(
            model("a", "a@1"),
            model("b", "b@2"),
            {
                "id": "w",
                "kind": "weighted_mean",
                "inputs": ["a", "b"],
                "weights": [1, 0],
            },
            output="w",
        ),
        "node 'w': weights must be positive",
    ),
    "weights wrong length": (
        spec(
            model("a", "a@1"),
            model("b", "b@2"),
            {"id": "w", "kind": "weighted_mean", "inputs": ["a", "b"], "weights": [1]},
            output="w",
        ),
        "node 'w': 'weights' must be 2 numbers, one per input",
    ),
    "two quantile maps": (
        spec(
            model("a", "a@1"),
            {"id": "q1", "kind": "quantile_map", "input": "a"},
            {"id": "q2", "kind": "quantile_map", "input": "q1"},
            output="q2",
        ),
        "node 'q2': more than one quantile_map",
    ),
    "quantile map not output": (
        spec(
            model("a", "a@1"),
            {"id": "q", "kind": "quantile_map", "input": "a"},
            {"id": "pc", "kind": "posterior_correction", "input": "q"},
            output="pc",
        ),
        "node 'q': a quantile_map must be the output",
    ),
    "default beta over two models": (
        spec(model("a", "a@1"), model("b", "b@2"), AVG, PC_OVER_AVG, output="pc"),
        r"node 'pc': input combines models \['a@1', 'b@2'\]; give 'beta'",
    ),
    "beta out of range": (
        spec(
            model("a", "a@1"), {**PC_OVER_AVG, "input": "a", "beta": 1.5}, output="pc"
        ),
        r"node 'pc': 'beta' must be a number in \(0, 1\]",
    ),
    "misspelt field": (
        spec(
            model("a", "a@1"), {"id": "m", "kind": "mean", "input": ["a"]}, output="m"
        ),
        r"node 'm': missing fields \['inputs'\], unknown fields \['input'\]",
    ),
    "misspelt top-level field": (
        {"name": "p", "nodes": [model("a", "a@1")], "ouput": "a"},
        r"predictor spec: missing fields \['output'\], unknown fields \['ouput'\]",
    ),
}


@pytest.mark.parametrize("declaration, message", INVALID.values(), ids=INVALID.keys())
def test_validate_rejects_and_names_the_node(
    declaration: dict[str, Any], message: str
) -> None:
    with pytest.raises(PredictorSpecError, match=message):
        validate(declaration, MODELS)


def test_model_listing_a_feature_twice_is_incompatible() -> None:
    models = {"d@1": ColumnModel(("f1", "f1"))}

    with pytest.raises(
        PredictorSpecError, match="node 'a': model d@1 has an incompatible"
    ):
        validate(spec(model("a", "d@1"), output="a"), models)


# -- evaluation -----------------------------------------------------------------

X = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])  # columns f1, f2, f3


def test_nodes_are_in_topological_order() -> None:
    predictor = build(ENSEMBLE)

    seen: set[str] = set()
    for node in predictor.nodes:
        assert set(node.inputs) <= seen, node.id
        seen.add(node.id)
    assert predictor.nodes[-1].id == "qm"


def test_weighted_mean_values_and_pass_through_without_mapping() -> None:
    predictor = build(ENSEMBLE)

    scores = predictor.score(X, MODELS)

    a, b = X[:, 0], 0.5 * X[:, 2]  # model a reads f1; b reads f3 (scaled)
    np.testing.assert_allclose(scores, 0.25 * a + 0.75 * b, rtol=1e-15)
    assert scores.dtype == np.float64
    assert predictor.mapping_id_used(None) is None


def test_quantile_map_applies_the_given_mapping() -> None:
    predictor = build(ENSEMBLE)
    mapping = ShiftMapping("m-1")

    scores = predictor.score(X, MODELS, mapping)

    np.testing.assert_allclose(scores, predictor.score(X, MODELS) + 10.0)
    assert predictor.mapping_id_used(mapping) == "m-1"


def test_weights_near_the_float_maximum_are_normalised_without_overflow() -> None:
    declaration = spec(
        model("a", "a@1"),
        model("b", "b@2"),
        {"id": "w", "kind": "weighted_mean", "inputs": ["a", "b"],
         "weights": [1e308, 1e308]},
        output="w",
    )  # fmt: skip

    scores = build(declaration).score(X, MODELS)

    np.testing.assert_allclose(scores, 0.5 * X[:, 0] + 0.25 * X[:, 2], rtol=1e-15)


def test_mean_of_three_models() -> None:
    declaration = spec(
        model("a", "a@1"),
        model("b", "b@2"),
        model("c", "c@1"),
        {"id": "m", "kind": "mean", "inputs": ["a", "b", "c"]},
        output="m",
    )

    scores = build(declaration).score(X, MODELS)

    np.testing.assert_allclose(scores, (X[:, 0] + 0.5 * X[:, 2] + X[:, 1]) / 3)


def test_posterior_correction_of_a_weighted_mean_closed_form() -> None:
    pytest.importorskip("muse._transform", reason="muse._transform not built yet")
    declaration = spec(
        model("a", "a@1"),
        model("b", "b@2"),
        {"id": "avg", "kind": "weighted_mean", "inputs": ["a", "b"], "weights": [1, 3]},
        {"id": "pc", "kind": "posterior_correction", "input": "avg", "beta": 0.2},
        output="pc",
    )

    scores = build(declaration).score(X, MODELS)

    p = 0.25 * X[:, 0] + 0.75 * 0.5 * X[:, 2]
    np.testing.assert_allclose(scores, 0.2 * p / (0.2 * p - p + 1), rtol=1e-12)


def test_posterior_correction_defaults_to_the_models_beta() -> None:
    pytest.importorskip("muse._transform", reason="muse._transform not built yet")
    declaration = spec(
        model("a", "a@1"),
        {"id": "pc", "kind": "posterior_correction", "input": "a"},
        output="pc",
    )

    predictor = build(declaration)
    scores = predictor.score(X[:, :2], MODELS)  # features f1, f2

    assert predictor.nodes[-1].beta == 0.1
    p = X[:, 0]
    np.testing.assert_allclose(scores, 0.1 * p / (0.1 * p - p + 1), rtol=1e-12)


def test_score_equals_combine_of_per_model_predictions() -> None:
    predictor = build({**ENSEMBLE, "features": ["f3", "f2", "f1"]})
    rng = np.random.default_rng(7)
    batch = rng.random((50, 3))
    mapping = ShiftMapping("m-2", shift=0.5)

    outputs = {
        ref: MODELS[ref].predict(predictor.columns_for(ref, batch))
        for ref in predictor.model_refs
    }

    np.testing.assert_array_equal(
        predictor.score(batch, MODELS, mapping), predictor.combine(outputs, mapping)
    )
    # Model b reads (f3, f1); with features (f3, f2, f1) those are columns 0, 2.
    np.testing.assert_array_equal(predictor.columns_for("b@2", batch), batch[:, [0, 2]])


def test_model_reading_every_column_in_order_gets_x_itself() -> None:
    predictor = build(spec(model("a", "a@1"), output="a"))

    batch = np.ascontiguousarray(X[:, :2])
    assert predictor.columns_for("a@1", batch) is batch


def test_score_rejects_wrong_width() -> None:
    with pytest.raises(BadRequest, match="expects 3 feature columns"):
        build(ENSEMBLE).score(X[:, :2], MODELS)


def test_score_needs_every_model() -> None:
    with pytest.raises(NotFound, match="model b@2 needed by predictor card-fraud@0"):
        build(ENSEMBLE).score(X, {"a@1": MODELS["a@1"]})


def test_score_rejects_a_model_with_other_features() -> None:
    models = {**MODELS, "b@2": ColumnModel(("f1", "f3"))}

    with pytest.raises(BadRequest, match="model b@2 has features"):
        build(ENSEMBLE).score(X, models)


def test_combine_needs_every_output_of_one_length() -> None:
    predictor = build(ENSEMBLE)

    with pytest.raises(NotFound, match="no output for model b@2"):
        predictor.combine({"a@1": np.zeros(2)})
    with pytest.raises(BadRequest, match="output of model b@2 has shape"):
        predictor.combine({"a@1": np.zeros(2), "b@2": np.zeros(3)})


# -- mappings -----------------------------------------------------------------


def test_mapping_for_prefers_tenant_then_global() -> None:
    predictor = build(ENSEMBLE, version=1)
    tenant_map, global_map = ShiftMapping("t"), ShiftMapping("g")
    mappings = {
        ("card-fraud@1", "bank-01"): tenant_map,
        ("card-fraud@1", None): global_map,
    }

    assert mapping_for(predictor, "bank-01", mappings) is tenant_map
    assert mapping_for(predictor, "bank-02", mappings) is global_map
    assert mapping_for(predictor, None, mappings) is global_map
    assert mapping_for(predictor, "bank-01", {}) is None


def test_mapping_for_is_none_without_a_quantile_map() -> None:
    predictor = build(spec(model("a", "a@1"), output="a"), version=1)

    assert (
        mapping_for(predictor, None, {("card-fraud@1", None): ShiftMapping("g")})
        is None
    )


def test_pinned_mapping() -> None:
    pinned = {
        **ENSEMBLE,
        "nodes": [*ENSEMBLE["nodes"][:3], {**ENSEMBLE["nodes"][3], "mapping": "fixed"}],
    }
    predictor = build(pinned, version=1)
    fixed = ShiftMapping("fixed")

    assert predictor.fixed_mapping == "fixed"
    assert mapping_for(predictor, "bank-01", {"fixed": fixed}) is fixed
    with pytest.raises(
        NotFound, match="mapping fixed pinned by predictor card-fraud@1"
    ):
        mapping_for(predictor, "bank-01", {("card-fraud@1", None): fixed})
    with pytest.raises(BadRequest, match="pins mapping fixed, was given other"):
        predictor.score(X, MODELS, ShiftMapping("other"))


# -- with real tree models ------------------------------------------------------


@pytest.mark.slow
def test_real_tree_models_score_equals_combine(tmp_path: Path) -> None:
    models_module = pytest.importorskip("muse._models", reason="muse._models not built")
    xgboost = pytest.importorskip("xgboost")
    from muse._synthetic import FEATURES, generate_transactions

    data = generate_transactions(5_000, seed=2)
    subset = [FEATURES[12], FEATURES[0], FEATURES[7]]
    loaded = {}
    for ref, names in (("all@1", list(FEATURES)), ("some@1", subset)):
        X = np.column_stack([data[n] for n in names])
        booster = xgboost.train(
            {"objective": "binary:logistic", "max_depth": 3},
            xgboost.DMatrix(X, label=data["TX_FRAUD"], feature_names=names),
            num_boost_round=5,
        )
        raw = bytes(booster.save_raw("json"))
        loaded[ref] = models_module.load_model(
            raw, "xgboost_json", names, 0.5, cache_dir=tmp_path, name=ref
        )
    declaration = spec(
        model("x", "all@1"),
        model("y", "some@1"),
        {"id": "avg", "kind": "mean", "inputs": ["x", "y"]},
        output="avg",
    )
    predictor = Predictor.from_spec(declaration, loaded)
    batch = np.column_stack([data[n] for n in predictor.feature_names])[:500]

    outputs = {
        ref: loaded[ref].predict(predictor.columns_for(ref, batch)) for ref in loaded
    }

    np.testing.assert_array_equal(
        predictor.score(batch, loaded), predictor.combine(outputs)
    )
    assert predictor.feature_names == FEATURES


def test_predictor_with_too_many_nodes_is_refused() -> None:
    from muse._errors import PredictorSpecError
    from muse._predictor import MAX_NODES, Predictor

    nodes = [{"id": "m", "kind": "model", "model": "m@1"}] + [
        {"id": f"pc{i}", "kind": "posterior_correction", "input": "m" if i == 0 else f"pc{i - 1}", "beta": 0.5}
        for i in range(MAX_NODES)
    ]
    spec = {"name": "chain", "nodes": nodes, "output": f"pc{MAX_NODES - 1}"}
    with pytest.raises(PredictorSpecError, match=f"at most {MAX_NODES}"):
        Predictor.from_spec(spec, {})
