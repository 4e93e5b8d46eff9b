"""Type stub for the compiled tree kernel (``_treepredict.pyx``).

``muse._compile.CtypesKernel`` is the pure-Python twin (same ``run``).
"""

import numpy as np
from numpy.typing import NDArray

class TreeKernel:
    """Runs one compiled model library over float64 rows."""

    def __init__(
        self,
        init: int,
        finish: int,
        units: tuple[int, ...],
        float32: bool,
        num_feature: int,
        result_size: int,
        out_index: int,
        zeros: bytes | None = None,
        owner: object = None,
    ) -> None: ...
    def run(self, X: NDArray[np.float64], margin: bool) -> NDArray[np.float64]: ...
