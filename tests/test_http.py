"""The real server on a loopback port, spoken to in msgpack over HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
import trio

from muse._wire import build_matrix
from muse.client import ApiError, AsyncClient

from _servers import serving

INTENT = "card-fraud"
MSGPACK = {"content-type": "application/msgpack"}


@asynccontextmanager
async def running(
    registry: Path, **engine_options: Any
) -> AsyncIterator[tuple[str, Any]]:
    """Serve ``registry`` on a free loopback port for the block's duration."""
    # These tests check answers, not latency: a generous deadline keeps a
    # busy CI machine from turning a slow answer into a 504.
    engine_options.setdefault("deadline_ms", 5000)
    async with serving(registry, **engine_options) as served:
        yield served.url, served.engine


def _spec(model: str) -> dict:
    return {
        "nodes": [
            {"id": "m", "kind": "model", "model": model},
            {"id": "pc", "kind": "posterior_correction", "input": "m"},
            {"id": "qm", "kind": "quantile_map", "input": "pc"},
        ],
        "output": "qm",
    }


async def _deploy(url: str, registry: Path, xgb_bytes: bytes, lgb_bytes: bytes) -> dict:
    admin_key = (registry / "admin.key").read_text().strip()
    async with AsyncClient(url, admin_key) as admin:
        m1 = await admin.put_model("xgb", xgb_bytes, "xgboost_json", beta=0.05)
        m2 = await admin.put_model("lgb", lgb_bytes, "lightgbm", beta=0.5)
        p1 = (await admin.put_predictor("fraud", _spec(m1["ref"])))["ref"]
        p2 = (await admin.put_predictor("fraud", _spec(m2["ref"])))["ref"]
        route = await admin.put_route("*", INTENT, p1, [p2])
        keys = {t: await admin.create_tenant(t) for t in ("bank-01", "bank-02")}
    return {"admin": admin_key, "p1": p1, "p2": p2, "keys": keys, "route": route}


def _offline(engine: Any, ref: str, tenant: str, events: list[dict]) -> np.ndarray:
    serving = engine.router.serving
    loaded = serving.predictors[ref]
    return loaded.score(
        build_matrix(events, loaded.feature_names), serving.mapping_for(ref, tenant)
    )


async def test_score_over_http_matches_offline_scores(
    registry_path: Path, xgb_bytes: bytes, lgb_bytes: bytes, events: list[dict]
) -> None:
    registry = registry_path
    async with running(registry) as (url, engine):
        setup = await _deploy(url, registry, xgb_bytes, lgb_bytes)
        batch = [{"id": e["id"], "features": e["features"]} for e in events[:64]]
        async with AsyncClient(url, setup["keys"]["bank-01"]) as client:
            results = await client.score(INTENT, batch)
        assert len(results) == 64
        assert [r["id"] for r in results] == [e["id"] for e in batch]
        assert {r["predictor"] for r in results} == {setup["p1"]}
        expected = _offline(engine, setup["p1"], "bank-01", batch)
        np.testing.assert_array_equal([r["score"] for r in results], expected)

        # JSON for people with curl, same answer.
        async with httpx.AsyncClient(base_url=url) as http:
            response = await http.post(
                "/v1/score",
                content=json.dumps({"intent": INTENT, "events": batch[:2]}),
                headers={
                    "content-type": "application/json",
                    "authorization": f"Bearer {setup['keys']['bank-01']}",
                },
            )
        assert response.status_code == 200
        assert response.json()["results"] == results[:2]


async def test_tenant_comes_from_the_key_not_the_body(
    registry_path: Path, xgb_bytes: bytes, lgb_bytes: bytes, events: list[dict]
) -> None:
    registry = registry_path
    async with running(registry) as (url, engine):
        setup = await _deploy(url, registry, xgb_bytes, lgb_bytes)
        async with AsyncClient(url, setup["admin"]) as admin:
            await admin.put_route("bank-01", INTENT, setup["p2"])
        batch = [{"id": 1, "features": events[0]["features"]}]
        async with AsyncClient(url, setup["keys"]["bank-01"]) as one:
            # A body cannot name a tenant: the field is refused outright.
            with pytest.raises(ApiError, match="unknown field.*'tenant'"):
                await one.call(
                    "POST",
                    "/v1/score",
                    {"intent": INTENT, "events": batch, "tenant": "bank-02"},
                )
            mine = await one.score(INTENT, batch)
        async with AsyncClient(url, setup["keys"]["bank-02"]) as two:
            theirs = await two.score(INTENT, batch)
        assert mine[0]["predictor"] == setup["p2"]
        assert theirs[0]["predictor"] == setup["p1"]


async def _status(
    http: httpx.AsyncClient, method: str, path: str, **kwargs: Any
) -> tuple[int, Any]:
    response = await http.request(method, path, **kwargs)
    body = msgpack.unpackb(response.content) if response.content else None
    return response.status_code, body


