"""The embedded engine: routing, batching, shadows, promotion, restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trio

from muse import open_engine
from muse._errors import (
    BadRequest,
    Conflict,
    InvalidEvent,
    MappingFitError,
    NotFound,
    Overloaded,
)
from muse._synthetic import FEATURES
from muse._transform import DEFAULT_CURVE
from muse._wire import build_matrix

INTENT = "card-fraud"


def _spec(model: str) -> dict:
    return {
        "nodes": [
            {"id": "m", "kind": "model", "model": model},
            {"id": "pc", "kind": "posterior_correction", "input": "m"},
            {"id": "qm", "kind": "quantile_map", "input": "pc"},
        ],
        "output": "qm",
    }


async def _setup(engine, xgb_bytes: bytes, lgb_bytes: bytes) -> tuple[str, str]:
    admin = engine.admin
    v1 = await admin.put_model("fraud-xgb", xgb_bytes, "xgboost_json", beta=0.05)
    v2 = await admin.put_model("fraud-lgb", lgb_bytes, "lightgbm", beta=0.5)
    p1 = (await admin.put_predictor("fraud", _spec(v1["ref"])))["ref"]
    p2 = (await admin.put_predictor("fraud", _spec(v2["ref"])))["ref"]
    await admin.set_route("*", INTENT, p1, (p2,))
    return p1, p2


def expected_premapped(engine, ref: str, events: list[dict]) -> np.ndarray:
    """Scores before any quantile mapping: what shadow samples hold."""
    loaded = engine.router.serving.predictors[ref]
    return loaded.score(build_matrix(events, loaded.feature_names), None)


def _offline(engine, ref: str, tenant: str, events: list[dict]) -> np.ndarray:
    serving = engine.router.serving
    loaded = serving.predictors[ref]
    matrix = build_matrix(events, loaded.feature_names)
    return loaded.score(matrix, serving.mapping_for(ref, tenant))


async def test_engine_scores_through_the_star_route(
    registry_path: Path, xgb_bytes: bytes, lgb_bytes: bytes, events: list[dict]
) -> None:
    async with open_engine(registry_path, deadline_ms=5000, seed=1) as engine:
        p1, _ = await _setup(engine, xgb_bytes, lgb_bytes)
        batch = events[:50]
        results = await engine.score("bank-03", INTENT, batch)

        assert [r["id"] for r in results] == [e["id"] for e in batch]
        assert {r["predictor"] for r in results} == {p1}
        assert {r["mapping"] for r in results} == {None}
        expected = _offline(engine, p1, "bank-03", batch)
        np.testing.assert_array_equal([r["score"] for r in results], expected)


async def test_engine_errors_name_the_problem(
    registry_path: Path, xgb_bytes: bytes, lgb_bytes: bytes, events: list[dict]
) -> None:
    async with open_engine(registry_path, deadline_ms=5000) as engine:
        p1, p2 = await _setup(engine, xgb_bytes, lgb_bytes)
        with pytest.raises(NotFound, match="no route for intent 'aml'"):
            await engine.score("bank-01", "aml", events[:1])
        bad = [{"id": "tx-1", "features": {**events[0]["features"], "TX_AMOUNT": "12"}}]
        with pytest.raises(InvalidEvent, match="tx-1.*TX_AMOUNT"):
            await engine.score("bank-01", INTENT, bad)
        # An embedding application names tenants and deadlines itself: the
        # ones HTTP could never pass are refused, and the engine serves on.
        for tenant in ("*", "", "bank 01/../x", "-x"):
            with pytest.raises(BadRequest, match="tenant name"):
                await engine.score(tenant, INTENT, events[:1])
        for deadline in (float("nan"), float("inf"), -5.0, 0, "10", True):
            with pytest.raises(BadRequest, match="deadline_ms"):
                await engine.score("bank-01", INTENT, events[:1], deadline_ms=deadline)
        results = await engine.score("bank-01", INTENT, events[:3], deadline_ms=500)
        assert [r["id"] for r in results] == [e["id"] for e in events[:3]]
        await engine.settle_shadows()
        assert engine.calibrator.statistics().samples == {
            f"{p1}/*/live": 3,
            f"{p1}/bank-01/live": 3,
            f"{p2}/*/shadow": 3,
            f"{p2}/bank-01/shadow": 3,
        }


async def test_shared_model_is_loaded_once(
    registry_path: Path, xgb_bytes: bytes, lgb_bytes: bytes
) -> None:
    async with open_engine(registry_path, deadline_ms=5000) as engine:
        ref = (await engine.admin.put_model("a", xgb_bytes, "xgboost_json"))["ref"]
        again = (await engine.admin.put_model("b", xgb_bytes, "xgboost_json"))["ref"]
        first = (await engine.admin.put_predictor("one", _spec(ref)))["ref"]
        second = (await engine.admin.put_predictor("two", _spec(again)))["ref"]
        await engine.admin.set_route("*", INTENT, first, (second,))
        predictors = engine.router.serving.predictors
        model_one = predictors[first].models[ref]
        model_two = predictors[second].models[again]
        assert model_one is model_two


async def test_shadow_fit_promote_and_rollback(
    registry_path: Path, xgb_bytes: bytes, lgb_bytes: bytes, events: list[dict]
) -> None:
    async with open_engine(registry_path, deadline_ms=5000, seed=3) as engine:
        p1, p2 = await _setup(engine, xgb_bytes, lgb_bytes)
        with pytest.raises(MappingFitError):
            await engine.admin.fit_mapping(p2, source="shadow", min_sample=1000)
        for start in range(0, 4000, 200):
            chunk = events[start : start + 200]
            await engine.score(chunk[0]["tenant"], INTENT, chunk)
        await engine.settle_shadows()
        assert len(engine.calibrator.sample(p2, "*", "shadow")) == 4000

        with pytest.raises(Exception, match="no fitted mapping"):
            await engine.admin.promote("*", INTENT, p2)
        # The live version is refused as not being a shadow, whatever its
        # mapping.
        with pytest.raises(Conflict, match=f"{p1} is not a shadow"):
            await engine.admin.promote("*", INTENT, p1)
        mapping = await engine.admin.fit_mapping(p2, source="shadow", min_sample=1000)
        await engine.admin.promote("*", INTENT, p2)

        results = await engine.score("bank-05", INTENT, events[4000:4100])
        assert {r["predictor"] for r in results} == {p2}
        assert {r["mapping"] for r in results} == {mapping["id"]}
        expected = _offline(engine, p2, "bank-05", events[4000:4100])
        np.testing.assert_array_equal([r["score"] for r in results], expected)

        await engine.admin.rollback("*", INTENT)
        results = await engine.score("bank-05", INTENT, events[:3])
        assert {r["predictor"] for r in results} == {p1}


async def _score_all_at_once(engine, tenants: list[str], requests: int, sent) -> None:
    """Start every request at once (request i for tenant i mod len(tenants)),
    so batches mix them; return once their shadow scores are sampled."""

    async def one(i: int) -> None:
        await engine.score(tenants[i % len(tenants)], INTENT, sent(i))

    async with trio.open_nursery() as nursery:
        for i in range(requests):
            nursery.start_soon(one, i)
    await engine.settle_shadows()


async def test_shadow_work_of_concurrent_requests_is_gathered_per_tenant(
    registry_path: Path, xgb_bytes: bytes, lgb_bytes: bytes, events: list[dict]
) -> None:
    requests = 300
    tenants = [f"bank-{k:02d}" for k in range(5)]
    async with open_engine(registry_path, deadline_ms=5000, seed=4) as engine:
        _, p2 = await _setup(engine, xgb_bytes, lgb_bytes)

        def sent(i: int) -> list[dict]:
            # Mixed sizes, so a shadow job stacks parts of 1 and 3 rows.
            return events[4 * i : 4 * i + 1 + i % 2 * 2]

        await _score_all_at_once(engine, tenants, requests, sent)
        stats = engine.statistics()
        for k, tenant in enumerate(tenants):
            of_tenant = [e for i in range(k, requests, 5) for e in sent(i)]
            np.testing.assert_array_equal(
                np.sort(engine.calibrator.sample(p2, tenant, "shadow")),
                np.sort(expected_premapped(engine, p2, of_tenant)),
            )

    assert stats.shadow_dropped == 0
    # Requests that arrived while the shadow scorer was busy shared a job.
    assert 0 < stats.shadow_jobs < requests


async def test_shadows_of_mixed_routes_and_other_features_see_their_own_rows(
    registry_path: Path, xgb_bytes: bytes, lgb_bytes: bytes, events: list[dict]
) -> None:
    """One batch can hold requests of routes with other shadows, and a shadow
    can read its features in another order: each shadow still samples
    exactly the rows of the requests routed to it."""
    requests = 200
    tenants = [f"bank-{k:02d}" for k in range(4)]
    async with open_engine(registry_path, deadline_ms=5000, seed=6) as engine:
        p1, p2 = await _setup(engine, xgb_bytes, lgb_bytes)
        v2 = engine.router.serving.predictors[p2].predictor.model_refs[0]
        reordered = {**_spec(v2), "features": list(reversed(FEATURES))}
        p3 = (await engine.admin.put_predictor("fraud-rev", reordered))["ref"]
        # bank-01: p2 from the live batch and p3 from its own rows;
        # bank-02: no shadow at all; the others: p2 through the * route.
        await engine.admin.set_route("bank-01", INTENT, p1, (p2, p3))
        await engine.admin.set_route("bank-02", INTENT, p1, ())

        def sent(i: int) -> list[dict]:
            return events[4 * i : 4 * i + 1 + i % 2 * 2]

        await _score_all_at_once(engine, tenants, requests, sent)
        for k, tenant in enumerate(tenants):
            of_tenant = [e for i in range(k, requests, 4) for e in sent(i)]
            p2_sample = np.sort(engine.calibrator.sample(p2, tenant, "shadow"))
            p3_sample = np.sort(engine.calibrator.sample(p3, tenant, "shadow"))
            if tenant == "bank-02":
                assert len(p2_sample) == 0
            else:
                np.testing.assert_array_equal(
                    p2_sample, np.sort(expected_premapped(engine, p2, of_tenant))
                )
            if tenant == "bank-01":
                np.testing.assert_array_equal(
                    p3_sample, np.sort(expected_premapped(engine, p3, of_tenant))
                )
            else:
                assert len(p3_sample) == 0
        assert engine.statistics().shadow_dropped == 0


async def test_edge_shares_follow_each_tenants_own_curve(
    registry_path: Path, xgb_bytes: bytes, lgb_bytes: bytes, events: list[dict]
) -> None:
    """A tenant with a mapping of its own is watched against its own curve,
    whichever tenant's scores reach the calibrator first."""
    own = {0.3: 0.5, 0.9: 0.01}
    async with open_engine(registry_path, deadline_ms=5000, seed=8) as engine:
        _, p2 = await _setup(engine, xgb_bytes, lgb_bytes)
        for tenant, start in (("bank-00", 0), ("bank-01", 1500)):
            await engine.score(tenant, INTENT, events[start : start + 1500])
        await engine.admin.fit_mapping(p2, scope="bank-00", curve=own, min_sample=500)
        await engine.admin.fit_mapping(p2, min_sample=500)
        await engine.admin.promote("*", INTENT, p2)
        served = {}
        for tenant, start in (("bank-01", 3000), ("bank-00", 4000)):
            results = await engine.score(tenant, INTENT, events[start : start + 1000])
            served[tenant] = np.array([r["score"] for r in results])
        shares = {
            s.tenant: s
            for s in engine.calibrator.statistics().shares
            if s.predictor == p2
        }

    default = sorted(DEFAULT_CURVE.items())
    for tenant, curve in (("bank-00", sorted(own.items())), ("bank-01", default)):
        edges = [edge for edge, _ in curve]
        assert shares[tenant].edges == tuple(edges)
        assert shares[tenant].targets == tuple(target for _, target in curve)
        assert shares[tenant].events == 1000
        assert shares[tenant].observed == tuple(
            float(np.mean(served[tenant] >= edge)) for edge in edges
        )


