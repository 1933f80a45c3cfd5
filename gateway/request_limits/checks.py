"""Limits on the request itself, before any handler: header size and count, and how
long a client may leave a promised body unsent.

uvicorn bounds neither with its default parser: httptools takes any number of
headers of any size, and nothing times out a body that a client announced
(Content-Length) and then never sends, so such a client holds its connection, and
a handler waiting on the body, indefinitely. (The h11 parser has one byte limit
on the whole head, ``h11_max_incomplete_event_size``, answered with a plain-text
400.) These checks work under any server; `gateway serve` also bounds the head
while it arrives (gateway/request_limits/protocol.py). See docs/configuration.md, ``[server]``.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Awaitable, Callable, Generator, Iterable
from typing import Any

from gateway.error_response import ErrorBody, render
from gateway.types import Message, Receive, Send


def header_refusal(
    headers: Iterable[tuple[bytes, bytes]], *, max_bytes: int, max_count: int
) -> str | None:
    """Why these request headers are refused (too many, too large), or None."""
    count = size = 0
    for name, value in headers:
        count += 1
        size += len(name) + len(value)
    if count > max_count:
        return f"The request has more than {max_count} headers."
    if size > max_bytes:
        return f"The request headers exceed {max_bytes} bytes."
    return None


async def send_refusal(
    send: Send, error_body: ErrorBody, status: int, code: str, message: str
) -> None:
    """A complete error answer that also ends the connection: after a refused head
    or an abandoned body, what follows on the connection cannot be trusted."""
    await render(error_body, status, code, message, close=True).send(send)


class BodyDeadline:
    """``receive`` and ``send`` for one request, with a deadline on each wait for
    the next piece of the request body.

    When the client stays silent for ``timeout`` seconds while its body is
    incomplete, it is answered 408 (unless an answer has already started) and the
    handler sees the client as gone (``http.disconnect``), so it gives back what
    it reserved the way it does for any client that leaves. Once the body is
    complete, waits on ``receive`` (for a disconnect) are not timed.
    """

    __slots__ = (
        "_answered",
        "_error_body",
        "_gone",
        "_on_timeout",
        "_receive",
        "_send",
        "_started",
        "_timeout",
        "body_done",
    )

    def __init__(
        self,
        receive: Receive,
        send: Send,
        *,
        timeout: float,
        error_body: ErrorBody,
        on_timeout: Callable[[], None] = lambda: None,
    ) -> None:
        self._receive = receive
        self._send = send
        self._timeout = timeout
        self._error_body = error_body
        self._on_timeout = on_timeout
        self.body_done = False
        self._gone = False  # the body timed out: the client counts as gone
        self._answered = False  # the 408 went out: the handler's own answer is dropped
        self._started = False

    # receive and send are plain functions that hand back the server's own
    # awaitable where they can: no coroutine of their own around every message
    # of every request (a frame, a call and a step each).

    def receive(self) -> Awaitable[Message]:
        if self._gone:
            return _disconnect()
        if self.body_done:
            return self._receive()
        return self._timed_receive()

    async def _timed_receive(self) -> Message:
        # The server's receive is stepped once first: a message it has
        # already (a body that came with the head, the usual case) is taken
        # without a timer - arming and cancelling one cost about 10 µs a
        # request on uvloop (issue 24). One it must wait for is waited for
        # under the deadline, from that step on.
        steps = self._receive().__await__()
        message: Message
        if not isinstance(steps, Generator):
            # Steps that are a plain iterator (PEP 492 allows it: Granian's
            # receive) cannot be sent or thrown into by hand: awaited under the
            # deadline whole, as before (review 7, R7-2).
            message = await self._waited(_iterated(steps))
            if self._gone:
                return message  # (timed out)
        else:
            try:
                waiting = steps.send(None)
            except StopIteration as done:
                message = done.value
            else:
                message = await self._waited(_resumed(steps, waiting))
                if self._gone:
                    return message  # (timed out)
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.body_done = True
        return message

    async def _waited(self, rest: Awaitable[Message]) -> Message:
        """The rest of a receive that has to wait, under the body's deadline."""
        try:
            async with asyncio.timeout(self._timeout):
                message = await rest
        except TimeoutError:
            self._gone = True
            self._on_timeout()
            if not self._started:
                await send_refusal(
                    self._send,
                    self._error_body,
                    408,
                    "request_timeout",
                    f"The request body was not received within {self._timeout:g} seconds.",
                )
                self._answered = True
            return {"type": "http.disconnect"}
        return message

    def send(self, message: Message) -> Awaitable[None]:
        if self._answered:
            return _nothing()  # the client was answered 408 and is being disconnected
        if message["type"] == "http.response.start":
            self._started = True
        return self._send(message)


@types.coroutine
def _iterated(steps: Any) -> Generator[Any, Any, Message]:
    """Await an awaitable whose ``__await__`` gave a plain iterator (``steps``:
    Iterator, whose ``yield from`` mypy takes for a None)."""
    message: Message = yield from steps
    return message


@types.coroutine
def _resumed(steps: Generator[Any, Any, Message], waiting: Any) -> Generator[Any, Any, Message]:
    """Await the rest of an awaitable already stepped once (``steps``, its
    ``__await__``, which yielded ``waiting``), as ``yield from`` would have:
    what the task sends or throws in goes on to it."""
    while True:
        try:
            sent = yield waiting
        except GeneratorExit:
            steps.close()
            raise
        except BaseException as exc:  # (a cancellation: the deadline's, or the task's)
            try:
                waiting = steps.throw(exc)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
        else:
            try:
                waiting = steps.send(sent)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]


async def _disconnect() -> Message:
    return {"type": "http.disconnect"}


async def _nothing() -> None:
    return None
