"""The on-disk registry: versions, immutability, crash safety."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from muse._atomic import TEMP_PREFIX
from muse._errors import (
    BadRequest,
    Conflict,
    NotFound,
    PredictorSpecError,
    RegistryError,
    StorageFull,
)
from muse._predictor import Predictor
from muse._registry import ALL_TENANTS, Registry

FEATURES = ["TX_AMOUNT", "TX_DURING_NIGHT"]
META = {"format": "xgboost_json", "feature_names": FEATURES, "beta": 0.5}


def meta(digest: str = "d1", **extra: Any) -> dict[str, Any]:
    return {**META, "digest": digest, **extra}


@dataclasses.dataclass(frozen=True)
class StoredMapping:
    """A stand-in for QuantileMapping: an id and plain-data ``to_dict``."""

    id: str
    predictor: str = "p@1"
    tenant: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "predictor": self.predictor, "tenant": self.tenant}


PREDICTOR: dict[str, Any] = {
    "name": "p",
    "nodes": [
        {"id": "m", "kind": "model", "model": "m@1"},
        {"id": "qm", "kind": "quantile_map", "input": "m"},
    ],
    "output": "qm",
}


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


def names_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- models -------------------------------------------------------------------


def test_model_versions_are_monotonic(registry: Registry) -> None:
    versions = [registry.put_model("m", b"model-%d" % i, meta()) for i in range(3)]

    assert versions == [1, 2, 3]
    assert registry.list_models() == ["m@1", "m@2", "m@3"]
    assert registry.get_model("m").data == b"model-2"
    assert registry.get_model("m@1").data == b"model-0"
    assert registry.get_model("m", 2).data == b"model-1"


def test_model_round_trip(registry: Registry) -> None:
    version = registry.put_model("m", b"bytes", meta(backend="compiled"), b"golden")

    data, stored, golden = registry.get_model("m", version)
    info = registry.model_meta("m@1")

    assert (data, golden) == (b"bytes", b"golden")
    assert stored["feature_names"] == FEATURES and stored["backend"] == "compiled"
    assert info.ref == "m@1" and info.feature_names == tuple(FEATURES)
    assert info.beta == 0.5 and info.format == "xgboost_json"
    assert info.has_golden and info.extra == {"backend": "compiled"}


def test_concurrent_puts_get_distinct_versions(registry: Registry) -> None:
    versions: list[int] = []

    def put() -> None:
        versions.append(registry.put_model("m", b"x", meta()))

    threads = [threading.Thread(target=put) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(versions) == list(range(1, 9))


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            {"format": "x", "feature_names": FEATURES, "digest": "d"},
            r"lacks \['beta'\]",
        ),
        (meta(beta=0), r"beta of model 'm' must be in \(0, 1\]"),
        (meta(feature_names=[1, 2]), "feature_names of model 'm' must be strings"),
        (meta(when=object()), "meta is not plain JSON data"),
    ],
)
def test_put_model_rejects_bad_meta(
    registry: Registry, bad: dict[str, Any], message: str
) -> None:
    with pytest.raises(BadRequest, match=message):
        registry.put_model("m", b"x", bad)

    assert registry.list_models() == []


def test_put_model_rejects_bad_name(registry: Registry) -> None:
    with pytest.raises(BadRequest, match="model name '../evil' must match"):
        registry.put_model("../evil", b"x", meta())


def test_missing_things_are_not_found(registry: Registry) -> None:
    registry.put_model("m", b"x", meta())

    with pytest.raises(NotFound, match="model 'nope' is not registered"):
        registry.get_model("nope")
    with pytest.raises(NotFound, match="model m@7 is not registered"):
        registry.get_model("m@7")
    with pytest.raises(NotFound, match="predictor 'p' is not registered"):
        registry.get_predictor("p")
    with pytest.raises(NotFound, match="mapping abc is not registered"):
        registry.get_mapping_dict("abc")
    with pytest.raises(NotFound, match="routes version 4 is not registered"):
        registry.get_routes(4)


def test_corrupt_model_bytes_are_detected(registry: Registry) -> None:
    registry.put_model("m", b"good", meta())
    (registry.path / "models" / "m" / "1.model").write_bytes(b"evil")

    with pytest.raises(RegistryError, match="stored bytes of model m@1 are corrupt"):
        registry.get_model("m@1")


# -- crash safety ---------------------------------------------------------------


def test_crash_mid_write_leaves_previous_state(registry: Registry) -> None:
    registry.put_model("m", b"v1", meta())

    # The golden rows are not a buffer, so the write fails after the model
    # bytes of version 2 were already published.
    with pytest.raises(TypeError):
        registry.put_model("m", b"v2", meta(), object())  # type: ignore[arg-type]

    assert registry.list_models() == ["m@1"]
    assert registry.get_model("m").data == b"v1"
    assert names_in(registry.path / "models" / "m") == ["1.json", "1.model"]
    assert registry.put_model("m", b"v2", meta()) == 2


def test_orphan_of_a_killed_writer_is_invisible_and_never_reused(
    registry: Registry,
) -> None:
    registry.put_model("m", b"v1", meta())
    # A writer killed between the bytes and the meta leaves version 2 claimed.
    (registry.path / "models" / "m" / "2.model").write_bytes(b"half")

    assert registry.list_models() == ["m@1"]
    assert registry.put_model("m", b"v3", meta()) == 3
    assert registry.list_models() == ["m@1", "m@3"]


def test_stray_temp_file_is_invisible_and_cleaned_on_open(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "r")
    registry.put_model("m", b"v1", meta())
    stray = registry.path / "models" / "m" / f"{TEMP_PREFIX}999999999-x"
    stray.write_bytes(b"partial")

    assert registry.list_models() == ["m@1"]
    assert registry.put_model("m", b"v2", meta()) == 2

    Registry(tmp_path / "r")

    assert not stray.exists()


def test_reopen_sees_everything(tmp_path: Path) -> None:
    first = Registry(tmp_path / "r")
    first.put_model("m", b"x", meta(), b"golden")
    first.put_predictor("p", PREDICTOR)
    first.put_mapping(StoredMapping("map1"))
    first.put_routes({"default": "p@1"}, 0)
    first.put_keys({"bank-01": ["hash"]}, 0)
    first.save_samples("p@1", "bank-01", "live", np.array([0.5, 0.25]))

    again = Registry(tmp_path / "r", create=False)

    assert again.list_models() == ["m@1"]
    assert again.get_model("m@1").golden == b"golden"
    assert again.list_predictors() == ["p@1"]
    assert again.get_predictor("p@1") == PREDICTOR
    assert again.list_mappings() == ["map1"]
    assert again.current_routes() == (1, {"default": "p@1"})
    assert again.current_keys() == (1, {"bank-01": ["hash"]})
    np.testing.assert_array_equal(
        again.load_samples("p@1", "bank-01", "live"), [0.5, 0.25]
    )


def test_open_without_create_needs_the_directory(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="no registry directory at"):
        Registry(tmp_path / "absent", create=False)


def test_publishes_are_logged(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="muse.registry"):
        registry.put_model("m", b"abc", meta())

    assert "published model m@1 (3 bytes)" in caplog.text


# -- predictors -----------------------------------------------------------------


def test_predictor_versions_and_spec(registry: Registry) -> None:
    registry.put_model("m", b"x", meta())

    assert registry.put_predictor("p", PREDICTOR) == 1
    assert registry.put_predictor("p", PREDICTOR) == 2

    spec = registry.get_predictor("p")
    predictor = Predictor.from_spec(
        spec, {"m@1": registry.model_meta("m@1")}, version=2
    )
    assert predictor.ref == "p@2"
    assert predictor.feature_names == tuple(FEATURES)


def test_put_predictor_validates_against_registered_models(registry: Registry) -> None:
    with pytest.raises(
        PredictorSpecError, match="node 'm': model m@1 is not registered"
    ):
        registry.put_predictor("p", PREDICTOR)
    with pytest.raises(PredictorSpecError, match="name 'p' differs from 'q'"):
        registry.put_predictor("q", PREDICTOR)

    assert registry.list_predictors() == []


def test_put_predictor_checks_a_pinned_mapping(registry: Registry) -> None:
    registry.put_model("m", b"x", meta())
    pinned = {
        **PREDICTOR,
        "nodes": [PREDICTOR["nodes"][0], {**PREDICTOR["nodes"][1], "mapping": "map1"}],
    }

    with pytest.raises(
        PredictorSpecError, match="node 'qm': mapping map1 is not registered"
    ):
        registry.put_predictor("p", pinned)
    registry.put_mapping(StoredMapping("map1"))

    assert registry.put_predictor("p", pinned) == 1


# -- mappings -------------------------------------------------------------------


def test_mapping_round_trip_and_idempotent_put(registry: Registry) -> None:
    mapping = StoredMapping("abc123", tenant="bank-01")

    assert registry.put_mapping(mapping) == "abc123"
    assert registry.put_mapping(mapping) == "abc123"

    assert registry.list_mappings() == ["abc123"]
    assert registry.get_mapping_dict("abc123") == mapping.to_dict()


def test_get_mapping_rebuilds_a_quantile_mapping(registry: Registry) -> None:
    transform = pytest.importorskip(
        "muse._transform", reason="muse._transform not built yet"
    )
    rng = np.random.default_rng(0)
    mapping = transform.QuantileMapping.fit(rng.random(5000))

    registry.put_mapping(mapping)

    assert registry.get_mapping(mapping.id) == mapping


# -- routes and keys ------------------------------------------------------------


def test_routes_versions_and_conflict(registry: Registry) -> None:
    assert registry.current_routes() == (0, {})

    assert registry.put_routes({"default": "p@1"}, 0) == 1
    assert registry.put_routes({"default": "p@2"}, 1) == 2
    with pytest.raises(Conflict, match="routes version 1 is not current .current is 2"):
        registry.put_routes({"default": "p@3"}, 1)

    assert registry.current_routes() == (2, {"default": "p@2"})
    assert registry.routes_versions() == [1, 2]
    assert registry.get_routes(1) == {"default": "p@1"}
    # Rollback is a new version holding an old table.
    assert registry.put_routes(registry.get_routes(1), 2) == 3
    assert registry.current_routes() == (3, {"default": "p@1"})


def test_keys_are_versioned_like_routes(registry: Registry) -> None:
    registry.put_keys({"bank-01": ["h1"]}, 0)

    with pytest.raises(Conflict, match="keys version 0 is not current"):
        registry.put_keys({"bank-01": ["h2"]}, 0)

    assert registry.current_keys() == (1, {"bank-01": ["h1"]})
    assert registry.get_keys(1) == {"bank-01": ["h1"]}


def test_routes_must_be_plain_data(registry: Registry) -> None:
    with pytest.raises(BadRequest, match="routes is not plain JSON data"):
        registry.put_routes({"default": float("nan")}, 0)

    assert registry.current_routes() == (0, {})


# -- samples --------------------------------------------------------------------


def test_samples_round_trip(registry: Registry) -> None:
    scores = np.random.default_rng(1).random(1000)

    registry.save_samples("p@1", "bank-01", "live", scores)
    registry.save_samples("p@1", ALL_TENANTS, "shadow", scores[:10])
    registry.save_samples("p@1", "bank-01", "live", scores[:5])

    np.testing.assert_array_equal(
        registry.load_samples("p@1", "bank-01", "live"), scores[:5]
    )
    np.testing.assert_array_equal(
        registry.load_samples("p@1", None, "shadow"), scores[:10]
    )
    assert registry.load_samples("p@1", "bank-02", "live").shape == (0,)
    restored = {(p, t, s): len(v) for p, t, s, v in registry.all_samples()}
    assert restored == {("p@1", "bank-01", "live"): 5, ("p@1", "*", "shadow"): 10}


@pytest.mark.parametrize(
    "ref, tenant, source, message",
    [
        ("p", "bank-01", "live", "name@version"),
        ("p@1", "../x", "live", "tenant '../x' must match"),
        ("p@1", "bank-01", "replay", "sample source must be one of"),
    ],
)
def test_samples_reject_bad_keys(
    registry: Registry, ref: str, tenant: str, source: str, message: str
) -> None:
    with pytest.raises(BadRequest, match=message):
        registry.save_samples(ref, tenant, source, np.zeros(3))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs; skips the test where mounting is not allowed."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root on Linux")
    where = tmp_path / "small"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def test_full_disk_raises_storage_full_and_keeps_state(small_disk: Path) -> None:
    registry = Registry(small_disk / "registry")
    registry.put_model("m", b"v1", meta())
    registry.save_samples("p@1", "bank-01", "live", np.arange(4.0))
    huge = b"x" * 1_000_000

    with pytest.raises(StorageFull, match="no space left"):
        registry.put_model("m", huge, meta())
    with pytest.raises(StorageFull, match="no space left"):
        registry.save_samples("p@1", "bank-01", "live", np.zeros(200_000))

    assert registry.list_models() == ["m@1"]
    assert registry.get_model("m").data == b"v1"
    np.testing.assert_array_equal(
        registry.load_samples("p@1", "bank-01", "live"), np.arange(4.0)
    )
    leftovers = [p for p in small_disk.rglob("*") if p.name.startswith(TEMP_PREFIX)]
    assert leftovers == []
    assert registry.put_model("m", b"v2", meta()) == 2
