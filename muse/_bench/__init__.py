"""The MUSE benchmark harness behind ``muse bench`` (issue 5).

Private like the rest of MUSE: the CLI calls ``bench_main``; the modules are
``_loadgen`` (open/closed-loop load generator), ``_workers`` (its child
processes), ``_http1`` (its sans-io HTTP/1.1 framing), ``_workload`` (events, model, request bodies), ``_slo``
(TOML objectives), ``_peers`` (peer venvs and server processes), ``_muse``
(starting and preparing MUSE), ``_embedded`` (engine without HTTP),
``_suite`` (the comparison suite) and ``_report`` (rows, targets, table,
plot).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["bench_main"]


def bench_main(argv: Sequence[str]) -> int:
    """Run ``muse bench`` with the arguments after ``bench``.

    Args:
        argv: command-line arguments, e.g. ``["--compare", "--out", "DIR"]``.

    Returns:
        The process exit status (see ``muse._bench._main``).
    """
    # Imported here, not at module level, so that importing the package
    # (as load-generator children do) does not pull in the whole harness.
    from muse._bench._main import bench_main as main

    return main(argv)
