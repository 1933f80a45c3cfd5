"""gateway/tasks.py: the one helper behind every registry of background tasks."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from gateway.tasks import Tasks


async def test_a_task_is_kept_until_it_ends_and_named() -> None:
    tasks = Tasks("test")
    release = asyncio.Event()

    async def job() -> int:
        await release.wait()
        return 7

    task = tasks.start(job(), name="job-1")
    assert task.get_name() == "job-1" and len(tasks) == 1 and list(tasks) == [task]
    gc.collect()  # the registry's reference keeps it alive, not the caller's luck
    release.set()
    assert await task == 7
    assert not tasks


async def test_a_failure_nobody_awaits_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    tasks = Tasks("test")

    async def broken() -> None:
        raise RuntimeError("boom")

    task = tasks.start(broken(), name="broken")
    await asyncio.wait([task])
    await asyncio.sleep(0)  # done callbacks run on the next loop turn
    died = [r for r in caplog.records if "broken died" in r.message]
    assert len(died) == 1 and died[0].levelno == logging.ERROR
    assert died[0].exc_info is not None and died[0].exc_info[1] is task.exception()


async def test_an_awaited_failure_is_left_to_whoever_awaits_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = Tasks("test")

    async def broken() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await tasks.start(broken(), name="awaited", awaited=True)
    await asyncio.sleep(0)
    assert not [r for r in caplog.records if "died" in r.message]


async def test_wait_lets_tasks_finish_including_ones_started_meanwhile() -> None:
    tasks = Tasks("test")
    first_done = asyncio.Event()
    finished: list[str] = []

    async def second() -> None:
        finished.append("second")

    async def first() -> None:
        await first_done.wait()
        tasks.start(second())  # a task started by one being waited for
        finished.append("first")

    tasks.start(first())
    waiting = asyncio.ensure_future(tasks.wait(5))
    await asyncio.sleep(0)
    first_done.set()
    assert await waiting is True
    assert finished == ["first", "second"] and not tasks


async def test_wait_gives_up_at_its_deadline_without_cancelling() -> None:
    tasks = Tasks("test")
    never = asyncio.Event()
    task = tasks.start(never.wait())
    assert await tasks.wait(0.05) is False
    assert not task.done()
    never.set()
    await task


async def test_cancel_lets_a_task_unwind_and_record() -> None:
    tasks = Tasks("test")
    recorded: list[str] = []
    started = asyncio.Event()

    async def answer() -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(0)  # what a cancelled follow does: record what it read
            recorded.append("settled")
            raise

    task = tasks.start(answer())
    await started.wait()
    await tasks.cancel(5)
    assert task.cancelled() and recorded == ["settled"] and not tasks


async def test_cancel_leaves_a_task_that_ignores_it_past_the_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = Tasks("test")
    started, release = asyncio.Event(), asyncio.Event()

    async def stubborn() -> None:
        started.set()
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # refuses to stop

    task = tasks.start(stubborn(), name="stubborn")
    await started.wait()
    await tasks.cancel(0.05)  # returns at the deadline instead of hanging
    assert not task.done()
    assert any("stubborn did not stop" in r.message for r in caplog.records)
    release.set()
    await task


async def test_cancel_with_nothing_running_returns_at_once() -> None:
    await Tasks("test").cancel(0)
