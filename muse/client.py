"""A small msgpack client for MUSE's HTTP API, sync and async, on httpx.

    from muse.client import Client
    with Client("http://127.0.0.1:8000", key) as client:
        results = client.score("card-fraud", [{"id": "tx-1", "features": {...}}])

Error responses raise ``ApiError`` carrying the status and the server's
``error`` code and ``detail``.  ``AsyncClient`` has the same methods, awaited.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import msgpack

__all__ = ["ApiError", "Client", "AsyncClient"]

_MSGPACK = "application/msgpack"
Call = tuple[str, str, Any]


class ApiError(Exception):
    """The server answered with an error status.

    Attributes:
        status: the HTTP status.
        code: the server's ``error`` field.
        detail: the server's ``detail`` field.
    """

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail


# -- what each operation sends: (method, path, body) -------------------------


def _score(intent: str, events: Sequence[Mapping[str, Any]], deadline_ms: float | None) -> Call:
    body: dict[str, Any] = {"intent": intent, "events": list(events)}
    if deadline_ms is not None:
        body["deadline_ms"] = deadline_ms
    return "POST", "/v1/score", body


def _put_model(name: str, data: bytes, format: str,
               feature_names: Sequence[str] | None, beta: float) -> Call:
    names = list(feature_names) if feature_names else None
    body = {"data": data, "format": format, "beta": beta, "feature_names": names}
    return "PUT", f"/v1/models/{name}", body


def _put_route(tenant: str, intent: str, live: str, shadows: Sequence[str],
               expect_version: int | None) -> Call:
    body = {"live": live, "shadows": list(shadows), "expect_version": expect_version}
    return "PUT", f"/v1/routes/{tenant}/{intent}", body


def _fit_mapping(predictor: str, scope: str, source: str,
                 curve: Mapping[float, float] | None, min_sample: int | None) -> Call:
    body = {
        "predictor": predictor, "scope": scope, "source": source,
        "curve": {str(k): v for k, v in curve.items()} if curve else None,
        "min_sample": min_sample,
    }
    return "POST", "/v1/mappings/fit", body


def _route_action(tenant: str, intent: str, action: str, body: dict[str, Any]) -> Call:
    return "POST", f"/v1/routes/{tenant}/{intent}/{action}", body


def _decode(response: httpx.Response) -> Any:
    content_type = response.headers.get("content-type", "")
    if "msgpack" in content_type:
        body = msgpack.unpackb(response.content, raw=False, strict_map_key=False)
    elif "json" in content_type:
        body = response.json()
    else:
        body = response.text
    if response.status_code >= 400:
        if isinstance(body, dict):
            raise ApiError(response.status_code, str(body.get("error")), str(body.get("detail")))
        raise ApiError(response.status_code, "http_error", str(body)[:200])
    return body


def _encode(body: Any) -> tuple[bytes | None, dict[str, str]]:
    if body is None:
        return None, {}
    return msgpack.packb(body, use_bin_type=True), {"content-type": _MSGPACK}


def _headers(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}", "accept": _MSGPACK}


class Client:
    """Blocking client.

    Args:
        url: the server's base URL.
        key: a tenant key (for scoring) or the admin key.
        timeout: seconds per request.
    """

    def __init__(self, url: str, key: str, *, timeout: float = 30.0) -> None:
        self._http = httpx.Client(base_url=url, timeout=timeout, headers=_headers(key))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """Send one request, msgpack both ways; raises ApiError on 4xx/5xx."""
        content, headers = _encode(body)
        return _decode(self._http.request(method, path, content=content, headers=headers))

    def score(self, intent: str, events: Sequence[Mapping[str, Any]],
              *, deadline_ms: float | None = None) -> list[dict[str, Any]]:
        return self.call(*_score(intent, events, deadline_ms))["results"]  # type: ignore[no-any-return]

    def put_model(self, name: str, data: bytes, format: str, *,
                  feature_names: Sequence[str] | None = None, beta: float = 1.0) -> Any:
        return self.call(*_put_model(name, data, format, feature_names, beta))

    def put_predictor(self, name: str, spec: Mapping[str, Any]) -> Any:
        return self.call("PUT", f"/v1/predictors/{name}", {"spec": dict(spec)})

    def put_route(self, tenant: str, intent: str, live: str, shadows: Sequence[str] = (),
                  *, expect_version: int | None = None) -> Any:
        return self.call(*_put_route(tenant, intent, live, shadows, expect_version))

    def fit_mapping(self, predictor: str, *, scope: str = "global", source: str = "shadow",
                    curve: Mapping[float, float] | None = None,
                    min_sample: int | None = None) -> Any:
        return self.call(*_fit_mapping(predictor, scope, source, curve, min_sample))

    def promote(self, tenant: str, intent: str, version: str | None = None,
                *, expect_version: int | None = None) -> Any:
        body = {"version": version, "expect_version": expect_version}
        return self.call(*_route_action(tenant, intent, "promote", body))

    def rollback(self, tenant: str, intent: str, *, expect_version: int | None = None) -> Any:
        body = {"expect_version": expect_version}
        return self.call(*_route_action(tenant, intent, "rollback", body))

    def create_tenant(self, tenant: str) -> str:
        return str(self.call("PUT", f"/v1/tenants/{tenant}", {})["key"])

    def listing(self, what: str) -> Any:
        return self.call("GET", f"/v1/{what}")


class AsyncClient:
    """The async twin of ``Client`` (under trio or asyncio)."""

    def __init__(self, url: str, key: str, *, timeout: float = 30.0,
                 limits: httpx.Limits | None = None) -> None:
        self._http = httpx.AsyncClient(
            base_url=url, timeout=timeout, headers=_headers(key),
            limits=limits or httpx.Limits(),
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        """Send one request, msgpack both ways; raises ApiError on 4xx/5xx."""
        content, headers = _encode(body)
        response = await self._http.request(method, path, content=content, headers=headers)
        return _decode(response)

    async def score(self, intent: str, events: Sequence[Mapping[str, Any]],
                    *, deadline_ms: float | None = None) -> list[dict[str, Any]]:
        return (await self.call(*_score(intent, events, deadline_ms)))["results"]  # type: ignore[no-any-return]

    async def put_model(self, name: str, data: bytes, format: str, *,
                        feature_names: Sequence[str] | None = None, beta: float = 1.0) -> Any:
        return await self.call(*_put_model(name, data, format, feature_names, beta))

    async def put_predictor(self, name: str, spec: Mapping[str, Any]) -> Any:
        return await self.call("PUT", f"/v1/predictors/{name}", {"spec": dict(spec)})

    async def put_route(self, tenant: str, intent: str, live: str, shadows: Sequence[str] = (),
                        *, expect_version: int | None = None) -> Any:
        return await self.call(*_put_route(tenant, intent, live, shadows, expect_version))

    async def fit_mapping(self, predictor: str, *, scope: str = "global",
                          source: str = "shadow", curve: Mapping[float, float] | None = None,
                          min_sample: int | None = None) -> Any:
        return await self.call(*_fit_mapping(predictor, scope, source, curve, min_sample))

    async def promote(self, tenant: str, intent: str, version: str | None = None,
                      *, expect_version: int | None = None) -> Any:
        body = {"version": version, "expect_version": expect_version}
        return await self.call(*_route_action(tenant, intent, "promote", body))

    async def rollback(self, tenant: str, intent: str, *,
                       expect_version: int | None = None) -> Any:
        body = {"expect_version": expect_version}
        return await self.call(*_route_action(tenant, intent, "rollback", body))

    async def create_tenant(self, tenant: str) -> str:
        return str((await self.call("PUT", f"/v1/tenants/{tenant}", {}))["key"])

    async def listing(self, what: str) -> Any:
        return await self.call("GET", f"/v1/{what}")
