"""``muse serve`` settings: a TOML file and command-line flags, checked once.

Precedence is flags over the file over defaults.  Every key is checked
against the settings that exist and every value against its type before
anything starts, so a misspelt key (``keepalive_timeout``) or a string
where a number belongs is one clear line naming the key, not a traceback
or a setting silently left at its default.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from muse._engine import EngineOptions
from muse._http import HttpLimits
from muse._quota import QuotaPolicy
from muse._server import ServerOptions

__all__ = ["ConfigError", "Settings", "load_settings"]

DEFAULT_REGISTRY = "./muse-registry"

# [server] keys that set the HTTP body limits rather than ServerOptions.
_LIMITS = {
    "score_body_limit": ("score_body", int),
    "admin_body_limit": ("admin_body", int),
    "score_body_timeout": ("score_body_timeout", float),
    "admin_body_timeout": ("admin_body_timeout", float),
}
_SERVER = {
    "bind": str,
    "keep_alive_timeout": float,
    "header_timeout": float,
    "graceful_timeout": float,
    "max_requests_per_connection": int,
    "backlog": int,
    "max_connections": int,
    "max_score_requests": int,
    "direct_lane": bool,
}
_ENGINE = {
    "deadline_ms": float,
    "max_events": int,
    "live_queue": int,
    "shadow_queue": int,
    "calibrator_queue": int,
    "persist_interval": float,
    "sample_capacity": int,
}
_QUOTA = {"rate": float, "burst": float}
_TOP = {"registry", "server", "engine", "quotas"}


class ConfigError(Exception):
    """The configuration cannot be used; the message says which key and why."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything ``muse serve`` needs, resolved."""

    registry: str
    server: ServerOptions
    engine: dict[str, Any]


def load_settings(
    path: Path | None, *, registry: str | None = None, bind: str | None = None
) -> Settings:
    """Read the TOML file (if any) and apply the command-line flags.

    Raises:
        ConfigError: unreadable file, unknown key, or a value of the wrong
            type or range.
    """
    config = _read(path) if path is not None else {}
    where = str(path) if path is not None else "configuration"
    _no_unknown(config, _TOP, where)
    server = _table(config, "server", where)
    _no_unknown(server, set(_SERVER) | set(_LIMITS), f"{where} [server]")
    engine = _table(config, "engine", where)
    _no_unknown(engine, set(_ENGINE), f"{where} [engine]")

    limits = HttpLimits(
        **{
            field: _value(server[key], kind, f"{where} [server] {key}")
            for key, (field, kind) in _LIMITS.items()
            if key in server
        }
    )
    options = {
        key: _value(value, _SERVER[key], f"{where} [server] {key}")
        for key, value in server.items()
        if key in _SERVER
    }
    if bind is not None:
        options["bind"] = bind
    engine_options: dict[str, Any] = {
        key: _value(value, _ENGINE[key], f"{where} [engine] {key}")
        for key, value in engine.items()
    }
    quotas = _quotas(_table(config, "quotas", where), where)
    if quotas:
        engine_options["quotas"] = quotas
    chosen = registry or config.get("registry") or DEFAULT_REGISTRY
    if not isinstance(chosen, str):
        raise ConfigError(f"{where}: registry must be a path string, got {chosen!r}")
    try:
        server_options = ServerOptions(limits=limits, **options)
        EngineOptions(**engine_options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return Settings(chosen, server_options, engine_options)


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc}") from exc


def _table(config: Mapping[str, Any], name: str, where: str) -> dict[str, Any]:
    table = config.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [{name}] must be a table, got {table!r}")
    return dict(table)


def _no_unknown(table: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(sorted(known))}"
        )


def _value(value: Any, kind: type, what: str) -> Any:
    # TOML has its own booleans; True is not the number 1 here.
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{what} must be true or false, got {value!r}")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{what} must be a string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{what} must be a number, got {value!r}")
    if kind is int:
        if not float(value).is_integer():
            raise ConfigError(f"{what} must be a whole number, got {value!r}")
        value = int(value)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what} must be positive, got {value!r}")
    return kind(value)


def _quotas(table: Mapping[str, Any], where: str) -> dict[str, QuotaPolicy]:
    quotas = {}
    for tenant, quota in table.items():
        what = f'[quotas."{tenant}"]'
        if not isinstance(quota, dict):
            raise ConfigError(f"{where}: {what} must be a table with 'rate'")
        _no_unknown(quota, set(_QUOTA), f"{where} {what}")
        if "rate" not in quota:
            raise ConfigError(f"{where}: {what} needs 'rate' (events per second)")
        rate = _value(quota["rate"], float, f"{where} {what} rate")
        burst = _value(quota.get("burst", max(rate, 1.0)), float, f"{where} {what} burst")
        try:
            quotas[tenant] = QuotaPolicy(rate, burst)
        except ValueError as exc:
            raise ConfigError(f"{where}: {what}: {exc}") from exc
    return quotas
