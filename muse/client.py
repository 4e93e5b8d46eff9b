"""A small msgpack client for MUSE's HTTP API, sync and async, on httpx.

    from muse.client import Client
    with Client("http://127.0.0.1:8000", key) as client:
        results = client.score("card-fraud", [{"id": "tx-1", "features": {...}}])

Error responses raise ``ApiError`` carrying the status and the server's
``error`` code and ``detail``.  The async twin has the same methods.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import msgpack

__all__ = ["ApiError", "Client", "AsyncClient"]

_MSGPACK = "application/msgpack"


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


class _Requests:
    """What both clients send: method, path and body per operation."""

    @staticmethod
    def score(intent: str, events: Sequence[Mapping[str, Any]], deadline_ms: float | None) -> tuple[str, str, Any]:
        body: dict[str, Any] = {"intent": intent, "events": list(events)}
        if deadline_ms is not None:
            body["deadline_ms"] = deadline_ms
        return "POST", "/v1/score", body

    @staticmethod
    def put_model(name: str, data: bytes, format: str, feature_names: Sequence[str] | None,
                  beta: float) -> tuple[str, str, Any]:
        body = {"data": data, "format": format, "beta": beta,
                "feature_names": list(feature_names) if feature_names else None}
        return "PUT", f"/v1/models/{name}", body


class Client:
    """Blocking client.

    Args:
        url: the server's base URL.
        key: a tenant key (for scoring) or the admin key.
        timeout: seconds per request.
    """

    def __init__(self, url: str, key: str, *, timeout: float = 30.0) -> None:
        self._http = httpx.Client(
            base_url=url, timeout=timeout,
            headers={"authorization": f"Bearer {key}", "accept": _MSGPACK},
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """Send one request; msgpack both ways."""
        content = None if body is None else msgpack.packb(body, use_bin_type=True)
        headers = {"content-type": _MSGPACK} if content is not None else {}
        return _decode(self._http.request(method, path, content=content, headers=headers))

    def score(self, intent: str, events: Sequence[Mapping[str, Any]],
              *, deadline_ms: float | None = None) -> list[dict[str, Any]]:
        return self.call(*_Requests.score(intent, events, deadline_ms))["results"]  # type: ignore[no-any-return]

    def put_model(self, name: str, data: bytes, format: str, *,
                  feature_names: Sequence[str] | None = None, beta: float = 1.0) -> dict[str, Any]:
        return self.call(*_Requests.put_model(name, data, format, feature_names, beta))  # type: ignore[no-any-return]

    def put_predictor(self, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        return self.call("PUT", f"/v1/predictors/{name}", {"spec": dict(spec)})  # type: ignore[no-any-return]

    def put_route(self, tenant: str, intent: str, live: str, shadows: Sequence[str] = (),
                  *, expect_version: int | None = None) -> dict[str, Any]:
        body = {"live": live, "shadows": list(shadows), "expect_version": expect_version}
        return self.call("PUT", f"/v1/routes/{tenant}/{intent}", body)  # type: ignore[no-any-return]

    def fit_mapping(self, predictor: str, *, scope: str = "global", source: str = "shadow",
                    curve: Mapping[float, float] | None = None,
                    min_sample: int | None = None) -> dict[str, Any]:
        body = {"predictor": predictor, "scope": scope, "source": source,
                "curve": {str(k): v for k, v in curve.items()} if curve else None,
                "min_sample": min_sample}
        return self.call("POST", "/v1/mappings/fit", body)  # type: ignore[no-any-return]

    def promote(self, tenant: str, intent: str, version: str | None = None,
                *, expect_version: int | None = None) -> dict[str, Any]:
        body = {"version": version, "expect_version": expect_version}
        return self.call("POST", f"/v1/routes/{tenant}/{intent}/promote", body)  # type: ignore[no-any-return]

    def rollback(self, tenant: str, intent: str, *, expect_version: int | None = None) -> dict[str, Any]:
        body = {"expect_version": expect_version}
        return self.call("POST", f"/v1/routes/{tenant}/{intent}/rollback", body)  # type: ignore[no-any-return]

    def create_tenant(self, tenant: str) -> str:
        return str(self.call("PUT", f"/v1/tenants/{tenant}", {})["key"])

    def listing(self, what: str) -> Any:
        return self.call("GET", f"/v1/{what}")


class AsyncClient:
    """The async twin of ``Client`` (works under trio and asyncio)."""

    def __init__(self, url: str, key: str, *, timeout: float = 30.0,
                 limits: httpx.Limits | None = None) -> None:
        self._http = httpx.AsyncClient(
            base_url=url, timeout=timeout, limits=limits or httpx.Limits(),
            headers={"authorization": f"Bearer {key}", "accept": _MSGPACK},
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        content = None if body is None else msgpack.packb(body, use_bin_type=True)
        headers = {"content-type": _MSGPACK} if content is not None else {}
        return _decode(await self._http.request(method, path, content=content, headers=headers))

    async def score(self, intent: str, events: Sequence[Mapping[str, Any]],
                    *, deadline_ms: float | None = None) -> list[dict[str, Any]]:
        return (await self.call(*_Requests.score(intent, events, deadline_ms)))["results"]  # type: ignore[no-any-return]

    async def put_model(self, name: str, data: bytes, format: str, *,
                        feature_names: Sequence[str] | None = None, beta: float = 1.0) -> dict[str, Any]:
        return await self.call(*_Requests.put_model(name, data, format, feature_names, beta))  # type: ignore[no-any-return]

    async def put_predictor(self, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        return await self.call("PUT", f"/v1/predictors/{name}", {"spec": dict(spec)})  # type: ignore[no-any-return]

    async def put_route(self, tenant: str, intent: str, live: str, shadows: Sequence[str] = (),
                        *, expect_version: int | None = None) -> dict[str, Any]:
        body = {"live": live, "shadows": list(shadows), "expect_version": expect_version}
        return await self.call("PUT", f"/v1/routes/{tenant}/{intent}", body)  # type: ignore[no-any-return]

    async def fit_mapping(self, predictor: str, *, scope: str = "global", source: str = "shadow",
                          curve: Mapping[float, float] | None = None,
                          min_sample: int | None = None) -> dict[str, Any]:
        body = {"predictor": predictor, "scope": scope, "source": source,
                "curve": {str(k): v for k, v in curve.items()} if curve else None,
                "min_sample": min_sample}
        return await self.call("POST", "/v1/mappings/fit", body)  # type: ignore[no-any-return]

    async def promote(self, tenant: str, intent: str, version: str | None = None,
                      *, expect_version: int | None = None) -> dict[str, Any]:
        body = {"version": version, "expect_version": expect_version}
        return await self.call("POST", f"/v1/routes/{tenant}/{intent}/promote", body)  # type: ignore[no-any-return]

    async def rollback(self, tenant: str, intent: str, *,
                       expect_version: int | None = None) -> dict[str, Any]:
        body = {"expect_version": expect_version}
        return await self.call("POST", f"/v1/routes/{tenant}/{intent}/rollback", body)  # type: ignore[no-any-return]

    async def create_tenant(self, tenant: str) -> str:
        return str((await self.call("PUT", f"/v1/tenants/{tenant}", {}))["key"])

    async def listing(self, what: str) -> Any:
        return await self.call("GET", f"/v1/{what}")
