"""Tests for muse/_compile.py: the patch, the cache, the kernels, GTIL."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tl2cgen
import treelite

from muse._compile import (
    PATCH_VERSION,
    GtilKernel,
    compile_statistics,
    default_cache_dir,
    generate_sources,
    patch_sources,
)
from muse._errors import ModelImportError
from muse._models import _import, _layout, load_model

xgb = pytest.importorskip("xgboost")
lgb = pytest.importorskip("lightgbm")

REPO = Path(__file__).resolve().parents[1]


def _data(
    n: int = 3000, features: int = 6, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, features))
    y = (X[:, 0] + X[:, 1] * X[:, 2] + rng.normal(size=n) > 0).astype(int)
    X[rng.random(X.shape) < 0.1] = np.nan
    return X, y


@pytest.fixture(scope="module")
def xgb_bytes() -> bytes:
    X, y = _data()
    params = {"objective": "binary:logistic", "max_depth": 4, "nthread": 1}
    booster = xgb.train(params, xgb.DMatrix(X, y), num_boost_round=24)
    return bytes(booster.save_raw(raw_format="json"))


@pytest.fixture(scope="module")
def lgb_text() -> bytes:
    X, y = _data(seed=1)
    params = {"objective": "binary", "num_leaves": 15, "verbose": -1, "num_threads": 1}
    booster = lgb.train(params, lgb.Dataset(X, y), num_boost_round=24)
    text: str = booster.model_to_string()
    return text.encode()


@pytest.fixture()
def rows() -> np.ndarray:
    X, _ = _data(n=1000, seed=9)
    low = X[:50].copy()
    finite = np.isfinite(low)
    low[finite] = (low[finite].view(np.uint64) | np.uint64(0xFFFFFFFF)).view(np.float64)
    return np.ascontiguousarray(np.vstack([X, low]))


def _raw_sources(
    tl_model: treelite.Model, directory: Path
) -> tuple[dict[str, str], str]:
    tl2cgen.generate_c_code(tl_model, str(directory), params={"parallel_comp": 3})
    sources = {p.name: p.read_text() for p in directory.glob("*.c")}
    return sources, (directory / "header.h").read_text()


def _code(text: str) -> str:
    return re.sub(r"//[^\n]*", "", text)


# --- the patch ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["xgboost", "lightgbm"])
def test_patch_removes_every_missing_sentinel(
    kind: str, xgb_bytes: bytes, lgb_text: bytes, tmp_path: Path
) -> None:
    if kind == "xgboost":
        tl_model = treelite.frontend.from_xgboost_json(xgb_bytes)
    else:
        (tmp_path / "m.txt").write_bytes(lgb_text)
        tl_model = treelite.frontend.load_lightgbm_model(tmp_path / "m.txt")
    sources, header = _raw_sources(tl_model, tmp_path / "raw")
    assert any(".missing != -1" in text for text in sources.values())

    patched, new_header = patch_sources(sources, header)

    for name, text in {**patched, "header.h": new_header}.items():
        assert not re.search(r"\bmissing\b", _code(text)), name
    assert "int missing;" not in new_header
    assert "isless" in "".join(patched.values())


def test_generated_sources_on_disk_have_no_missing(
    xgb_bytes: bytes, tmp_path: Path
) -> None:
    tl_model = treelite.frontend.from_xgboost_json(xgb_bytes)

    files = generate_sources(tl_model, tmp_path)

    assert files and all(path.suffix == ".c" for path in files)
    for path in [*files, tmp_path / "header.h"]:
        assert ".missing" not in path.read_text()


def test_patch_rewrites_categorical_tests_with_isnan() -> None:
    header = "union Entry {\n  int missing;\n  double fvalue;\n  int qvalue;\n};\n"
    main = (
        "void predict(union Entry* data, int pred_margin, double* result) {\n"
        "  if (data[2].missing == -1 || (tmp = (unsigned int)(data[2].fvalue))) {\n"
        "    result[0] += 1.0;\n"
        "  }\n"
        "  \n"
        "  // Apply base_scores\n"
        "  result[0] += 0.5;\n"
        "}\n"
    )

    patched, _ = patch_sources({"main.c": main}, header)

    assert "isnan(data[2].fvalue) ||" in patched["main.c"]
    assert "result[0] = (double)(0.5);" in patched["main.c"]


@pytest.mark.parametrize(
    ("test", "message"),
    [
        ("data[0].missing < 0", "sentinel"),
        ("data[0].missing!=-1 && data[1]. missing", "sentinel"),
        ("data[0].qvalue < 3", "qvalue"),
    ],
)
def test_patch_refuses_code_it_does_not_understand(test: str, message: str) -> None:
    header = "union Entry {\n  int missing;\n  float fvalue;\n  int qvalue;\n};\n"
    main = (
        "void predict(union Entry* data, int pred_margin, float* result) {\n"
        f"  if ({test}) {{ result[0] += 1; }}\n"
        "  // Apply base_scores\n"
        "  result[0] += 0;\n"
        "}\n"
    )

    with pytest.raises(ModelImportError, match=message):
        patch_sources({"main.c": main}, header)


def test_patch_refuses_header_without_missing_member() -> None:
    header = "union Entry {\n  float fvalue;\n};\n"
    main = (
        "void predict(union Entry* data, int pred_margin, float* result) {\n"
        "  // Apply base_scores\n  result[0] += 0;\n}\n"
    )

    with pytest.raises(ModelImportError, match="int missing"):
        patch_sources({"main.c": main}, header)


# --- the cache ---------------------------------------------------------------


def test_compile_cache_reused_within_a_process(
    xgb_bytes: bytes, tmp_path: Path
) -> None:
    first = load_model(xgb_bytes, "xgboost_json", cache_dir=tmp_path)
    [library] = tmp_path.glob("*.so")
    built = library.stat().st_mtime_ns
    runs = compile_statistics().compiler_runs

    second = load_model(xgb_bytes, "xgboost_json", cache_dir=tmp_path)

    assert not first.cache_hit and second.cache_hit
    assert compile_statistics().compiler_runs == runs
    assert library.stat().st_mtime_ns == built
    assert [p.name for p in tmp_path.iterdir()] == [library.name]


@pytest.mark.slow
def test_compile_cache_reused_by_another_process(
    lgb_text: bytes, tmp_path: Path
) -> None:
    load_model(lgb_text, "lightgbm", cache_dir=tmp_path)
    (tmp_path / "model.txt").write_bytes(lgb_text)
    script = (
        "import sys\n"
        "from muse._compile import compile_statistics\n"
        "from muse._models import _import, _layout, load_model\n"
        "m = load_model(sys.argv[1], 'lightgbm', cache_dir=sys.argv[2])\n"
        "print(m.backend, m.cache_hit, compile_statistics().compiler_runs)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "model.txt"), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=120,
    )

    assert done.stdout.split() == ["compiled", "True", "0"]


def test_corrupt_cached_library_is_rebuilt(
    xgb_bytes: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Learn the file name from another cache: overwriting a library this
    # process has mapped would crash it (os.replace never does that).
    load_model(xgb_bytes, "xgboost_json", cache_dir=tmp_path / "first")
    [built] = (tmp_path / "first").glob("*.so")
    corrupt = tmp_path / "second" / built.name
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"not a shared object")

    with caplog.at_level(logging.WARNING, logger="muse.models"):
        model = load_model(xgb_bytes, "xgboost_json", cache_dir=corrupt.parent)

    assert model.backend == "compiled" and not model.cache_hit
    assert "rebuilding" in caplog.text
    assert corrupt.read_bytes()[:4] == b"\x7fELF"


def test_default_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUSE_CACHE_DIR", "/srv/muse-cache")
    assert default_cache_dir() == Path("/srv/muse-cache")
    monkeypatch.delenv("MUSE_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "muse" / "compiled"


def test_patch_version_is_exported_by_the_library(
    xgb_bytes: bytes, tmp_path: Path
) -> None:
    import ctypes

    load_model(xgb_bytes, "xgboost_json", cache_dir=tmp_path)
    [library] = tmp_path.glob("*.so")

    assert ctypes.CDLL(str(library)).muse_patch_version() == PATCH_VERSION


# --- GTIL fallback -----------------------------------------------------------


def _without_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("MUSE_CC", raising=False)


@pytest.mark.parametrize("how", ["empty PATH", "MUSE_CC=''", "failing compiler"])
def test_gtil_fallback_when_no_compiler(
    how: str,
    xgb_bytes: bytes,
    rows: np.ndarray,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    compiled = load_model(xgb_bytes, "xgboost_json", cache_dir=tmp_path / "ok")
    if how == "empty PATH":
        _without_compiler(monkeypatch, tmp_path)
    elif how == "MUSE_CC=''":
        monkeypatch.setenv("MUSE_CC", "")
    else:
        monkeypatch.setenv("MUSE_CC", "false")
    fallbacks = compile_statistics().fallbacks

    with caplog.at_level(logging.INFO, logger="muse.models"):
        model = load_model(xgb_bytes, "xgboost_json", cache_dir=tmp_path / "none")

    assert model.backend == "gtil" and model.implementation == "gtil"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "GTIL" in warnings[0].getMessage()
    assert compile_statistics().fallbacks == fallbacks + 1
    assert not list((tmp_path / "none").glob("*.so"))
    np.testing.assert_array_equal(
        model.predict_margin(rows), compiled.predict_margin(rows)
    )
    np.testing.assert_allclose(
        model.predict(rows), compiled.predict(rows), rtol=0, atol=1e-7
    )


def test_gtil_kernel_sums_base_score_first(xgb_bytes: bytes, rows: np.ndarray) -> None:
    imported = _import(xgb_bytes, "xgboost_json")
    booster = xgb.Booster()
    booster.load_model(bytearray(xgb_bytes))

    got = GtilKernel(imported.tl_model, _layout(imported.tl_model), None).run(
        rows, True
    )

    expected = booster.inplace_predict(rows, predict_type="margin")
    np.testing.assert_array_equal(got, expected.astype(np.float64))


# --- kernels -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["xgboost_json", "lightgbm"])
def test_single_row_and_batch_agree_bit_for_bit(
    fmt: str, xgb_bytes: bytes, lgb_text: bytes, rows: np.ndarray, tmp_path: Path
) -> None:
    model = load_model(
        xgb_bytes if fmt == "xgboost_json" else lgb_text, fmt, cache_dir=tmp_path
    )

    many = np.tile(rows, (9, 1))  # 9,450 rows: several blocks, the last short

    batch = model.predict_margin(many)
    single = np.array(
        [model.predict_margin(many[i : i + 1])[0] for i in range(len(many))]
    )

    np.testing.assert_array_equal(single, batch)
    np.testing.assert_array_equal(
        model.predict(many),
        np.concatenate([model.predict(many[:1]), model.predict(many[1:])]),
    )


@pytest.mark.parametrize("fmt", ["xgboost_json", "lightgbm"])
def test_pure_python_kernel_agrees_with_cython(
    fmt: str,
    xgb_bytes: bytes,
    lgb_text: bytes,
    rows: np.ndarray,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = xgb_bytes if fmt == "xgboost_json" else lgb_text
    monkeypatch.delenv("MUSE_PURE_PYTHON", raising=False)
    fast = load_model(source, fmt, cache_dir=tmp_path)
    monkeypatch.setenv("MUSE_PURE_PYTHON", "1")

    pure = load_model(source, fmt, cache_dir=tmp_path)

    assert (fast.implementation, pure.implementation) == ("cython", "ctypes")
    np.testing.assert_array_equal(pure.predict(rows), fast.predict(rows))
    np.testing.assert_array_equal(pure.predict_margin(rows), fast.predict_margin(rows))


def test_cython_kernel_rejects_arrays_it_cannot_read(
    xgb_bytes: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MUSE_PURE_PYTHON", raising=False)
    model = load_model(xgb_bytes, "xgboost_json", cache_dir=tmp_path)
    kernel = model._kernel
    X = np.zeros((4, model.num_features))

    with pytest.raises(ValueError, match="C-contiguous float64"):
        kernel.run(np.asfortranarray(X), False)
    with pytest.raises(ValueError, match="C-contiguous float64"):
        kernel.run(X.astype(np.float32), False)
    with pytest.raises(ValueError, match=f"expected {model.num_features} columns"):
        kernel.run(np.zeros((4, 2)), False)
    assert kernel.run(np.zeros((0, model.num_features)), False).shape == (0,)