async def test_every_error_status_has_a_msgpack_body(
    registry_path: Path, xgb_bytes: bytes, lgb_bytes: bytes, events: list[dict]
) -> None:
    registry = registry_path
    async with running(registry, max_events=100) as (url, engine):
        setup = await _deploy(url, registry, xgb_bytes, lgb_bytes)
        tenant = {"authorization": f"Bearer {setup['keys']['bank-01']}", **MSGPACK}
        admin = {"authorization": f"Bearer {setup['admin']}", **MSGPACK}
        features = events[0]["features"]

        def body(value: Any) -> bytes:
            return msgpack.packb(value)

        good = body({"intent": INTENT, "events": [{"id": "a", "features": features}]})
        cases = [
            (
                "POST",
                "/v1/score",
                {"content": good, "headers": MSGPACK},
                401,
                "unauthorized",
            ),
            (
                "POST",
                "/v1/score",
                {
                    "content": good,
                    "headers": {**MSGPACK, "authorization": "Bearer nope"},
                },
                401,
                "unauthorized",
            ),
            ("GET", "/v1/models", {"headers": tenant}, 403, "forbidden"),
            (
                "POST",
                "/v1/score",
                {
                    "content": body(
                        {"intent": "aml", "events": [{"features": features}]}
                    ),
                    "headers": tenant,
                },
                404,
                "not_found",
            ),
            (
                "POST",
                "/v1/score",
                {
                    "content": body(
                        {
                            "intent": INTENT,
                            "events": [
                                {
                                    "id": "tx-7",
                                    "features": {**features, "TX_AMOUNT": True},
                                }
                            ],
                        }
                    ),
                    "headers": tenant,
                },
                400,
                "invalid_event",
            ),
            (
                "POST",
                "/v1/score",
                {
                    "content": body(
                        {"intent": INTENT, "events": [{"features": features}] * 101}
                    ),
                    "headers": tenant,
                },
                413,
                "too_large",
            ),
            (
                "POST",
                "/v1/score",
                {"content": good, "headers": {**tenant, "content-type": "text/csv"}},
                415,
                "unsupported_media_type",
            ),
            (
                "POST",
                "/v1/score",
                {"content": b"\xc1", "headers": tenant},
                400,
                "bad_request",
            ),
            ("GET", "/v1/score", {"headers": tenant}, 405, "method_not_allowed"),
            (
                "PUT",
                "/v1/routes/*/card-fraud",
                {
                    "content": body({"live": setup["p1"], "expect_version": 0}),
                    "headers": admin,
                },
                409,
                "conflict",
            ),
            (
                "POST",
                "/v1/routes/*/card-fraud/promote",
                {"content": body({}), "headers": admin},
                409,
                "conflict",
            ),
            # An empty string is a value, not an absent field: refused, not
            # read as the default.
            (
                "POST",
                "/v1/routes/*/card-fraud/promote",
                {"content": body({"version": ""}), "headers": admin},
                409,
                "conflict",
            ),
            (
                "POST",
                "/v1/mappings/fit",
                {
                    "content": body({"predictor": setup["p2"], "source": ""}),
                    "headers": admin,
                },
                400,
                "bad_request",
            ),
            (
                "POST",
                "/v1/mappings/fit",
                {
                    "content": body({"predictor": setup["p2"], "scope": ""}),
                    "headers": admin,
                },
                400,
                "bad_request",
            ),
            (
                "PUT",
                "/v1/models/bad",
                {
                    "content": body({"data": b"not a model", "format": "xgboost_json"}),
                    "headers": admin,
                },
                400,
                "model_import",
            ),
            (
                "PUT",
                "/v1/predictors/p",
                {
                    "content": body({"spec": {"nodes": [], "output": "x"}}),
                    "headers": admin,
                },
                400,
                "predictor_spec",
            ),
            (
                "PUT",
                "/v1/predictors/p",
                {
                    "content": body(
                        {
                            "spec": {
                                "nodes": [{"id": "m", "kind": ["model"], "model": "x"}],
                                "output": "m",
                            }
                        }
                    ),
                    "headers": admin,
                },
                400,
                "predictor_spec",
            ),
            (
                "PUT",
                "/v1/routes/*/card-fraud",
                {
                    "content": body({"live": setup["p1"], "shadow": []}),
                    "headers": admin,
                },
                400,
                "bad_request",
            ),
            (
                "PUT",
                "/v1/models/typo",
                {
                    "content": body(
                        {"data": xgb_bytes, "format": "xgboost_json", "Beta": 0.05}
                    ),
                    "headers": admin,
                },
                400,
                "bad_request",
            ),
            ("GET", "/v1/nowhere", {"headers": admin}, 404, "not_found"),
        ]
        async with httpx.AsyncClient(base_url=url) as http:
            for method, path, kwargs, status, code in cases:
                got, answer = await _status(http, method, path, **kwargs)
                assert (got, answer["error"]) == (status, code), (path, answer)
                assert answer["detail"]
            # A detail quoting what the client sent is cut short.
            huge = body({"intent": "x" * 100_000, "events": [{"features": features}]})
            got, answer = await _status(
                http, "POST", "/v1/score", content=huge, headers=tenant
            )
            assert got == 404
            assert answer["detail"].endswith("characters)")
            assert len(answer["detail"]) < 1100
            # Still serving after all of that.
            got, answer = await _status(
                http, "POST", "/v1/score", content=good, headers=tenant
            )
            assert got == 200


