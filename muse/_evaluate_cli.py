"""``muse evaluate``: how a mapping keeps the curve on a file of events.

    muse evaluate --registry DIR --predictor NAME@V
                  [--mapping ID | --scope global|TENANT] --events FILE.parquet

Loads the predictor and its models from the registry, scores the file's
events offline (feature columns found by name), maps the scores and prints,
per edge, the target share, the observed share and the relative error,
pooled and per tenant.  Tenants come from a ``TENANT`` column, else from
``CUSTOMER_ID`` as ``"bank-%02d" % (CUSTOMER_ID % 24)``, as everywhere in
MUSE.

Which mapping: ``--mapping ID`` names one; ``--scope`` takes the one the
route table assigns to the predictor for that scope (a tenant falls back to
the predictor-wide ``*`` assignment, as serving does), else the most
recently fitted one for the scope.  ``--scope TENANT`` also restricts the
events to that tenant.  Without either, the scope is global.

Kept apart from ``_evaluate`` (which re-exports ``evaluate_main``) so the
metrics module stays free of registry and model imports.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt

from muse._errors import MuseError
from muse._evaluate import (
    ALL_TENANTS,
    format_share_table,
    median_abs_relative_error,
    share_table,
    tenants_of,
)

__all__ = ["evaluate_main"]

# Exit status for bad input, as argparse uses for bad arguments.
_BAD_INPUT = 2


def evaluate_main(argv: Sequence[str], *, out: TextIO | None = None) -> int:
    """Run ``muse evaluate``.

    Args:
        argv: the arguments after ``evaluate``.
        out: where the table goes; standard output when None.

    Returns:
        0 on success, 2 on bad arguments or bad input (the reason goes to
        standard error).
    """
    try:
        args = _parser().parse_args(list(argv))
    except SystemExit as exc:  # argparse has printed usage and the reason
        return exc.code if isinstance(exc.code, int) else _BAD_INPUT
    try:
        text = _evaluate(args)
    except (MuseError, OSError, ValueError, KeyError, ImportError) as exc:
        detail = exc.detail if isinstance(exc, MuseError) else str(exc)
        print(f"muse evaluate: {detail}", file=sys.stderr)
        return _BAD_INPUT
    print(text, file=out or sys.stdout)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="muse evaluate",
        description="Compare served shares at each edge with the reference curve.",
    )
    parser.add_argument("--registry", required=True, help="registry directory")
    parser.add_argument("--predictor", required=True, help="predictor ref NAME@V")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--mapping", help="mapping id")
    choice.add_argument("--scope", help="'global' or a tenant (default global)")
    parser.add_argument("--events", required=True, help="parquet file of events")
    return parser


def _evaluate(args: argparse.Namespace) -> str:
    """Score, map and tabulate; returns the report text."""
    from muse._predictor import Predictor, split_ref
    from muse._registry import Registry

    registry = Registry(args.registry, create=False)
    name, version = split_ref(args.predictor)
    spec = registry.get_predictor(name, version)
    models = _load_models(registry, _model_refs(spec))
    predictor = Predictor.from_spec(spec, models, version=version)
    scope = None if args.scope in (None, "global") else str(args.scope)
    if args.mapping is not None:
        mapping = registry.get_mapping(args.mapping)
    else:
        mapping = _scoped_mapping(registry, predictor.ref, scope)

    X, tenants = _read_events(args.events, predictor.feature_names)
    if scope is not None:
        if tenants is None:
            raise ValueError(f"{args.events} has no TENANT or CUSTOMER_ID column")
        X, tenants = X[tenants == scope], tenants[tenants == scope]
    if len(X) == 0:
        raise ValueError(f"{args.events} holds no events to evaluate")

    scores = predictor.score(X, models, mapping)
    curve = _curve(mapping)
    rows = share_table(scores, curve, tenants)
    return _report(predictor.ref, mapping, len(X), rows)


def _model_refs(spec: dict[str, Any]) -> list[str]:
    """The model references a predictor spec names, in order, once each."""
    nodes = spec.get("nodes", [])
    return list(dict.fromkeys(n["model"] for n in nodes if n.get("kind") == "model"))


def _load_models(registry: Any, refs: Sequence[str]) -> dict[str, Any]:
    """Every model a predictor names, loaded (and compiled) by reference."""
    from muse._models import load_model

    models = {}
    for ref in refs:
        data, meta, golden = registry.get_model(ref)
        models[ref] = load_model(
            data,
            meta["format"],
            list(meta["feature_names"]),
            meta["beta"],
            cache_dir=registry.compiled_dir,
            golden=golden,
            name=meta["name"],
        )
    return models


def _scoped_mapping(registry: Any, predictor_ref: str, tenant: str | None) -> Any:
    """The mapping serving would use for a scope, or the latest fitted one.

    Args:
        registry: the registry.
        predictor_ref: the predictor's ``name@version``.
        tenant: the tenant, or None for the predictor-wide scope.

    Returns:
        The mapping, or None when the scope has none.
    """
    from muse._routes import RouteTable

    version, document = registry.current_routes()
    table = RouteTable.from_dict({**document, "version": version})
    mapping_id = table.mapping_id(predictor_ref, tenant or ALL_TENANTS)
    if mapping_id is None:
        mapping_id = _latest_mapping(registry, predictor_ref, tenant)
    if mapping_id is None:
        print(
            f"muse evaluate: no mapping for {predictor_ref}; scores are unmapped",
            file=sys.stderr,
        )
        return None
    return registry.get_mapping(mapping_id)


def _latest_mapping(
    registry: Any, predictor_ref: str, tenant: str | None
) -> str | None:
    """Id of the most recently fitted mapping for the scope, else global.

    Global mappings record their tenant as None; "*" is accepted as well.
    """
    newest: dict[str | None, tuple[float, str]] = {}
    for mapping_id in registry.list_mappings():
        stored = registry.get_mapping_dict(mapping_id)
        if stored.get("predictor") != predictor_ref:
            continue
        scope = stored.get("tenant")
        scope = None if scope == ALL_TENANTS else scope
        candidate = (float(stored.get("fitted_at", 0.0)), mapping_id)
        newest[scope] = max(newest.get(scope, candidate), candidate)
    for scope in (tenant, None):
        if scope in newest:
            return newest[scope][1]
    return None


def _read_events(
    path: str, feature_names: Sequence[str]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.str_] | None]:
    """Feature matrix and tenants of a parquet file's events.

    Raises:
        ValueError: a feature column is missing.
        OSError: the file cannot be read.
    """
    import pyarrow.parquet as pq  # type: ignore[import-untyped]  # no stubs

    available = set(pq.read_schema(path).names)
    missing = [name for name in feature_names if name not in available]
    if missing:
        raise ValueError(f"{path} lacks feature columns {missing}")
    tenant_column = next(
        (name for name in ("TENANT", "CUSTOMER_ID") if name in available), None
    )
    wanted = list(dict.fromkeys([*feature_names, *filter(None, [tenant_column])]))
    table = pq.read_table(path, columns=wanted)
    X = np.empty((table.num_rows, len(feature_names)))
    for j, name in enumerate(feature_names):
        X[:, j] = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
    tenants = None
    if tenant_column == "TENANT":
        tenants = table.column("TENANT").to_numpy(zero_copy_only=False).astype(str)
    elif tenant_column == "CUSTOMER_ID":
        ids = table.column("CUSTOMER_ID").to_numpy(zero_copy_only=False)
        tenants = tenants_of(ids)
    return X, tenants


def _curve(mapping: Any) -> tuple[tuple[float, float], ...]:
    """The mapping's curve, or the default one for unmapped scores."""
    if mapping is not None:
        return tuple(mapping.curve)
    from muse._transform import DEFAULT_CURVE

    return tuple(sorted(DEFAULT_CURVE.items()))


def _report(predictor_ref: str, mapping: Any, n: int, rows: list[Any]) -> str:
    """Header lines, the share table and the median errors."""
    mapping_id = "none" if mapping is None else mapping.id
    lines = [
        f"predictor: {predictor_ref}",
        f"mapping:   {mapping_id}",
        f"events:    {n}",
        "",
        format_share_table(rows),
        "",
        f"median |relative error|, pooled:     {median_abs_relative_error(rows):.4f}",
        f"median |relative error|, per tenant: "
        f"{median_abs_relative_error(rows, per_tenant=True):.4f}",
    ]
    return "\n".join(lines)
