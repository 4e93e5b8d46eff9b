"""Tenant and admin keys: who is calling.  Plain data, no I/O.

Keys are random 256-bit tokens shown once when made; only their SHA-256 is
kept.  A fast unsalted hash is enough because the tokens carry full entropy:
there is no password to guess, and lookup stays one dict access per request.

The key document is versioned like the route table and published to the
registry before it takes effect.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from muse._errors import Conflict, Forbidden, NotFound, Unauthorized

__all__ = ["ADMIN", "Principal", "KeyTable", "new_token", "token_hash"]

ADMIN = "__admin__"
_PREFIX = "muse_"


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller a key belongs to: one tenant, or the admin."""

    tenant: str

    @property
    def is_admin(self) -> bool:
        return self.tenant == ADMIN

    def require_admin(self) -> None:
        """Raises Forbidden unless the key is the admin key."""
        if not self.is_admin:
            raise Forbidden("this operation needs the admin key")


def new_token() -> str:
    """A fresh key to hand out once."""
    return _PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class KeyTable:
    """Key hashes by owner, at one version.

    Attributes:
        version: bumped by every change.
        owners: tenant (or ``ADMIN``) -> tuple of key records
            ``{"hash": ..., "created": unix time}``.
    """

    version: int = 0
    owners: Mapping[str, tuple[Mapping[str, Any], ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    def __post_init__(self) -> None:
        index = {
            record["hash"]: Principal(owner)
            for owner, records in self.owners.items()
            for record in records
        }
        object.__setattr__(self, "_index", index)

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal behind an ``Authorization: Bearer`` header value.

        Raises:
            Unauthorized: no header, not a bearer token, or an unknown key.
        """
        if not authorization:
            raise Unauthorized("missing Authorization header (Bearer key)")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("Authorization must be 'Bearer <key>'")
        principal: Principal | None = self._index.get(  # type: ignore[attr-defined]
            token_hash(token.strip())
        )
        if principal is None:
            raise Unauthorized("unknown or revoked key")
        return principal

    def tenants(self) -> list[str]:
        """Tenants that have at least one key."""
        return sorted(t for t, keys in self.owners.items() if t != ADMIN and keys)

    def has_admin(self) -> bool:
        return bool(self.owners.get(ADMIN))

    def with_new_key(self, owner: str, *, replace_all: bool) -> tuple[KeyTable, str]:
        """Add a key for ``owner``; with ``replace_all`` the old ones go.

        Returns:
            The new table and the token, which is never stored.
        """
        token = new_token()
        record = MappingProxyType({"hash": token_hash(token), "created": time.time()})
        kept = () if replace_all else self.owners.get(owner, ())
        return self._with(owner, (*kept, record)), token

    def with_tenant(self, tenant: str) -> tuple[KeyTable, str]:
        """Create a tenant with its first key.

        Raises:
            Conflict: the tenant already exists.
        """
        if self.owners.get(tenant):
            raise Conflict(f"tenant {tenant!r} already exists; rotate its key instead")
        return self.with_new_key(tenant, replace_all=True)

    def without_keys(self, tenant: str) -> KeyTable:
        """Revoke every key of a tenant.

        Raises:
            NotFound: the tenant has no keys.
        """
        if not self.owners.get(tenant):
            raise NotFound(f"tenant {tenant!r} has no keys")
        return self._with(tenant, ())

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "owners": {o: [dict(r) for r in rs] for o, rs in self.owners.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KeyTable:
        owners = {
            str(owner): tuple(MappingProxyType(dict(r)) for r in records)
            for owner, records in data.get("owners", {}).items()
        }
        return cls(int(data.get("version", 0)), MappingProxyType(owners))

    def _with(self, owner: str, records: tuple[Mapping[str, Any], ...]) -> KeyTable:
        owners = dict(self.owners)
        owners[owner] = records
        return KeyTable(self.version + 1, MappingProxyType(owners))
