"""Predictors: immutable, versioned DAGs of models and score transforms.

A predictor is declared as plain data (a dict, TOML or JSON)::

    name = "card-fraud"
    output = "qm"
    features = ["TX_AMOUNT", ...]          # optional: the input schema

    [[nodes]]
    id = "xgb"
    kind = "model"
    model = "fraud-xgb@1"                  # a registered model, name@version
    [[nodes]]
    id = "avg"
    kind = "weighted_mean"
    inputs = ["xgb", "lgb"]
    weights = [0.3, 0.7]
    [[nodes]]
    id = "pc"
    kind = "posterior_correction"
    input = "avg"
    beta = 0.1                             # optional over a single model
    [[nodes]]
    id = "qm"
    kind = "quantile_map"
    input = "pc"                           # optional: mapping = "<id>"

Validation is strict, and every ``PredictorSpecError`` names the node at
fault.  Decisions beyond the obvious ones:

- Nodes the output does not depend on are refused, not ignored: a dead node
  is almost always a typo in an ``input``.
- At most one ``quantile_map`` node, and it must be the output.  The mapping
  turns scores into the stable scale clients act on; anything after it
  would undo that.
- When ``features`` is declared it is the predictor's input schema, in that
  order; it may list features no model uses (a schema kept ahead of the
  models), but every model feature must be in it.  Without it, the schema
  is the union of the models' features in first-seen order.
- A feature list that names a feature twice (declared or a model's) is
  incompatible: columns could not be matched unambiguously.
- Unknown top-level or node fields are refused, so a misspelt ``ouput`` or
  ``wieghts`` fails loudly.

Evaluation never touches the models module: models are anything that
satisfies ``ScoringModel``, mappings anything that satisfies ``ScoreMapping``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np

from muse._errors import BadRequest, NotFound, PredictorSpecError

__all__ = [
    "NODE_KINDS",
    "ModelInfo",
    "Predictor",
    "ScoreMapping",
    "ScoringModel",
    "mapping_for",
    "parse_spec",
    "split_ref",
    "validate",
]

NODE_KINDS = (
    "model",
    "mean",
    "weighted_mean",
    "posterior_correction",
    "quantile_map",
)

# Required and optional fields per node kind ("id" and "kind" always apply).
_NODE_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "model": (frozenset({"model"}), frozenset()),
    "mean": (frozenset({"inputs"}), frozenset()),
    "weighted_mean": (frozenset({"inputs", "weights"}), frozenset()),
    "posterior_correction": (frozenset({"input"}), frozenset({"beta"})),
    "quantile_map": (frozenset({"input"}), frozenset({"mapping"})),
}
_COMMON = frozenset({"id", "kind", "description"})
_SPEC_REQUIRED = frozenset({"name", "nodes", "output"})
_SPEC_OPTIONAL = frozenset({"features", "description"})

# Names become directory names in the registry: no separators, no leading
# dot, bounded length.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class ModelInfo(Protocol):
    """What validation needs to know about a model."""

    @property
    def feature_names(self) -> Sequence[str]: ...

    @property
    def beta(self) -> float: ...


class ScoringModel(ModelInfo, Protocol):
    """A loaded model as predictors use it (``muse._models.Model`` fits)."""

    @property
    def digest(self) -> str: ...

    def predict(self, X: np.ndarray) -> np.ndarray: ...

    def predict_margin(self, X: np.ndarray) -> np.ndarray: ...


class ScoreMapping(Protocol):
    """A fitted quantile mapping (``muse._transform.QuantileMapping`` fits)."""

    @property
    def id(self) -> str: ...

    def apply(self, scores: np.ndarray) -> np.ndarray: ...


def split_ref(ref: str) -> tuple[str, int]:
    """Split a ``"name@version"`` reference.

    Args:
        ref: e.g. ``"fraud-xgb@3"``.

    Returns:
        ``(name, version)`` with ``version >= 1``.

    Raises:
        BadRequest: ``ref`` is not of that form.
    """
    name, sep, version = ref.rpartition("@")
    if not sep or not NAME_PATTERN.fullmatch(name) or not version.isdigit():
        raise BadRequest(f"expected a reference 'name@version', got {ref!r}")
    # "@01" and "@0" would alias or precede version 1; refuse both.
    if int(version) < 1 or version != str(int(version)):
        raise BadRequest(f"version in {ref!r} must be a positive integer")
    return name, int(version)


def parse_spec(
    source: Mapping[str, Any] | str | bytes | os.PathLike[str],
) -> dict[str, Any]:
    """Read a predictor declaration into a fresh plain dict.

    Args:
        source: a mapping; TOML or JSON text (str or bytes; text whose first
            non-blank character is ``{`` is JSON); or a path to a ``.toml``
            or ``.json`` file.  A plain ``str`` is always text, never a path.

    Returns:
        A deep copy made of JSON types only.

    Raises:
        PredictorSpecError: the source does not parse, or holds values that
            are not plain data.
    """
    if isinstance(source, Mapping):
        return _plain_copy(source)
    if isinstance(source, os.PathLike):
        path = os.fspath(source)
        with open(path, "rb") as handle:
            raw = handle.read()
        return _parse_text(raw.decode("utf-8"), path.endswith(".json"))
    if isinstance(source, bytes):
        source = source.decode("utf-8")
    if not isinstance(source, str):
        raise PredictorSpecError(
            f"predictor spec must be a mapping, text or a path, "
            f"got {type(source).__name__}"
        )
    return _parse_text(source, source.lstrip().startswith("{"))


def validate(spec: Mapping[str, Any], models: Mapping[str, ModelInfo]) -> None:
    """Check a predictor declaration against the models it names.

    Args:
        spec: the declaration (see ``parse_spec``).
        models: model infos by ``"name@version"`` reference.

    Raises:
        PredictorSpecError: the declaration is invalid; the message names
            the node at fault.
    """
    Predictor.from_spec(spec, models)


@dataclass(frozen=True)
class _Node:
    """One validated node; ``inputs`` are node ids."""

    id: str
    kind: str
    inputs: tuple[str, ...] = ()
    model_ref: str | None = None
    weights: tuple[float, ...] = ()
    beta: float | None = None
    mapping_id: str | None = None


@dataclass(frozen=True)
class Predictor:
    """A validated predictor; build it with ``Predictor.from_spec``.

    Attributes:
        name: the predictor's name.
        version: assigned by the registry; 0 for an unregistered predictor.
        feature_names: columns ``score`` expects, in order.
        model_refs: distinct model references, in declaration order.
        has_quantile_map: whether the output is a quantile map.
        fixed_mapping: the mapping id pinned by the spec, or None.
        digest: sha256 hex of the canonical spec JSON.
        output: id of the output node.
        spec_json: the canonical spec JSON (``spec`` parses a fresh copy).
        nodes: validated nodes in topological order, betas resolved.
        model_features: each model's feature names, by reference.
        model_columns: each model's column indices into ``feature_names``
            (read-only), None when it reads them all in order.
    """

    name: str
    version: int
    feature_names: tuple[str, ...]
    model_refs: tuple[str, ...]
    has_quantile_map: bool
    fixed_mapping: str | None
    digest: str
    output: str
    spec_json: str = field(repr=False, compare=False)
    nodes: tuple[_Node, ...] = field(repr=False, compare=False)
    model_features: Mapping[str, tuple[str, ...]] = field(repr=False, compare=False)
    model_columns: Mapping[str, np.ndarray | None] = field(repr=False, compare=False)

    @classmethod
    def from_spec(
        cls,
        spec: Mapping[str, Any] | str | bytes | os.PathLike[str],
        models: Mapping[str, ModelInfo],
        *,
        version: int = 0,
    ) -> Predictor:
        """Validate a declaration and build the predictor.

        Args:
            spec: the declaration, in any form ``parse_spec`` takes.
            models: infos of (at least) the models the spec names, by
                ``"name@version"``; ``ScoringModel`` objects qualify.
            version: the registry version; 0 when unregistered.

        Returns:
            The predictor, nodes in topological order.

        Raises:
            PredictorSpecError: the declaration is invalid; the message
                names the node at fault.
        """
        plain = parse_spec(spec)
        name, output, raw_nodes = _check_top_level(plain)
        nodes = {raw["id"]: _check_node(raw) for raw in raw_nodes}
        _check_graph(nodes, output)
        order = _topological_order(nodes, output)
        infos = _check_models(nodes, models)
        features = _feature_names(plain.get("features"), nodes, infos)
        order = _resolve_betas(order, infos)
        text = json.dumps(plain, sort_keys=True, separators=(",", ":"))
        model_features = MappingProxyType(
            {ref: tuple(infos[ref].feature_names) for ref in infos}
        )
        return cls(
            name=name,
            version=version,
            feature_names=features,
            model_refs=tuple(infos),
            has_quantile_map=nodes[output].kind == "quantile_map",
            fixed_mapping=nodes[output].mapping_id,
            digest=hashlib.sha256(text.encode()).hexdigest(),
            output=output,
            spec_json=text,
            nodes=order,
            model_features=model_features,
            model_columns=_column_indices(features, model_features),
        )

    @property
    def ref(self) -> str:
        """``"name@version"``."""
        return f"{self.name}@{self.version}"

    @property
    def spec(self) -> dict[str, Any]:
        """A fresh copy of the declaration (mutating it changes nothing)."""
        spec: dict[str, Any] = json.loads(self.spec_json)
        return spec

    def mapping_id_used(self, mapping: ScoreMapping | None) -> str | None:
        """Which mapping id ``combine(..., mapping)`` applies.

        Args:
            mapping: the mapping that would be passed.

        Returns:
            The mapping's id, or None when scores pass through unmapped
            (no mapping given, or no quantile_map node).
        """
        if not self.has_quantile_map or mapping is None:
            return None
        return mapping.id

    def score(
        self,
        X: np.ndarray,
        models: Mapping[str, ScoringModel],
        mapping: ScoreMapping | None = None,
    ) -> np.ndarray:
        """Evaluate the whole DAG on a batch.

        Args:
            X: float64 array, shape ``(n, len(feature_names))``; NaN is
                missing.
            models: loaded models by ``"name@version"``.
            mapping: the quantile mapping for the output node; None passes
                scores through unchanged.

        Returns:
            float64 scores, shape ``(n,)``.

        Raises:
            BadRequest: ``X`` has the wrong shape, or a model's features
                differ from those the predictor was built with.
            NotFound: a model the predictor needs is not in ``models``.
        """
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != len(self.feature_names):
            raise BadRequest(
                f"predictor {self.ref} expects {len(self.feature_names)} "
                f"feature columns, got an array of shape {X.shape}"
            )
        outputs = {ref: self._predict(ref, X, models) for ref in self.model_refs}
        return self.combine(outputs, mapping)

    def combine(
        self,
        outputs: Mapping[str, np.ndarray],
        mapping: ScoreMapping | None = None,
    ) -> np.ndarray:
        """Evaluate the non-model nodes over given model outputs.

        Args:
            outputs: each model's predictions by ``"name@version"``, all of
                the same length.
            mapping: as for ``score``.

        Returns:
            float64 scores, the output node's values.

        Raises:
            NotFound: a model output is missing.
            BadRequest: outputs differ in length, or ``mapping`` is not the
                one the spec pins.
        """
        if (
            self.fixed_mapping is not None
            and mapping is not None
            and mapping.id != self.fixed_mapping
        ):
            raise BadRequest(
                f"predictor {self.ref} pins mapping {self.fixed_mapping}, "
                f"was given {mapping.id}"
            )
        values: dict[str, np.ndarray] = {}
        for node in self.nodes:
            if node.kind == "model":
                values[node.id] = _model_output(self, node, outputs, values)
            else:
                args = [values[input_id] for input_id in node.inputs]
                values[node.id] = _apply(node, args, mapping)
        return values[self.output]

    def columns_for(self, ref: str, X: np.ndarray) -> np.ndarray:
        """The columns of a predictor batch that one model reads.

        Args:
            ref: a model reference among ``model_refs``.
            X: a batch laid out as ``feature_names``.

        Returns:
            ``X`` itself when the model reads every column in order, else a
            C-contiguous copy of its columns in the model's order.

        Raises:
            NotFound: ``ref`` is not one of this predictor's models.
        """
        if ref not in self.model_columns:
            raise NotFound(f"predictor {self.ref} uses no model {ref}")
        columns = self.model_columns[ref]
        return X if columns is None else X[:, columns]

    def _predict(
        self, ref: str, X: np.ndarray, models: Mapping[str, ScoringModel]
    ) -> np.ndarray:
        model = models.get(ref)
        if model is None:
            raise NotFound(f"model {ref} needed by predictor {self.ref} is not loaded")
        # A model object built from other bytes than the one validated would
        # read the wrong columns silently; the check costs a tuple compare.
        if tuple(model.feature_names) != self.model_features[ref]:
            raise BadRequest(
                f"model {ref} has features {tuple(model.feature_names)}, "
                f"predictor {self.ref} was built for {self.model_features[ref]}"
            )
        return np.asarray(model.predict(self.columns_for(ref, X)), dtype=np.float64)


def mapping_for(
    predictor: Predictor,
    tenant: str | None,
    mappings: Mapping[Any, ScoreMapping],
) -> ScoreMapping | None:
    """The mapping a predictor's quantile_map node uses for one tenant.

    Args:
        predictor: the predictor.
        tenant: the tenant scored, or None for the global mapping only.
        mappings: current mappings keyed by ``(predictor_ref, tenant)``,
            with ``tenant`` None for a predictor's global mapping, and by
            mapping id for mappings a spec pins.

    Returns:
        The pinned mapping if the spec pins one; else the tenant's mapping;
        else the predictor's global one; None when there is none, or when
        the predictor has no quantile_map node.

    Raises:
        NotFound: the spec pins a mapping that is not in ``mappings``.
    """
    if not predictor.has_quantile_map:
        return None
    if predictor.fixed_mapping is not None:
        pinned = mappings.get(predictor.fixed_mapping)
        if pinned is None:
            raise NotFound(
                f"mapping {predictor.fixed_mapping} pinned by predictor "
                f"{predictor.ref} is not loaded"
            )
        return pinned
    found = mappings.get((predictor.ref, tenant)) if tenant is not None else None
    if found is None:
        found = mappings.get((predictor.ref, None))
    return found


# -- evaluation ---------------------------------------------------------------


def _model_output(
    predictor: Predictor,
    node: _Node,
    outputs: Mapping[str, np.ndarray],
    values: Mapping[str, np.ndarray],
) -> np.ndarray:
    assert node.model_ref is not None  # guaranteed by _check_node
    found = outputs.get(node.model_ref)
    if found is None:
        raise NotFound(
            f"no output for model {node.model_ref} (node {node.id!r} of "
            f"predictor {predictor.ref})"
        )
    result = np.asarray(found, dtype=np.float64)
    # Leaves come first in topological order, so any earlier value is
    # another model's output: all must line up row for row.
    first = next(iter(values.values()), result)
    if result.ndim != 1 or result.shape != first.shape:
        raise BadRequest(
            f"output of model {node.model_ref} has shape {result.shape}, "
            f"expected {first.shape}"
        )
    return result


def _apply(
    node: _Node, args: list[np.ndarray], mapping: ScoreMapping | None
) -> np.ndarray:
    """Evaluate one non-model node over its inputs' values."""
    if node.kind in ("mean", "weighted_mean"):
        # Weights were normalised to sum to one at validation (equal for a
        # plain mean).
        total = args[0] * node.weights[0]
        for arg, weight in zip(args[1:], node.weights[1:], strict=True):
            total += arg * weight
        return total
    if node.kind == "posterior_correction":
        # Imported here so predictors load without the transform module
        # (and its Cython kernel) until a correction is evaluated.
        from muse._transform import posterior_correction

        assert node.beta is not None  # resolved by _resolve_betas
        return np.asarray(posterior_correction(args[0], node.beta), np.float64)
    if mapping is None:  # quantile_map without a mapping: pass through
        return args[0]
    return np.asarray(mapping.apply(args[0]), dtype=np.float64)


# -- validation ---------------------------------------------------------------


def _fail(node_id: str | None, message: str) -> PredictorSpecError:
    where = "predictor spec" if node_id is None else f"node {node_id!r}"
    return PredictorSpecError(f"{where}: {message}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _plain_copy(source: Mapping[str, Any]) -> dict[str, Any]:
    try:
        copy = json.loads(json.dumps(source, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise _fail(None, f"must hold plain JSON data only ({exc})") from exc
    if not isinstance(copy, dict):
        raise _fail(None, "must be a table/object at the top level")
    return copy


def _parse_text(text: str, is_json: bool) -> dict[str, Any]:
    try:
        parsed = json.loads(text) if is_json else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if is_json else "TOML"
        raise _fail(None, f"is not valid {kind}: {exc}") from exc
    return _plain_copy(parsed)


def _check_fields(
    node_id: str | None, given: Any, required: frozenset[str], allowed: frozenset[str]
) -> None:
    missing, unknown = sorted(required - given), sorted(given - allowed)
    if missing or unknown:
        raise _fail(node_id, f"missing fields {missing}, unknown fields {unknown}")


# Predictors are a handful of steps; the cap keeps validation (recursive over
# the graph) far from Python's recursion limit on a hostile spec.
MAX_NODES = 256


def _check_top_level(spec: dict[str, Any]) -> tuple[str, str, list[dict[str, Any]]]:
    _check_fields(None, spec.keys(), _SPEC_REQUIRED, _SPEC_REQUIRED | _SPEC_OPTIONAL)
    name, output, nodes = spec["name"], spec["output"], spec["nodes"]
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise _fail(None, f"name {name!r} must match {NAME_PATTERN.pattern}")
    if not isinstance(output, str):
        raise _fail(None, f"'output' must be exactly one node id, got {output!r}")
    if not isinstance(nodes, list) or not nodes:
        raise _fail(None, "'nodes' must be a non-empty list of tables")
    if len(nodes) > MAX_NODES:
        raise _fail(None, f"{len(nodes)} nodes; a predictor has at most {MAX_NODES}")
    seen: set[str] = set()
    for index, raw in enumerate(nodes):
        if not isinstance(raw, dict) or not isinstance(raw.get("id"), str):
            raise _fail(None, f"nodes[{index}] must be a table with a string 'id'")
        if raw["id"] in seen:
            raise _fail(raw["id"], "duplicate node id")
        seen.add(raw["id"])
    return name, output, nodes


def _check_node(raw: dict[str, Any]) -> _Node:
    node_id, kind = raw["id"], raw.get("kind")
    # A list or map as the kind is unhashable: test the type first.
    if not isinstance(kind, str) or kind not in _NODE_FIELDS:
        raise _fail(node_id, f"unknown kind {kind!r}; expected one of {NODE_KINDS}")
    required, optional = _NODE_FIELDS[kind]
    _check_fields(node_id, raw.keys(), required, required | optional | _COMMON)
    if kind == "model":
        return _Node(node_id, kind, model_ref=_check_model_ref(node_id, raw["model"]))
    if kind in ("mean", "weighted_mean"):
        inputs = _check_inputs(node_id, raw["inputs"])
        weights = _check_weights(node_id, raw.get("weights", [1] * len(inputs)), inputs)
        return _Node(node_id, kind, inputs=inputs, weights=weights)
    if not isinstance(raw["input"], str):
        raise _fail(node_id, f"'input' must be one node id, got {raw['input']!r}")
    beta = _check_beta(node_id, raw["beta"]) if "beta" in raw else None
    mapping_id = raw.get("mapping")
    if mapping_id is not None and not (
        isinstance(mapping_id, str) and NAME_PATTERN.fullmatch(mapping_id)
    ):
        raise _fail(node_id, f"'mapping' must be a mapping id, got {mapping_id!r}")
    return _Node(node_id, kind, (raw["input"],), beta=beta, mapping_id=mapping_id)


def _check_model_ref(node_id: str, ref: object) -> str:
    try:
        if isinstance(ref, str):
            split_ref(ref)
            return ref
    except BadRequest:
        pass
    raise _fail(node_id, f"'model' must be a reference name@version, got {ref!r}")


def _check_inputs(node_id: str, inputs: object) -> tuple[str, ...]:
    if not isinstance(inputs, list) or not inputs:
        raise _fail(node_id, f"'inputs' must be a list of node ids, got {inputs!r}")
    if not all(isinstance(i, str) for i in inputs) or len(set(inputs)) < len(inputs):
        raise _fail(node_id, f"'inputs' must be distinct node ids, got {inputs!r}")
    return tuple(inputs)


def _check_weights(
    node_id: str, weights: object, inputs: tuple[str, ...]
) -> tuple[float, ...]:
    """Weights normalised to sum to one (a plain mean has equal weights)."""
    if not isinstance(weights, list) or len(weights) != len(inputs):
        raise _fail(node_id, f"'weights' must be {len(inputs)} numbers, one per input")
    for weight in weights:
        if not (_is_number(weight) and math.isfinite(weight) and weight > 0):
            raise _fail(node_id, f"weights must be positive numbers, got {weight!r}")
    # Scaled by the largest first, so weights near the float maximum
    # cannot overflow their sum.
    largest = float(max(weights))
    scaled = [float(w) / largest for w in weights]
    total = math.fsum(scaled)
    return tuple(w / total for w in scaled)


def _check_beta(node_id: str, beta: object) -> float:
    if not (_is_number(beta) and 0 < beta <= 1):  # type: ignore[operator]
        raise _fail(node_id, f"'beta' must be a number in (0, 1], got {beta!r}")
    return float(beta)  # type: ignore[arg-type]


def _check_graph(nodes: dict[str, _Node], output: str) -> None:
    if output not in nodes:
        raise _fail(output, "is named as the output but no node has that id")
    for node in nodes.values():
        for input_id in node.inputs:
            if input_id not in nodes:
                raise _fail(node.id, f"input {input_id!r} is not a node (dangling)")
    maps = [n.id for n in nodes.values() if n.kind == "quantile_map"]
    if len(maps) > 1:
        raise _fail(maps[1], f"more than one quantile_map node: {maps}")
    if maps and maps[0] != output:
        raise _fail(maps[0], f"a quantile_map must be the output, not {output!r}")


def _topological_order(nodes: dict[str, _Node], output: str) -> tuple[_Node, ...]:
    """Depth-first from the output: inputs before the nodes using them."""
    order: list[_Node] = []
    state: dict[str, str] = {}  # "open" while on the stack, then "done"
    path: list[str] = []

    def visit(node_id: str) -> None:
        if state.get(node_id) == "done":
            return
        if state.get(node_id) == "open":
            cycle = [*path[path.index(node_id) :], node_id]
            raise _fail(node_id, f"is part of a cycle: {' -> '.join(cycle)}")
        state[node_id] = "open"
        path.append(node_id)
        for input_id in nodes[node_id].inputs:
            visit(input_id)
        path.pop()
        state[node_id] = "done"
        order.append(nodes[node_id])

    # A first pass over every node reports cycles off the output's path as
    # cycles rather than as unused nodes.
    for node_id in nodes:
        visit(node_id)
    order.clear()
    state.clear()
    visit(output)
    unused = [node_id for node_id in nodes if node_id not in state]
    if unused:
        raise _fail(unused[0], f"is not used by the output {output!r}: {unused}")
    return tuple(order)


def _check_models(
    nodes: dict[str, _Node], models: Mapping[str, ModelInfo]
) -> dict[str, ModelInfo]:
    """Model infos by ref, in the order the spec declares them."""
    infos: dict[str, ModelInfo] = {}
    for node in nodes.values():
        if node.model_ref is None:
            continue
        info = models.get(node.model_ref)
        if info is None:
            raise _fail(node.id, f"model {node.model_ref} is not registered")
        names = tuple(info.feature_names)
        if len(set(names)) != len(names):
            raise _fail(
                node.id,
                f"model {node.model_ref} has an incompatible "
                f"feature list naming a feature twice: {names}",
            )
        infos[node.model_ref] = info
    return infos


def _feature_names(
    declared: object, nodes: dict[str, _Node], infos: Mapping[str, ModelInfo]
) -> tuple[str, ...]:
    if declared is None:
        union: dict[str, None] = {}
        for info in infos.values():
            union.update(dict.fromkeys(info.feature_names))
        return tuple(union)
    if not isinstance(declared, list) or not all(isinstance(f, str) for f in declared):
        raise _fail(None, f"'features' must be a list of names, got {declared!r}")
    if len(set(declared)) != len(declared):
        raise _fail(None, "'features' is incompatible: it names a feature twice")
    for node in nodes.values():
        if node.model_ref is not None:
            needed = infos[node.model_ref].feature_names
            lacking = [f for f in needed if f not in declared]
            if lacking:
                raise _fail(
                    node.id,
                    f"model {node.model_ref} needs features "
                    f"{lacking} missing from 'features'",
                )
    return tuple(declared)


def _resolve_betas(
    order: tuple[_Node, ...], infos: Mapping[str, ModelInfo]
) -> tuple[_Node, ...]:
    """Fill in default betas; only a correction over a single model has one."""
    refs_below: dict[str, frozenset[str]] = {}
    resolved: list[_Node] = []
    for node in order:
        refs = frozenset({node.model_ref}) if node.model_ref else frozenset()
        refs = refs.union(*(refs_below[i] for i in node.inputs))
        refs_below[node.id] = refs
        if node.kind == "posterior_correction" and node.beta is None:
            if len(refs) != 1:
                raise _fail(
                    node.id,
                    f"input combines models {sorted(refs)}; give 'beta' explicitly",
                )
            beta = _check_beta(node.id, float(infos[next(iter(refs))].beta))
            node = dataclasses.replace(node, beta=beta)
        resolved.append(node)
    return tuple(resolved)


def _column_indices(
    features: tuple[str, ...], model_features: Mapping[str, tuple[str, ...]]
) -> Mapping[str, np.ndarray | None]:
    """Per model, the columns of X it reads; None when it reads X as is."""
    position = {name: index for index, name in enumerate(features)}
    columns: dict[str, np.ndarray | None] = {}
    for ref, names in model_features.items():
        if names == features:
            columns[ref] = None
            continue
        index = np.array([position[n] for n in names], dtype=np.intp)
        index.flags.writeable = False  # the predictor is immutable
        columns[ref] = index
    return MappingProxyType(columns)
