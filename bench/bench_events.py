"""Scoring bodies and event dicts to model input, against the general path.

Run:  python bench/bench_events.py [--repeat 15]

For 1, 64 and 4096 events of the 15 features per request, prints the median
over repetitions of the time per request of:

* a msgpack ``/v1/score`` body to a checked float64 matrix: the general
  path (``msgpack.unpackb``, ``parse_score_request``, ``build_matrix``,
  the baseline) against ``read_score_call`` (the compiled reader, then the
  column selection and checks the engine does) and the reader's twin;
* events already decoded as dicts (the embedding API) to the matrix:
  ``build_matrix`` (baseline) against ``DecodedEvents.matrix`` (the
  compiled dict reader and the one-pass check).

Each request body is distinct (a pool of them, cycled), with one feature in
twenty missing, as a client sends them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import numpy as np

from muse._events import DecodedEvents, PackedEvents, read_score_call
from muse._fast import _events_reference
from muse._synthetic import FEATURES, generate_transactions
from muse._wire import MSGPACK, build_matrix, decode_body, parse_score_request

SIZES = (1, 64, 4096)
# Events per pool: enough distinct bodies that none is replayed soon.
POOL_EVENTS = 65_536
MAX_EVENTS = 4096


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=15, help="repetitions")
    args = parser.parse_args(argv)

    data = generate_transactions(POOL_EVENTS, seed=11)
    rng = np.random.default_rng(5)
    events = []
    for i in range(POOL_EVENTS):
        features: dict[str, Any] = {f: float(data[f][i]) for f in FEATURES}
        for name in FEATURES:
            if rng.random() < 0.05:
                features[name] = None
        events.append({"id": f"tx-{i}", "features": features})
    print(
        f"median of {args.repeat} repetitions, methods interleaved in each;"
        " ratio = baseline time / this method's time\n"
    )

    print("msgpack body -> checked matrix (baseline: unpackb + build_matrix)")
    for size in SIZES:
        bodies = [
            msgpack.packb({"intent": "card-fraud", "events": events[a : a + size]})
            for a in range(0, POOL_EVENTS - size + 1, size)
        ][:2048]
        _report(size, bodies, args.repeat, {
            "general path (baseline)": _general,
            "read_score_call (compiled)": _served,
            "reader twin (pure Python)": _twin,
        })  # fmt: skip

    print("event dicts -> checked matrix (baseline: build_matrix)")
    for size in SIZES:
        chunks = [
            events[a : a + size] for a in range(0, POOL_EVENTS - size + 1, size)
        ][:2048]
        _report(size, chunks, args.repeat, {
            "build_matrix (baseline)": lambda ev: build_matrix(ev, FEATURES),
            "DecodedEvents.matrix": lambda ev: DecodedEvents(ev).matrix(FEATURES),
        })  # fmt: skip


def _general(body: bytes) -> np.ndarray:
    request = parse_score_request(
        decode_body(body, MSGPACK, max_events=MAX_EVENTS), max_events=MAX_EVENTS
    )
    return build_matrix(request.events, FEATURES)


def _served(body: bytes) -> np.ndarray:
    return read_score_call(body, MSGPACK, max_events=MAX_EVENTS).events.matrix(
        FEATURES
    )


def _twin(body: bytes) -> np.ndarray:
    plain = _events_reference.read_score_body(body, MAX_EVENTS)
    assert plain is not None
    return PackedEvents(plain[2], plain[3], plain[4]).matrix(FEATURES)


def _report(
    size: int, pool: list[Any], repeat: int, methods: dict[str, Callable[[Any], Any]]
) -> None:
    """Time each method over the pool, round-robin, and print a table.

    The first method is the baseline; every method must give its matrix.
    """
    reference = methods[next(iter(methods))](pool[0])
    for fn in methods.values():
        assert np.array_equal(fn(pool[0]), reference, equal_nan=True)
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeat):
        for name, fn in methods.items():
            start = time.perf_counter()
            for item in pool:
                fn(item)
            samples[name].append((time.perf_counter() - start) / len(pool))
    medians = {name: statistics.median(times) for name, times in samples.items()}
    baseline = next(iter(medians.values()))
    header = f"{'events':>7}  {'method':<30}{'us/request':>12}{'us/event':>10}{'ratio':>8}"
    print(header)
    print("-" * len(header))
    for name, seconds in medians.items():
        print(f"{size:>7}  {name:<30}{seconds * 1e6:>12.2f}"
              f"{seconds * 1e6 / size:>10.3f}{baseline / seconds:>8.2f}")  # fmt: skip
    print()


if __name__ == "__main__":
    main()
