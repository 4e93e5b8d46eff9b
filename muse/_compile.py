"""Native code for tree models: generate, patch, compile once, run.

A treelite model goes through ``tl2cgen.generate_c_code``, then through
``patch_sources``, then a C compiler, and the shared library lands in a cache
directory under a name derived from everything that shapes it (the model's
treelite checkpoint, compiler flags, tl2cgen and treelite versions, our patch
version).  A later load -- same process, another process, after a restart --
opens the cached file and never starts the compiler.  Files are built in a
temporary directory beside the cache and moved into place with
``os.replace``, so a reader never sees half a library.

Why the patch exists.  tl2cgen 1.0 passes features as
``union Entry { int missing; double fvalue; int qvalue; }`` and tests
``data[i].missing != -1``.  The int shares the low 32 bits of the double, so
any float64 whose low 32 bits are all ones (35.87499999999999 is one; 3,418
rows of our card data have one) is taken as missing and follows the default
branch: a LightGBM score moved from 8.1e-05 to 0.99998 that way.  The patch
tests ``isnan(fvalue)`` instead (NaN is the only missing value), drops the
``missing`` member so no leftover use can compile, and refuses the sources if
any use remains, so a future tl2cgen cannot bring the sentinel back quietly.
It also adds the base score before the trees rather than after, in the
model's own precision, as XGBoost does (float32 sums are order-sensitive:
with the base last, 59% of our XGBoost margins were off by up to 1.3e-05),
and exports ``muse_init`` / ``predict_unit<k>`` / ``muse_finish`` so the
Cython kernel can run each group of trees over a block of rows.

Where no compiler exists or compilation fails, ``build_library`` raises
``CompileUnavailable`` and the caller serves the model with ``GtilKernel``,
treelite's interpreter with the same summation order.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import tl2cgen
import treelite

from muse._errors import ModelImportError, StorageFull

__all__ = [
    "PATCH_VERSION",
    "CompileStatistics",
    "CompileUnavailable",
    "CtypesKernel",
    "GtilKernel",
    "Kernel",
    "NativeLibrary",
    "OutputLayout",
    "build_library",
    "compile_statistics",
    "default_cache_dir",
    "find_compiler",
    "generate_sources",
    "ZERO_THRESHOLD",
    "ZEROS_ARE_MISSING",
    "ZEROS_ARE_ZERO",
    "ZEROS_KEPT",
    "native_kernel",
    "patch_sources",
]

log = logging.getLogger("muse.models")

FloatArray = npt.NDArray[np.float64]

#: Bump whenever patch_sources changes what it emits: it is part of the
#: cache key, and libraries built by another version are not opened.
PATCH_VERSION = 1

# Trees per translation unit.  A unit is what the kernel runs over a block
# of rows; 8 trees of depth 6 are ~25 kB of code, which stays in L2 while
# 64 rows pass (a 4096-row batch took a quarter less time than calling
# predict() row by row).  Units also compile faster than one function:
# gcc -O3 took 23 s on 200 depth-6 trees in one function, 8 s in 30 units
# on two cores.
TREES_PER_UNIT = 8

# -ffp-contract=off: no fused multiply-add, so a sum is the same whether or
# not gcc inlines muse_init/muse_finish into predict (platforms with FMA).
# -O3 without -march: the cache must stay valid on any machine of the arch.
_CFLAGS = ("-O3", "-fPIC", "-ffp-contract=off")
# -Bsymbolic: every model library exports predict, predict_unit0, ...; bind
# each library's internal calls to itself, whatever else is loaded.
_LDFLAGS = (
    ("-shared", "-Wl,-Bsymbolic") if sys.platform.startswith("linux") else ("-shared",)
)
_COMPILERS = ("gcc", "cc")
# Translation units compiled at once.  Beyond a few, a build slows down the
# server sharing the machine more than it speeds itself up.
_MAX_COMPILE_JOBS = 4
# A 12,000-node LightGBM model takes about 30 s on one slow core.
_COMPILE_TIMEOUT = 900.0

_KIND = {"float32": True, "float64": False}


class CompileUnavailable(Exception):
    """No native library for this model; serve it with GTIL instead.

    Internal: ``load_model`` catches it, logs one warning and falls back.
    """


@dataclass(frozen=True)
class CompileStatistics:
    """Counts since the process started.

    Attributes:
        compiler_runs: builds that started the compiler (one per model,
            however many translation units it has).
        cache_hits: loads that opened an already compiled library.
        fallbacks: loads served by GTIL (no compiler, failed build, refused
            patch).
        compile_seconds: wall time spent in builds.
    """

    compiler_runs: int = 0
    cache_hits: int = 0
    fallbacks: int = 0
    compile_seconds: float = 0.0


_stats_lock = threading.Lock()
_stats = CompileStatistics()


def _count(**increments: float) -> None:
    global _stats
    with _stats_lock:
        values = {
            name: getattr(_stats, name) + increments.get(name, 0)
            for name in CompileStatistics.__dataclass_fields__
        }
        _stats = CompileStatistics(**values)


def compile_statistics() -> CompileStatistics:
    """Counters of builds, cache hits and GTIL fallbacks in this process."""
    return _stats


def default_cache_dir() -> Path:
    """``$MUSE_CACHE_DIR``, else ``~/.cache/muse/compiled``."""
    configured = os.environ.get("MUSE_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "muse" / "compiled"


def find_compiler() -> str | None:
    """The C compiler to use, or None.

    ``$MUSE_CC`` names one explicitly (set it empty to disable compiling);
    otherwise the first of gcc, cc on PATH.
    """
    configured = os.environ.get("MUSE_CC")
    if configured is not None:
        return shutil.which(configured) if configured else None
    for name in _COMPILERS:
        found = shutil.which(name)
        if found:
            return found
    return None


# --- generated sources -------------------------------------------------------

# One numerical test as tl2cgen writes it: (data[3].fvalue < (float)0.5)
_TEST = (
    r"\(data\[(?P<j>\d+)\]\.fvalue (?P<op><=|>=|<|>) "
    r"(?P<t>\((?:float|double)\)[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\)"
)
_DEFAULT_LEFT = re.compile(r"!\(data\[(?P<i>\d+)\]\.missing != -1\) \|\| " + _TEST)
_DEFAULT_RIGHT = re.compile(r"\(data\[(?P<i>\d+)\]\.missing != -1\) && " + _TEST)
_NOT_MISSING = re.compile(r"data\[(\d+)\]\.missing\s*!=\s*-1")
_IS_MISSING = re.compile(r"data\[(\d+)\]\.missing\s*==\s*-1")
# C99 quiet comparisons are false when a side is NaN and raise nothing, so
# "not missing and x < t" is isless(x, t) ...
_FALSE_ON_NAN = {
    "<": "isless",
    "<=": "islessequal",
    ">": "isgreater",
    ">=": "isgreaterequal",
}
# ... and "missing or x < t" is !isgreaterequal(x, t).
_TRUE_ON_NAN = {
    "<": "isgreaterequal",
    "<=": "isgreater",
    ">": "islessequal",
    ">=": "isless",
}
_LEAF_ADD = re.compile(
    r"^(?P<lhs>\s*result\[\d+\] \+= )"
    r"(?P<v>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?);$",
    re.M,
)
_PREDICT = re.compile(
    r"^void predict\(union Entry\* data, int pred_margin, "
    r"(?P<t>float|double)\* result\) \{\n(?P<body>.*?)^\}\n",
    re.M | re.S,
)
_UNIT_CALL = re.compile(r"^\s*(predict_unit\d+)\(data, result\);$")
_BASE_LINE = re.compile(r"^\s*result\[(?P<k>\d+)\] \+= (?P<v>[^;]+);$")
_MISSING_MEMBER = re.compile(r"^\s*int missing;\s*\n", re.M)
_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)


def generate_sources(tl_model: treelite.Model, directory: Path) -> list[Path]:
    """Write tl2cgen's C for ``tl_model`` into ``directory``, patched.

    Returns:
        The .c files to compile (header.h sits beside them).

    Raises:
        ModelImportError: tl2cgen failed, or its output could not be
            patched (see ``patch_sources``).
    """
    units = max(1, -(-tl_model.num_tree // TREES_PER_UNIT))
    params: dict[str, Any] = {"parallel_comp": units} if units > 1 else {}
    try:
        tl2cgen.generate_c_code(tl_model, str(directory), params=params)
    except tl2cgen.TL2cgenError as exc:
        raise ModelImportError(f"tl2cgen could not generate code: {exc}") from exc
    recipe = json.loads((directory / "recipe.json").read_text())
    names = [f"{source['name']}.c" for source in recipe["sources"]]
    texts = {name: (directory / name).read_text() for name in names}
    header = (directory / "header.h").read_text()
    patched, patched_header = patch_sources(texts, header)
    for name, text in patched.items():
        (directory / name).write_text(text)
    (directory / "header.h").write_text(patched_header)
    return [directory / name for name in patched]


def patch_sources(sources: dict[str, str], header: str) -> tuple[dict[str, str], str]:
    """Remove the missing-value sentinel and add MUSE's entry points.

    Args:
        sources: file name -> text of tl2cgen's .c files (one is main.c).
        header: text of tl2cgen's header.h.

    Returns:
        The patched sources (same names) and header.

    Raises:
        ModelImportError: the code does not have the shape this patch knows,
            or a use of ``missing`` / ``qvalue`` survived it.
    """
    if "main.c" not in sources:
        raise ModelImportError("tl2cgen output has no main.c")
    float32 = "float fvalue;" in header
    patched = {name: _patch_tests(text, float32) for name, text in sources.items()}
    main, extra_prototypes = _restructure_main(patched["main.c"], float32)
    patched["main.c"] = main
    new_header = _patch_header(header, extra_prototypes)
    _refuse_sentinel({**patched, "header.h": new_header})
    return patched, new_header


def _patch_tests(text: str, float32: bool) -> str:
    """Rewrite every missing test on ``fvalue``; float leaves for float models."""

    def default_left(match: re.Match[str]) -> str:
        if match["i"] != match["j"]:
            return match[0]
        return f"!{_TRUE_ON_NAN[match['op']]}(data[{match['j']}].fvalue, {match['t']})"

    def default_right(match: re.Match[str]) -> str:
        if match["i"] != match["j"]:
            return match[0]
        return f"{_FALSE_ON_NAN[match['op']]}(data[{match['j']}].fvalue, {match['t']})"

    text = _DEFAULT_LEFT.sub(default_left, text)
    text = _DEFAULT_RIGHT.sub(default_right, text)
    # Whatever other shape a test has (categorical splits), the same meaning.
    text = _NOT_MISSING.sub(r"!isnan(data[\1].fvalue)", text)
    text = _IS_MISSING.sub(r"isnan(data[\1].fvalue)", text)
    if float32:
        # tl2cgen writes float leaves as double literals, so "result += v" is
        # computed in double and rounded; XGBoost adds floats.
        text = _LEAF_ADD.sub(r"\g<lhs>(float)\g<v>;", text)
    return text


def _restructure_main(text: str, float32: bool) -> tuple[str, list[str]]:
    """Split predict() into muse_init + units + muse_finish; base score first.

    Returns:
        The new main.c and prototypes to add to header.h.
    """
    match = _PREDICT.search(text)
    if match is None:
        raise ModelImportError("tl2cgen main.c has no predict() of known shape")
    ctype = match["t"]
    if (ctype == "float") != float32:
        raise ModelImportError("tl2cgen predict() result type disagrees with Entry")
    lines = match["body"].splitlines()
    start = next(
        (i for i, line in enumerate(lines) if line.strip().startswith("// ")),
        len(lines),
    )
    tree_lines, finish_lines = lines[:start], lines[start:]
    units, unit_code = _units(tree_lines, ctype, text, float32)
    finish, base = _split_base(finish_lines)
    init = [f"  result[{k}] = ({ctype})({value});" for k, value in base]
    calls = "".join(f"  {unit}(data, result);\n" for unit in units)
    new = (
        f"void muse_init({ctype}* result) {{\n"
        "  for (int i = 0; i < N_TARGET * MAX_N_CLASS; ++i) { result[i] = 0; }\n"
        + "".join(line + "\n" for line in init)
        + "}\n\n"
        f"void muse_finish({ctype}* result, int pred_margin) {{\n"
        + "".join(line + "\n" for line in finish)
        + "}\n\n"
        f"int32_t muse_num_units(void) {{ return {len(units)}; }}\n"
        "int32_t muse_result_size(void) { return N_TARGET * MAX_N_CLASS; }\n"
        f"int32_t muse_patch_version(void) {{ return {PATCH_VERSION}; }}\n\n"
        f"void predict(union Entry* data, int pred_margin, {ctype}* result) {{\n"
        "  muse_init(result);\n" + calls + "  muse_finish(result, pred_margin);\n}\n"
    )
    prototypes = [
        f"void muse_init({ctype}* result);",
        f"void muse_finish({ctype}* result, int pred_margin);",
        "int32_t muse_num_units(void);",
        "int32_t muse_result_size(void);",
        "int32_t muse_patch_version(void);",
    ]
    if unit_code:
        prototypes.append(f"void predict_unit0(union Entry* data, {ctype}* result);")
    return text[: match.start()] + unit_code + new + text[match.end() :], prototypes


def _units(
    tree_lines: list[str], ctype: str, text: str, float32: bool
) -> tuple[list[str], str]:
    """Unit functions predict() calls; inline trees become predict_unit0."""
    code = [
        line for line in tree_lines if line.strip() not in ("", "unsigned int tmp;")
    ]
    calls = [_UNIT_CALL.match(line) for line in code]
    if code and all(calls):
        return [call[1] for call in calls if call], ""
    if "predict_unit" in text:
        raise ModelImportError("tl2cgen predict() mixes unit calls and inline trees")
    body = "\n".join(tree_lines)
    unit = f"void predict_unit0(union Entry* data, {ctype}* result) {{\n{body}\n}}\n\n"
    return ["predict_unit0"], unit


def _split_base(finish: list[str]) -> tuple[list[str], list[tuple[int, str]]]:
    """Take the base-score lines out of predict()'s tail, unless it averages.

    Averaging models (random forests) divide the tree sum and then add the
    base; there the order stays as tl2cgen wrote it and muse_init adds 0.
    """
    stripped = [line.strip() for line in finish]
    if "// Apply base_scores" not in stripped:
        raise ModelImportError("tl2cgen predict() has no base-score section")
    if "// Average tree outputs" in stripped:
        return finish, []
    at = stripped.index("// Apply base_scores")
    end = at + 1
    base: list[tuple[int, str]] = []
    while end < len(finish) and (found := _BASE_LINE.match(finish[end])):
        base.append((int(found["k"]), found["v"]))
        end += 1
    if not base:
        raise ModelImportError("tl2cgen base-score section has no assignments")
    return finish[:at] + finish[end:], base


def _patch_header(header: str, prototypes: list[str]) -> str:
    header, removed = _MISSING_MEMBER.subn("", header)
    if removed != 1:
        raise ModelImportError(
            f"tl2cgen header.h: expected one 'int missing;' member, found {removed}"
        )
    return header + "\n" + "\n".join(prototypes) + "\n"


def _refuse_sentinel(files: dict[str, str]) -> None:
    for name, text in files.items():
        code = _COMMENT.sub("", text)
        if re.search(r"\bmissing\b", code):
            raise ModelImportError(
                f"patched {name} still uses the 'missing' sentinel; refusing to "
                "compile (tl2cgen changed the code it generates?)"
            )
        if re.search(r"(\.|->)\s*qvalue\b", code):
            raise ModelImportError(
                f"patched {name} reads quantized 'qvalue' entries, which would "
                "overwrite the float features; refusing to compile"
            )


# --- building and caching ----------------------------------------------------


def _cache_key(tl_model: treelite.Model, compiler: str) -> str:
    digest = hashlib.sha256()
    for part in (
        b"muse-compiled-model",
        tl_model.serialize_bytes(),
        " ".join((Path(compiler).name, *_CFLAGS, *_LDFLAGS)).encode(),
        f"tl2cgen {tl2cgen.__version__} treelite {treelite.__version__}".encode(),
        f"patch {PATCH_VERSION} units {TREES_PER_UNIT}".encode(),
        f"{sys.platform} {platform.machine()}".encode(),
    ):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


def build_library(
    tl_model: treelite.Model, cache_dir: Path, label: str
) -> tuple[NativeLibrary, bool]:
    """The compiled library for ``tl_model``, from the cache or built now.

    Args:
        tl_model: the model to compile.
        cache_dir: where compiled libraries are kept (created if needed).
        label: the model's name, for messages.

    Returns:
        The opened library, and whether it came from the cache.

    Raises:
        CompileUnavailable: no compiler, a failed build or a refused patch.
    """
    compiler = find_compiler()
    if compiler is None:
        _count(fallbacks=1)
        raise CompileUnavailable(
            "no C compiler found (looked for $MUSE_CC, then gcc, cc on PATH)"
        )
    key = _cache_key(tl_model, compiler)
    path = cache_dir / f"{key}.so"
    if path.exists():
        try:
            library = _open_library(path)
        except OSError as exc:
            # Truncated by a full disk, or built by another patch: rebuild.
            log.warning("cached library %s unusable (%s); rebuilding", path, exc)
        else:
            _count(cache_hits=1)
            return library, True
    started = time.perf_counter()
    try:
        _build(tl_model, compiler, path, label)
        library = _open_library(path)
    except (ModelImportError, OSError, ValueError, subprocess.SubprocessError) as exc:
        # A full disk shows up in many guises (a truncated recipe from
        # tl2cgen, a compiler error, ENOSPC): ask the disk before blaming
        # the model, and never fall back to GTIL over a full disk.
        if _disk_full(cache_dir):
            raise StorageFull(
                f"the disk holding {cache_dir} is full; model {label} was not compiled"
            ) from exc
        _count(fallbacks=1)
        raise CompileUnavailable(str(exc)) from exc
    finally:
        _count(compile_seconds=time.perf_counter() - started)
    return library, False


def _disk_full(directory: Path) -> bool:
    """Whether a small write in ``directory`` fails for lack of space."""
    try:
        with tempfile.TemporaryFile(dir=directory) as probe:
            probe.write(b"\0" * 65536)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return False


def _build(tl_model: treelite.Model, compiler: str, path: Path, label: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as tmp:
        work = Path(tmp)
        sources = generate_sources(tl_model, work)
        _count(compiler_runs=1)
        objects = _compile_units(compiler, sources, work)
        built = work / "model.so"
        _run_compiler([compiler, *_LDFLAGS, "-o", str(built), *objects, "-lm"])
        with open(built, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(built, path)
    log.debug("compiled %s into %s", label, path)


def _compile_units(compiler: str, sources: Sequence[Path], work: Path) -> list[str]:
    objects = [str(work / f"{source.stem}.o") for source in sources]
    commands = [
        [compiler, *_CFLAGS, "-c", str(source), "-o", obj]
        for source, obj in zip(sources, objects, strict=True)
    ]
    jobs = max(1, min(_MAX_COMPILE_JOBS, os.cpu_count() or 1, len(commands)))
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for _ in pool.map(_run_compiler, commands):
            pass
    return objects


def _run_compiler(command: list[str]) -> None:
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT
    )
    if done.returncode != 0:
        tail = " ".join(done.stderr.strip().splitlines()[-3:])
        raise subprocess.SubprocessError(
            f"{Path(command[0]).name} exited with {done.returncode}: {tail}"
        )


@dataclass(frozen=True)
class NativeLibrary:
    """An opened model library and the addresses the kernels call.

    Attributes:
        path: the cached .so file.
        float32: Entry and result are float (XGBoost), not double.
        num_feature: columns the model reads.
        result_size: length of the result vector predict() fills.
        init, finish: addresses of muse_init and muse_finish.
        units: addresses of predict_unit0, predict_unit1, ...
    """

    path: Path
    float32: bool
    num_feature: int
    result_size: int
    init: int
    finish: int
    units: tuple[int, ...]
    handle: ctypes.CDLL = field(repr=False, compare=False)


def _open_library(path: Path) -> NativeLibrary:
    handle = ctypes.CDLL(str(path))
    version = _int_call(handle, "muse_patch_version")
    if version != PATCH_VERSION:
        raise OSError(f"built by patch {version}, this is patch {PATCH_VERSION}")
    handle.get_threshold_type.restype = ctypes.c_char_p
    kind = handle.get_threshold_type().decode()
    if kind not in _KIND:
        raise OSError(f"unknown threshold type {kind!r}")
    units = tuple(
        _address(handle, f"predict_unit{k}")
        for k in range(_int_call(handle, "muse_num_units"))
    )
    return NativeLibrary(
        path=path,
        float32=_KIND[kind],
        num_feature=_int_call(handle, "get_num_feature"),
        result_size=_int_call(handle, "muse_result_size"),
        init=_address(handle, "muse_init"),
        finish=_address(handle, "muse_finish"),
        units=units,
        handle=handle,
    )


def _int_call(handle: ctypes.CDLL, name: str) -> int:
    function = getattr(handle, name)
    function.restype = ctypes.c_int32
    function.argtypes = []
    return int(function())


def _address(handle: ctypes.CDLL, name: str) -> int:
    address = ctypes.cast(getattr(handle, name), ctypes.c_void_p).value
    if not address:
        raise OSError(f"{name} has a null address")
    return address


# --- kernels -----------------------------------------------------------------

#: LightGBM's kZeroThreshold (the float 1e-35f as a double).
ZERO_THRESHOLD = 1.0000000180025095e-35


class Kernel(Protocol):
    """What a Model predicts with: ``run(X, margin)`` -> float64 per row."""

    def run(self, X: FloatArray, margin: bool) -> FloatArray: ...


@dataclass(frozen=True)
class OutputLayout:
    """How a binary model's output is computed, for the GTIL kernel.

    Attributes:
        float32: the model's precision (XGBoost) rather than float64.
        out_index: the result element holding the positive class.
        num_tree: trees in the model.
        average: the tree sum is divided by num_tree (random forests).
        base: base score added to that element.
        sigmoid_alpha: slope of the sigmoid postprocessor, None for identity.
    """

    float32: bool
    out_index: int
    num_tree: int
    average: bool
    base: float
    sigmoid_alpha: float | None


# Per-feature handling of values within ZERO_THRESHOLD of zero (``zeros``
# arrays, one uint8 per feature).  LightGBM's predictor keeps only values
# with |x| > kZeroThreshold (or NaN) and reads the rest as 0.0: every
# LightGBM feature is ZEROS_ARE_ZERO, zero_as_missing ones ZEROS_ARE_MISSING.
ZEROS_KEPT, ZEROS_ARE_ZERO, ZEROS_ARE_MISSING = 0, 1, 2

ZeroModes = npt.NDArray[np.uint8]


def prepare_rows(
    X: FloatArray, float32: bool, zeros: ZeroModes | None
) -> npt.NDArray[np.floating[Any]]:
    """A C-contiguous copy of X in the model's precision, zeros as LightGBM's."""
    rows = np.array(X, dtype=np.float64, order="C", copy=True)
    if zeros is not None:
        tiny = (np.abs(rows) <= ZERO_THRESHOLD) & (zeros != ZEROS_KEPT)
        rows[tiny] = 0.0
        rows[tiny & (zeros == ZEROS_ARE_MISSING)] = np.nan
    if not float32:
        return rows
    # Beyond float32's range a value becomes +-inf, as the C cast (and
    # XGBoost's own conversion) makes it.
    with np.errstate(over="ignore"):
        return rows.astype(np.float32)


def native_kernel(
    library: NativeLibrary,
    out_index: int,
    zeros: ZeroModes | None,
    pure_python: bool,
) -> tuple[Kernel, str]:
    """The Cython kernel for ``library``, or its ctypes twin.

    Args:
        pure_python: use the ctypes twin (``MUSE_PURE_PYTHON=1``).

    Returns:
        The kernel and its name, ``"cython"`` or ``"ctypes"``.
    """
    if not pure_python:
        try:
            from muse._fast._treepredict import TreeKernel
        except ImportError as exc:
            log.warning("compiled tree kernel unavailable (%s); using ctypes", exc)
        else:
            flags = None if zeros is None else zeros.astype(np.uint8).tobytes()
            kernel = TreeKernel(
                library.init,
                library.finish,
                library.units,
                library.float32,
                library.num_feature,
                library.result_size,
                out_index,
                flags,
                library.handle,
            )
            return kernel, "cython"
    return CtypesKernel(library, out_index, zeros), "ctypes"


class CtypesKernel:
    """Pure-Python twin of ``TreeKernel``: the library's predict() per row.

    Same library, same arithmetic, so the same bits; about a hundred times
    slower per row.  Selected with ``MUSE_PURE_PYTHON=1``.
    """

    def __init__(
        self,
        library: NativeLibrary,
        out_index: int,
        zeros: ZeroModes | None,
    ) -> None:
        self._library = library
        self._out_index = out_index
        self._zeros = zeros
        self._predict = library.handle.predict
        self._predict.restype = None
        self._predict.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]

    def run(self, X: FloatArray, margin: bool) -> FloatArray:
        """Outputs (or margins) of every row of X; see ``TreeKernel.run``."""
        if X.ndim != 2 or X.shape[1] != self._library.num_feature:
            raise ValueError(
                f"expected {self._library.num_feature} columns, got shape {X.shape}"
            )
        rows = prepare_rows(X, self._library.float32, self._zeros)
        dtype = np.float32 if self._library.float32 else np.float64
        result = np.zeros(self._library.result_size, dtype=dtype)
        out = np.empty(len(rows), dtype=np.float64)
        start, stride = rows.ctypes.data, rows.strides[0]
        target = result.ctypes.data
        for i in range(len(rows)):
            self._predict(start + i * stride, int(margin), target)
            out[i] = result[self._out_index]
        return out


class GtilKernel:
    """treelite's GTIL interpreter, summed the way the compiled code sums.

    GTIL's own totals add the base score last, which moves float32 XGBoost
    margins by a few ulps; per-tree outputs summed here base-first in the
    model's precision give the compiled library's (and XGBoost's) bits.
    """

    def __init__(
        self,
        tl_model: treelite.Model,
        layout: OutputLayout,
        zeros: ZeroModes | None,
    ) -> None:
        self._model = tl_model
        self._layout = layout
        self._zeros = zeros

    def run(self, X: FloatArray, margin: bool) -> FloatArray:
        """Outputs (or margins) of every row of X; see ``TreeKernel.run``."""
        layout = self._layout
        if X.ndim != 2 or X.shape[1] != self._model.num_feature:
            raise ValueError(
                f"expected {self._model.num_feature} columns, got shape {X.shape}"
            )
        if len(X) == 0:
            return np.empty(0, dtype=np.float64)
        rows = prepare_rows(X, layout.float32, self._zeros)
        per_tree = treelite.gtil.predict_per_tree(self._model, rows, nthread=1)
        leaves = per_tree[:, :, layout.out_index]
        dtype: type[np.floating[Any]] = np.float32 if layout.float32 else np.float64
        start = 0.0 if layout.average else layout.base
        total: npt.NDArray[Any] = np.full(len(rows), start, dtype)
        for k in range(leaves.shape[1]):
            total += leaves[:, k].astype(dtype)
        if layout.average:
            total /= dtype(layout.num_tree)
            total += dtype(layout.base)
        if not margin and layout.sigmoid_alpha is not None:
            # As the generated postprocess: 1 / (1 + expf(-alpha * x)) with
            # each step rounded to the model's precision; numpy's float32
            # exp is not correctly rounded, glibc's expf (nearly always) is.
            one = dtype(1.0)
            exponent = -dtype(layout.sigmoid_alpha) * total
            total = one / (one + np.exp(exponent.astype(np.float64)).astype(dtype))
        return total.astype(np.float64)