async def test_a_broken_shadow_does_not_keep_the_engine_from_serving(
    registry_path: Path, xgb_bytes: bytes, lgb_bytes: bytes, events: list[dict]
) -> None:
    async with open_engine(registry_path, deadline_ms=5000) as engine:
        p1, p2 = await _setup(engine, xgb_bytes, lgb_bytes)
    # The shadow's model file goes bad while the engine is down.
    (registry_path / "models" / "fraud-lgb" / "1.model").write_bytes(b"garbage")

    async with open_engine(registry_path, deadline_ms=5000) as engine:
        assert engine.ready() == [p2]
        results = await engine.score("bank-01", INTENT, events[:5])
        assert {r["predictor"] for r in results} == {p1}
        assert engine.statistics().shadow_dropped == 5
        # The operator routes around it, and the engine is ready again.
        await engine.admin.set_route("*", INTENT, p1, ())
        assert engine.ready() == []


async def test_a_declared_predictor_off_every_route_can_be_fitted_after_restart(
    registry_path: Path, xgb_bytes: bytes, lgb_bytes: bytes, events: list[dict]
) -> None:
    async with open_engine(registry_path, deadline_ms=5000) as engine:
        p1, p2 = await _setup(engine, xgb_bytes, lgb_bytes)
        await engine.score("bank-01", INTENT, events[:1500])
        await engine.settle_shadows()
        await engine.admin.set_route("*", INTENT, p1, ())  # p2 leaves the route

    async with open_engine(registry_path, deadline_ms=5000) as engine:
        assert p2 not in engine.router.serving.predictors
        fitted = await engine.admin.fit_mapping(p2, min_sample=500)
        assert fitted["sample_size"] == 1500
        with pytest.raises(NotFound, match="fraud@9"):
            await engine.admin.fit_mapping("fraud@9", min_sample=500)


