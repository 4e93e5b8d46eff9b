"""A scoring endpoint as a team writes it by hand: FastAPI, msgpack, XGBoost.

Runs in the FastAPI peer's own virtual environment under uvicorn (one
worker), never inside MUSE.  It accepts the same msgpack events as MUSE's
``POST /v1/score`` (``{"events": [{"id", "features": {...}}]}``), builds a
float32 matrix in the model's feature order (absent features are NaN) and
calls ``xgboost.Booster.inplace_predict``, which for a binary:logistic model
returns the class-1 probability.

Environment:
    MUSE_BENCH_MODEL: path of the XGBoost model file to serve.
"""

from __future__ import annotations

import math
import os

import msgpack
import numpy as np
import xgboost
from fastapi import FastAPI, Request, Response

_booster = xgboost.Booster()
_booster.load_model(os.environ["MUSE_BENCH_MODEL"])
_FEATURES: list[str] = list(_booster.feature_names or [])

app = FastAPI()


@app.post("/score")
async def score(request: Request) -> Response:
    """Score a batch of events; answers ``{"results": [{"id", "score"}]}``."""
    events = msgpack.unpackb(await request.body())["events"]
    rows = [[e["features"].get(n, math.nan) for n in _FEATURES] for e in events]
    scores = _booster.inplace_predict(np.asarray(rows, dtype=np.float32))
    results = [{"id": e["id"], "score": float(s)} for e, s in zip(events, scores)]
    return Response(
        msgpack.packb({"results": results}), media_type="application/msgpack"
    )


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness probe used by the bench before it sends load."""
    return {"status": "ok"}
