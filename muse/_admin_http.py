"""The admin API on quart-trio: models, predictors, routes, mappings, tenants.

Thin by design: each view authenticates, decodes and checks its body's
fields, calls one ``engine.admin`` operation and encodes the result.  Errors
are ``MuseError``s turned into ``{"error", "detail"}`` bodies by one handler;
quart's own HTTP errors (unknown path, wrong method) get the same shape.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from typing import Any

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from muse._errors import BadRequest, InternalError, MuseError
from muse._wire import JSON, MSGPACK, decode_body, encode_body, media_type

__all__ = ["build_admin_app"]

log = logging.getLogger("muse.http")


def build_admin_app(engine: Any, max_body: int) -> QuartTrio:
    """A quart-trio app serving the admin API of ``engine``."""
    app = QuartTrio("muse")
    app.config["MAX_CONTENT_LENGTH"] = max_body
    admin = engine.admin

    def view(
        rule: str, methods: list[str], status: int = 200, fields: str = ""
    ) -> Callable[[Any], Any]:
        allowed = frozenset(fields.split())

        def register(handler: Callable[..., Any]) -> Callable[..., Any]:
            async def endpoint(**params: Any) -> Response:
                engine.authenticate(
                    request.headers.get("authorization")
                ).require_admin()
                body = await _body() if request.method in ("PUT", "POST") else {}
                _known_fields(body, allowed)
                result = await handler(body, **params)
                return _reply(result, status)

            endpoint.__name__ = handler.__name__
            app.add_url_rule(rule, view_func=endpoint, methods=methods)
            return handler

        return register

    @view("/v1/models/<name>", ["PUT"], 201, "data format feature_names beta golden")
    async def put_model(body: dict[str, Any], name: str) -> Any:
        data = body.get("data")
        if isinstance(data, str):  # JSON clients send base64
            try:
                data = base64.b64decode(data, validate=True)
            except ValueError as exc:
                raise BadRequest("'data' must be bytes (or base64 in JSON)") from exc
        if not isinstance(data, bytes) or not data:
            raise BadRequest("'data' must hold the model file's bytes")
        return await admin.put_model(
            name,
            data,
            _field(body, "format", str),
            feature_names=_optional(body, "feature_names", list),
            beta=_beta(body),
            golden=body.get("golden"),
        )

    @view("/v1/predictors/<name>", ["PUT"], 201, "spec")
    async def put_predictor(body: dict[str, Any], name: str) -> Any:
        return await admin.put_predictor(name, _field(body, "spec", dict))

    @view("/v1/routes/<tenant>/<intent>", ["PUT"], 200, "live shadows expect_version")
    async def put_route(body: dict[str, Any], tenant: str, intent: str) -> Any:
        shadows = _optional(body, "shadows", list) or []
        if not all(isinstance(s, str) for s in shadows):
            raise BadRequest("'shadows' must be a list of predictor refs")
        return await admin.set_route(
            tenant,
            intent,
            _field(body, "live", str),
            tuple(shadows),
            expect_version=_optional(body, "expect_version", int),
        )

    @view("/v1/routes/<tenant>/<intent>", ["DELETE"])
    async def delete_route(body: dict[str, Any], tenant: str, intent: str) -> Any:
        return await admin.delete_route(tenant, intent, expect_version=None)

    @view(
        "/v1/routes/<tenant>/<intent>/promote", ["POST"], 200, "version expect_version"
    )
    async def promote(body: dict[str, Any], tenant: str, intent: str) -> Any:
        return await admin.promote(
            tenant,
            intent,
            _optional(body, "version", str),
            expect_version=_optional(body, "expect_version", int),
        )

    @view("/v1/routes/<tenant>/<intent>/rollback", ["POST"], 200, "expect_version")
    async def rollback(body: dict[str, Any], tenant: str, intent: str) -> Any:
        return await admin.rollback(
            tenant, intent, expect_version=_optional(body, "expect_version", int)
        )

    @view(
        "/v1/mappings/fit",
        ["POST"],
        201,
        "predictor scope source curve min_sample",
    )
    async def fit_mapping(body: dict[str, Any]) -> Any:
        return await admin.fit_mapping(
            _field(body, "predictor", str),
            scope=_default(_optional(body, "scope", str), "global"),
            source=_default(_optional(body, "source", str), "shadow"),
            curve=_optional(body, "curve", dict),
            min_sample=_optional(body, "min_sample", int),
        )

    @view("/v1/tenants/<tenant>", ["PUT"], 201)
    async def create_tenant(body: dict[str, Any], tenant: str) -> Any:
        return await admin.create_tenant(tenant)

    @view("/v1/tenants/<tenant>/rotate", ["POST"], 201)
    async def rotate_key(body: dict[str, Any], tenant: str) -> Any:
        return await admin.rotate_key(tenant)

    @view("/v1/tenants/<tenant>", ["DELETE"])
    async def revoke(body: dict[str, Any], tenant: str) -> Any:
        return await admin.revoke_keys(tenant)

    for what in ("models", "predictors", "mappings", "routes", "tenants"):
        _listing(app, engine, what)

    @app.errorhandler(MuseError)
    async def muse_error(exc: MuseError) -> Response:
        if exc.status >= 500:
            log.warning("admin request failed with %d: %s", exc.status, exc.detail)
        return _reply(exc.to_body(), exc.status)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        code = (exc.name or "error").lower().replace(" ", "_")
        return _reply(
            {"error": code, "detail": exc.description or code}, exc.code or 400
        )

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        log.exception("unexpected error in the admin API")
        return _reply(
            InternalError("internal error; see the server log").to_body(), 500
        )

    return app


def _listing(app: QuartTrio, engine: Any, what: str) -> None:
    async def endpoint() -> Response:
        engine.authenticate(request.headers.get("authorization")).require_admin()
        return _reply(await engine.admin.listing(what), 200)

    endpoint.__name__ = f"list_{what}"
    app.add_url_rule(f"/v1/{what}", view_func=endpoint, methods=["GET"])


async def _body() -> dict[str, Any]:
    data = await request.get_data(cache=False, as_text=False)
    if not data:
        # Calls with nothing to say (create a tenant, promote the only
        # shadow) need no body and so no Content-Type.
        return {}
    document = decode_body(data, media_type(request.headers.get("content-type")))
    if not isinstance(document, dict):
        raise BadRequest("body must be a map")
    return document


def _reply(value: Any, status: int) -> Response:
    kind = _response_kind()
    return Response(encode_body(value, kind), status=status, content_type=kind)


def _response_kind() -> str:
    content_type = request.headers.get("content-type", "")
    accept = request.headers.get("accept", "")
    if "json" in content_type.lower() or ("json" in accept and "msgpack" not in accept):
        return JSON
    return MSGPACK


def _beta(body: dict[str, Any]) -> float:
    # 0 is a value to refuse, not an absent one: test for None, not falsiness.
    beta = _optional(body, "beta", (int, float))
    return 1.0 if beta is None else float(beta)


def _known_fields(body: Any, allowed: frozenset[str]) -> None:
    # A misspelt option ('Beta', 'shadow') would otherwise be dropped and
    # its default used, with a 201 that says nothing.
    if not isinstance(body, dict):
        return
    unknown = sorted(str(k)[:40] for k in body if k not in allowed)
    if unknown:
        expected = ", ".join(sorted(allowed)) if allowed else "no body"
        raise BadRequest(
            f"unknown field(s) {', '.join(map(repr, unknown))}; expected {expected}"
        )


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(name)
    if value is None:
        raise BadRequest(f"field {name!r} is required")
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadRequest(f"field {name!r} has the wrong type: {type(value).__name__}")
    return value


def _optional(body: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    return None if body.get(name) is None else _field(body, name, kind)


def _default(value: Any, default: Any) -> Any:
    # Only an absent (or nil) field takes the default: an empty string is a
    # value, and refused as one.
    return default if value is None else value