async def test_overload_sheds_instead_of_queueing(
    registry_path: Path, xgb_bytes: bytes, lgb_bytes: bytes, events: list[dict]
) -> None:
    answered = shed = 0
    async with open_engine(registry_path, live_queue=2, deadline_ms=5000) as engine:
        await _setup(engine, xgb_bytes, lgb_bytes)

        async def one(i: int) -> None:
            nonlocal answered, shed
            try:
                await engine.score("bank-01", INTENT, events[i : i + 1])
                answered += 1
            except Overloaded:
                shed += 1

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(one, i)
    assert answered + shed == 200
    assert shed > 0
    assert answered > 0


async def test_restart_keeps_routes_mappings_and_samples(
    registry_path: Path, xgb_bytes: bytes, lgb_bytes: bytes, events: list[dict]
) -> None:
    registry = registry_path
    async with open_engine(registry, deadline_ms=5000, seed=5) as engine:
        p1, p2 = await _setup(engine, xgb_bytes, lgb_bytes)
        await engine.score("bank-02", INTENT, events[:2000])
        await engine.settle_shadows()
        await engine.admin.fit_mapping(p2, min_sample=1000)
        await engine.admin.promote("*", INTENT, p2)
        before = await engine.score("bank-02", INTENT, events[2000:2010])
        table = engine.router.serving.table.to_dict()

    async with open_engine(registry, deadline_ms=5000) as engine:
        assert engine.router.serving.table.to_dict() == table
        after = await engine.score("bank-02", INTENT, events[2000:2010])
        assert after == before
        assert len(engine.calibrator.sample(p2, "*", "shadow")) == 2000
        assert len(engine.calibrator.sample(p1, "bank-02", "live")) == 2000


