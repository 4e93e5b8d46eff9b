"""The route table: which predictor serves (tenant, intent), and with which
mappings.  Plain immutable data, no I/O.

A table is a value.  Every change returns a new table with the next version
number; the router publishes it to the registry and then swaps it in with one
assignment, so a request resolves its route once against one table and can
never see half of a promotion.

The tenant ``*`` routes every tenant that has no route of its own: that is how
many tenants share one predictor.  Mappings are assigned per (predictor,
scope), where the scope is a tenant or ``*`` for the predictor-wide mapping
that tenants without their own fall back to.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from muse._errors import BadRequest, Conflict, NotFound

__all__ = ["ANY_TENANT", "Route", "RouteTable"]

ANY_TENANT = "*"

# Rollback keeps this many earlier live versions per route; older ones stay
# in the registry but are no longer one call away.
_HISTORY = 16


@dataclass(frozen=True, slots=True)
class Route:
    """One (tenant, intent) entry.

    Attributes:
        live: the predictor ref (``name@version``) that answers requests.
        shadows: predictor refs that score the same traffic off the answer path.
        history: earlier live refs, most recent last, for rollback.
    """

    live: str
    shadows: tuple[str, ...] = ()
    history: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "live": self.live,
            "shadows": list(self.shadows),
            "history": list(self.history),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Route:
        return cls(
            live=str(data["live"]),
            shadows=tuple(str(s) for s in data.get("shadows", ())),
            history=tuple(str(h) for h in data.get("history", ())),
        )


@dataclass(frozen=True)
class RouteTable:
    """Routes and mapping assignments at one version.

    Attributes:
        version: bumped by every change; writes name the version they replace.
        routes: (tenant, intent) -> Route.
        mappings: predictor ref -> {scope: mapping id}, scope a tenant or ``*``.
    """

    version: int = 0
    routes: Mapping[tuple[str, str], Route] = field(
        default_factory=lambda: MappingProxyType({})
    )
    mappings: Mapping[str, Mapping[str, str]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    # -- reads ---------------------------------------------------------------

    def resolve(self, tenant: str, intent: str) -> Route:
        """The route serving ``tenant`` for ``intent``.

        Raises:
            NotFound: neither the tenant nor ``*`` has a route for the intent.
        """
        route = self.routes.get((tenant, intent))
        if route is None:
            route = self.routes.get((ANY_TENANT, intent))
            if route is None:
                raise NotFound(f"no route for intent {intent!r} (tenant {tenant!r})")
        return route

    def mapping_id(self, predictor: str, tenant: str) -> str | None:
        """The mapping for (predictor, tenant), else the predictor-wide one."""
        scopes = self.mappings.get(predictor)
        if not scopes:
            return None
        found = scopes.get(tenant)
        return found if found is not None else scopes.get(ANY_TENANT)

    def predictors(self) -> set[str]:
        """Every predictor ref a route uses: live, shadow, or one rollback away."""
        refs: set[str] = set()
        for route in self.routes.values():
            refs.add(route.live)
            refs.update(route.shadows)
            refs.update(route.history)
        return refs

    def check_version(self, expected: int | None) -> None:
        """Refuse a write based on a table that is no longer current.

        Raises:
            Conflict: ``expected`` is given and is not this table's version.
        """
        if expected is not None and expected != self.version:
            raise Conflict(
                f"route table is at version {self.version}, "
                f"the request expected {expected}"
            )

    # -- changes (each returns a new table) ---------------------------------

    def with_route(
        self, tenant: str, intent: str, live: str, shadows: tuple[str, ...]
    ) -> RouteTable:
        """Set a route; a changed live version goes onto the history."""
        if live in shadows:
            raise BadRequest(f"{live} cannot be both live and a shadow")
        old = self.routes.get((tenant, intent))
        history = old.history if old else ()
        if old is not None and old.live != live:
            history = (*history, old.live)[-_HISTORY:]
        route = Route(live, tuple(dict.fromkeys(shadows)), history)
        return self._replace_route(tenant, intent, route)

    def without_route(self, tenant: str, intent: str) -> RouteTable:
        """Remove a route.

        Raises:
            NotFound: there is no such route.
        """
        if (tenant, intent) not in self.routes:
            raise NotFound(f"no route for tenant {tenant!r} and intent {intent!r}")
        routes = dict(self.routes)
        del routes[(tenant, intent)]
        return replace(self, version=self.version + 1, routes=MappingProxyType(routes))

    def promoted(self, tenant: str, intent: str, shadow: str | None) -> RouteTable:
        """Make a shadow live; the old live version goes onto the history.

        Args:
            shadow: the shadow to promote; None means the only shadow.

        Raises:
            NotFound: no such route.
            Conflict: the version is not a shadow of the route, or ``None``
                was given and the route has no shadow or several.
        """
        route = self._own_route(tenant, intent)
        if shadow is None:
            if len(route.shadows) != 1:
                raise Conflict(
                    f"route {tenant}/{intent} has {len(route.shadows)} shadows; "
                    "name the version to promote"
                )
            shadow = route.shadows[0]
        if shadow not in route.shadows:
            raise Conflict(f"{shadow} is not a shadow of route {tenant}/{intent}")
        shadows = tuple(s for s in route.shadows if s != shadow)
        history = (*route.history, route.live)[-_HISTORY:]
        return self._replace_route(tenant, intent, Route(shadow, shadows, history))

    def rolled_back(self, tenant: str, intent: str) -> RouteTable:
        """Make the previous live version live again.

        The version rolled back from becomes a shadow, so it keeps collecting
        samples and can be promoted again once fixed.

        Raises:
            Conflict: the route has no earlier live version.
        """
        route = self._own_route(tenant, intent)
        if not route.history:
            raise Conflict(f"route {tenant}/{intent} has no earlier live version")
        previous = route.history[-1]
        shadows = tuple(s for s in (route.live, *route.shadows) if s != previous)
        rolled = Route(previous, shadows, route.history[:-1])
        return self._replace_route(tenant, intent, rolled)

    def with_mapping(self, predictor: str, scope: str, mapping_id: str) -> RouteTable:
        """Assign a mapping to (predictor, scope)."""
        mappings = {k: dict(v) for k, v in self.mappings.items()}
        mappings.setdefault(predictor, {})[scope] = mapping_id
        frozen = {k: MappingProxyType(v) for k, v in mappings.items()}
        return replace(
            self, version=self.version + 1, mappings=MappingProxyType(frozen)
        )

    # -- plain data ------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The table as JSON-safe data (the registry's document)."""
        routes: dict[str, dict[str, Any]] = {}
        for (tenant, intent), route in sorted(self.routes.items()):
            routes.setdefault(tenant, {})[intent] = route.to_dict()
        return {
            "version": self.version,
            "routes": routes,
            "mappings": {k: dict(v) for k, v in sorted(self.mappings.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RouteTable:
        """Inverse of ``to_dict``."""
        routes = {
            (tenant, intent): Route.from_dict(route)
            for tenant, intents in data.get("routes", {}).items()
            for intent, route in intents.items()
        }
        mappings = {
            str(pred): MappingProxyType({str(s): str(m) for s, m in scopes.items()})
            for pred, scopes in data.get("mappings", {}).items()
        }
        return cls(
            version=int(data.get("version", 0)),
            routes=MappingProxyType(routes),
            mappings=MappingProxyType(mappings),
        )

    def _own_route(self, tenant: str, intent: str) -> Route:
        route = self.routes.get((tenant, intent))
        if route is None:
            raise NotFound(f"no route for tenant {tenant!r} and intent {intent!r}")
        return route

    def _replace_route(self, tenant: str, intent: str, route: Route) -> RouteTable:
        routes = dict(self.routes)
        routes[(tenant, intent)] = route
        return replace(self, version=self.version + 1, routes=MappingProxyType(routes))
