"""Background tasks the gateway keeps: one helper for every registry of them (as
mitmproxy's ``utils/asyncio_utils.py`` wraps ``asyncio.create_task``).

A `Tasks` starts named tasks and holds a strong reference to each until it ends
(the event loop keeps only weak ones: an unreferenced task can be collected
mid-run), logs the failure of a task nobody awaits, and ends them at shutdown
with a deadline: ``wait`` lets them finish, ``cancel`` cancels them and waits for
them to unwind. A task still running past the deadline is logged and left.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

__all__ = ["Tasks"]

log = logging.getLogger("gateway.tasks")

T = TypeVar("T")


class Tasks:
    """A registry of running background tasks."""

    __slots__ = ("_name", "_tasks")

    def __init__(self, name: str) -> None:
        self._name = name  # for the log: which registry a task belonged to
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(
        self, coro: Coroutine[Any, Any, T], *, name: str | None = None, awaited: bool = False
    ) -> asyncio.Task[T]:
        """Run ``coro`` as a task kept until it ends. Its failure is logged unless
        ``awaited`` (whoever awaits it sees the exception)."""
        task = asyncio.create_task(coro, name=name or getattr(coro, "__qualname__", None))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if not awaited:
            task.add_done_callback(self._log_failure)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    def __bool__(self) -> bool:
        return bool(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))

    async def wait(self, timeout: float) -> bool:
        """Wait until every task has ended, those started meanwhile included, for
        at most ``timeout`` seconds; nothing is cancelled. True if all ended."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._tasks:
            left = deadline - loop.time()
            if left <= 0:
                return False
            await asyncio.wait(list(self._tasks), timeout=left)
        return True

    async def cancel(self, timeout: float) -> None:
        """Cancel every task and wait, at most ``timeout`` seconds, for them to
        unwind (a cancelled task may still record what it did). Tasks still
        running then are logged and left to the loop."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            log.error(
                "%s: task %s did not stop within %g s of being cancelled",
                self._name,
                task.get_name(),
                timeout,
            )

    def _log_failure(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("%s: background task %s died", self._name, task.get_name(), exc_info=exc)