async def test_infinity_follows_each_library(
    registry_path: Path, xgb_bytes: bytes, lgb_bytes: bytes, events: list[dict]
) -> None:
    features = {**events[0]["features"], "TX_AMOUNT": float("inf")}
    async with open_engine(registry_path, deadline_ms=5000) as engine:
        admin = engine.admin
        xgb_ref = (await admin.put_model("x", xgb_bytes, "xgboost_json"))["ref"]
        lgb_ref = (await admin.put_model("l", lgb_bytes, "lightgbm"))["ref"]
        px = (await admin.put_predictor("px", _spec(xgb_ref)))["ref"]
        pl = (await admin.put_predictor("pl", _spec(lgb_ref)))["ref"]
        await admin.set_route("*", "xgb", px)
        await admin.set_route("*", "lgb", pl)
        with pytest.raises(InvalidEvent, match="TX_AMOUNT.*infinity"):
            await engine.score("bank-01", "xgb", [{"id": 1, "features": features}])
        results = await engine.score(
            "bank-01", "lgb", [{"id": 1, "features": features}]
        )
        assert 0.0 <= results[0]["score"] <= 1.0


async def test_admin_key_cannot_score_and_beta_belongs_to_each_upload(
    registry_path: Path, xgb_bytes: bytes, lgb_bytes: bytes, events: list[dict]
) -> None:
    from muse._errors import BadRequest, Forbidden
    from muse._keys import ADMIN

    async with open_engine(registry_path, deadline_ms=5000) as engine:
        await _setup(engine, xgb_bytes, lgb_bytes)
        with pytest.raises(Forbidden, match="admin key cannot score"):
            await engine.score(ADMIN, INTENT, events[:1])
        low = await engine.admin.put_model("same", xgb_bytes, "xgboost_json", beta=0.3)
        high = await engine.admin.put_model("same", xgb_bytes, "xgboost_json", beta=0.7)
        assert (low["beta"], high["beta"]) == (0.3, 0.7)
        with pytest.raises(BadRequest, match="min_sample must be at least 1"):
            await engine.admin.fit_mapping(low["ref"], min_sample=0)


