"""The router actor: owns what is served, and changes it one step at a time.

Reads never touch the actor: a request takes ``router.serving``, an immutable
snapshot, and resolves its route against it.  Writes (set a route, promote,
roll back, assign a mapping, add a loaded predictor) arrive in the inbox as
``Change`` messages and are applied strictly one after another: each builds a
new route table from the current snapshot, publishes it to the registry
first, and only then swaps the snapshot in with a single assignment.  A
change that fails validation or cannot be written leaves the snapshot as it
was, and a restarted server comes back with the last published table.

Inbox: ``Change``.  The engine owns the send side and closes it at shutdown.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from muse._routes import RouteTable
from muse._serving import LoadedPredictor, Serving

__all__ = ["Change", "Router"]

log = logging.getLogger("muse.router")

# Admin changes are rare; a short queue is plenty and bounds a burst of them.
CHANGE_BUFFER = 16


@dataclass(eq=False)
class Change:
    """One state change for the router.

    Attributes:
        build: current snapshot -> new route table (may raise to refuse), or
            None to keep the table and only add predictors or mappings.
        predictors: loaded predictors to add to the snapshot.
        mappings: mapping objects to add, by id.
        description: for the log line.
    """

    build: Callable[[Serving], RouteTable] | None
    predictors: Mapping[str, LoadedPredictor] = field(default_factory=dict)
    mappings: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    result: Serving | None = None
    error: BaseException | None = None
    done: trio.Event = field(default_factory=trio.Event)


class Router:
    """Holds the current ``Serving`` snapshot and applies changes to it.

    Args:
        serving: the snapshot loaded at start-up.
        change_receive: the inbox.
        publish: writes a route table to the registry; called in a worker
            thread before the table takes effect.
    """

    def __init__(
        self,
        serving: Serving,
        change_receive: trio.MemoryReceiveChannel[Change],
        publish: Callable[[RouteTable], None],
    ) -> None:
        self.serving = serving
        self._inbox = change_receive
        self._publish = publish
        self._applied = 0
        self._refused = 0

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Apply changes until the inbox closes."""
        task_status.started()
        async with self._inbox:
            async for change in self._inbox:
                await self._apply(change)

    async def _apply(self, change: Change) -> None:
        current = self.serving
        try:
            table = None if change.build is None else change.build(current)
            if table is not None and table.version != current.table.version:
                await trio.to_thread.run_sync(self._publish, table)
        except BaseException as exc:
            self._refused += 1
            change.error = exc
            change.done.set()
            if not isinstance(exc, Exception):
                raise
            return
        self.serving = current.with_changes(table, change.predictors, change.mappings)
        if change.predictors:
            # Loaded models are long-lived: keep them out of the cyclic
            # collector's full passes (see ``open_engine``).
            gc.freeze()
        self._applied += 1
        if change.description:
            log.info(
                "%s (route table version %d)",
                change.description,
                self.serving.table.version,
            )
        change.result = self.serving
        change.done.set()

    def statistics(self) -> dict[str, int]:
        return {
            "applied": self._applied,
            "refused": self._refused,
            "table_version": self.serving.table.version,
        }
