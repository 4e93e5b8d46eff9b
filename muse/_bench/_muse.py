"""Start a MUSE server for the bench and prepare it through the admin API.

The bench drives MUSE only through its documented HTTP API, as a user would:
``python -m muse serve`` on a free loopback port, the admin key from
``<registry>/admin.key``, then, on an empty registry, the bench model as
``bench-xgb``, a one-node predictor ``bench`` (so the score is the model's
own probability, comparable with the peers') routed live for every tenant
(``*``) on the intent, and a fresh tenant whose key the load carries.
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

__all__ = ["MODEL_NAME", "PREDICTOR_NAME", "prepare", "start_muse"]

log = logging.getLogger("muse.bench")

MODEL_NAME = "bench-xgb"
PREDICTOR_NAME = "bench"
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
    spec = {
        "name": PREDICTOR_NAME,
        "nodes": [{"id": "xgb", "kind": "model", "model": model["ref"]}],
        "output": "xgb",
    }
    predictor = admin.call("PUT", f"/v1/predictors/{PREDICTOR_NAME}", {"spec": spec})
    admin.call(
        "PUT",
        f"/v1/routes/*/{intent}",
        {"live": predictor["ref"], "shadows": [], "expect_version": None},
    )
    log.info("routed %s -> %s (model %s)", intent, predictor["ref"], model["ref"])