async def test_invalid_event_names_event_and_feature(
    registry_path: Path, xgb_bytes: bytes, lgb_bytes: bytes, events: list[dict]
) -> None:
    registry = registry_path
    async with running(registry) as (url, engine):
        setup = await _deploy(url, registry, xgb_bytes, lgb_bytes)
        bad = {**events[0]["features"], "TX_AMOUNT": "57.16"}
        async with AsyncClient(url, setup["keys"]["bank-02"]) as client:
            with pytest.raises(ApiError, match="tx-42.*TX_AMOUNT") as caught:
                await client.score(INTENT, [{"id": "tx-42", "features": bad}])
        assert caught.value.status == 400


async def test_promotion_under_load_loses_nothing_and_never_mixes_versions(
    registry_path: Path, xgb_bytes: bytes, lgb_bytes: bytes, events: list[dict]
) -> None:
    registry = registry_path
    async with running(registry, seed=11) as (url, engine):
        setup = await _deploy(url, registry, xgb_bytes, lgb_bytes)
        p1, p2 = setup["p1"], setup["p2"]
        async with AsyncClient(url, setup["keys"]["bank-01"]) as client:
            for start in range(0, 3000, 500):
                await client.score(INTENT, _plain(events[start : start + 500]))
        # The shadow fit waits for the shadow scorer to catch up by itself.
        async with AsyncClient(url, setup["admin"]) as admin:
            await admin.fit_mapping(p1, source="live", min_sample=1000)
            await admin.fit_mapping(p2, source="shadow", min_sample=1000)

        sent = answered = 0
        seen: dict[str, int] = {}
        stop = trio.Event()

        async def scorer(worker: int) -> None:
            nonlocal sent, answered
            async with AsyncClient(url, setup["keys"]["bank-01"]) as client:
                i = worker * 7
                while not stop.is_set():
                    batch = _plain(events[i % 5000 : i % 5000 + 3])
                    sent += 1
                    results = await client.score(INTENT, batch)
                    answered += 1
                    versions = {r["predictor"] for r in results}
                    assert len(versions) == 1
                    version = versions.pop()
                    seen[version] = seen.get(version, 0) + 1
                    expected = _offline(engine, version, "bank-01", batch)
                    np.testing.assert_array_equal(
                        [r["score"] for r in results], expected
                    )
                    i += 3

        async with trio.open_nursery() as nursery:
            for worker in range(4):
                nursery.start_soon(scorer, worker)
            async with AsyncClient(url, setup["admin"]) as admin:
                for _ in range(3):
                    await trio.sleep(0.15)
                    await admin.promote("*", INTENT, p2)
                    await trio.sleep(0.15)
                    await admin.rollback("*", INTENT)
            await trio.sleep(0.1)
            stop.set()
        assert sent == answered
        assert seen.get(p1, 0) > 0 and seen.get(p2, 0) > 0


async def test_health_readiness_and_metrics(
    registry_path: Path, xgb_bytes: bytes, lgb_bytes: bytes, events: list[dict]
) -> None:
    registry = registry_path
    async with running(registry) as (url, engine):
        setup = await _deploy(url, registry, xgb_bytes, lgb_bytes)
        async with AsyncClient(url, setup["keys"]["bank-02"]) as client:
            for _ in range(3):
                await client.score(INTENT, _plain(events[:10]))
        await engine.settle_shadows()
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/readyz")).status_code == 200
            text = (await http.get("/metrics")).text
        assert 'muse_http_requests_total{route="/v1/score",status="200"} 3.0' in text
        assert "muse_events_total 30.0" in text
        assert "muse_live_share_at_edge" in text
        # 30 events of bank-02 on the * route's live p1, and on its shadow.
        for predictor, source in ((setup["p1"], "live"), (setup["p2"], "shadow")):
            for tenant in ("*", "bank-02"):
                line = (
                    f'muse_calibration_sample_size{{predictor="{predictor}",'
                    f'source="{source}",tenant="{tenant}"}} 30.0'
                )
                assert line in text


async def test_restart_comes_back_with_the_same_routes(
    registry_path: Path, xgb_bytes: bytes, lgb_bytes: bytes, events: list[dict]
) -> None:
    registry = registry_path
    async with running(registry) as (url, engine):
        setup = await _deploy(url, registry, xgb_bytes, lgb_bytes)
        async with AsyncClient(url, setup["keys"]["bank-01"]) as client:
            before = await client.score(INTENT, _plain(events[:20]))
    async with running(registry) as (url, engine):
        async with AsyncClient(url, setup["keys"]["bank-01"]) as client:
            after = await client.score(INTENT, _plain(events[:20]))
    assert after == before


def _plain(events: list[dict]) -> list[dict]:
    return [{"id": e["id"], "features": e["features"]} for e in events]
