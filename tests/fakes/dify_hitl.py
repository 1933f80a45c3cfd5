"""Dify's human-in-the-loop, as the fake upstream plays it (docs/upstreams/dify.md,
"Human input").

A streamed workflow run with scenario ``pause`` runs one LLM node, asks for human
input (``human_input_required`` with a fresh form token) and pauses
(``workflow_paused``). ``POST /form/human_input/{token}`` answers ``{}`` and
resumes the run in the background, like Dify's worker: it publishes the rest of
the run - one more LLM node, whose usage the submit's ``x-fake-*`` usage headers
set, then ``workflow_finished`` with the whole run's total - to whoever is
subscribed to ``GET /workflow/{run_id}/events`` at that moment (Redis pub/sub: a
late subscriber misses what came before it; a run already finished is answered
by its ``workflow_finished`` alone). A submit with scenario ``cut`` makes the
resumed run's streams break after its text, before its node reports; with
``huge``, its text is one 64 KiB chunk.

Tests steer it with ``hold`` (an Event the resumed runs wait for before they
publish) and ``wait_subscribers``. Refusals raise ``DifyError``, which the fake
answers in Dify's error shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Final

from gateway.demo_upstream import SSE_HEADERS, DifyError, sse_frame
from gateway.tasks import Tasks
from gateway.types import Receive, Send

__all__ = ["HumanInput", "PausedRun"]

JSON = dict[str, Any]

_CUT: Final = object()  # published to make every subscriber's connection break


@dataclass(eq=False)
class PausedRun:
    run_id: str
    task_id: str
    user: str  # the end user who started it: the only one served its events
    token: str
    paused_tokens: int  # what the part before the pause used
    workflow_id: str
    submitted_by: str | None = None
    finished: JSON | None = None  # its workflow_finished, once it ended
    subscribers: list[asyncio.Queue[object]] = field(default_factory=list)

    def event(self, event: str, data: JSON) -> JSON:
        return {"event": event, "task_id": self.task_id, "workflow_run_id": self.run_id} | {
            "data": data
        }


class HumanInput:
    """The paused runs of one fake Dify and their subscribers."""

    def __init__(self) -> None:
        self.runs: dict[str, PausedRun] = {}  # by run id
        self.forms: dict[str, PausedRun] = {}  # by form token
        self.submitted: list[tuple[str, str]] = []  # (form token, user)
        self.subscriptions = 0  # events requests that subscribed, ever
        self.hold: asyncio.Event | None = None  # resumed runs wait for it, when set
        self._changed: asyncio.Event | None = None
        self._tasks = Tasks("fake resumed runs")

    def pause(self, *, run_id: str, task_id: str, user: str, workflow_id: str, tokens: int) -> JSON:
        """Record a run pausing; returns the ``data`` of its human_input_required."""
        token = f"form-{uuid.uuid4().hex}"
        run = PausedRun(run_id, task_id, user, token, tokens, workflow_id)
        self.runs[run_id] = self.forms[token] = run
        return {
            "form_id": str(uuid.uuid4()),
            "node_id": "approval",
            "node_title": "Duyệt",
            "form_content": "Duyệt bản nháp?",
            "inputs": [],
            "actions": [{"id": "approve", "title": "Duyệt", "button_style": "primary"}],
            "form_token": token,
            "resolved_default_values": {},
            "display_in_ui": True,
            "expiration_time": int(time.time()) + 3600,
        }

    @staticmethod
    def paused_data(run: PausedRun) -> JSON:
        reason = {"TYPE": "human_input_required", "form_id": "f", "form_token": run.token}
        return {"paused_nodes": ["approval"], "reasons": [reason], "status": "paused"}

    async def wait_subscribers(self, run_id: str, count: int) -> None:
        """Wait until ``count`` events requests are subscribed to the run."""
        run = self.runs[run_id]
        while len(run.subscribers) < count:
            await self._change().wait()

    def _change(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _bump(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    # -- the two endpoints --------------------------------------------------------------

    def submit(self, token: str, user: str, *, usage: JSON, cut: bool, text: str) -> JSON:
        """``POST /form/human_input/{token}``: resume the run in the background."""
        run = self.forms.get(token)
        if run is None:
            raise DifyError(404, "not_found", "Form not found")
        if run.submitted_by is not None:
            raise DifyError(412, "human_input_form_submitted", "Form already submitted")
        run.submitted_by = user
        self.submitted.append((token, user))
        resume = self._resume(run, usage, cut=cut, text=text)
        self._tasks.start(resume)
        return {}

    async def _resume(self, run: PausedRun, usage: JSON, *, cut: bool, text: str) -> None:
        if self.hold is not None:
            await self.hold.wait()
        node: JSON = {"id": str(uuid.uuid4()), "node_id": "llm_after", "node_type": "llm"}
        node |= {"title": "LLM", "index": 3, "created_at": int(time.time())}
        started = {"id": run.run_id, "workflow_id": run.workflow_id, "reason": "resumption"}
        self._publish(run, run.event("workflow_started", started))
        self._publish(run, run.event("node_started", node))
        self._publish(run, run.event("text_chunk", {"text": text}))
        if cut:
            self._publish(run, _CUT)
            return
        metadata = {
            "total_tokens": usage["total_tokens"],
            "total_price": usage["total_price"],
            "currency": usage["currency"],
        }
        finished_node = node | {
            "status": "succeeded",
            "outputs": {"text": text, "usage": usage},
            "execution_metadata": metadata,
        }
        self._publish(run, run.event("node_finished", finished_node))
        run.finished = run.event(
            "workflow_finished",
            {
                "id": run.run_id,
                "workflow_id": run.workflow_id,
                "status": "succeeded",
                "outputs": {"answer": "Đã duyệt."},
                # The whole run's total, the part before the pause included.
                "total_tokens": int(usage["total_tokens"]) + run.paused_tokens,
                "total_steps": 4,
            },
        )
        self._publish(run, run.finished)

    def _publish(self, run: PausedRun, item: object) -> None:
        for queue in run.subscribers:
            queue.put_nowait(item)

    async def events(
        self, run_id: str, user: str, query: dict[str, str], receive: Receive, send: Send
    ) -> None:
        """``GET /workflow/{run_id}/events``: what the run publishes from now on."""
        run = self.runs.get(run_id)
        if run is None or run.user != user:
            raise DifyError(404, "not_found", "Workflow run not found")
        await send({"type": "http.response.start", "status": 200, "headers": list(SSE_HEADERS)})
        if run.finished is not None:
            await send({"type": "http.response.body", "body": sse_frame(run.finished)})
            return
        keep_on = query.get("continue_on_pause", "false").lower() == "true"
        queue: asyncio.Queue[object] = asyncio.Queue()
        run.subscribers.append(queue)
        self.subscriptions += 1
        self._bump()
        left = asyncio.ensure_future(_disconnected(receive))
        try:
            # Dify's first byte: a ping, sent once the subscription is live.
            await send(
                {"type": "http.response.body", "body": b"event: ping\n\n", "more_body": True}
            )
            while True:
                got = asyncio.ensure_future(queue.get())
                await asyncio.wait([got, left], return_when=asyncio.FIRST_COMPLETED)
                if not got.done():
                    got.cancel()
                    return  # the subscriber left
                item = got.result()
                if item is _CUT:
                    raise ConnectionAbortedError("fake upstream cut the resumed run's stream")
                assert isinstance(item, dict)
                await send(
                    {"type": "http.response.body", "body": sse_frame(item), "more_body": True}
                )
                kind = item["event"]
                if kind == "workflow_finished" or (kind == "workflow_paused" and not keep_on):
                    break
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            left.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await left
            run.subscribers.remove(queue)
            self._bump()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
