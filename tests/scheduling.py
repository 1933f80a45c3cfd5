"""pytest-xdist's `--dist loadgroup` scheduler, its bookkeeping made linear.

The controller (tests/conftest.py, `pytest_xdist_make_scheduler`) keeps, per
worker, every work unit it ever gave the worker (a unit is a test, or an xdist
group), and on each finished test counts the worker's pending tests by walking
all of them (pytest-xdist 3.8, `LoadScopeScheduling._pending_of`); each unit it
hands out, it finds the tests' indexes by a linear search of the worker's
collection (`list.index`). Both are quadratic in the tests a run has: ~0.55 s
of the controller's CPU in a run of ~4,950 tests (a simulated run, the
scheduler alone), ~0.03 s here.

Here a unit leaves the worker's record once all its tests are done, and the
indexes come from a dictionary built once per worker. The decisions are
xdist's own: its `_reschedule` counts the same pending tests (a finished unit
has none), so the same units go to the same workers in the same order
(tests/test_suite_scheduling.py replays a run on both). Only a crashed worker's
record is smaller: its finished units are not queued again, where xdist queued
them to be handed out with no test left to run in them.
"""

from __future__ import annotations

from typing import Any

from xdist.scheduler.loadgroup import LoadGroupScheduling


class LinearLoadGroupScheduling(LoadGroupScheduling):
    def __init__(self, config: Any, log: Any = None) -> None:
        super().__init__(config, log)
        self._indexes: dict[Any, dict[str, int]] = {}

    def mark_test_complete(self, node: Any, item_index: int, duration: float = 0) -> None:
        nodeid = self.registered_collections[node][item_index]
        scope = self._split_scope(nodeid)
        assigned = self.assigned_work[node]
        unit = assigned[scope]
        unit[nodeid] = True
        if all(unit.values()):
            del assigned[scope]
        self._reschedule(node)

    def remove_node(self, node: Any) -> str | None:
        self._indexes.pop(node, None)
        crashed: str | None = super().remove_node(node)
        return crashed

    def _assign_work_unit(self, node: Any) -> None:
        assert self.workqueue
        scope, work_unit = self.workqueue.popitem(last=False)
        self.assigned_work.setdefault(node, {})[scope] = work_unit
        index = self._indexes.get(node)
        if index is None:
            index = self._indexes[node] = {}
            for i, nodeid in enumerate(self.registered_collections[node]):
                index.setdefault(nodeid, i)  # the first, as list.index finds it
        node.send_runtest_some(
            [index[nodeid] for nodeid, completed in work_unit.items() if not completed]
        )
