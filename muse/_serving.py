"""What the engine serves at one moment: one immutable snapshot.

A ``Serving`` value bundles the route table with the loaded predictors and
mappings it names.  The router replaces it with one assignment; a request
reads it once and uses that value throughout, so the predictor version, its
models and its mapping always come from the same moment.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from muse._errors import NotReady
from muse._names import check_name
from muse._routes import RouteTable

__all__ = ["LoadedPredictor", "RoutePlan", "Serving"]


@dataclass(frozen=True, eq=False)
class LoadedPredictor:
    """A predictor with its compiled models resolved.

    Attributes:
        predictor: the declared DAG.
        models: model ref -> compiled model (shared with other predictors).
        plan: per model, (ref, model, column indices into the predictor's
            features, or None when the model takes them all in order).
    """

    predictor: Any
    models: Mapping[str, Any]
    plan: tuple[tuple[str, Any, np.ndarray | None], ...] = field(init=False)
    # Read on every request: computed once here rather than per call.
    ref: str = field(init=False)
    feature_names: tuple[str, ...] = field(init=False)
    allow_missing: bool = field(init=False)
    allow_infinity: bool = field(init=False)

    def __post_init__(self) -> None:
        names = list(self.predictor.feature_names)
        plan = []
        for ref in self.predictor.model_refs:
            model = self.models[ref]
            wanted = list(model.feature_names)
            columns = (
                None
                if wanted == names
                else np.array([names.index(f) for f in wanted], dtype=np.intp)
            )
            plan.append((ref, model, columns))
        models = self.models.values()
        object.__setattr__(self, "plan", tuple(plan))
        object.__setattr__(self, "ref", str(self.predictor.ref))
        object.__setattr__(self, "feature_names", tuple(names))
        object.__setattr__(
            self,
            "allow_missing",
            all(getattr(m, "allows_missing", True) for m in models),
        )
        object.__setattr__(
            self,
            "allow_infinity",
            all(getattr(m, "allows_infinity", False) for m in models),
        )

    def combine(self, outputs: dict[str, np.ndarray], mapping: Any) -> np.ndarray:
        return self.predictor.combine(outputs, mapping)  # type: ignore[no-any-return]

    def score(self, matrix: np.ndarray, mapping: Any) -> np.ndarray:
        """The whole DAG on one matrix, without the actors (offline checks)."""
        outputs = {
            ref: model.predict(
                matrix if cols is None else np.ascontiguousarray(matrix[:, cols])
            )
            for ref, model, cols in self.plan
        }
        return self.combine(outputs, mapping)


@dataclass(frozen=True, slots=True)
class RoutePlan:
    """What one (tenant, intent) is served with in a snapshot, resolved once.

    Attributes:
        live: the live predictor.
        mapping: its mapping for the tenant, or None.
        mapping_id: the mapping id answers name (None when unmapped).
        forwarded: shadows that take the live predictor's matrix as it is
            (see ``_takes_rows_of``): the live scorer hands them its batches.
        own_input: the other shadows, whose rows each request reads itself;
            None for a shadow that is not loaded.
    """

    live: LoadedPredictor
    mapping: Any
    mapping_id: str | None
    forwarded: tuple[LoadedPredictor, ...]
    own_input: tuple[LoadedPredictor | None, ...]


@dataclass(frozen=True)
class Serving:
    """Routes plus every predictor and mapping they need, at one version."""

    table: RouteTable = field(default_factory=RouteTable)
    predictors: Mapping[str, LoadedPredictor] = field(
        default_factory=lambda: MappingProxyType({})
    )
    mappings: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    # (tenant, intent) -> RoutePlan, filled on first use.  The snapshot never
    # changes, so neither do its plans; only routes that resolve are kept,
    # so the entries are bounded by tenants x routed intents.
    _plans: dict[tuple[str, str], RoutePlan] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def plan(self, tenant: str, intent: str) -> RoutePlan:
        """How (tenant, intent) is served.

        Raises:
            BadRequest: the tenant is not a valid tenant name (``*`` among
                them): its scores would be sampled where they cannot be
                saved, or twice.
            NotFound: no route for the intent.
            NotReady: the route names a predictor that is not loaded.
        """
        found = self._plans.get((tenant, intent))
        if found is None:
            # Checked here, once per (tenant, intent) and snapshot, rather
            # than on every request: HTTP tenants come from keys, which are
            # checked when made, but an embedding application names its own.
            check_name("tenant", tenant)
            route = self.table.resolve(tenant, intent)
            live = self.predictor(route.live)
            mapping = self.mapping_for(live.ref, tenant)
            forwarded, own_input = [], []
            for ref in route.shadows:
                shadow = self.predictors.get(ref)
                if shadow is not None and _takes_rows_of(shadow, live):
                    forwarded.append(shadow)
                else:
                    own_input.append(shadow)
            found = RoutePlan(
                live,
                mapping,
                live.predictor.mapping_id_used(mapping),
                tuple(forwarded),
                tuple(own_input),
            )
            self._plans[(tenant, intent)] = found
        return found

    def predictor(self, ref: str) -> LoadedPredictor:
        """A loaded predictor.

        Raises:
            NotReady: the route names a version that is not loaded.
        """
        found = self.predictors.get(ref)
        if found is None:
            raise NotReady(f"predictor {ref} is routed but not loaded")
        return found

    def mapping_for(self, predictor: str, tenant: str) -> Any:
        """The mapping object for (predictor, tenant), with fallback, or None."""
        mapping_id = self.table.mapping_id(predictor, tenant)
        return None if mapping_id is None else self.mappings[mapping_id]

    def missing(self) -> list[str]:
        """Routed predictor refs that are not loaded (empty when ready)."""
        return sorted(self.table.predictors() - set(self.predictors))

    def with_changes(
        self,
        table: RouteTable | None = None,
        predictors: Mapping[str, LoadedPredictor] | None = None,
        mappings: Mapping[str, Any] | None = None,
    ) -> Serving:
        merged_predictors = dict(self.predictors)
        merged_predictors.update(predictors or {})
        merged_mappings = dict(self.mappings)
        merged_mappings.update(mappings or {})
        return Serving(
            table if table is not None else self.table,
            MappingProxyType(merged_predictors),
            MappingProxyType(merged_mappings),
        )


def _takes_rows_of(shadow: LoadedPredictor, live: LoadedPredictor) -> bool:
    """Whether every matrix the live predictor accepts suits the shadow too:
    the same columns, and no value refused that the live one lets through
    (a matrix's values do not depend on the rules, only its refusal does)."""
    return (
        shadow.feature_names == live.feature_names
        and (shadow.allow_missing or not live.allow_missing)
        and (shadow.allow_infinity or not live.allow_infinity)
    )
