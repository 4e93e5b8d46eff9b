"""Running the load generator in child processes, and merging their results.

``run_load`` starts ``processes`` children, each with a share of the
connections and of an open-loop schedule; they connect, meet, start
together, and report plain data that is merged into one ``LoadResult``.
Children run apart from the caller so that measuring never shares an
interpreter (or a GIL) with anything else the bench does.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from muse._bench._loadgen import GRACE_S, LoadResult, LoadSpec, run_load_here

__all__ = ["run_load"]


def _child_main() -> int:
    """Entry point of a load-generator process (``python -m``).

    Protocol on its pipes: the parent writes the pickled ``LoadSpec`` share
    to stdin; the child connects and writes ``ready`` (or ``error <why>``) as
    one line; the parent writes ``go`` to every child at once; the child
    runs and writes the pickled ``("ok", LoadResult.to_wire())`` or
    ``("error", why)`` to stdout.  Log lines go to stderr.

    Returns:
        Process exit code.
    """
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    spec: LoadSpec = pickle.load(stdin)
    met = False

    def meet() -> None:
        nonlocal met
        met = True
        stdout.write(b"ready\n")
        stdout.flush()
        if stdin.readline().strip() != b"go":
            raise RuntimeError("parent withdrew the go signal")

    try:
        outcome: tuple[str, Any] = ("ok", run_load_here(spec, meet).to_wire())
    except Exception as exc:  # noqa: BLE001 - sent to the parent, which raises it
        outcome = ("error", f"{type(exc).__name__}: {exc}")
        if not met:
            # The parent still waits for the ready line: answer it there.
            line = outcome[1].replace("\n", " ")
            stdout.write(b"error " + line.encode(errors="replace") + b"\n")
    pickle.dump(outcome, stdout)
    stdout.flush()
    return 0 if outcome[0] == "ok" else 1


def run_load(spec: LoadSpec, processes: int = 1) -> LoadResult:
    """Run a spec in ``processes`` separate load-generator processes.

    Connections are split between the processes, and so is an open-loop
    schedule (interleaved, see ``schedule_offsets``); all start together
    after connecting.  Their results are merged.

    Args:
        spec: the whole run (connections and rate are totals).
        processes: number of client processes (>= 1, <= connections).

    Returns:
        The merged result.

    Raises:
        RuntimeError: a load-generator process failed (message says why).
    """
    processes = max(1, min(processes, spec.connections))
    children: list[subprocess.Popen[bytes]] = []
    try:
        for k in range(processes):
            children.append(_spawn(_share(spec, k, processes)))
        for child in children:
            assert child.stdout is not None
            line = child.stdout.readline()
            if line.strip() != b"ready":
                why = line.decode(errors="replace").strip().removeprefix("error ")
                raise RuntimeError(f"load generator failed: {why or 'no answer'}")
        for child in children:
            assert child.stdin is not None
            child.stdin.write(b"go\n")
            child.stdin.flush()
        merged = LoadResult(spec=spec)
        for child in children:
            assert child.stdout is not None
            kind, data = pickle.load(child.stdout)
            if kind != "ok":
                raise RuntimeError(f"load generator failed: {data}")
            merged.merge_wire(data)
        return merged
    finally:
        for child in children:
            _reap(child)


# A child imports only these modules and ``_http1``: stub parent packages keep
# ``muse/__init__`` (the whole engine: trio, quart, treelite) from loading,
# so a child starts in a fraction of a second and runs even while the rest of
# MUSE is broken mid-edit.
_CHILD_BOOTSTRAP = """
import sys, types
for name, path in {packages!r}:
    module = types.ModuleType(name)
    module.__path__ = [path]
    sys.modules[name] = module
from muse._bench._workers import _child_main
sys.exit(_child_main())
"""


def _spawn(spec: LoadSpec) -> subprocess.Popen[bytes]:
    """Start one load-generator process and hand it its spec."""
    here = Path(__file__).resolve().parent
    packages = [("muse", str(here.parent)), ("muse._bench", str(here))]
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD_BOOTSTRAP.format(packages=packages)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert child.stdin is not None
    pickle.dump(spec, child.stdin)
    child.stdin.flush()
    return child


def _reap(child: subprocess.Popen[bytes]) -> None:
    """Close a child's pipes and make sure it has exited."""
    for pipe in (child.stdin, child.stdout):
        if pipe is not None:
            pipe.close()
    try:
        child.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _share(spec: LoadSpec, index: int, count: int) -> LoadSpec:
    """Process ``index``'s part of a spec: its connections and schedule slice."""
    connections = spec.connections // count + (index < spec.connections % count)
    return replace(spec, connections=connections, phase_index=index, phase_count=count)


if __name__ == "__main__":
    sys.exit(_child_main())
