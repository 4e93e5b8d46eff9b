"""The on-disk registry: every artifact MUSE serves, versioned and immutable.

Layout under the registry's root directory::

    models/<name>/<v>.model       the model's bytes, as given
    models/<name>/<v>.golden      golden rows (npz bytes), when given
    models/<name>/<v>.json        meta; its presence publishes version v
    compiled/                     cache of compiled model libraries
    predictors/<name>/<v>.json    {"name", "version", "created", "spec"}
    mappings/<id>.json            QuantileMapping.to_dict()
    routes/<v>.json               {"version", "created", "document"}
    keys/<v>.json                 same: tenants and API-key hashes, never keys
    samples/<ref>/<tenant>/<source>.npy   calibration samples (state); the
                                  tenant "*" (folder "_all") pools all tenants

Rules every write follows:

- Published files are never overwritten (``publish_new``); a new version is
  a new file.  Only calibration samples, which are state rather than
  artifacts, are replaced, and atomically.
- Versions count 1, 2, 3 ... per name.  The next version is one more than
  the largest number with *any* file on disk, so a number left behind by a
  crashed write is skipped, never reused.  A lock serialises writers in this
  process; between processes the no-overwrite link decides who gets a
  number, and the loser takes the next one.
- A model version is claimed by its bytes and published by its meta, which
  is written last: a crash in between leaves an invisible, skipped number.
- Routes and keys are each one document, versioned as a whole.  A write
  names the version it replaces and fails with ``Conflict`` if that is no
  longer current; old versions stay readable for rollback.

Every method is synchronous; the engine calls them from a worker thread.
Failures of the disk raise ``RegistryError`` (``StorageFull`` when full).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from muse._atomic import publish_new, remove_stale_temps, write_bytes_atomic
from muse._errors import (
    BadRequest,
    Conflict,
    NotFound,
    PredictorSpecError,
    RegistryError,
)
from muse._predictor import NAME_PATTERN, Predictor, parse_spec, split_ref

__all__ = ["ALL_TENANTS", "SAMPLE_SOURCES", "ModelMeta", "ModelRecord", "Registry"]

logger = logging.getLogger("muse.registry")

SAMPLE_SOURCES = ("live", "shadow")
#: The tenant of calibration samples pooled over all tenants.
ALL_TENANTS = "*"

# Racing processes each take the next free number; past this many lost races
# in a row something is wrong (a writer looping), not merely busy.
_CLAIM_ATTEMPTS = 100
_VERSION_FILE = re.compile(r"(\d+)\.json")
_CLAIMED_FILE = re.compile(r"(\d+)\.")
# Folder of pooled samples; no tenant folder can be named so, since names
# start with a letter or digit.
_ALL_TENANTS_FOLDER = "_all"
_REQUIRED_META = ("format", "feature_names", "beta", "digest")


class _Serializable(Protocol):
    """What ``put_mapping`` needs of a ``QuantileMapping``."""

    @property
    def id(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ModelMeta:
    """What the registry knows about one model version.

    Attributes:
        name, version: the model's identity; ``ref`` is ``"name@version"``.
        format: the import format (``muse._models.FORMATS``).
        feature_names: the model's input columns, in order.
        beta: share of negatives kept at training, in (0, 1].
        digest: the model's own digest (sha256 of its canonical bytes).
        created: publication time, unix seconds.
        size: length of the stored bytes.
        sha256: sha256 hex of the stored bytes, checked on every read.
        has_golden: whether golden rows are stored.
        extra: any other meta the publisher gave, as plain data.
    """

    name: str
    version: int
    format: str
    feature_names: tuple[str, ...]
    beta: float
    digest: str
    created: float
    size: int
    sha256: str
    has_golden: bool
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def ref(self) -> str:
        """``"name@version"``."""
        return f"{self.name}@{self.version}"


class ModelRecord(NamedTuple):
    """A stored model; unpacks as ``data, meta, golden``.

    ``meta`` is the stored meta document (what ``put_model`` was given plus
    ``name``, ``version``, ``created``, ``size``, ``sha256``, ``has_golden``);
    ``golden`` is None when no golden rows were stored.
    """

    data: bytes
    meta: dict[str, Any]
    golden: bytes | None


class Registry:
    """A registry directory.

    Every method is synchronous and thread-safe.  Besides the errors each
    one lists, any of them raises ``RegistryError`` when the disk fails and
    ``StorageFull`` when it is full; a failed write leaves what was
    published before intact and readable.

    Args:
        path: the root directory.
        create: create it (and its subdirectories) when missing.

    Raises:
        RegistryError: ``path`` is missing and ``create`` is false, or it
            cannot be created.
    """

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_dir() and not create:
            raise RegistryError(f"no registry directory at {self.path}")
        self._lock = threading.Lock()
        with _disk(f"open the registry at {self.path}"):
            for sub in ("models", "compiled", "predictors", "mappings", "samples"):
                (self.path / sub).mkdir(parents=True, exist_ok=True)
            self._routes = _Document(self.path / "routes", "routes")
            self._keys = _Document(self.path / "keys", "keys")
            remove_stale_temps(self.path)
        logger.info("opened registry at %s", self.path)

    @property
    def compiled_dir(self) -> Path:
        """Directory for compiled model libraries (the models' cache_dir)."""
        return self.path / "compiled"

    # -- models ---------------------------------------------------------------

    def put_model(
        self,
        name: str,
        data: bytes,
        meta: Mapping[str, Any],
        golden: bytes | None = None,
    ) -> int:
        """Publish a new version of a model.

        Args:
            name: the model's name.
            data: the model's bytes (the models module's ``to_bytes()``).
            meta: at least ``format``, ``feature_names``, ``beta`` and
                ``digest``; other plain-data keys are stored as given.
            golden: golden rows for the parity check (npz bytes), optional.

        Returns:
            The new version number.

        Raises:
            BadRequest: ``name`` or ``meta`` is invalid.
        """
        _check_name(name, "model name")
        document = _meta_document(name, data, meta, golden is not None)
        directory = self.path / "models" / name

        def publish(version: int) -> None:
            files = [(directory / f"{version}.model", data)]
            if golden is not None:
                files.append((directory / f"{version}.golden", golden))
            document.update(version=version, created=time.time())
            files.append((directory / f"{version}.json", _to_json(document, "meta")))
            _publish_all(files)

        version = self._claim(directory, publish)
        logger.info("published model %s@%d (%d bytes)", name, version, len(data))
        return version

    def model_meta(self, name_or_ref: str, version: int | None = None) -> ModelMeta:
        """The meta of one model version.

        Args:
            name_or_ref: ``"name"`` or ``"name@version"``.
            version: with a bare name, the version; None for the latest.

        Raises:
            NotFound: no such model or version.
        """
        return _meta_from_json(self._model_document(name_or_ref, version))

    def get_model(self, name_or_ref: str, version: int | None = None) -> ModelRecord:
        """One model version with its bytes and golden rows.

        Args:
            name_or_ref: ``"name"`` or ``"name@version"``.
            version: with a bare name, the version; None for the latest.

        Raises:
            NotFound: no such model or version.
            RegistryError: the bytes differ from those published.
        """
        meta = self._model_document(name_or_ref, version)
        stem = self.path / "models" / meta["name"] / str(meta["version"])
        ref = f"{meta['name']}@{meta['version']}"
        with _disk(f"read model {ref}"):
            data = stem.with_suffix(".model").read_bytes()
            golden = None
            if meta.get("has_golden"):
                golden = stem.with_suffix(".golden").read_bytes()
        if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            raise RegistryError(f"stored bytes of model {ref} are corrupt")
        return ModelRecord(data, meta, golden)

    def list_models(self, name: str | None = None) -> list[str]:
        """``"name@version"`` of every published model, by name then version.

        Args:
            name: only this model's versions.
        """
        return _list_refs(self.path / "models", name)

    # -- predictors -----------------------------------------------------------

    def put_predictor(self, name: str, spec: Any) -> int:
        """Validate a predictor against the registry and publish a version.

        Args:
            name: the predictor's name; the spec's ``name`` must match, or
                is filled in when absent.
            spec: the declaration, in any form ``parse_spec`` takes.

        Returns:
            The new version number.

        Raises:
            PredictorSpecError: the spec is invalid against the registered
                models and mappings; the message names the node.
        """
        plain = parse_spec(spec)
        plain.setdefault("name", name)
        if plain["name"] != name:
            raise PredictorSpecError(
                f"predictor spec: name {plain['name']!r} differs from {name!r}"
            )
        predictor = Predictor.from_spec(plain, _RegisteredModels(self))
        pinned = predictor.fixed_mapping
        if pinned is not None and not self._mapping_path(pinned).is_file():
            raise PredictorSpecError(
                f"node {predictor.output!r}: mapping {pinned} is not registered"
            )
        directory = self.path / "predictors" / name

        def publish(version: int) -> None:
            record = {"name": name, "version": version, "spec": plain}
            record["created"] = time.time()
            path = directory / f"{version}.json"
            _publish_all([(path, _to_json(record, "predictor spec"))])

        version = self._claim(directory, publish)
        logger.info("published predictor %s@%d", name, version)
        return version

    def get_predictor(
        self, name_or_ref: str, version: int | None = None
    ) -> dict[str, Any]:
        """The spec of one predictor version, as published.

        Build the predictor with ``Predictor.from_spec(spec, models,
        version=...)`` once its models are loaded.

        Args:
            name_or_ref: ``"name"`` or ``"name@version"``.
            version: with a bare name, the version; None for the latest.

        Raises:
            NotFound: no such predictor or version.
        """
        name, number = self._resolve("predictor", "predictors", name_or_ref, version)
        path = self.path / "predictors" / name / f"{number}.json"
        spec = _read_json(path, f"predictor {name}@{number}")["spec"]
        assert isinstance(spec, dict)  # written by put_predictor
        return spec

    def list_predictors(self, name: str | None = None) -> list[str]:
        """``"name@version"`` of every published predictor.

        Args:
            name: only this predictor's versions.
        """
        return _list_refs(self.path / "predictors", name)

    # -- mappings -------------------------------------------------------------

    def put_mapping(self, mapping: _Serializable) -> str:
        """Publish a quantile mapping under its id.

        Publishing an id again is a no-op: ids are content digests, so the
        stored file already holds this mapping.

        Args:
            mapping: a ``QuantileMapping`` (anything with ``id``, ``to_dict``).

        Returns:
            The mapping's id.

        Raises:
            BadRequest: the id is not a valid file name, or the dict is not
                plain data.
        """
        _check_name(mapping.id, "mapping id")
        data = _to_json(mapping.to_dict(), "mapping")
        with self._lock, _disk(f"write mapping {mapping.id}"):
            try:
                _publish_all([(self._mapping_path(mapping.id), data)])
            except Conflict:
                return mapping.id
        logger.info("published mapping %s", mapping.id)
        return mapping.id

    def get_mapping_dict(self, mapping_id: str) -> dict[str, Any]:
        """A mapping as stored, ``QuantileMapping.to_dict()``.

        Raises:
            NotFound: no mapping has that id.
        """
        _check_name(mapping_id, "mapping id", NotFound)
        path = self._mapping_path(mapping_id)
        return _read_json(path, f"mapping {mapping_id}")

    def get_mapping(self, mapping_id: str) -> Any:
        """A mapping, rebuilt as a ``QuantileMapping``.

        Raises:
            NotFound: no mapping has that id.
        """
        # Imported here: only callers that apply mappings need the transform
        # module and its Cython kernel.
        from muse._transform import QuantileMapping

        return QuantileMapping.from_dict(self.get_mapping_dict(mapping_id))

    def list_mappings(self) -> list[str]:
        """Ids of every published mapping, sorted."""
        with _disk("list mappings"):
            names = [p.stem for p in (self.path / "mappings").glob("*.json")]
        return sorted(n for n in names if NAME_PATTERN.fullmatch(n))

    # -- routes and keys --------------------------------------------------------

    def put_routes(self, table: Mapping[str, Any], expect_version: int) -> int:
        """Replace the route table.

        Args:
            table: the whole new table, plain data.
            expect_version: the version being replaced (0 for the first).

        Returns:
            The new version, ``expect_version + 1``.

        Raises:
            Conflict: ``expect_version`` is not the current version.
            BadRequest: ``table`` is not plain JSON data.
        """
        with self._lock, _disk("write routes"):
            return self._routes.put(table, expect_version)

    def current_routes(self) -> tuple[int, dict[str, Any]]:
        """``(version, table)``; ``(0, {})`` before the first put."""
        return self._routes.current()

    def get_routes(self, version: int) -> dict[str, Any]:
        """An earlier route table, for rollback.

        Raises:
            NotFound: no such version.
        """
        return self._routes.get(version)

    def routes_versions(self) -> list[int]:
        """Every published route-table version, ascending."""
        return self._routes.versions()

    def put_keys(self, document: Mapping[str, Any], expect_version: int) -> int:
        """Replace the tenants-and-keys document.

        Args:
            document: the whole new document: key *hashes* only, never the
                tokens themselves.
            expect_version: the version being replaced (0 for the first).

        Returns:
            The new version.

        Raises:
            Conflict: ``expect_version`` is not the current version.
            BadRequest: ``document`` is not plain JSON data.
        """
        with self._lock, _disk("write keys"):
            return self._keys.put(document, expect_version)

    def current_keys(self) -> tuple[int, dict[str, Any]]:
        """``(version, document)``; ``(0, {})`` before the first put."""
        return self._keys.current()

    def get_keys(self, version: int) -> dict[str, Any]:
        """An earlier keys document.

        Raises:
            NotFound: no such version.
        """
        return self._keys.get(version)

    # -- calibration samples ----------------------------------------------------

    def save_samples(
        self, predictor_ref: str, tenant: str | None, source: str, scores: Any
    ) -> None:
        """Store (replace) a calibration sample atomically.

        Args:
            predictor_ref: ``"name@version"`` of the predictor scored.
            tenant: the tenant; ``ALL_TENANTS`` (``"*"``) or None for a
                sample pooled over tenants.
            source: ``"live"`` or ``"shadow"``.
            scores: 1-D scores, stored as float64.

        Raises:
            BadRequest: an argument is malformed.
        """
        path = self._sample_path(predictor_ref, tenant, source)
        values = np.ascontiguousarray(scores, dtype=np.float64)
        if values.ndim != 1:
            raise BadRequest(f"samples must be 1-D, got shape {values.shape}")
        buffer = io.BytesIO()
        np.save(buffer, values, allow_pickle=False)
        with _disk(f"save samples to {path}"):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(path, buffer.getvalue())

    def load_samples(
        self, predictor_ref: str, tenant: str | None, source: str
    ) -> np.ndarray:
        """A stored calibration sample; empty when none was saved.

        Args:
            predictor_ref, tenant, source: as for ``save_samples``.

        Raises:
            BadRequest: an argument is malformed.
        """
        path = self._sample_path(predictor_ref, tenant, source)
        if not path.is_file():
            return np.empty(0, dtype=np.float64)
        with _disk(f"load samples from {path}"):
            try:
                values = np.load(path, allow_pickle=False)
            except ValueError as exc:
                raise RegistryError(f"samples file {path} is corrupt") from exc
        return np.asarray(values, dtype=np.float64)

    def all_samples(self) -> list[tuple[str, str, str, np.ndarray]]:
        """Every stored sample, to restore a calibrator after a restart.

        Returns:
            ``(predictor_ref, tenant, source, scores)`` tuples, the pooled
            tenant spelled ``ALL_TENANTS``.
        """
        found = []
        with _disk("list samples"):
            paths = sorted((self.path / "samples").glob("*/*/*.npy"))
        for path in paths:
            ref, folder, source = path.parts[-3], path.parts[-2], path.stem
            tenant = ALL_TENANTS if folder == _ALL_TENANTS_FOLDER else folder
            found.append((ref, tenant, source, self.load_samples(ref, tenant, source)))
        return found

    # -- helpers --------------------------------------------------------------

    def _claim(self, directory: Path, publish: Callable[[int], None]) -> int:
        """Publish under the next free version number of ``directory``."""
        with self._lock, _disk(f"write under {directory}"):
            directory.mkdir(parents=True, exist_ok=True)
            for _ in range(_CLAIM_ATTEMPTS):
                version = _last_claimed(directory) + 1
                try:
                    publish(version)
                except Conflict:
                    continue  # another process took this number
                return version
        raise RegistryError(f"could not claim a version under {directory}")

    def _model_document(self, name_or_ref: str, version: int | None) -> dict[str, Any]:
        name, number = self._resolve("model", "models", name_or_ref, version)
        path = self.path / "models" / name / f"{number}.json"
        return _read_json(path, f"model {name}@{number}")

    def _resolve(
        self, what: str, area: str, name_or_ref: str, version: int | None
    ) -> tuple[str, int]:
        if "@" in name_or_ref:
            try:
                return split_ref(name_or_ref)
            except BadRequest as exc:
                raise NotFound(f"no {what} {name_or_ref!r}: {exc.detail}") from exc
        _check_name(name_or_ref, f"{what} name", NotFound)
        if version is not None:
            return name_or_ref, version
        versions = _published_versions(self.path / area / name_or_ref)
        if not versions:
            raise NotFound(f"{what} {name_or_ref!r} is not registered")
        return name_or_ref, versions[-1]

    def _mapping_path(self, mapping_id: str) -> Path:
        return self.path / "mappings" / f"{mapping_id}.json"

    def _sample_path(self, predictor_ref: str, tenant: str | None, source: str) -> Path:
        split_ref(predictor_ref)
        if tenant is None or tenant == ALL_TENANTS:
            folder = _ALL_TENANTS_FOLDER
        else:
            _check_name(tenant, "tenant")
            folder = tenant
        if source not in SAMPLE_SOURCES:
            raise BadRequest(f"sample source must be one of {SAMPLE_SOURCES}")
        return self.path / "samples" / predictor_ref / folder / f"{source}.npy"


class _Document:
    """One JSON document versioned as a whole (routes, keys)."""

    def __init__(self, directory: Path, label: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.label = label

    def current(self) -> tuple[int, dict[str, Any]]:
        versions = self.versions()
        if not versions:
            return 0, {}
        return versions[-1], self.get(versions[-1])

    def get(self, version: int) -> dict[str, Any]:
        path = self.directory / f"{version}.json"
        document = _read_json(path, f"{self.label} version {version}")["document"]
        assert isinstance(document, dict)  # written by put
        return document

    def versions(self) -> list[int]:
        return _published_versions(self.directory)

    def put(self, document: Mapping[str, Any], expect_version: int) -> int:
        versions = self.versions()
        current = versions[-1] if versions else 0
        if expect_version != current:
            raise Conflict(
                f"{self.label} version {expect_version} is not current "
                f"(current is {current}); reread and retry"
            )
        version = current + 1
        record = {"version": version, "created": time.time(), "document": document}
        path = self.directory / f"{version}.json"
        try:
            _publish_all([(path, _to_json(record, self.label))])
        except Conflict as exc:
            raise Conflict(
                f"{self.label} version {expect_version} was replaced by another "
                "process; reread and retry"
            ) from exc
        logger.info("published %s version %d", self.label, version)
        return version


class _RegisteredModels(Mapping[str, ModelMeta]):
    """Registered model metas by reference, read on demand."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def __getitem__(self, ref: str) -> ModelMeta:
        try:
            split_ref(ref)
            return self._registry.model_meta(ref)
        except (BadRequest, NotFound) as exc:
            raise KeyError(ref) from exc

    def __iter__(self) -> Iterator[str]:
        return iter(self._registry.list_models())

    def __len__(self) -> int:
        return len(self._registry.list_models())


@contextlib.contextmanager
def _disk(what: str) -> Iterator[None]:
    """Turn OS errors into ``RegistryError``; MUSE errors pass through."""
    try:
        yield
    except OSError as exc:
        raise RegistryError(f"cannot {what}: {exc}") from exc


def _publish_all(files: list[tuple[Path, bytes]]) -> None:
    """Publish files in order; on failure remove those this call published.

    The first file claims the version; removing it again is safe because
    the version was not visible yet (the last file publishes it).
    """
    done: list[Path] = []
    try:
        for path, data in files:
            publish_new(path, data)
            done.append(path)
    except BaseException:
        for path in done:
            with contextlib.suppress(OSError):
                path.unlink()
        raise


def _check_name(
    name: object, what: str, error: type[BadRequest] | type[NotFound] = BadRequest
) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise error(f"{what} {name!r} must match {NAME_PATTERN.pattern}")


def _to_json(value: Any, what: str) -> bytes:
    try:
        text = json.dumps(value, sort_keys=True, indent=1, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"{what} is not plain JSON data: {exc}") from exc
    return text.encode("utf-8")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        text = path.read_bytes()
    except FileNotFoundError as exc:
        raise NotFound(f"{what} is not registered") from exc
    except OSError as exc:
        raise RegistryError(f"cannot read {what} from {path}: {exc}") from exc
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise RegistryError(f"{what} at {path} is corrupt: {exc}") from exc
    if not isinstance(value, dict):
        raise RegistryError(f"{what} at {path} is not a JSON object")
    return value


def _published_versions(directory: Path) -> list[int]:
    """Versions whose publishing file (``<v>.json``) exists, ascending."""
    if not directory.is_dir():
        return []
    with _disk(f"list {directory}"):
        names = [entry.name for entry in directory.iterdir()]
    found = (_VERSION_FILE.fullmatch(name) for name in names)
    return sorted(int(match.group(1)) for match in found if match)


def _last_claimed(directory: Path) -> int:
    """The largest version number any file uses, published or not."""
    found = (_CLAIMED_FILE.match(entry.name) for entry in directory.iterdir())
    return max((int(match.group(1)) for match in found if match), default=0)


def _list_refs(area: Path, name: str | None) -> list[str]:
    with _disk(f"list {area}"):
        names = [name] if name is not None else sorted(p.name for p in area.iterdir())
    refs = []
    for each in names:
        if NAME_PATTERN.fullmatch(each):
            refs += [f"{each}@{v}" for v in _published_versions(area / each)]
    return refs


def _meta_document(
    name: str, data: bytes, meta: Mapping[str, Any], has_golden: bool
) -> dict[str, Any]:
    """Check a model's meta and add what the registry records itself."""
    missing = [key for key in _REQUIRED_META if key not in meta]
    if missing:
        raise BadRequest(f"meta of model {name!r} lacks {missing}")
    names, beta = meta["feature_names"], meta["beta"]
    if not isinstance(names, (list, tuple)) or not all(
        isinstance(n, str) for n in names
    ):
        raise BadRequest(f"feature_names of model {name!r} must be strings")
    if (
        isinstance(beta, bool)
        or not isinstance(beta, (int, float))
        or not 0 < beta <= 1
    ):
        raise BadRequest(f"beta of model {name!r} must be in (0, 1], got {beta!r}")
    if not isinstance(meta["format"], str) or not isinstance(meta["digest"], str):
        raise BadRequest(f"format and digest of model {name!r} must be strings")
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise BadRequest(f"model {name!r} has no bytes")
    document = dict(meta)
    document.update(
        name=name,
        feature_names=list(names),
        beta=float(beta),
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        has_golden=has_golden,
    )
    return document


def _meta_from_json(stored: dict[str, Any]) -> ModelMeta:
    known = set(ModelMeta.__dataclass_fields__) - {"extra"}
    try:
        return ModelMeta(
            name=stored["name"],
            version=int(stored["version"]),
            format=stored["format"],
            feature_names=tuple(stored["feature_names"]),
            beta=float(stored["beta"]),
            digest=stored["digest"],
            created=float(stored["created"]),
            size=int(stored["size"]),
            sha256=stored["sha256"],
            has_golden=bool(stored["has_golden"]),
            extra={k: v for k, v in stored.items() if k not in known},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise RegistryError(f"model meta is malformed: {exc!r}") from exc
