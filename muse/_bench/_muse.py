"""Start a MUSE server for the bench and prepare it through the admin API.

The bench drives MUSE only through its documented HTTP API, as a user would:
``python -m muse serve`` on a free loopback port, the admin key from
``<registry>/admin.key``, then, on an empty registry, the full serving path:
the bench model as ``bench-xgb``; a predictor ``bench`` of three nodes
(model, posterior correction, quantile map) routed live for every tenant
(``*``) on the intent; a second predictor ``bench-shadow`` of the same
shape on the same compiled model, as the route's shadow, so every request
also queues a shadow job; a fresh tenant whose key the load carries; and,
once ``calibrate`` has sent some traffic, a mapping fitted for each
predictor from its own samples.  The model is uploaded with beta 1 (it was
trained on all rows), so posterior correction runs but changes nothing.
"""

from __future__ import annotations

import logging
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import msgpack

from muse._bench._http1 import Endpoint
from muse._bench._peers import ManagedServer, free_port, own_python_env

__all__ = [
    "MODEL_NAME",
    "PREDICTOR_NAME",
    "SHADOW_NAME",
    "calibrate",
    "prepare",
    "start_muse",
]

log = logging.getLogger("muse.bench")

MODEL_NAME = "bench-xgb"
PREDICTOR_NAME = "bench"
SHADOW_NAME = "bench-shadow"
# Scores each predictor needs before its mapping is fitted (the admin API's
# default minimum sample), sent in 64-event requests.
CALIBRATION_EVENTS = 2048
# Model import compiles the trees to native code, which takes a while for
# 200 trees on two busy cores.
ADMIN_TIMEOUT_S = 300.0
# How long a fresh server may take to write its admin key.
KEY_TIMEOUT_S = 30.0


