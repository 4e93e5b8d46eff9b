"""A stand-in for MUSE's scoring endpoint, for self-tests of the harness only.

It speaks the documented ``POST /v1/score`` contract (msgpack events in,
``{"results": [{"id", "score", "predictor", "mapping"}]}`` out, bearer key
checked) and answers ``/healthz`` and ``/readyz``, so ``muse bench --url``
and ``--slo`` can be exercised end to end when no MUSE server is at hand.
Scores come from an XGBoost model when ``MUSE_BENCH_MODEL`` names one,
else they are 0.5.  It is never a baseline: the comparison suite measures
real peers.

Run:
    /work/venv/bin/hypercorn bench.standin_app:app --bind 127.0.0.1:8123
    muse bench --url http://127.0.0.1:8123 --key standin --slo bench/slo.example.toml
"""

from __future__ import annotations

import math
import os
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import numpy as np

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

KEY = os.environ.get("MUSE_STANDIN_KEY", "standin")


def _load_model() -> tuple[Any, list[str]]:
    path = os.environ.get("MUSE_BENCH_MODEL")
    if not path:
        return None, []
    import xgboost

    booster = xgboost.Booster()
    booster.load_model(path)
    return booster, list(booster.feature_names or [])


_BOOSTER, _FEATURES = _load_model()


def _scores(events: list[dict[str, Any]]) -> list[float]:
    if _BOOSTER is None:
        return [0.5] * len(events)
    rows = [[e["features"].get(n, math.nan) for n in _FEATURES] for e in events]
    return [float(s) for s in _BOOSTER.inplace_predict(np.asarray(rows, np.float32))]


async def _body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _reply(send: Send, status: int, document: Any) -> None:
    payload = msgpack.packb(document)
    headers = [
        (b"content-type", b"application/msgpack"),
        (b"content-length", str(len(payload)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI application."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    path = scope["path"]
    if path in ("/healthz", "/readyz"):
        await _reply(send, 200, {"status": "ok"})
        return
    if path != "/v1/score" or scope["method"] != "POST":
        await _reply(send, 404, {"error": "not_found", "detail": path})
        return
    headers = dict(scope["headers"])
    if headers.get(b"authorization") != f"Bearer {KEY}".encode():
        await _reply(send, 401, {"error": "unauthorized", "detail": "bad key"})
        return
    events = msgpack.unpackb(await _body(receive))["events"]
    results = [
        {"id": e["id"], "score": s, "predictor": "standin@1", "mapping": None}
        for e, s in zip(events, _scores(events))
    ]
    await _reply(send, 200, {"results": results})
