"""The controller's `--dist loadgroup` scheduler (tests/scheduling.py) hands out
the same tests to the same workers in the same order as pytest-xdist's own, and
forgets what is done: a run replayed on both, with fake workers."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

from xdist.remote import Producer
from xdist.scheduler.loadgroup import LoadGroupScheduling

from tests.scheduling import LinearLoadGroupScheduling

WORKERS = 4
TESTS = [f"tests/test_m{i // 25}.py::test_{i}[p{i % 3}]" for i in range(600)] + [
    f"tests/test_b.py::test_{i}@browser" for i in range(20)
]


class _Worker:
    def __init__(self, name: str, sent: list[tuple[str, list[str]]]) -> None:
        self.gateway = SimpleNamespace(id=name)
        self.shutting_down = False
        self.queue: list[int] = []
        self._sent = sent

    def send_runtest_some(self, indexes: list[int]) -> None:
        self.queue.extend(indexes)
        self._sent.append((self.gateway.id, [TESTS[i] for i in indexes]))

    def shutdown(self) -> None:
        self.shutting_down = True


def _start(kind: type[Any]) -> tuple[Any, list[_Worker], list[tuple[str, list[str]]]]:
    config = SimpleNamespace(
        option=SimpleNamespace(loadscopereorder=True),
        getvalue=lambda name: [f"{WORKERS}*popen"] if name == "tx" else None,
    )
    scheduler = kind(config, Producer("test", enabled=False))
    sent: list[tuple[str, list[str]]] = []
    workers = [_Worker(f"gw{i}", sent) for i in range(WORKERS)]
    for worker in workers:
        scheduler.add_node(worker)
    for worker in workers:
        # Each worker reports a collection of its own (equal strings, not the same).
        scheduler.add_node_collection(worker, [name.encode().decode() for name in TESTS])
    scheduler.schedule()
    return scheduler, workers, sent


def _run(scheduler: Any, workers: list[_Worker], seed: int, *, until: int = -1) -> int:
    """Finish the workers' tests in a random order (all, or ``until`` of them);
    the number finished."""
    pick = random.Random(seed)
    done = 0
    while done != until and (busy := [w for w in workers if w.queue]):
        worker = pick.choice(busy)
        scheduler.mark_test_complete(worker, worker.queue.pop(0))
        done += 1
        scheduler.tests_finished  # noqa: B018 (as the controller asks after every event)
    return done


def test_the_same_tests_go_to_the_same_workers_in_the_same_order() -> None:
    for seed in range(3):
        theirs, their_workers, their_sent = _start(LoadGroupScheduling)
        ours, our_workers, our_sent = _start(LinearLoadGroupScheduling)
        _run(theirs, their_workers, seed)
        _run(ours, our_workers, seed)
        assert theirs.tests_finished and ours.tests_finished
        assert our_sent == their_sent
        assert sorted(name for _, names in our_sent for name in names) == sorted(TESTS)
        # The browser group went whole to one worker, at once.
        assert sum(any("@browser" in name for name in names) for _, names in our_sent) == 1
        # What is done is forgotten: no worker's record is walked at each test.
        assert all(not record for record in ours.assigned_work.values())
        assert sum(map(len, theirs.assigned_work.values())) == len(TESTS) - 19


def test_a_crashed_workers_unfinished_tests_go_to_the_others() -> None:
    theirs, their_workers, their_sent = _start(LoadGroupScheduling)
    ours, our_workers, our_sent = _start(LinearLoadGroupScheduling)
    assert _run(theirs, their_workers, 7, until=300) == _run(ours, our_workers, 7, until=300)
    assert our_sent == their_sent
    dead = our_workers.pop(0)
    left = list(dead.queue)  # sent to it, not finished
    crashed = ours.remove_node(dead)
    assert crashed == theirs.remove_node(their_workers.pop(0)) == TESTS[left[0]]
    resent = len(our_sent)
    _run(ours, our_workers, 7)
    assert ours.tests_finished
    # Each test the dead worker had not finished went to another worker, once.
    again = [name for _, names in our_sent[resent:] for name in names]
    assert sorted(set(again) & {TESTS[i] for i in left}) == sorted(TESTS[i] for i in left)
    assert len(again) == len(set(again))
