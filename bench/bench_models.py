"""Tree prediction: MUSE's compiled kernel against xgboost, GTIL and tl2cgen.

Run:  python bench/bench_models.py [--repeat 9] [--rows 120000]

Trains a 200-tree depth-6 XGBoost binary model on synthetic card
transactions (``muse._synthetic``, the 15 features of the real data), loads
it with ``muse.load_model`` and prints, for batches of 1, 64 and 4096 rows,
the median over repetitions of microseconds per row and rows per second of:

* (a) MUSE: ``Model.predict`` (compiled library, Cython kernel);
* (b) xgboost ``Booster.inplace_predict`` with nthread=1;
* (c) treelite GTIL ``treelite.gtil.predict`` with nthread=1;
* (d) tl2cgen's generic Python API, ``tl2cgen.Predictor(nthread=1)`` on a
  ``tl2cgen.DMatrix`` built per call (the library exported by tl2cgen with
  the same parallel_comp as MUSE's);

and each one's time per row divided by MUSE's (above 1: MUSE is faster).
Every call gets different rows, taken in turn from held-out data, so no
branch history is replayed; repetitions go round-robin over the methods, so
load from elsewhere on the machine hits them alike.  One thread each.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import tl2cgen
import treelite
import xgboost as xgb

from muse._compile import TREES_PER_UNIT
from muse._models import load_model
from muse._synthetic import FEATURES, generate_transactions

BATCHES = (1, 64, 4096)
TREES = 200
DEPTH = 6
# Rows predicted per repetition and batch size: enough calls that timer
# resolution and one-off stalls do not matter, few enough for GTIL.
ROWS_PER_REPEAT = 8192

Predict = Callable[[np.ndarray], object]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=9, help="repetitions")
    parser.add_argument("--rows", type=int, default=120_000, help="rows generated")
    args = parser.parse_args(argv)

    train, test = _data(args.rows)
    booster = _train(*train)
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        started = time.perf_counter()
        model = load_model(booster, "xgboost", cache_dir=tmp, name="bench")
        print(
            f"model: {TREES} trees depth {DEPTH}, {len(FEATURES)} features; "
            f"load_model (compile + parity) {time.perf_counter() - started:.1f} s, "
            f"kernel {model.implementation}"
        )
        methods = _methods(model, booster, Path(tmp))
        print(
            f"median of {args.repeat} repetitions; "
            "ratio = method us/row / MUSE us/row\n"
        )
        print(f"{'batch':>6}  {'method':<34}{'us/row':>10}{'rows/s':>14}{'ratio':>8}")
        for batch in BATCHES:
            _report(batch, methods, test, args.repeat)


def _data(rows: int) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    data = generate_transactions(rows, seed=7)
    X = np.ascontiguousarray(np.column_stack([data[f] for f in FEATURES]), np.float64)
    y = data["TX_FRAUD"].astype(np.int32)
    half = len(X) // 2
    return (X[:half], y[:half]), X[half:]


def _train(X: np.ndarray, y: np.ndarray) -> xgb.Booster:
    params = {
        "objective": "binary:logistic",
        "max_depth": DEPTH,
        "eta": 0.1,
        "nthread": 2,
        "tree_method": "hist",
    }
    matrix = xgb.DMatrix(X, y, feature_names=list(FEATURES))
    booster = xgb.train(params, matrix, num_boost_round=TREES)
    booster.set_param({"nthread": 1})
    return booster


def _methods(model: object, booster: xgb.Booster, tmp: Path) -> dict[str, Predict]:
    tl_model = treelite.frontend.from_xgboost_ubjson(bytes(booster.save_raw("ubj")))
    libpath = tmp / "tl2cgen_predictor.so"
    tl2cgen.export_lib(
        tl_model,
        toolchain="gcc",
        libpath=str(libpath),
        params={"parallel_comp": max(1, TREES // TREES_PER_UNIT)},
    )
    predictor = tl2cgen.Predictor(str(libpath), nthread=1)
    return {
        "(a) MUSE Model.predict": model.predict,  # type: ignore[attr-defined]
        "(b) xgboost inplace_predict": lambda X: booster.inplace_predict(X),
        "(c) treelite GTIL": lambda X: treelite.gtil.predict(tl_model, X, nthread=1),
        "(d) tl2cgen Predictor+DMatrix": lambda X: predictor.predict(
            tl2cgen.DMatrix(X)
        ),
    }


def _report(
    batch: int, methods: dict[str, Predict], test: np.ndarray, repeat: int
) -> None:
    calls = max(1, ROWS_PER_REPEAT // batch)
    chunks = [
        np.ascontiguousarray(test[(i * batch) % (len(test) - batch) :][:batch])
        for i in range(calls)
    ]
    rows = calls * batch
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values():
        fn(chunks[0])  # warm up: first-call imports and page faults
    # Round-robin, so a burst of load on the machine hits every method alike.
    for _ in range(repeat):
        for name, fn in methods.items():
            started = time.perf_counter()
            for chunk in chunks:
                fn(chunk)
            samples[name].append((time.perf_counter() - started) * 1e6 / rows)
    timings = {name: statistics.median(values) for name, values in samples.items()}
    ours = timings["(a) MUSE Model.predict"]
    for name, us in timings.items():
        print(f"{batch:>6}  {name:<34}{us:>10.3f}{1e6 / us:>14,.0f}{us / ours:>8.2f}")
    print()


if __name__ == "__main__":
    main()
