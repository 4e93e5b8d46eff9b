"""Score kernels against numpy, single thread, same knots and same data.

Run:  python bench/bench_mapping.py [--repeat 15] [--quick]

Prints, for 1, 64, 4096 and 1e6 scores per call, the median over
repetitions of the time per call and the scores per second of:

* the quantile-mapping kernel (``MappingTable.apply``, output allocated;
  with a preallocated output; through typed memoryviews), the public
  ``QuantileMapping.apply``, and the numpy twin, each against
  ``numpy.interp`` on the same knots;
* the posterior-correction kernels against the numpy expressions
  ``beta*y / (1 - (1 - beta)*y)`` and ``1 / (1 + exp(-(m + log beta)))``.

Each call gets a different array from a pool several times larger than the
CPU caches' taste for repetition: ``numpy.interp``'s binary search branches
on the data, and replaying one small array lets the branch predictor learn
it, which no server sees.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
from numpy.typing import NDArray

from muse._fast import _mapping, _reference
from muse._transform import QuantileMapping

SIZES = (1, 64, 4096, 1_000_000)
# Scores per pool: enough distinct arrays that nothing is replayed soon.
POOL_SCORES = 4_000_000
BETA = 0.05

Array = NDArray[np.float64]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=15, help="repetitions")
    parser.add_argument("--quick", action="store_true", help="smaller pools")
    args = parser.parse_args(argv)
    pool_scores = POOL_SCORES // 8 if args.quick else POOL_SCORES

    rng = np.random.default_rng(2024)
    mapping = QuantileMapping.fit(rng.beta(0.6, 4.0, 200_000))
    table = _mapping.MappingTable(mapping.knots, mapping.edges)
    twin = _reference.MappingTable(mapping.knots, mapping.edges)
    xp = np.array([0.0, *mapping.knots, 1.0])
    fp = np.array([0.0, *mapping.edges, 1.0])
    print(f"knots {[round(k, 4) for k in mapping.knots]}, edges {list(mapping.edges)}")
    print(
        f"median of {args.repeat} repetitions, methods interleaved in each;"
        " ratio = baseline time / this method's time\n"
    )

    print("quantile mapping (baseline numpy.interp, same knots)")
    for size in SIZES:
        pool = _pool(rng, size, pool_scores)
        out = np.empty(size)
        _report(size, pool, args.repeat, {
            "numpy.interp (baseline)": lambda x: np.interp(x, xp, fp),
            "kernel MappingTable.apply": table.apply,
            "kernel apply, preallocated out": partial(table.apply, out=out),
            "kernel apply_into (memoryviews)": partial(table.apply_into, out=out),
            "QuantileMapping.apply (public)": mapping.apply,
            "numpy twin MappingTable.apply": twin.apply,
        })  # fmt: skip

    log_beta = math.log(BETA)
    print(f"posterior correction, beta = {BETA:g} (baseline the numpy expression)")
    for size in SIZES:
        pool = _pool(rng, size, pool_scores)
        _report(size, pool, args.repeat, {
            "numpy beta*y/(1-(1-beta)*y)": lambda y: BETA * y / (1 - (1 - BETA) * y),
            "kernel correct_posterior": lambda y: _mapping.correct_posterior(y, BETA),
            "numpy twin correct_posterior":
                lambda y: _reference.correct_posterior(y, BETA),
        })  # fmt: skip
    print("margin form (baseline the numpy expression)")
    for size in SIZES:
        margins = [np.log(x) - np.log1p(-x) for x in _pool(rng, size, pool_scores)]
        _report(size, margins, args.repeat, {
            "numpy 1/(1+exp(-(m+log beta)))":
                lambda m: 1.0 / (1.0 + np.exp(-(m + log_beta))),
            "kernel correct_margin": lambda m: _mapping.correct_margin(m, BETA),
        })  # fmt: skip


def _pool(rng: np.random.Generator, size: int, scores: int) -> list[Array]:
    count = max(4, min(4096, scores // size))
    # Clipped away from 0 and 1 so the margins stay finite.
    return [np.clip(rng.random(size), 1e-12, 1 - 1e-12) for _ in range(count)]


def _report(
    size: int,
    pool: list[Array],
    repeat: int,
    methods: dict[str, Callable[[Array], object]],
) -> None:
    """Time each method over the pool, round-robin, and print a table.

    The first method is the baseline.  Each repetition times every method
    once, so a burst of load from other processes hits them all alike.
    """
    for fn in methods.values():
        for x in pool[:4]:
            fn(x)  # warm up: first-call allocations, lazy imports
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeat):
        for name, fn in methods.items():
            start = time.perf_counter()
            for x in pool:
                fn(x)
            samples[name].append((time.perf_counter() - start) / len(pool))
    medians = {name: statistics.median(times) for name, times in samples.items()}
    baseline = next(iter(medians.values()))
    header = f"{'size':>9}  {'method':<34}{'ns/call':>12}{'Mscores/s':>11}{'ratio':>8}"
    print(header)
    print("-" * len(header))
    for name, seconds in medians.items():
        rate = size / seconds / 1e6
        print(f"{size:>9}  {name:<34}{seconds * 1e9:>12,.0f}{rate:>11.1f}"
              f"{baseline / seconds:>8.2f}")  # fmt: skip
    print()


if __name__ == "__main__":
    main()