def start_muse(registry: Path, workdir: Path) -> ManagedServer:
    """Run ``python -m muse serve`` on a registry, on a free loopback port.

    Args:
        registry: registry directory (created by the server if absent).
        workdir: where the server's log goes.

    Returns:
        The running server (live, not necessarily ready); the caller stops it.

    Raises:
        RuntimeError: it did not come up (message has its log's tail).
    """
    endpoint = Endpoint("127.0.0.1", free_port())
    argv = [
        sys.executable,
        "-m",
        "muse",
        "serve",
        "--registry",
        str(registry),
        "--bind",
        f"{endpoint.host}:{endpoint.port}",
        "--log-level",
        "WARNING",
    ]
    server = ManagedServer(
        "muse", argv, endpoint, "muse", cwd=workdir, env=own_python_env()
    )
    server.start()
    try:
        server.wait_ready("/healthz")
        _wait_for_file(registry / "admin.key", KEY_TIMEOUT_S)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_for_file(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {timeout_s}s")
        time.sleep(0.1)


class _Admin:
    """The few admin calls the bench needs, msgpack over httpx."""

    def __init__(self, endpoint: Endpoint, key: str) -> None:
        self._client = httpx.Client(
            base_url=endpoint.url,
            headers={
                "Authorization": f"Bearer {key}",
                "Content-Type": "application/msgpack",
                "Accept": "application/msgpack",
            },
            timeout=ADMIN_TIMEOUT_S,
        )

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        content = msgpack.packb(body) if body is not None else None
        response = self._client.request(method, path, content=content)
        if response.status_code >= 300:
            raise RuntimeError(
                f"{method} {path} answered {response.status_code}: "
                f"{_decode(response.content)!r}"
            )
        return _decode(response.content)

    def close(self) -> None:
        self._client.close()


def _decode(content: bytes) -> Any:
    try:
        return msgpack.unpackb(content)
    except (ValueError, msgpack.ExtraData):
        return content[:200]


def prepare(
    endpoint: Endpoint,
    admin_key: str,
    model_path: Callable[[], Path],
    feature_names: Sequence[str],
    intent: str,
) -> tuple[str, str]:
    """Set up the bench model on an empty registry, and create a tenant.

    Args:
        endpoint: the running MUSE server.
        admin_key: its admin key.
        model_path: gives the XGBoost JSON model file; called only when the
            registry is empty (training it takes a while).
        feature_names: the model's features, in order.
        intent: intent to route (for every tenant).

    Returns:
        The new tenant's name and bearer key.

    Raises:
        RuntimeError: an admin call failed (status and error body in message).
    """
    admin = _Admin(endpoint, admin_key)
    try:
        if not admin.call("GET", "/v1/models"):
            _install_model(admin, model_path(), feature_names, intent)
        else:
            log.info("registry not empty: using the route it has for %r", intent)
        tenant = f"bench-{secrets.token_hex(3)}"
        created = admin.call("PUT", f"/v1/tenants/{tenant}", {})
        return tenant, str(created["key"])
    finally:
        admin.close()


def _install_model(
    admin: _Admin, model_path: Path, feature_names: Sequence[str], intent: str
) -> None:
    model = admin.call(
        "PUT",
        f"/v1/models/{MODEL_NAME}",
        {
            "data": model_path.read_bytes(),
            "format": "xgboost_json",
            "feature_names": list(feature_names),
            "beta": 1.0,
        },
    )
    refs = {}
    for name in (PREDICTOR_NAME, SHADOW_NAME):
        spec = {
            "name": name,
            "nodes": [
                {"id": "xgb", "kind": "model", "model": model["ref"]},
                {"id": "pc", "kind": "posterior_correction", "input": "xgb"},
                {"id": "qm", "kind": "quantile_map", "input": "pc"},
            ],
            "output": "qm",
        }
        refs[name] = admin.call("PUT", f"/v1/predictors/{name}", {"spec": spec})["ref"]
    admin.call(
        "PUT",
        f"/v1/routes/*/{intent}",
        {
            "live": refs[PREDICTOR_NAME],
            "shadows": [refs[SHADOW_NAME]],
            "expect_version": None,
        },
    )
    log.info(
        "routed %s -> %s, shadow %s (model %s)",
        intent,
        refs[PREDICTOR_NAME],
        refs[SHADOW_NAME],
        model["ref"],
    )


def calibrate(
    endpoint: Endpoint,
    admin_key: str,
    tenant_key: str,
    intent: str,
    events: Sequence[dict[str, Any]],
) -> dict[str, Any] | None:
    """Send scoring traffic, then fit each routed predictor's mapping.

    Args:
        endpoint: the running MUSE server.
        admin_key: its admin key.
        tenant_key: a tenant's key to score with.
        intent: the routed intent.
        events: MUSE events to send (cycled up to ``CALIBRATION_EVENTS``).

    Returns:
        The live predictor's fitted mapping (``to_dict`` form), or None when
        the route is not the bench's own (a registry prepared elsewhere).

    Raises:
        RuntimeError: a call failed.
    """
    admin = _Admin(endpoint, admin_key)
    try:
        routes = admin.call("GET", "/v1/routes")
        route = _route_for(routes, intent)
        if route is None or not route["live"].startswith(PREDICTOR_NAME + "@"):
            return None
        scorer = _Admin(endpoint, tenant_key)
        try:
            for start in range(0, CALIBRATION_EVENTS, 64):
                chunk = [events[(start + k) % len(events)] for k in range(64)]
                scorer.call("POST", "/v1/score", {"intent": intent, "events": chunk})
        finally:
            scorer.close()
        for shadow in route.get("shadows", []):
            admin.call(
                "POST",
                "/v1/mappings/fit",
                {"predictor": shadow, "scope": "global", "source": "shadow"},
            )
        fitted: dict[str, Any] = admin.call(
            "POST",
            "/v1/mappings/fit",
            {"predictor": route["live"], "scope": "global", "source": "live"},
        )
        log.info("mappings fitted for %s and its shadows", route["live"])
        return fitted
    finally:
        admin.close()


def _route_for(routes: Any, intent: str) -> dict[str, Any] | None:
    """The ``*`` route for ``intent`` in a ``GET /v1/routes`` answer."""
    route = routes.get("routes", {}).get("*", {}).get(intent)
    return route if isinstance(route, dict) else None
