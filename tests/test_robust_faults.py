"""Faults around the models and the process: bad models, threads, kills,
a full disk, and shutdown on SIGTERM.

The server runs for real: in this process where the engine must be looked
at, as ``python -m muse serve`` where it is killed or signalled.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import random
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
import treelite
import trio
from _servers import (
    plain_events,
    HEAVY_FEATURES,
    HEAVY_INTENT,
    INTENT,
    RawConnection,
    ServerProcess,
    copy_registry,
    record_figure,
    request,
    serving,
    spec,
)

from muse._atomic import TEMP_PREFIX
from muse._models import load_model
from muse._registry import Registry
from muse._synthetic import FEATURES
from muse.client import ApiError, AsyncClient, Client


# -- models that must not go live ---------------------------------------------


async def test_unimportable_models_are_refused_and_the_live_version_serves_on(
    template: Path, tmp_path: Path, xgb_bytes: bytes, events: list[dict]
) -> None:
    deployment = copy_registry(template, tmp_path / "reg")
    batch = plain_events(events, 20)
    broken = [
        ("garbage", b"not a model at all", "xgboost_json"),
        ("truncated", xgb_bytes[: len(xgb_bytes) // 2], "xgboost_json"),
        ("wrong_format", xgb_bytes, "lightgbm"),
        ("empty_json", b"{}", "xgboost_json"),
        ("not_treelite", b"\x00" * 64, "treelite"),
    ]
    async with serving(tmp_path / "reg") as served:
        async with AsyncClient(served.url, deployment.keys["bank-01"]) as client:
            before = await client.score(INTENT, batch)
        async with AsyncClient(served.url, deployment.admin) as admin:
            models_before = await admin.listing("models")
            for label, data, format in broken:
                with pytest.raises(ApiError, match="model_import") as caught:
                    await admin.put_model("xgb", data, format)
                assert caught.value.status == 400, label
                assert caught.value.detail, label
            models_after = await admin.listing("models")
        async with AsyncClient(served.url, deployment.keys["bank-01"]) as client:
            after = await client.score(INTENT, batch)
    assert models_after == models_before
    assert after == before


async def test_model_differing_from_its_golden_rows_is_refused(
    template: Path, tmp_path: Path, xgb_bytes: bytes, events: list[dict]
) -> None:
    deployment = copy_registry(template, tmp_path / "reg")
    stored = Registry(template).get_model(deployment.models["xgb"])
    assert stored.golden is not None
    with np.load(io.BytesIO(stored.golden)) as golden:
        X, margin = golden["X"], golden["margin"]
    # One row off by far more than the parity tolerance.
    margin = margin.copy()
    margin[len(margin) // 2] += 1e-3
    wrong = io.BytesIO()
    np.savez(wrong, X=X, margin=margin)
    body = msgpack.packb(
        {"data": xgb_bytes, "format": "xgboost_json", "golden": wrong.getvalue()}
    )
    batch = plain_events(events, 20)
    async with serving(tmp_path / "reg") as served:
        async with AsyncClient(served.url, deployment.keys["bank-02"]) as client:
            before = await client.score(INTENT, batch)
        connection = await RawConnection.open(served.host, served.port)
        reply = await connection.exchange(
            request("PUT", "/v1/models/xgb", body, key=deployment.admin)
        )
        async with AsyncClient(served.url, deployment.admin) as admin:
            models = await admin.listing("models")
        async with AsyncClient(served.url, deployment.keys["bank-02"]) as client:
            after = await client.score(INTENT, batch)
    assert reply.status == 400 and reply.error == "model_parity", reply.document()
    assert "golden" in reply.detail or "parity" in reply.detail
    assert "xgb@2" not in json.dumps(models)
    assert after == before


@pytest.mark.parametrize("which", ["xgb", "lgb", "heavy"])
def test_one_model_from_many_threads_matches_sequential_calls(
    template: Path, which: str
) -> None:
    registry = Registry(template)
    record = registry.get_model(registry.list_models(which)[-1])
    model = load_model(
        record.data,
        record.meta["format"],
        list(record.meta["feature_names"]),
        record.meta["beta"],
        cache_dir=registry.compiled_dir,
        golden=record.golden,
    )
    rng = np.random.default_rng(11)
    X = rng.normal(0, 1e4, size=(4000, model.num_features))
    X[rng.random(X.shape) < 0.1] = np.nan
    slices = [np.ascontiguousarray(X[i : i + 50 + i % 700]) for i in range(0, 3000, 50)]
    sequential = [model.predict(part) for part in slices]

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        jobs = [
            (index, pool.submit(model.predict, slices[index]))
            for _ in range(4)
            for index in range(len(slices))
        ]
        for index, job in jobs:
            assert job.result().tobytes() == sequential[index].tobytes()


# -- SIGKILL during writes ----------------------------------------------------


def _tiny_treelite_models(synthetic: dict, count: int) -> list[bytes]:
    """Distinct small XGBoost models as treelite checkpoints (no xgboost is
    imported when the server loads them, which keeps restarts fast)."""
    import xgboost as xgb

    X = np.column_stack([synthetic[f] for f in FEATURES])[:4000]
    y = synthetic["TX_FRAUD"][:4000]
    models = []
    for seed in range(count):
        booster = xgb.train(
            {
                "max_depth": 3,
                "objective": "binary:logistic",
                "nthread": 1,
                "seed": seed,
                "subsample": 0.8,
                "eta": 0.3,
            },
            xgb.DMatrix(X, label=y, feature_names=list(FEATURES)),
            num_boost_round=4 + seed,
        )
        converted = treelite.frontend.from_xgboost_json(
            bytes(booster.save_raw("json")).decode()
        )
        models.append(bytes(converted.serialize_bytes()))
    return models


async def _kill_loop_registry(registry: Path, model: bytes) -> tuple[str, str]:
    from muse import open_engine

    async with open_engine(registry) as engine:
        admin = engine.admin
        admin_key = await admin.ensure_admin_key()
        assert admin_key is not None
        base = await admin.put_model(
            "base", model, "treelite", feature_names=list(FEATURES), beta=0.5
        )
        live = await admin.put_predictor("fraud", spec(base["ref"], quantile_map=True))
        await admin.set_route("*", INTENT, live["ref"])
        tenant = (await admin.create_tenant("bank-01"))["key"]
    (registry / "admin.key").write_text(admin_key + "\n")
    return admin_key, tenant


class _Acknowledged:
    """Everything the server said it stored, as the client saw it."""

    def __init__(self) -> None:
        self.models: list[str] = []
        self.predictors: list[str] = []
        self.mappings: list[str] = []
        self.route_version = 0
        self.tenants: list[str] = []
        self.operations = 0
        self.kills = 0
        self.interrupted = 0
        self.lost = 0
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()


def _story(
    url: str,
    admin_key: str,
    tenant_key: str,
    models: list[bytes],
    events: list[dict],
    done: _Acknowledged,
    stop: threading.Event,
    rng: random.Random,
) -> None:
    """Upload, declare, shadow, fit, promote, over and over, until killed."""
    try:
        with (
            Client(url, admin_key, timeout=30) as admin,
            Client(url, tenant_key, timeout=30) as scorer,
        ):
            while not stop.is_set():
                _one_story(admin, scorer, models, events, done, rng)
    except httpx.TransportError:
        done.interrupted += 1  # the kill landed mid-request: not acknowledged
    except ApiError as exc:
        # A state the last kill left behind can make a step invalid (a 4xx);
        # the story ends and the next one starts from what was stored.
        if exc.status >= 500:
            done.errors.append(exc)
    except Exception as exc:  # noqa: BLE001 - reported by the test thread
        done.errors.append(exc)


def _one_story(
    admin: Client,
    scorer: Client,
    models: list[bytes],
    events: list[dict],
    done: _Acknowledged,
    rng: random.Random,
) -> None:
    def ack(kind: str, value: Any) -> None:
        with done.lock:
            done.operations += 1
            if kind == "route":
                done.route_version = max(done.route_version, value)
            else:
                getattr(done, kind).append(value)

    index = rng.randrange(len(models))
    model = admin.put_model(
        f"m{index}", models[index], "treelite", feature_names=list(FEATURES), beta=0.5
    )
    ack("models", model["ref"])
    declared = admin.put_predictor("fraud", spec(model["ref"], quantile_map=True))
    ack("predictors", declared["ref"])
    live = admin.listing("routes")["routes"]["*"][INTENT]["live"]
    ack("route", admin.put_route("*", INTENT, live, [declared["ref"]])["version"])
    start = rng.randrange(0, len(events) - 900)
    for offset in range(0, 900, 300):
        scorer.score(INTENT, plain_events(events, 300, start + offset))
    mapping = admin.fit_mapping(declared["ref"], source="shadow", min_sample=300)
    ack("mappings", mapping["id"])
    ack("route", admin.promote("*", INTENT, declared["ref"])["version"])
    if rng.random() < 0.3:
        ack("route", admin.rollback("*", INTENT)["version"])
    if rng.random() < 0.2:
        name = f"t{rng.randrange(10**6)}"
        admin.create_tenant(name)
        ack("tenants", name)


def _check_registry(path: Path, done: _Acknowledged) -> None:
    """After a kill: it opens, holds everything acknowledged, and shows
    nothing half-written."""
    registry = Registry(path)  # also removes the killed writer's temp files
    for directory, _, names in os.walk(path):
        leftovers = [n for n in names if n.startswith(TEMP_PREFIX)]
        assert not leftovers, (directory, leftovers)
    models = set(registry.list_models())
    predictors = set(registry.list_predictors())
    mappings = set(registry.list_mappings())
    version, table = registry.current_routes()
    keys = json.dumps(registry.current_keys()[1])
    done.lost += (
        len(set(done.models) - models)
        + len(set(done.predictors) - predictors)
        + len(set(done.mappings) - mappings)
        + len([t for t in done.tenants if t not in keys])
        + (version < done.route_version)
    )
    assert done.lost == 0
    for ref in models:
        registry.get_model(ref)  # checks the stored bytes against their sha256
    for ref in predictors:
        registry.get_predictor(ref)
    for mapping_id in mappings:
        registry.get_mapping(mapping_id)
    for intents in table.get("routes", {}).values():
        for route in intents.values():
            for ref in [
                route["live"],
                *route.get("shadows", []),
                *route.get("history", []),
            ]:
                assert ref in predictors, ref
    for scopes in table.get("mappings", {}).values():
        for mapping_id in scopes.values():
            assert mapping_id in mappings


def _wait_for_a_random_point(
    done: _Acknowledged, worker: threading.Thread, rng: random.Random
) -> None:
    """Let the story acknowledge a random number of operations (none to a
    whole story's worth), then a random slice of the next one.

    A fixed short delay would kill every story before its first upload is
    acknowledged (an upload is imported in a child process first), and the
    check after the kill would then hold vacuously.
    """
    target = done.operations + rng.randrange(0, 7)
    deadline = time.monotonic() + 30
    while (
        done.operations < target and worker.is_alive() and time.monotonic() < deadline
    ):
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.4))


def _kill_lane(
    workdir: Path, models: list[bytes], events: list[dict], kills: int, seed: int
) -> _Acknowledged:
    """Start, work, SIGKILL, check, ``kills`` times over one registry."""
    rng = random.Random(seed)
    registry = workdir / "reg"
    admin_key, tenant_key = trio.run(_kill_loop_registry, registry, models[0])
    done = _Acknowledged()
    with ServerProcess(registry, workdir) as server:
        for _ in range(kills):
            url = server.start()
            stop = threading.Event()
            worker = threading.Thread(
                target=_story,
                args=(url, admin_key, tenant_key, models, events, done, stop, rng),
                daemon=True,
            )
            worker.start()
            _wait_for_a_random_point(done, worker, rng)
            server.kill()
            stop.set()
            worker.join(timeout=30)
            assert not worker.is_alive()
            assert not done.errors, done.errors
            _check_registry(registry, done)
            done.kills += 1
        # The last restart serves, from the registry the kills left.
        url = server.start()
        with Client(url, tenant_key) as scorer:
            assert len(scorer.score(INTENT, plain_events(events, 10))) == 10
    return done


@pytest.mark.slow
def test_sigkill_during_writes_loses_nothing_acknowledged(
    tmp_path: Path, synthetic: dict, events: list[dict]
) -> None:
    lanes, kills = 2, 26  # two registries killed side by side: 52 kills
    models = _tiny_treelite_models(synthetic, 3)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=lanes) as pool:
        futures = []
        for lane in range(lanes):
            workdir = tmp_path / f"lane{lane}"
            workdir.mkdir()
            futures.append(
                pool.submit(_kill_lane, workdir, models, events, kills, 1000 + lane)
            )
        results = [future.result() for future in futures]
    record_figure(
        "sigkill",
        {
            "kills_survived": sum(r.kills for r in results),
            "operations_acknowledged": sum(r.operations for r in results),
            "models": sum(len(r.models) for r in results),
            "predictors": sum(len(r.predictors) for r in results),
            "mappings": sum(len(r.mappings) for r in results),
            "requests_cut_by_the_kill": sum(r.interrupted for r in results),
            "acknowledged_lost": sum(r.lost for r in results),
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
    assert sum(r.kills for r in results) >= 50
    # The kills landed after real work, not only before the first answer.
    assert sum(len(r.models) for r in results) >= 10
    assert sum(len(r.mappings) for r in results) >= 5
    assert sum(r.route_version > 0 for r in results) == lanes


# -- a full disk --------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 4 MB tmpfs, mounted for the test; skips where mounting is not allowed."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; cannot fill a disk safely")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    # Unbuffered: nothing left over to fail again when the file closes.
    with filler.open("wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\x00" * 65536)
        except OSError:
            pass
    return filler


async def test_full_disk_fails_writes_cleanly_and_damages_nothing(
    template: Path,
    small_disk: Path,
    xgb_bytes: bytes,
    lgb_bytes: bytes,
    events: list[dict],
) -> None:
    registry_path = small_disk / "reg"
    deployment = copy_registry(template, registry_path)
    batch = plain_events(events, 10)
    async with serving(registry_path, persist_interval=0.05) as served:
        async with AsyncClient(served.url, deployment.keys["bank-01"]) as scorer:
            before = await scorer.score(INTENT, batch)
        routes_before = Registry(registry_path).current_routes()
        filler = _fill(small_disk)
        failures = {}
        async with AsyncClient(served.url, deployment.admin) as admin:
            attempts = {
                # Same bytes as a stored model: the compiled library is cached,
                # so the registry write itself meets the full disk.
                "model": lambda: admin.put_model("xgb-copy", xgb_bytes, "xgboost_json"),
                "route": lambda: admin.put_route("*", INTENT, deployment.shadow),
                "tenant": lambda: admin.create_tenant("bank-09"),
                "predictor": lambda: admin.put_predictor(
                    "fraud", spec(deployment.models["lgb"])
                ),
            }
            for label, attempt in attempts.items():
                with pytest.raises(ApiError) as caught:
                    await attempt()
                failures[label] = (caught.value.status, caught.value.code)
            # Scoring goes on, and so do sample flushes that cannot be written.
            async with AsyncClient(served.url, deployment.keys["bank-01"]) as scorer:
                for _ in range(5):
                    assert await scorer.score(INTENT, batch) == before
                    await trio.sleep(0.06)
            filler.unlink()
            stored = await admin.put_model("xgb-copy", xgb_bytes, "xgboost_json")
    assert failures == {
        label: (507, "storage_full")
        for label in ("model", "route", "tenant", "predictor")
    }, failures
    assert stored["ref"] == "xgb-copy@1"
    registry = Registry(registry_path)
    assert registry.current_routes() == routes_before
    for ref in registry.list_models():
        registry.get_model(ref)
    for directory, _, names in os.walk(registry_path):
        assert not [n for n in names if n.startswith(TEMP_PREFIX)], directory


async def test_full_disk_during_a_compile_is_a_507(
    template: Path, small_disk: Path, synthetic: dict
) -> None:
    import xgboost as xgb

    deployment = copy_registry(template, small_disk / "reg")
    X = np.column_stack([synthetic[f] for f in FEATURES])[:2000]
    fresh = xgb.train(
        {"max_depth": 2, "objective": "binary:logistic", "seed": 3, "nthread": 1},
        xgb.DMatrix(
            X, label=synthetic["TX_FRAUD"][:2000], feature_names=list(FEATURES)
        ),
        num_boost_round=3,
    )
    async with serving(small_disk / "reg") as served:
        _fill(small_disk)
        async with AsyncClient(served.url, deployment.admin) as admin:
            with pytest.raises(ApiError) as caught:
                await admin.put_model("fresh", bytes(fresh.save_raw("json")), "xgboost")
    assert (caught.value.status, caught.value.code) == (507, "storage_full")


# -- graceful shutdown --------------------------------------------------------


@pytest.mark.slow
def test_sigterm_answers_everything_in_flight_and_exits_cleanly(
    template: Path, tmp_path: Path
) -> None:
    deployment = copy_registry(template, tmp_path / "reg")
    rows, clients = 30_000, 16
    rng = np.random.default_rng(5)
    body = msgpack.packb(
        {
            "intent": HEAVY_INTENT,
            "events": [
                {"features": {HEAVY_FEATURES[0]: float(a), HEAVY_FEATURES[1]: float(b)}}
                for a, b in rng.uniform(0, 1e5, size=(rows, 2))
            ],
            "deadline_ms": 60_000,
        }
    )
    key = deployment.keys["bank-01"]
    head = request(
        "POST",
        "/v1/score",
        None,
        key=key,
        headers=[("Expect", "100-continue"), ("Content-Length", str(len(body)))],
    )
    config = {
        "server": {"graceful_timeout": 20.0},
        "engine": {"max_events": rows, "persist_interval": 3600.0},
    }
    server = ServerProcess(tmp_path / "reg", tmp_path, config)
    server.start()
    host, port = server.host_port
    statuses: list[int] = []
    refused_while_busy = False

    async def main() -> None:
        nonlocal refused_while_busy
        connections = [await RawConnection.open(host, port) for _ in range(clients)]
        for connection in connections:
            await connection.send(head)
        # A 100 Continue means the server has the head: the request is in
        # flight from here on.
        for connection in connections:
            assert (await connection.reply()).status == 100
        for connection in connections:
            await connection.send(body)
        server.terminate()

        async def answer(connection: RawConnection) -> None:
            statuses.append((await connection.reply(timeout=60)).status)

        async with trio.open_nursery() as nursery:
            for connection in connections:
                nursery.start_soon(answer, connection)
            # New connections are refused while those answers are pending.
            with trio.fail_after(10):
                while True:
                    try:
                        probe = await trio.open_tcp_stream(host, port)
                    except OSError:
                        refused_while_busy = len(statuses) < clients
                        break
                    await probe.aclose()
                    await trio.sleep(0.005)

    try:
        trio.run(main)
        code = server.wait(timeout=30)
    finally:
        server.kill()
    samples = Registry(tmp_path / "reg").load_samples(deployment.heavy, None, "live")
    record_figure(
        "sigterm",
        {"in_flight": clients, "answered_200": statuses.count(200), "exit_code": code},
    )
    assert statuses == [200] * clients
    assert refused_while_busy
    assert code == 0
    assert "stopped" in server.log()
    # Calibration samples were written on the way out.
    assert len(samples) == 50_000
