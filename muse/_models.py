"""Tree models in (XGBoost, LightGBM, scikit-learn, treelite), Model out.

``load_model`` imports a binary classifier through treelite, compiles it
once (``_compile.py``; treelite's GTIL interpreter where no compiler is
available) and refuses it unless it reproduces the model's own library on
golden rows (``_golden.py``), which are kept with the model.

An import can shift scores silently in a few known ways, each handled here
and each covered by a test:

* XGBoost compares and sums in float32, its base margin included; treelite
  derives that margin in float64 and may land one float32 step away, so it
  is recomputed as XGBoost does (``_set_xgboost_intercept``).
* scikit-learn trees (not HistGradientBoosting) compare ``float32(x) <= t``
  with a float64 t; treelite compares ``x <= t``.  Thresholds are moved to
  the float64 value that sends every double the way scikit-learn does
  (``_float32_thresholds``), so the stored checkpoint is right on its own.
* LightGBM's predictor reads any |x| <= 1e-35 as 0.0, and zero_as_missing
  splits send those zeros (and NaN) to the default child, where treelite
  reads "NaN is 0".  Those splits become NaN-missing splits and the kernels
  rewrite tiny values per feature, as LightGBM does (``_lightgbm_zeros``).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
import re
import struct
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import treelite
from treelite.core import TreeliteError

from muse._compile import (
    ZEROS_ARE_MISSING,
    ZEROS_ARE_ZERO,
    CompileUnavailable,
    GtilKernel,
    Kernel,
    OutputLayout,
    ZeroModes,
    build_library,
    default_cache_dir,
    native_kernel,
)
from muse._errors import BadRequest, ModelImportError
from muse._golden import (
    PARITY_TOLERANCE,
    Golden,
    Reference,
    check_parity,
    derive_golden,
    given_golden,
)

__all__ = ["FORMATS", "PARITY_TOLERANCE", "Model", "load_model"]

log = logging.getLogger("muse.models")

FloatArray = npt.NDArray[np.float64]
# What predict takes: an array, or nested lists where None means missing.
Rows = npt.ArrayLike | Sequence[Sequence[float | None]]

FORMATS = ("xgboost_json", "xgboost_ubj", "lightgbm", "sklearn", "treelite")
# "xgboost" is accepted too and resolved by sniffing JSON against UBJSON.
_XGBOOST_FORMATS = ("xgboost", "xgboost_json", "xgboost_ubj")

# LightGBM decision_type bits: 1 categorical, 2 default left, 12 missing
# type (0 none, 1 zero, 2 NaN).
_LGB_CATEGORICAL = 1
_LGB_MISSING_SHIFT = 2
_LGB_ZERO, _LGB_NAN = 1, 2


@dataclass(frozen=True, eq=False)
class Model:
    """An imported binary tree model; immutable, predict is thread-safe.

    Attributes:
        digest: sha256 hex of ``to_bytes()``, the artifact's identity.
        feature_names: the model's input columns, in order.
        beta: share of negatives kept at training, in (0, 1].
        backend: ``"compiled"`` (native library) or ``"gtil"``.
        format: the format of ``to_bytes()`` (sklearn models: "treelite").
        zero_as_missing: some split treats 0 as missing (LightGBM
            ``zero_as_missing``); predict does the same.
        name: the name given at load, else a digest prefix.
        num_trees: trees in the ensemble.
        implementation: what runs predict: ``"cython"``, ``"ctypes"``
            (``MUSE_PURE_PYTHON=1``) or ``"gtil"``.
        cache_hit: the compiled library came from the cache.
    """

    digest: str
    feature_names: tuple[str, ...]
    beta: float
    backend: str
    format: str
    zero_as_missing: bool
    name: str
    num_trees: int
    implementation: str
    cache_hit: bool
    _data: bytes = field(repr=False)
    _kernel: Kernel = field(repr=False)
    _golden: Golden = field(repr=False)

    @property
    def allows_infinity(self) -> bool:
        """Whether the native library scores infinite inputs.

        LightGBM compares them like any number; XGBoost's DMatrix and
        scikit-learn's input checks refuse them, so MUSE refuses them too.
        """
        return self.format == "lightgbm"

    @property
    def num_features(self) -> int:
        """Number of input columns."""
        return len(self.feature_names)

    @property
    def golden(self) -> tuple[FloatArray, FloatArray]:
        """(rows, expected margins) of the parity check, read-only."""
        return self._golden.X, self._golden.margin

    @property
    def golden_source(self) -> str:
        """Who computed the expected values: xgboost, lightgbm, sklearn,
        gtil (no native library) or caller."""
        return self._golden.source

    def predict(self, X: Rows) -> FloatArray:
        """Positive-class probability of every row.

        Args:
            X: shape (n, num_features), columns in ``feature_names`` order;
                NaN (or None) means missing.

        Returns:
            float64 array of shape (n,).

        Raises:
            BadRequest: X is not a 2-D numeric array of num_features columns.
        """
        return self._run(X, margin=False)

    def predict_margin(self, X: Rows) -> FloatArray:
        """Raw margin per row: log-odds (a forest: its mean probability).

        Raises:
            BadRequest: as ``predict``.
        """
        return self._run(X, margin=True)

    def to_bytes(self) -> bytes:
        """Canonical bytes; ``load_model(b, model.format)`` reads them."""
        return self._data

    def golden_bytes(self) -> bytes:
        """Golden rows and expected outputs as npz bytes (no pickles)."""
        return self._golden.to_bytes()

    def _by_name(self, frame: Any) -> Any:
        # A data frame names its columns: use the names, never the order.
        given = [str(c) for c in frame.columns]
        absent = [f for f in self.feature_names if f not in given]
        if absent:
            raise BadRequest(
                f"model {self.name} needs columns {absent[:5]} that the frame lacks"
            )
        return frame[list(self.feature_names)]

    def _run(self, X: Rows, margin: bool) -> FloatArray:
        # The kernels check shape and width themselves (ValueError); checking
        # here as well would add a third to the cost of a one-row call.
        if type(X) is not np.ndarray and hasattr(X, "columns"):
            X = self._by_name(X)
        try:
            rows = np.ascontiguousarray(X, dtype=np.float64)
            return self._kernel.run(rows, margin)
        except (TypeError, ValueError) as exc:
            raise BadRequest(
                f"model {self.name} expects a 2-D array of rows of "
                f"{self.num_features} numbers: {exc}"
            ) from exc


def load_model(
    source: Any,
    format: str,
    feature_names: Sequence[str] | None = None,
    beta: float = 1.0,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    golden: bytes | tuple[Any, ...] | None = None,
    name: str | None = None,
) -> Model:
    """Import, compile and check a binary tree model.

    Args:
        source: a path, the model's bytes, or a native object
            (``xgboost.Booster``, ``lightgbm.Booster``, a fitted sklearn
            RandomForest / ExtraTrees / GradientBoosting /
            HistGradientBoosting classifier, ``treelite.Model``).
        format: one of ``FORMATS``, or ``"xgboost"`` (JSON or UBJSON).
        feature_names: column names; must match the model file's own names
            where it has them.  Default: the file's, else f0, f1, ...
        beta: share of negatives kept at training, in (0, 1].
        cache_dir: compiled-library cache; default ``$MUSE_CACHE_DIR`` or
            ``~/.cache/muse/compiled``.
        golden: npz bytes from ``Model.golden_bytes``, or (X, margin) or
            (X, margin, probability).  Default: rows derived from the
            model's splits, expected values from its native library (from
            GTIL when that library is not installed).
        name: used in logs and messages.

    Returns:
        The model, ready to predict.

    Raises:
        BadRequest: beta outside (0, 1].
        ModelImportError: unreadable model, not a binary classifier,
            feature names that disagree with the model, bad golden rows.
        ParityError: an output differs from the expected one by more than
            PARITY_TOLERANCE on a golden row.
    """
    started = time.perf_counter()
    beta = _check_beta(beta)
    imported = _import(source, format)
    tl_model = imported.tl_model
    layout = _layout(tl_model)
    names = _resolve_names(imported.names, feature_names, tl_model.num_feature)
    digest = hashlib.sha256(imported.data).hexdigest()
    label = name or digest[:12]
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    kernel, implementation, cache_hit = _kernel_for(imported, layout, directory, label)
    if golden is None:
        reference = imported.reference or _gtil_reference(imported, layout)
        expected = derive_golden(tl_model, reference, int(digest[:15], 16))
    else:
        expected = given_golden(golden, tl_model.num_feature)
    check_parity(kernel, expected, label)
    model = Model(
        digest=digest,
        feature_names=names,
        beta=beta,
        backend="gtil" if implementation == "gtil" else "compiled",
        format=imported.format,
        zero_as_missing=imported.zero_as_missing,
        name=label,
        num_trees=tl_model.num_tree,
        implementation=implementation,
        cache_hit=cache_hit,
        _data=imported.data,
        _kernel=kernel,
        _golden=expected,
    )
    log.info(
        "model %s loaded: digest %s, backend %s (%s), %d trees, %.2f s, "
        "compile cache %s, %d golden rows vs %s",
        label,
        digest[:12],
        model.backend,
        implementation,
        model.num_trees,
        time.perf_counter() - started,
        "hit" if cache_hit else "miss",
        len(expected.X),
        expected.source,
    )
    return model


def _check_beta(beta: float) -> float:
    try:
        value = float(beta)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"beta must be a number in (0, 1], got {beta!r}") from exc
    if not 0.0 < value <= 1.0:
        raise BadRequest(f"beta must be in (0, 1], got {beta!r}")
    return value


def _kernel_for(
    imported: _Imported, layout: OutputLayout, cache_dir: Path, label: str
) -> tuple[Kernel, str, bool]:
    """The compiled kernel, or GTIL after one warning; and if cached."""
    tl_model, zeros = imported.tl_model, imported.zeros
    try:
        library, cache_hit = build_library(tl_model, cache_dir, label)
    except CompileUnavailable as exc:
        log.warning(
            "model %s: cannot compile (%s); serving it with treelite's GTIL "
            "interpreter: same results, slower",
            label,
            exc,
        )
        return GtilKernel(tl_model, layout, zeros), "gtil", False
    if (library.float32, library.num_feature) != (layout.float32, tl_model.num_feature):
        raise ModelImportError(f"model {label}: {library.path} is another model")
    pure = os.environ.get("MUSE_PURE_PYTHON", "") not in ("", "0")
    kernel, implementation = native_kernel(library, layout.out_index, zeros, pure)
    return kernel, implementation, cache_hit


def _gtil_reference(imported: _Imported, layout: OutputLayout) -> Reference:
    """GTIL as the reference where the native library is not installed."""
    gtil = GtilKernel(imported.tl_model, layout, imported.zeros)
    return Reference("gtil", lambda X: (gtil.run(X, True), gtil.run(X, False)))


# --- import ------------------------------------------------------------------


@dataclass(frozen=True)
class _Imported:
    tl_model: treelite.Model
    data: bytes
    format: str
    names: tuple[str, ...] | None
    reference: Reference | None
    zeros: ZeroModes | None = None

    @property
    def zero_as_missing(self) -> bool:
        return self.zeros is not None and bool((self.zeros == ZEROS_ARE_MISSING).any())


def _import(source: Any, format: str) -> _Imported:
    if format in _XGBOOST_FORMATS:
        return _import_xgboost(source, format)
    if format == "lightgbm":
        return _import_lightgbm(source)
    if format == "sklearn":
        return _import_sklearn(source)
    if format == "treelite":
        return _import_treelite(source)
    raise ModelImportError(
        f"unknown model format {format!r}; expected one of {', '.join(FORMATS)}"
    )


def _optional(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _source_bytes(source: Any, format: str) -> bytes | None:
    """The bytes of a path or bytes-like source; None for anything else."""
    if isinstance(source, (str, os.PathLike)):
        try:
            return Path(source).read_bytes()
        except OSError as exc:
            raise ModelImportError(f"cannot read {format} model: {exc}") from exc
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    return None


def _wrong_source(format: str, expected: str, source: Any) -> ModelImportError:
    return ModelImportError(
        f"format {format!r} takes a path, bytes or {expected}; "
        f"got {type(source).__name__}"
    )


def _names(names: Sequence[str] | None) -> tuple[str, ...] | None:
    if names is None or len(names) == 0:
        return None
    return tuple(str(n) for n in names)


def _import_xgboost(source: Any, format: str) -> _Imported:
    xgb = _optional("xgboost")
    data = _source_bytes(source, format)
    if data is None:
        if xgb is None or not isinstance(source, xgb.Booster):
            raise _wrong_source(format, "an xgboost.Booster", source)
        data = bytes(source.save_raw(raw_format="ubj"))
        format = "xgboost"
    sniffed = _sniff_xgboost(data)
    if format not in ("xgboost", sniffed):
        raise ModelImportError(
            f"format {format!r} given, but the bytes are {sniffed!r}"
        )
    try:
        if sniffed == "xgboost_json":
            tl_model = treelite.frontend.from_xgboost_json(data)
        else:
            tl_model = treelite.frontend.from_xgboost_ubjson(data)
    except (TreeliteError, UnicodeDecodeError, ValueError) as exc:
        # treelite's own error decoding can fail on garbage bytes.
        raise ModelImportError(
            f"treelite cannot read this XGBoost model: {exc}"
        ) from exc
    _set_xgboost_intercept(tl_model, data)
    reference, names = _xgboost_reference(xgb, data)
    if names is None and sniffed == "xgboost_json":
        names = _names(json.loads(data).get("learner", {}).get("feature_names"))
    return _Imported(tl_model, data, sniffed, names, reference)


def _sniff_xgboost(data: bytes) -> str:
    head = data[:64].lstrip()
    if head[:1] != b"{":
        raise ModelImportError("not an XGBoost JSON or UBJSON model (no leading '{')")
    return "xgboost_json" if head[1:].lstrip()[:1] in (b'"', b"}") else "xgboost_ubj"


# XGBoost's learner_model_param base_score, in JSON ("base_score":"[3E-1]")
# or UBJSON (the key, 'S', a typed length, the string).
_BASE_SCORE_JSON = re.compile(rb'"base_score"\s*:\s*"([^"]*)"')
_BASE_SCORE_UBJ = re.compile(rb"base_scoreS")
_UBJ_LENGTH = {b"i": "b", b"U": "B", b"I": ">h", b"l": ">i", b"L": ">q"}


def _set_xgboost_intercept(tl_model: treelite.Model, data: bytes) -> None:
    """Give a logistic model XGBoost's own float32 base margin.

    XGBoost turns its stored base_score p into ``-log(1.0f / p - 1.0f)``
    computed in float (glibc's logf: correctly rounded); treelite takes a
    float64 logit, which can land one float32 step away.
    """
    header = tl_model.get_header_accessor()
    text = _xgboost_base_score(data)
    if str(header.get_field("postprocessor")) != "sigmoid" or text is None:
        return
    values = [float(v) for v in text.strip("[]").split(",") if v.strip()]
    if len(values) != 1 or not 0.0 < values[0] < 1.0:
        return
    p = np.float32(values[0])
    margin = np.float32(-math.log(float(np.float32(1.0) / p - np.float32(1.0))))
    header.set_field("base_scores", np.array([margin], dtype=np.float64))


def _xgboost_base_score(data: bytes) -> str | None:
    found = _BASE_SCORE_JSON.search(data)
    if found is not None:
        return found[1].decode("ascii", "replace")
    found = _BASE_SCORE_UBJ.search(data)
    if found is None or data[found.end() : found.end() + 1] not in _UBJ_LENGTH:
        return None
    fmt = _UBJ_LENGTH[data[found.end() : found.end() + 1]]
    start = found.end() + 1 + struct.calcsize(fmt)
    (length,) = struct.unpack(fmt, data[found.end() + 1 : start])
    return data[start : start + length].decode("ascii", "replace")


def _xgboost_reference(
    xgb: ModuleType | None, data: bytes
) -> tuple[Reference | None, tuple[str, ...] | None]:
    if xgb is None:
        return None, None
    booster = xgb.Booster()
    booster.load_model(bytearray(data))
    booster.set_param({"nthread": 1})

    def predict(X: FloatArray) -> tuple[FloatArray, FloatArray]:
        margin = booster.inplace_predict(X, predict_type="margin")
        proba = booster.inplace_predict(X, predict_type="value")
        return np.asarray(margin, np.float64), np.asarray(proba, np.float64)

    return Reference("xgboost", predict, (ValueError,)), _names(booster.feature_names)


def _import_lightgbm(source: Any) -> _Imported:
    lgb = _optional("lightgbm")
    data = _source_bytes(source, "lightgbm")
    if data is None:
        if lgb is None or not isinstance(source, lgb.Booster):
            raise _wrong_source("lightgbm", "a lightgbm.Booster", source)
        data = source.model_to_string().encode()
    text = data.decode("utf-8", "replace")
    if not text.startswith("tree\n"):
        raise ModelImportError("not a LightGBM text model (no leading 'tree' line)")
    if re.search(r"^is_linear=1", text, re.M):
        raise ModelImportError("LightGBM linear trees are not supported by treelite")
    rewritten, zero_features = _lightgbm_zero_missing(text)
    with tempfile.TemporaryDirectory(prefix="muse-lgb-") as tmp:
        path = Path(tmp) / "model.txt"
        path.write_text(rewritten)
        try:
            tl_model = treelite.frontend.load_lightgbm_model(path)
        except (TreeliteError, UnicodeDecodeError, ValueError) as exc:
            raise ModelImportError(
                f"treelite cannot read this LightGBM model: {exc}"
            ) from exc
    zeros = np.full(tl_model.num_feature, ZEROS_ARE_ZERO, dtype=np.uint8)
    zeros[sorted(zero_features)] = ZEROS_ARE_MISSING
    reference = _lightgbm_reference(lgb, text)
    return _Imported(
        tl_model, data, "lightgbm", _lightgbm_names(text), reference, zeros
    )


def _lightgbm_zero_missing(text: str) -> tuple[str, frozenset[int]]:
    """Rewrite zero-as-missing splits as NaN-missing ones.

    Returns:
        The rewritten model text and the features whose zeros mean missing.

    Raises:
        ModelImportError: a feature has both kinds of missing split, or the
            tree layout is not the one LightGBM writes.
    """
    lines = text.split("\n")
    zero: set[int] = set()
    nan: set[int] = set()
    features: list[int] = []
    for i, line in enumerate(lines):
        key, _, value = line.partition("=")
        if key == "Tree":
            features = []
        elif key == "split_feature":
            features = [int(v) for v in value.split()]
        elif key == "decision_type":
            kinds = [int(v) for v in value.split()]
            if len(kinds) != len(features):
                raise ModelImportError(
                    "LightGBM tree: decision_type before split_feature"
                )
            lines[i] = "decision_type=" + " ".join(
                str(_zero_split_as_nan(k, f, zero, nan))
                for k, f in zip(kinds, features, strict=True)
            )
    if zero & nan:
        raise ModelImportError(
            f"LightGBM features {sorted(zero & nan)} have both zero-missing and "
            "NaN-missing splits; MUSE cannot reproduce that"
        )
    return "\n".join(lines), frozenset(zero)


def _zero_split_as_nan(kind: int, feature: int, zero: set[int], nan: set[int]) -> int:
    missing = (kind >> _LGB_MISSING_SHIFT) & 3
    if kind & _LGB_CATEGORICAL or missing not in (_LGB_ZERO, _LGB_NAN):
        return kind
    if missing == _LGB_NAN:
        nan.add(feature)
        return kind
    zero.add(feature)
    return (kind & ~(3 << _LGB_MISSING_SHIFT)) | (_LGB_NAN << _LGB_MISSING_SHIFT)


def _lightgbm_names(text: str) -> tuple[str, ...] | None:
    found = re.search(r"^feature_names=(.*)$", text, re.M)
    names = found[1].split() if found else []
    # LightGBM's own placeholders when it was given no names.
    if names == [f"Column_{i}" for i in range(len(names))]:
        return None
    return tuple(names)


def _lightgbm_reference(lgb: ModuleType | None, text: str) -> Reference | None:
    if lgb is None:
        return None
    booster = lgb.Booster(model_str=text)
    # num_iteration=-1: every tree in the text, as treelite reads it.
    options = {"num_iteration": -1, "num_threads": 1}

    def predict(X: FloatArray) -> tuple[FloatArray, FloatArray]:
        margin = booster.predict(X, raw_score=True, **options)
        proba = booster.predict(X, **options)
        return np.asarray(margin, np.float64), np.asarray(proba, np.float64)

    return Reference("lightgbm", predict, (ValueError, lgb.basic.LightGBMError))


def _import_sklearn(source: Any) -> _Imported:
    ensemble = _optional("sklearn.ensemble")
    if ensemble is None:
        raise ModelImportError("format 'sklearn' needs scikit-learn installed")
    forests = (ensemble.RandomForestClassifier, ensemble.ExtraTreesClassifier)
    kinds = forests + (
        ensemble.GradientBoostingClassifier,
        ensemble.HistGradientBoostingClassifier,
    )
    if not isinstance(source, kinds):
        raise ModelImportError(
            "format 'sklearn' takes a fitted RandomForest, ExtraTrees, GradientBoosting"
            f" or HistGradientBoosting classifier; got {type(source).__name__}"
        )
    try:
        tl_model = treelite.sklearn.import_model(source)
    except (TreeliteError, AttributeError, ValueError, NotImplementedError) as exc:
        raise ModelImportError(f"treelite cannot import this estimator: {exc}") from exc
    if not isinstance(source, ensemble.HistGradientBoostingClassifier):
        # HistGradientBoosting compares float64 inputs; the others float32.
        _match_float32_inputs(tl_model)
    names = _names(getattr(source, "feature_names_in_", None))
    _store_names(tl_model, names)
    reference = _sklearn_reference(source, isinstance(source, forests))
    return _Imported(tl_model, tl_model.serialize_bytes(), "treelite", names, reference)


def _float32_thresholds(t: FloatArray) -> FloatArray:
    """Thresholds t' with ``x <= t'`` exactly when ``float32(x) <= t``.

    float32(x) <= t means float32(x) <= a, a the largest float32 <= t.  That
    holds for every x below the midpoint m of a and the next float32 b, and
    at m itself when round-to-even picks a (a's last mantissa bit is 0).
    m is exact in float64.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        a = t.astype(np.float32)
        a = np.where(a.astype(np.float64) > t, np.nextafter(a, np.float32(-np.inf)), a)
        b = np.nextafter(a, np.float32(np.inf))
        m = (a.astype(np.float64) + b.astype(np.float64)) / 2.0
        even = (a.view(np.uint32) & np.uint32(1)) == 0
        moved = np.where(even, m, np.nextafter(m, -np.inf))
    keep = ~np.isfinite(t) | ~np.isfinite(b)
    return np.where(keep, t, moved)


def _match_float32_inputs(tl_model: treelite.Model) -> None:
    for k in range(tl_model.num_tree):
        tree = tl_model.get_tree_accessor(k)
        numeric = tree.get_field("node_type") == 1
        if not (tree.get_field("cmp")[numeric] == 3).all():
            raise ModelImportError("expected only '<=' splits in a scikit-learn tree")
        threshold = tree.get_field("threshold").copy()
        threshold[numeric] = _float32_thresholds(threshold[numeric])
        tree.set_field("threshold", threshold)


def _store_names(tl_model: treelite.Model, names: tuple[str, ...] | None) -> None:
    """Keep feature names inside the checkpoint, for format "treelite"."""
    if names is None:
        return
    header = tl_model.get_header_accessor()
    text = str(header.get_field("attributes")).strip()
    attributes = json.loads(text) if text else {}
    attributes["muse_feature_names"] = list(names)
    header.set_field("attributes", json.dumps(attributes))


def _sklearn_reference(estimator: Any, forest: bool) -> Reference:
    def predict(X: FloatArray) -> tuple[FloatArray, FloatArray]:
        with warnings.catch_warnings():
            # Fitted on a DataFrame, asked about an array: names unchecked.
            warnings.simplefilter("ignore", UserWarning)
            # It sums rows holding +inf and -inf to test finiteness.
            warnings.simplefilter("ignore", RuntimeWarning)
            proba = np.asarray(estimator.predict_proba(X)[:, 1], np.float64)
            if forest:
                return proba, proba
            return np.asarray(estimator.decision_function(X), np.float64), proba

    return Reference("sklearn", predict, (ValueError,))


def _import_treelite(source: Any) -> _Imported:
    data = _source_bytes(source, "treelite")
    if data is None:
        if not isinstance(source, treelite.Model):
            raise _wrong_source("treelite", "a treelite.Model", source)
        data = source.serialize_bytes()
    try:
        tl_model = treelite.Model.deserialize_bytes(data)
        text = str(tl_model.get_header_accessor().get_field("attributes")).strip()
        attributes = json.loads(text) if text else {}
    except (TreeliteError, ValueError) as exc:
        raise ModelImportError(f"not a treelite checkpoint: {exc}") from exc
    names = _names(attributes.get("muse_feature_names"))
    return _Imported(tl_model, data, "treelite", names, None)


# --- what the model computes -------------------------------------------------


def _layout(tl_model: treelite.Model) -> OutputLayout:
    """How to read the positive class; refuses all but binary classifiers."""
    header = tl_model.get_header_accessor()
    targets = int(header.get_field("num_target")[0])
    classes = int(header.get_field("num_class")[0])
    postprocessor = str(header.get_field("postprocessor"))
    alpha: float | None = float(header.get_field("sigmoid_alpha")[0])
    if targets == 1 and classes == 1 and postprocessor == "sigmoid":
        out_index = 0
    elif targets == 1 and classes == 2 and postprocessor == "identity_multiclass":
        out_index, alpha = 1, None
    else:
        raise ModelImportError(
            "MUSE serves binary classifiers only; this model has "
            f"{targets} target(s), {classes} class(es) and postprocessor "
            f"{postprocessor!r}"
        )
    return OutputLayout(
        float32=tl_model.input_type == "float32",
        out_index=out_index,
        num_tree=tl_model.num_tree,
        average=bool(header.get_field("average_tree_output")[0]),
        base=float(header.get_field("base_scores")[out_index]),
        sigmoid_alpha=alpha,
    )


def _resolve_names(
    from_model: tuple[str, ...] | None, given: Sequence[str] | None, count: int
) -> tuple[str, ...]:
    if from_model is not None and len(from_model) != count:
        raise ModelImportError(
            f"the model file names {len(from_model)} features but its trees "
            f"read {count}"
        )
    if given is None:
        return from_model or tuple(f"f{i}" for i in range(count))
    names = tuple(str(n) for n in given)
    if len(names) != count:
        raise ModelImportError(
            f"feature_names has {len(names)} names; the model reads {count} features"
        )
    if len(set(names)) != len(names):
        raise ModelImportError("feature_names has duplicates")
    if from_model is not None and names != from_model:
        i = next(
            i
            for i, pair in enumerate(zip(names, from_model, strict=True))
            if pair[0] != pair[1]
        )
        raise ModelImportError(
            f"feature_names[{i}] is {names[i]!r}, the model file calls it "
            f"{from_model[i]!r}"
        )
    return names
