"""Properties that must hold for every input, checked with hypothesis.

The request path: any bytes, under either media type, come out of decoding
and validation as a request and a float matrix, or as a ``ClientError`` (a
4xx): never another exception, and never a value silently dropped.  The
path is the server's own, ``read_score_call``: the compiled plain-body
reader first, the general decoder where it declines.

The transformation: posterior correction then quantile mapping is finite,
inside [0, 1] and never decreasing, and a mapping fitted on a sample puts
each target share of that sample at or above its edge, to within 1/n.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

import msgpack
import numpy as np
import pytest
from _servers import record_figure
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from muse._errors import ClientError
from muse._transform import DEFAULT_CURVE, QuantileMapping, posterior_correction
from muse._events import read_score_call
from muse._wire import JSON, MSGPACK

FEATURES = ("amount", "hour", "count")
MAX_EVENTS = 64
TRIED: Counter[str] = Counter()

_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module", autouse=True)
def report_inputs_tried() -> Any:
    yield
    if TRIED:
        record_figure("bad_inputs_tried", dict(TRIED))


def _through_the_request_path(
    body: bytes, kind: str, allow_missing: bool = True, allow_infinity: bool = False
) -> np.ndarray | None:
    """Decode, validate and build the matrix; None for a ClientError."""
    try:
        call = read_score_call(body, kind, max_events=MAX_EVENTS)
        return call.events.matrix(
            FEATURES, allow_missing=allow_missing, allow_infinity=allow_infinity
        )
    except ClientError as exc:
        assert 400 <= exc.status < 500
        assert exc.detail
        return None


# -- any bytes --------------------------------------------------------------------


@_SETTINGS
@given(body=st.binary(max_size=4096), kind=st.sampled_from([MSGPACK, JSON]))
def test_any_bytes_give_a_request_or_a_client_error(body: bytes, kind: str) -> None:
    TRIED["property:random_bytes"] += 1
    _through_the_request_path(body, kind)


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


# Values msgpack can carry, ext types and timestamps included.
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.floats(width=32)
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))
    | st.builds(
        msgpack.Timestamp,
        st.integers(0, 2**34 - 1),
        st.integers(0, 999_999_999),
    )
)
_keys = st.sampled_from(["intent", "events", "id", "features", *FEATURES]) | _scalars
_values = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(_keys.filter(_hashable), children, max_size=4)
    ),
    max_leaves=20,
)


_feature_values = (
    st.none()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | _scalars
)
_events = st.lists(
    st.fixed_dictionaries(
        {
            "features": st.dictionaries(
                st.sampled_from(FEATURES) | _keys.filter(_hashable),
                _feature_values,
                max_size=5,
            )
        },
        optional={"id": _scalars.filter(_hashable)},
    ),
    min_size=0,
    max_size=MAX_EVENTS + 2,
)
_requests = st.fixed_dictionaries(
    {"intent": st.text(max_size=6) | _scalars, "events": _events},
    optional={"deadline_ms": _scalars},
)


@_SETTINGS
@given(document=_values | _requests)
def test_any_msgpack_document_gives_a_request_or_a_client_error(document: Any) -> None:
    TRIED["property:msgpack_document"] += 1
    body = msgpack.packb(document, use_bin_type=True)
    _through_the_request_path(body, MSGPACK)


# Mostly well-formed requests, so that most reach the matrix.
_plausible = st.fixed_dictionaries(
    {
        "intent": st.just("card-fraud"),
        "events": st.lists(
            st.fixed_dictionaries(
                {
                    "features": st.dictionaries(
                        st.sampled_from(FEATURES),
                        st.none()
                        | st.floats(allow_nan=True, allow_infinity=True)
                        | st.integers(min_value=-(2**63), max_value=2**64 - 1),
                        max_size=3,
                    )
                },
                optional={"id": st.text(max_size=4) | st.integers(0, 2**64 - 1)},
            ),
            min_size=1,
            max_size=8,
        ),
    }
)


@_SETTINGS
@given(
    document=_plausible | _requests,
    allow_missing=st.booleans(),
    allow_infinity=st.booleans(),
)
def test_nothing_is_silently_missing(
    document: dict[str, Any], allow_missing: bool, allow_infinity: bool
) -> None:
    TRIED["property:score_shaped"] += 1
    body = msgpack.packb(document, use_bin_type=True)
    matrix = _through_the_request_path(body, MSGPACK, allow_missing, allow_infinity)
    if matrix is None:
        return
    TRIED["property:score_shaped_accepted"] += 1
    assert matrix.dtype == np.float64
    assert matrix.shape == (len(document["events"]), len(FEATURES))
    for row, event in zip(matrix, document["events"], strict=True):
        features = event["features"]
        for value, name in zip(row, FEATURES, strict=True):
            given_value = features.get(name)
            if given_value is None or (
                isinstance(given_value, float) and math.isnan(given_value)
            ):
                assert math.isnan(value) and allow_missing
            else:
                # Only an exact number reaches the matrix, and unchanged.
                assert type(given_value) in (int, float)
                assert value == given_value
                assert allow_infinity or math.isfinite(value)


@_SETTINGS
@given(data=st.data(), document=_requests)
def test_damaged_bodies_give_a_request_or_a_client_error(
    data: st.DataObject, document: Any
) -> None:
    TRIED["property:damaged_msgpack"] += 1
    body = bytearray(msgpack.packb(document, use_bin_type=True))
    for _ in range(data.draw(st.integers(1, 4))):
        where = data.draw(st.integers(0, len(body)))
        action = data.draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        if action == "flip" and where < len(body):
            body[where] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "insert":
            body[where:where] = data.draw(st.binary(min_size=1, max_size=5))
        elif action == "delete":
            del body[where : where + data.draw(st.integers(1, 5))]
        else:
            del body[where:]
    _through_the_request_path(bytes(body), MSGPACK)


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@_SETTINGS
@given(document=_json_values, deep=st.integers(0, 3000))
def test_any_json_document_gives_a_request_or_a_client_error(
    document: Any, deep: int
) -> None:
    TRIED["property:json_document"] += 1
    body = ("[" * deep + json.dumps(document) + "]" * deep).encode()
    _through_the_request_path(body, JSON)


# -- the transformation -------------------------------------------------------------


_probabilities = st.floats(min_value=0.0, max_value=1.0)
_betas = st.floats(min_value=1e-6, max_value=1.0, exclude_min=False)


@_SETTINGS
@given(scores=st.lists(_probabilities, min_size=1, max_size=200), beta=_betas)
def test_posterior_correction_is_monotone_finite_in_zero_one(
    scores: list[float], beta: float
) -> None:
    TRIED["property:posterior_correction"] += 1
    ordered = np.sort(np.array(scores))
    corrected = posterior_correction(ordered, beta)
    assert np.all(np.isfinite(corrected))
    assert np.all((corrected >= 0.0) & (corrected <= 1.0))
    assert np.all(np.diff(corrected) >= 0.0)
    # A share kept below one can only lower a score.
    assert np.all(corrected <= ordered)


def _distinct_sample(draw: st.DrawFn, n: int) -> np.ndarray:
    seed = draw(st.integers(0, 2**32 - 1))
    shape = draw(st.sampled_from(["uniform", "beta", "skewed"]))
    rng = np.random.default_rng(seed)
    if shape == "uniform":
        values = rng.uniform(0, 1, n)
    elif shape == "beta":
        values = rng.beta(0.5, 5.0, n)
    else:
        values = rng.uniform(0, 1, n) ** 8
    return np.unique(values)


@st.composite
def _samples(draw: st.DrawFn) -> np.ndarray:
    return _distinct_sample(draw, draw(st.integers(20, 3000)))


@_SETTINGS
@given(sample=_samples(), beta=_betas)
def test_fit_then_apply_reproduces_the_target_shares(
    sample: np.ndarray, beta: float
) -> None:
    TRIED["property:quantile_mapping"] += 1
    corrected = np.unique(posterior_correction(sample, beta))
    n = len(corrected)
    assume(n >= 2 * len(DEFAULT_CURVE) + 1)
    mapping = QuantileMapping.fit(corrected, DEFAULT_CURVE, min_sample=1)
    served = mapping.apply(corrected)

    for (edge, target), achieved in zip(mapping.curve, mapping.achieved, strict=True):
        share = np.count_nonzero(served >= edge) / n
        assert share == achieved
        assert abs(share - target) <= 1.0 / n + 1e-12
    assert np.all(np.isfinite(served))
    assert np.all((served >= 0.0) & (served <= 1.0))
    assert np.all(np.diff(served) >= 0.0)


@_SETTINGS
@given(
    sample=_samples(),
    probes=st.lists(_probabilities, min_size=1, max_size=100),
    beta=_betas,
)
def test_the_two_levels_together_are_monotone_finite_in_zero_one(
    sample: np.ndarray, probes: list[float], beta: float
) -> None:
    TRIED["property:two_levels"] += 1
    assume(len(sample) >= 2 * len(DEFAULT_CURVE) + 1)
    mapping = QuantileMapping.fit(sample, DEFAULT_CURVE, min_sample=1)
    ordered = np.sort(np.array(probes))
    served = mapping.apply(posterior_correction(ordered, beta))
    assert np.all(np.isfinite(served))
    assert np.all((served >= 0.0) & (served <= 1.0))
    assert np.all(np.diff(served) >= 0.0)
