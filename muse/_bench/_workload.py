"""The bench's workload: events, the model every server loads, and request bodies.

Every server in a comparison scores the same events with the same model file.
Events come from the real transactions file (``--data``) or from
``muse._synthetic``; the model is trained here (XGBoost, binary logistic) and
saved as XGBoost JSON.  Each server then gets the same events in its own wire
format:

- ``muse``: msgpack ``{"intent", "events": [{"id", "features": {...}}]}`` on
  ``POST /v1/score`` with the tenant's bearer key (the documented MUSE API);
- ``v2``: the KServe V2 inference protocol as MLServer speaks it, JSON
  ``{"inputs": [{"name", "shape": [n, 15], "datatype": "FP32", "data"}]}``;
- ``fastapi``: the same msgpack events as MUSE on ``POST /score``, which is
  what a team writing the endpoint by hand would accept.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from muse._bench._http1 import Endpoint, encode_request

__all__ = [
    "WIRES",
    "RequestSet",
    "Workload",
    "load_workload",
    "request_set",
    "scores_from_body",
    "train_model",
]

log = logging.getLogger("muse.bench")

WIRES = ("muse", "v2", "fastapi")
# Distinct request bodies kept per run; they are cycled.  Enough that no
# server can profit from seeing one body over and over, few enough that
# every body is encoded in well under a second.
MAX_DISTINCT_REQUESTS = 4096
# The default model: the 200 trees of depth 6.
DEFAULT_TREES = 200
DEFAULT_DEPTH = 6


@dataclass(frozen=True)
class Workload:
    """Events to replay and the rows to train the model on.

    Attributes:
        feature_names: column order of ``X`` and ``train_X``.
        ids: event ids, one per row of ``X``.
        X: events to send, float64, NaN = missing.
        train_X: training rows (not sent).
        train_y: 0/1 labels of ``train_X``.
        source: where the events came from, for the report.
    """

    feature_names: tuple[str, ...]
    ids: tuple[str, ...]
    X: np.ndarray
    train_X: np.ndarray
    train_y: np.ndarray
    source: str

    def events(self, start: int, stop: int) -> list[dict[str, Any]]:
        """Rows ``start:stop`` as MUSE events (NaN features left out).

        Args:
            start: first row.
            stop: one past the last row.

        Returns:
            ``[{"id": ..., "features": {name: value}}]``.
        """
        names = self.feature_names
        return [
            {
                "id": self.ids[i],
                "features": {
                    n: float(v) for n, v in zip(names, self.X[i]) if not math.isnan(v)
                },
            }
            for i in range(start, stop)
        ]


def load_workload(
    data: Path | None, n_events: int = 16384, n_train: int = 200_000, seed: int = 7
) -> Workload:
    """Load events from the data file, or generate synthetic ones.

    Args:
        data: the transactions parquet file, or None for ``muse._synthetic``.
        n_events: events to replay.
        n_train: rows to train the model on.
        seed: seed for the synthetic generator.

    Returns:
        The workload.
    """
    if data is not None:
        return _from_parquet(data, n_events, n_train)
    return _from_synthetic(n_events, n_train, seed)


def _from_parquet(path: Path, n_events: int, n_train: int) -> Workload:
    from muse import _synthetic

    names = _synthetic.FEATURES
    data = _synthetic.load_transactions(
        path, columns=(*names, "TX_FRAUD", "TRANSACTION_ID")
    )
    return _split(data, names, n_events, n_train, str(path))


def _from_synthetic(n_events: int, n_train: int, seed: int) -> Workload:
    from muse import _synthetic

    data = _synthetic.generate_transactions(n_train + n_events, seed=seed)
    source = f"muse._synthetic (seed {seed})"
    return _split(data, _synthetic.FEATURES, n_events, n_train, source)


def _split(
    data: Mapping[str, np.ndarray],
    names: tuple[str, ...],
    n_events: int,
    n_train: int,
    source: str,
) -> Workload:
    """Train on the oldest rows and replay the newest, as in production."""
    X = np.column_stack([np.asarray(data[n], dtype=np.float64) for n in names])
    total = len(X)
    replay = slice(max(total - n_events, min(n_train, total - 1)), total)
    ids = data["TRANSACTION_ID"][replay]
    return Workload(
        feature_names=names,
        ids=tuple(f"tx-{int(i)}" for i in ids),
        X=X[replay],
        train_X=X[:n_train],
        train_y=np.asarray(data["TX_FRAUD"][:n_train], dtype=np.int8),
        source=source,
    )


def train_model(
    workload: Workload,
    path: Path,
    trees: int = DEFAULT_TREES,
    depth: int = DEFAULT_DEPTH,
) -> Path:
    """Train the binary XGBoost model all servers load, and save it as JSON.

    Args:
        workload: gives training rows and feature names.
        path: where to write the model (``.json``).
        trees: boosting rounds.
        depth: maximum tree depth.

    Returns:
        ``path``.
    """
    import xgboost

    matrix = xgboost.DMatrix(
        workload.train_X,
        label=workload.train_y,
        feature_names=list(workload.feature_names),
    )
    params = {
        "objective": "binary:logistic",
        "max_depth": depth,
        "eta": 0.1,
        "tree_method": "hist",
        "nthread": 2,
        "seed": 0,
    }
    booster = xgboost.train(params, matrix, num_boost_round=trees)
    path.parent.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(path))
    log.info("trained %d trees of depth %d into %s", trees, depth, path)
    return path


@dataclass(frozen=True)
class RequestSet:
    """Request bodies for one server, one batch size, before HTTP encoding.

    Attributes:
        path: request path (below the endpoint's base path).
        headers: headers besides Host and Content-Length.
        bodies: the distinct bodies, cycled by the load generator.
        events_per_request: batch size.
    """

    path: str
    headers: dict[str, str]
    bodies: tuple[bytes, ...]
    events_per_request: int

    def encoded(self, endpoint: Endpoint) -> tuple[bytes, ...]:
        """Complete HTTP requests for the load generator.

        Args:
            endpoint: the server they go to.

        Returns:
            One request per body.
        """
        return tuple(
            encode_request("POST", endpoint, self.path, body, self.headers)
            for body in self.bodies
        )


def request_set(
    wire: str,
    workload: Workload,
    batch: int,
    *,
    key: str = "",
    intent: str = "card-fraud",
    model_name: str = "bench-xgb",
) -> RequestSet:
    """Encode the workload's events for one server's wire format.

    Args:
        wire: "muse", "v2" or "fastapi".
        workload: the events.
        batch: events per request.
        key: tenant bearer key (muse only).
        intent: scoring intent (muse only).
        model_name: model name in the V2 path (v2 only).

    Returns:
        The request set.

    Raises:
        ValueError: unknown wire, or batch larger than the workload.
    """
    count = min(len(workload.ids) // batch, MAX_DISTINCT_REQUESTS)
    if count == 0:
        raise ValueError(f"batch {batch} exceeds the {len(workload.ids)} events")
    spans = [(i * batch, (i + 1) * batch) for i in range(count)]
    if wire == "muse":
        headers = {"Content-Type": "application/msgpack"}
        headers["Authorization"] = f"Bearer {key}"
        bodies = [_msgpack_body(workload, a, b, intent) for a, b in spans]
        return RequestSet("/v1/score", headers, tuple(bodies), batch)
    if wire == "fastapi":
        headers = {"Content-Type": "application/msgpack"}
        bodies = [_msgpack_body(workload, a, b, None) for a, b in spans]
        return RequestSet("/score", headers, tuple(bodies), batch)
    if wire == "v2":
        headers = {"Content-Type": "application/json"}
        bodies = [_v2_body(workload, a, b) for a, b in spans]
        return RequestSet(
            f"/v2/models/{model_name}/infer", headers, tuple(bodies), batch
        )
    raise ValueError(f"unknown wire format {wire!r}; expected one of {WIRES}")


def _msgpack_body(
    workload: Workload, start: int, stop: int, intent: str | None
) -> bytes:
    body: dict[str, Any] = {"events": workload.events(start, stop)}
    if intent is not None:
        body["intent"] = intent
    packed: bytes = msgpack.packb(body)
    return packed


def _v2_body(workload: Workload, start: int, stop: int) -> bytes:
    rows = workload.X[start:stop].astype(np.float32)
    if np.isnan(rows).any():
        # JSON has no NaN; V2 JSON clients cannot send missing values.
        raise ValueError("V2 JSON bodies cannot carry missing (NaN) features")
    payload = {
        "inputs": [
            {
                "name": "input-0",
                "shape": list(rows.shape),
                "datatype": "FP32",
                "data": [float(v) for v in rows.ravel()],
            }
        ]
    }
    return json.dumps(payload, separators=(",", ":")).encode()


def scores_from_body(wire: str, body: bytes) -> list[float]:
    """Extract the scores from one server's response body.

    Args:
        wire: "muse", "v2" or "fastapi".
        body: the response body of a 2xx answer.

    Returns:
        One score per event, in request order.

    Raises:
        ValueError: unknown wire format.
    """
    if wire in ("muse", "fastapi"):
        return [float(r["score"]) for r in msgpack.unpackb(body)["results"]]
    if wire == "v2":
        return [float(v) for v in json.loads(body)["outputs"][0]["data"]]
    raise ValueError(f"unknown wire format {wire!r}; expected one of {WIRES}")