async def test_a_model_that_crashes_its_parser_is_refused_and_serving_goes_on(
    registry_path: Path, xgb_bytes: bytes, lgb_bytes: bytes, events: list[dict]
) -> None:
    import json

    from muse._errors import ModelImportError

    document = json.loads(xgb_bytes)
    tree = document["learner"]["gradient_booster"]["model"]["trees"][0]
    tree["split_indices"] = [99999] * len(tree["split_indices"])
    async with open_engine(registry_path, deadline_ms=5000) as engine:
        p1, p2 = await _setup(engine, xgb_bytes, lgb_bytes)
        with pytest.raises(ModelImportError, match="refused"):
            await engine.admin.put_model(
                "junk", json.dumps(document).encode(), "xgboost_json"
            )
        results = await engine.score("bank-01", INTENT, events[:2])
        assert {r["predictor"] for r in results} == {p1}


async def test_same_bytes_under_other_feature_names_are_another_model(
    registry_path: Path, synthetic: dict
) -> None:
    import xgboost as xgb

    # A model file that names no features: the upload's names are its own.
    X = np.column_stack([synthetic[f] for f in FEATURES])[:2000]
    booster = xgb.train(
        {"max_depth": 2, "objective": "binary:logistic", "nthread": 1},
        xgb.DMatrix(X, label=synthetic["TX_FRAUD"][:2000]),
        num_boost_round=3,
    )
    unnamed = bytes(booster.save_raw("json"))
    renamed = [f"col_{name}" for name in FEATURES]
    async with open_engine(registry_path) as engine:
        admin = engine.admin
        first = await admin.put_model("unnamed", unnamed, "xgboost_json")
        named = await admin.put_model(
            "named", unnamed, "xgboost_json", feature_names=list(FEATURES)
        )
        other = await admin.put_model(
            "renamed", unnamed, "xgboost_json", feature_names=renamed
        )

    assert first["feature_names"] == [f"f{i}" for i in range(len(FEATURES))]
    assert named["feature_names"] == list(FEATURES)
    assert other["feature_names"] == renamed
    assert first["digest"] == named["digest"] == other["digest"]
