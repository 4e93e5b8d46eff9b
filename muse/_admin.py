"""Admin operations: models, predictors, routes, mappings, tenants.

Every operation writes to the registry before it takes effect, and route or
mapping changes go through the router actor, one at a time.  Slow work
(compiling a model, fitting a mapping, disk writes) runs in worker threads so
scoring carries on meanwhile.

Compiled models are kept by digest: one model sits in memory once however
many versions, predictors and tenants use it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

from muse._calibrator import Calibrator
from muse._errors import BadRequest, Conflict, MuseError, NotFound
from muse._keys import ADMIN, KeyTable
from muse._models import load_model
from muse._names import check_name
from muse._predictor import Predictor, split_ref
from muse._registry import Registry
from muse._router import Change, Router
from muse._routes import ANY_TENANT, RouteTable
from muse._serving import LoadedPredictor, Serving
from muse._transform import DEFAULT_CURVE, QuantileMapping
from muse._trial import check_in_child

__all__ = ["Admin"]

log = logging.getLogger("muse.admin")

# A mapping fitted on fewer scores than this is refused unless asked for.
DEFAULT_MIN_SAMPLE = 1000


class Admin:
    """The engine's admin operations (``engine.admin``)."""

    def __init__(
        self,
        registry: Registry,
        router: Router,
        calibrator: Calibrator,
        apply: Callable[[Change], Awaitable[Serving]],
        settle_shadows: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._registry = registry
        self._router = router
        self._calibrator = calibrator
        self._apply = apply
        self._settle_shadows = settle_shadows
        self._models: dict[str, Any] = {}
        self._keys_lock = trio.Lock()
        self.keys = KeyTable()

    # -- start-up ------------------------------------------------------------

    async def load(self) -> None:
        """Load keys, routes, routed predictors, their mappings and samples."""
        registry = self._registry
        key_version, key_document = await trio.to_thread.run_sync(registry.current_keys)
        self.keys = KeyTable.from_dict({**key_document, "version": key_version})
        version, document = await trio.to_thread.run_sync(registry.current_routes)
        table = RouteTable.from_dict({**document, "version": version})
        predictors = {}
        for ref in sorted(table.predictors()):
            try:
                predictors[ref] = await self._load_predictor(ref)
            except MuseError as exc:
                # One broken version must not keep the server from serving
                # every route that does not need it: it stays out of the
                # snapshot, /readyz names it, a route with it live answers
                # 503, a route with it as a shadow drops its shadow events
                # (counted), and the admin API can route around it.
                log.error("predictor %s could not be loaded: %s", ref, exc)
        mappings = {}
        for scopes in table.mappings.values():
            for mapping_id in scopes.values():
                mappings[mapping_id] = await trio.to_thread.run_sync(
                    registry.get_mapping, mapping_id
                )
        self._router.serving = Serving().with_changes(table, predictors, mappings)
        for predictor, tenant, source, values in await trio.to_thread.run_sync(
            registry.all_samples
        ):
            self._calibrator.restore(predictor, tenant or ANY_TENANT, source, values)

    # -- models and predictors -------------------------------------------------

    async def put_model(
        self,
        name: str,
        data: bytes,
        format: str,
        *,
        feature_names: list[str] | None = None,
        beta: float = 1.0,
        golden: Any = None,
    ) -> dict[str, Any]:
        """Import, compile and check a model, then publish it as a new version.

        Raises:
            ModelImportError: the bytes are not a model of that format.
            ParityError: compiled predictions differ on the golden rows.
        """
        check_name("model", name)
        started = time.perf_counter()
        if isinstance(data, (bytes, bytearray)):
            await trio.to_thread.run_sync(
                lambda: check_in_child(
                    bytes(data),
                    format,
                    feature_names,
                    beta,
                    self._registry.compiled_dir,
                    golden,
                )
            )
        model = await trio.to_thread.run_sync(
            lambda: load_model(
                data,
                format,
                feature_names,
                beta,
                cache_dir=self._registry.compiled_dir,
                golden=golden,
                name=name,
            )
        )
        # The same bytes with another beta, or other feature names, are
        # another model: beta is part of the transformation, and the names
        # say which request field feeds which column.
        model = self._models.setdefault(_identity(model), model)
        meta = {
            "format": model.format,
            "feature_names": list(model.feature_names),
            "beta": model.beta,
            "digest": model.digest,
            "backend": model.backend,
        }
        version = await trio.to_thread.run_sync(
            lambda: self._registry.put_model(
                name, model.to_bytes(), meta, model.golden_bytes()
            )
        )
        seconds = time.perf_counter() - started
        log.info(
            "model %s@%d accepted (%s, %.2f s)", name, version, model.backend, seconds
        )
        return {**meta, "ref": f"{name}@{version}", "seconds": seconds}

    async def _model(self, ref: str) -> Any:
        record = await trio.to_thread.run_sync(self._registry.get_model, ref)
        meta = record.meta
        found = self._models.get(
            (meta["digest"], meta["beta"], tuple(meta["feature_names"]))
        )
        if found is not None:
            return found
        model = await trio.to_thread.run_sync(
            lambda: load_model(
                record.data,
                meta["format"],
                list(meta["feature_names"]),
                meta["beta"],
                cache_dir=self._registry.compiled_dir,
                golden=record.golden,
                name=meta["name"],
            )
        )
        return self._models.setdefault(_identity(model), model)

    async def _load_predictor(self, ref: str) -> LoadedPredictor:
        loaded = self._router.serving.predictors.get(ref)
        if loaded is not None:
            return loaded
        name, version = split_ref(ref)
        spec = await trio.to_thread.run_sync(self._registry.get_predictor, ref)
        models = {m: await self._model(m) for m in _model_refs(spec)}
        predictor = Predictor.from_spec(spec, models, version=version)
        log.info("predictor %s loaded (%d models)", ref, len(models))
        return LoadedPredictor(predictor, models)

    async def put_predictor(self, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        """Validate a predictor against its models and publish a new version.

        Raises:
            PredictorSpecError: the DAG is invalid (the message names the node).
            NotFound: a model it names does not exist.
        """
        check_name("predictor", name)
        spec = {**spec, "name": name}
        models = {m: await self._model(m) for m in _model_refs(spec)}
        Predictor.from_spec(spec, models)  # validate before publishing
        version = await trio.to_thread.run_sync(
            self._registry.put_predictor, name, spec
        )
        predictor = Predictor.from_spec(spec, models, version=version)
        loaded = LoadedPredictor(predictor, models)
        await self._apply(Change(None, predictors={loaded.ref: loaded}))
        log.info("predictor %s declared", loaded.ref)
        return {"ref": loaded.ref, "features": list(predictor.feature_names)}

    # -- routes ------------------------------------------------------------------

    async def set_route(
        self,
        tenant: str,
        intent: str,
        live: str,
        shadows: tuple[str, ...] = (),
        *,
        expect_version: int | None = None,
    ) -> dict[str, Any]:
        """Point (tenant, intent) at a live predictor and shadows."""
        if tenant != ANY_TENANT:
            check_name("tenant", tenant)
        check_name("intent", intent)
        loaded = {ref: await self._load_predictor(ref) for ref in (live, *shadows)}

        def build(serving: Serving) -> RouteTable:
            serving.table.check_version(expect_version)
            return serving.table.with_route(tenant, intent, live, shadows)

        serving = await self._apply(
            Change(
                build,
                predictors=loaded,
                description=f"route {tenant}/{intent}: live {live}, shadows {list(shadows)}",
            )
        )
        return self._route_reply(serving, tenant, intent)

    async def delete_route(
        self, tenant: str, intent: str, *, expect_version: int | None = None
    ) -> dict[str, Any]:
        def build(serving: Serving) -> RouteTable:
            serving.table.check_version(expect_version)
            return serving.table.without_route(tenant, intent)

        serving = await self._apply(
            Change(build, description=f"route {tenant}/{intent} removed")
        )
        return {"version": serving.table.version}

    async def promote(
        self,
        tenant: str,
        intent: str,
        version: str | None = None,
        *,
        expect_version: int | None = None,
    ) -> dict[str, Any]:
        """Make a shadow live, atomically.

        Raises:
            Conflict: stale ``expect_version``, not a shadow, or the shadow has
                no fitted mapping while its predictor ends in a quantile map.
        """

        def build(serving: Serving) -> RouteTable:
            serving.table.check_version(expect_version)
            route = serving.table.routes.get((tenant, intent))
            target = version
            if target is None and route is not None and len(route.shadows) == 1:
                target = route.shadows[0]
            # The route's own checks first: promoting what is not a shadow
            # is refused as that, not as a version lacking a mapping.
            table = serving.table.promoted(tenant, intent, target)
            if target is not None:
                self._check_servable(serving, target, tenant)
            return table

        serving = await self._apply(
            Change(build, description=f"promoted on {tenant}/{intent}")
        )
        return self._route_reply(serving, tenant, intent)

    async def rollback(
        self, tenant: str, intent: str, *, expect_version: int | None = None
    ) -> dict[str, Any]:
        """Make the previous live version live again."""

        def build(serving: Serving) -> RouteTable:
            serving.table.check_version(expect_version)
            return serving.table.rolled_back(tenant, intent)

        serving = await self._apply(
            Change(build, description=f"rolled back {tenant}/{intent}")
        )
        return self._route_reply(serving, tenant, intent)

    @staticmethod
    def _check_servable(serving: Serving, ref: str, tenant: str) -> None:
        loaded = serving.predictors.get(ref)
        if loaded is None:
            raise Conflict(f"{ref} is not loaded and cannot be promoted")
        if (
            loaded.predictor.has_quantile_map
            and serving.mapping_for(ref, tenant) is None
        ):
            raise Conflict(f"{ref} has no fitted mapping for {tenant!r}; fit one first")

    @staticmethod
    def _route_reply(serving: Serving, tenant: str, intent: str) -> dict[str, Any]:
        route = serving.table.routes[(tenant, intent)]
        return {
            "version": serving.table.version,
            "tenant": tenant,
            "intent": intent,
            **route.to_dict(),
        }

    # -- mappings ----------------------------------------------------------------

    async def fit_mapping(
        self,
        predictor: str,
        *,
        scope: str = "global",
        source: str = "shadow",
        curve: Mapping[Any, Any] | None = None,
        min_sample: int | None = None,
    ) -> dict[str, Any]:
        """Fit a quantile mapping from collected samples and make it active.

        Args:
            predictor: the predictor version the mapping is for.
            scope: ``global`` (predictor-wide) or one tenant.
            source: ``shadow`` or ``live`` samples.
            curve: edge -> target share; the default reference curve if None.
            min_sample: refuse fewer scores than this.

        Raises:
            MappingFitError: too few scores or too few distinct values.
        """
        if min_sample is not None and min_sample < 1:
            raise BadRequest(f"min_sample must be at least 1, got {min_sample}")
        if source not in ("shadow", "live"):
            raise BadRequest(f"source must be 'shadow' or 'live', got {source!r}")
        # Declared but not routed since a restart: loaded now, so a fit works
        # the same before and after one (its samples were restored).
        loaded = await self._load_predictor(predictor)
        tenant = ANY_TENANT if scope == "global" else check_name("tenant", scope)
        if source == "shadow" and self._settle_shadows is not None:
            # Shadow scores reach the sample a little after their requests
            # are answered; a fit includes every request answered before it.
            await self._settle_shadows()
        sample = self._calibrator.sample(predictor, tenant, source)
        reference = _curve(curve)
        mapping = await trio.to_thread.run_sync(
            lambda: QuantileMapping.fit(
                sample,
                reference,
                min_sample=min_sample or DEFAULT_MIN_SAMPLE,
                predictor=predictor,
                tenant=None if tenant == ANY_TENANT else tenant,
            )
        )
        await trio.to_thread.run_sync(self._registry.put_mapping, mapping)

        def build(serving: Serving) -> RouteTable:
            return serving.table.with_mapping(predictor, tenant, mapping.id)

        await self._apply(
            Change(
                build,
                predictors={predictor: loaded},
                mappings={mapping.id: mapping},
                description=f"mapping {mapping.id} fitted for {predictor} ({scope}, "
                f"{len(sample)} {source} scores)",
            )
        )
        return mapping.to_dict()

    # -- tenants -------------------------------------------------------------------

    async def create_tenant(self, tenant: str) -> dict[str, Any]:
        check_name("tenant", tenant)
        return await self._change_keys(lambda keys: keys.with_tenant(tenant), tenant)

    async def rotate_key(self, tenant: str) -> dict[str, Any]:
        if not self.keys.owners.get(tenant):
            raise NotFound(f"tenant {tenant!r} does not exist")
        return await self._change_keys(
            lambda keys: keys.with_new_key(tenant, replace_all=True), tenant
        )

    async def revoke_keys(self, tenant: str) -> dict[str, Any]:
        async with self._keys_lock:
            table = self.keys.without_keys(tenant)
            await self._publish_keys(table)
        log.info("keys of tenant %s revoked", tenant)
        return {"tenant": tenant, "revoked": True}

    async def ensure_admin_key(self) -> str | None:
        """Create the admin key on a fresh registry; None when one exists."""
        if self.keys.has_admin():
            return None
        reply = await self._change_keys(
            lambda keys: keys.with_new_key(ADMIN, replace_all=True), ADMIN
        )
        return str(reply["key"])

    async def _change_keys(
        self, build: Callable[[KeyTable], tuple[KeyTable, str]], owner: str
    ) -> dict[str, Any]:
        async with self._keys_lock:
            table, token = build(self.keys)
            await self._publish_keys(table)
        log.info(
            "new key issued for %s",
            "the admin" if owner == ADMIN else f"tenant {owner}",
        )
        return {"tenant": owner, "key": token}

    async def _publish_keys(self, table: KeyTable) -> None:
        document = table.to_dict()
        del document["version"]
        await trio.to_thread.run_sync(
            self._registry.put_keys, document, self.keys.version
        )
        self.keys = table

    # -- listings -------------------------------------------------------------------

    async def listing(self, what: str) -> Any:
        """Models, predictors, mappings, routes or tenants, with their roles."""
        serving = self._router.serving
        if what == "routes":
            return serving.table.to_dict()
        if what == "tenants":
            return {"tenants": self.keys.tenants()}
        lister = {
            "models": self._registry.list_models,
            "predictors": self._registry.list_predictors,
            "mappings": self._registry.list_mappings,
        }[what]
        items = await trio.to_thread.run_sync(lister)
        if what == "predictors":
            return [self._with_roles(serving, item) for item in items]
        return items

    @staticmethod
    def _with_roles(serving: Serving, item: Any) -> Any:
        ref = item["ref"] if isinstance(item, dict) else str(item)
        roles = [
            f"{role}:{tenant}/{intent}"
            for (tenant, intent), route in serving.table.routes.items()
            for role, refs in (("live", (route.live,)), ("shadow", route.shadows))
            if ref in refs
        ]
        base = item if isinstance(item, dict) else {"ref": ref}
        return {**base, "roles": roles, "loaded": ref in serving.predictors}


def _identity(model: Any) -> tuple[str, float, tuple[str, ...]]:
    """What makes two loaded models the same one, to load it once."""
    return model.digest, model.beta, tuple(model.feature_names)


def _model_refs(spec: Mapping[str, Any]) -> list[str]:
    nodes = spec.get("nodes")
    if not isinstance(nodes, list):
        raise BadRequest("predictor spec needs a 'nodes' list")
    refs = [
        n.get("model")
        for n in nodes
        if isinstance(n, dict) and n.get("kind") == "model"
    ]
    return list(dict.fromkeys(r for r in refs if isinstance(r, str)))


def _curve(curve: Mapping[Any, Any] | None) -> dict[float, float]:
    if curve is None:
        return dict(DEFAULT_CURVE)
    try:
        return {float(edge): float(target) for edge, target in curve.items()}
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"curve must map score edges to target shares: {exc}") from exc
