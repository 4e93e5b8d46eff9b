"""Every error MUSE raises on purpose.

Two families, each carrying the HTTP status a server should answer with
(in the manner of h11's ``error_status_hint``): ``ClientError`` for what the
caller sent or asked for, ``ServerError`` for a server that is up but cannot
serve right now.  ``InternalError`` is reserved for MUSE's own bugs; the HTTP
layer answers it with 500 and logs it, and nothing a client sends should ever
reach it.

Messages say what was expected, what came, and where.
"""

from __future__ import annotations

__all__ = [
    "MuseError",
    "ClientError",
    "BadRequest",
    "InvalidEvent",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "Conflict",
    "PayloadTooLarge",
    "UnsupportedMediaType",
    "TooManyRequests",
    "ServerError",
    "Overloaded",
    "DeadlineExceeded",
    "NotReady",
    "ModelImportError",
    "ParityError",
    "MappingFitError",
    "PredictorSpecError",
    "RegistryError",
    "StorageFull",
    "InternalError",
]


# Longest error detail sent to a client.
MAX_DETAIL = 1000


class MuseError(Exception):
    """Base of every error MUSE raises on purpose."""

    #: HTTP status a server answers with when this error reaches the edge.
    status: int = 500
    #: Short machine-readable code, sent as ``error`` in response bodies.
    code: str = "internal"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def to_body(self) -> dict[str, str]:
        """The error as a response body: ``{"error": code, "detail": text}``.

        The detail is cut at ``MAX_DETAIL`` characters: it may quote what
        the client sent, and a megabyte intent need not come back whole.
        """
        detail = self.detail
        if len(detail) > MAX_DETAIL:
            detail = detail[:MAX_DETAIL] + f"... ({len(detail)} characters)"
        return {"error": self.code, "detail": detail}


class ClientError(MuseError):
    """The request was wrong; retrying it unchanged will fail again."""

    status = 400
    code = "bad_request"


class BadRequest(ClientError, ValueError):
    """The request is malformed or names something inconsistent."""


class InvalidEvent(BadRequest):
    """One event of a scoring request is unusable.

    Attributes:
        event: the event's id (or its index when it has none).
        feature: the offending feature name, or None.
    """

    code = "invalid_event"

    def __init__(
        self, detail: str, *, event: object = None, feature: str | None = None
    ) -> None:
        super().__init__(detail)
        self.event = event
        self.feature = feature


class Unauthorized(ClientError):
    """No credentials, or credentials that match no key."""

    status = 401
    code = "unauthorized"


class Forbidden(ClientError):
    """Valid credentials that may not do this (wrong tenant, not admin)."""

    status = 403
    code = "forbidden"


class NotFound(ClientError, LookupError):
    """No route, model, predictor, mapping or tenant of that name."""

    status = 404
    code = "not_found"


class Conflict(ClientError):
    """A write named a version to replace that is no longer current, or a
    state change is not allowed from the current state."""

    status = 409
    code = "conflict"


class PayloadTooLarge(ClientError):
    """The body or the batch is over its configured limit."""

    status = 413
    code = "too_large"


class UnsupportedMediaType(ClientError):
    """The Content-Type is not one MUSE decodes."""

    status = 415
    code = "unsupported_media_type"


class TooManyRequests(ClientError):
    """The tenant is over its quota; ``retry_after`` says when to come back."""

    status = 429
    code = "quota_exceeded"

    def __init__(self, detail: str, *, retry_after: float = 1.0) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class ModelImportError(BadRequest):
    """A model file could not be imported or compiled."""

    code = "model_import"


class ParityError(BadRequest):
    """Compiled predictions differ from the native library on golden rows."""

    code = "model_parity"


class MappingFitError(BadRequest):
    """A quantile mapping cannot be fitted (or loaded) from what was given."""

    code = "mapping_fit"


class PredictorSpecError(BadRequest):
    """A predictor declaration is invalid; the message names the node."""

    code = "predictor_spec"


class ServerError(MuseError):
    """The server cannot serve this now; the same request may succeed later."""

    status = 503
    code = "unavailable"


class Overloaded(ServerError):
    """Every queue is full; answered at once rather than queued."""

    code = "overloaded"

    def __init__(self, detail: str, *, retry_after: float = 1.0) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class DeadlineExceeded(ServerError):
    """The request's deadline passed; its remaining work was cancelled."""

    status = 504
    code = "deadline_exceeded"


class NotReady(ServerError):
    """A routed predictor is not loaded yet."""

    code = "not_ready"


class RegistryError(ServerError):
    """The on-disk registry could not be read or written."""

    code = "registry"


class StorageFull(RegistryError):
    """The registry's disk is full; nothing already stored was touched."""

    status = 507
    code = "storage_full"


class InternalError(MuseError):
    """A bug in MUSE itself.  Never raised for anything a client sent."""

    status = 500
    code = "internal"
