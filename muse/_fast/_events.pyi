"""Type stub for the compiled scoring-body reader (``_events.pyx``)."""

from typing import Any

import numpy as np
from numpy.typing import NDArray

def read_score_body(
    body: bytes, max_events: int
) -> tuple[str, float | None, list[Any], list[str], NDArray[np.float64]] | None: ...

HAS_INFINITY: int
HAS_MISSING: int
HAS_EMPTY_ROW: int

def matrix_flags(matrix: NDArray[np.float64]) -> int: ...
def read_event_dicts(
    events: Any, names: tuple[str, ...]
) -> tuple[list[Any], NDArray[np.float64], int] | None: ...
