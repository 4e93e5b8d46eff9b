"""Tenant and admin keys: hashed storage, authentication, rotation."""

from __future__ import annotations

import pytest

from muse._errors import Conflict, Forbidden, NotFound, Unauthorized
from muse._keys import ADMIN, KeyTable, token_hash


def test_a_tenant_key_authenticates_as_that_tenant_only() -> None:
    table, token = KeyTable().with_tenant("bank-01")
    principal = table.authenticate(f"Bearer {token}")
    assert principal.tenant == "bank-01"
    assert not principal.is_admin
    with pytest.raises(Forbidden, match="admin key"):
        principal.require_admin()


def test_only_hashes_are_stored() -> None:
    table, token = KeyTable().with_tenant("bank-01")
    stored = table.to_dict()
    assert token not in repr(stored)
    assert stored["owners"]["bank-01"][0]["hash"] == token_hash(token)


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (None, "missing Authorization"),
        ("", "missing Authorization"),
        ("Basic abc", "Bearer"),
        ("Bearer ", "Bearer"),
        ("Bearer muse_not-a-key", "unknown or revoked"),
    ],
)
def test_bad_credentials(header: str | None, match: str) -> None:
    table, _ = KeyTable().with_tenant("bank-01")
    with pytest.raises(Unauthorized, match=match):
        table.authenticate(header)


def test_rotation_revokes_old_key_and_revocation_removes_all() -> None:
    table, old = KeyTable().with_tenant("bank-01")
    rotated, new = table.with_new_key("bank-01", replace_all=True)
    with pytest.raises(Unauthorized):
        rotated.authenticate(f"Bearer {old}")
    assert rotated.authenticate(f"bearer {new}").tenant == "bank-01"
    revoked = rotated.without_keys("bank-01")
    with pytest.raises(Unauthorized):
        revoked.authenticate(f"Bearer {new}")
    with pytest.raises(NotFound, match="has no keys"):
        revoked.without_keys("bank-01")


def test_duplicate_tenant_and_admin_key() -> None:
    table, _ = KeyTable().with_tenant("bank-01")
    with pytest.raises(Conflict, match="already exists"):
        table.with_tenant("bank-01")
    table, admin = table.with_new_key(ADMIN, replace_all=True)
    assert table.has_admin()
    assert table.authenticate(f"Bearer {admin}").is_admin
    assert table.tenants() == ["bank-01"]
    assert KeyTable.from_dict(table.to_dict()).authenticate(f"Bearer {admin}").is_admin
