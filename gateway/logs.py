"""The process's log: one handler for the gateway's and uvicorn's loggers, and
the per-answer line (issue 25).

Every entry point that runs a server or a command calls `configure_logging`:
`gateway serve` (the supervising process, and each worker through the app
factory), the uvicorn factory path (`uvicorn gateway.app:create_app --factory`),
`gateway demo` and the other CLI commands. Apps built with a configuration in
hand (tests, tools embedding the gateway) leave logging to their host.

Each line carries an ISO 8601 timestamp with its offset, the level, the logger
and the request id the proxy is working on (a context variable the proxy binds
per request: asyncio copies it into every task the request starts, so the
settle and alert work it hands off logs the same id). ``server.log_format``
chooses text or JSON (one orjson object per line); uvicorn's own loggers are
routed through the same handler so the two never mix formats.

The answer line (logger ``gateway.answers``, ``server.answer_log``) is written
once per settled answer by the settler, with who, what, how much and how long.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import traceback
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, TextIO

import orjson

if TYPE_CHECKING:
    from gateway.config import ServerConfig
    from gateway.storage import UsageEvent

ANSWERS_LOGGER = "gateway.answers"
# uvicorn's loggers: their handlers are replaced by the gateway's one, so that its
# start-up, error and access lines share the chosen format.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
LEVELS["error"] = logging.ERROR

_answers = logging.getLogger(ANSWERS_LOGGER)


class RequestContext:
    """What the logs know about the request being handled: its id, and the status
    sent to the client (read by the answer line)."""

    __slots__ = ("request_id", "status")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.status: int | None = None


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "gateway_request", default=None
)


def bind_request(request_id: str) -> None:
    """Name the request this task (and the tasks it starts) works for.

    Called once per request by the proxy; a request runs in its own task (uvicorn
    starts one per request), so the binding never leaks into another request.
    """
    _current.set(RequestContext(request_id))


def note_status(status: int) -> None:
    """The status the response of the current request started with (for the
    answer line); called where a response starts, not on every chunk sent."""
    context = _current.get()
    if context is not None:
        context.status = status


def current_request() -> RequestContext | None:
    return _current.get()


# --- formatting ----------------------------------------------------------------------


def _timestamp(record: logging.LogRecord) -> str:
    # Local time with its offset, so a line is unambiguous wherever it is read.
    return datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (or ``-`` outside a request) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            context = _current.get()
            record.request_id = context.request_id if context is not None else "-"
        return True


class TextFormatter(logging.Formatter):
    """``2026-12-06T12:00:00.123+07:00 INFO gateway.proxy [request id] message``."""

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{_timestamp(record)} {record.levelname} {record.name} "
            f"[{getattr(record, 'request_id', '-')}] {record.getMessage()}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        elif record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, request_id, message, the
    answer line's fields (``extra={"fields": {...}}``) and any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info))
        return orjson.dumps(entry, default=str).decode()


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (a test may swap it), as
    logging's own last-resort handler does."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def make_handler(fmt: Literal["text", "json"]) -> logging.Handler:
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    handler._gateway = True  # type: ignore[attr-defined]  # ours: replaced, not stacked
    return handler


def configure_logging(server: ServerConfig) -> None:
    """Route the gateway's and uvicorn's loggers to one handler on stderr, in
    ``server.log_format``, at ``server.log_level``.

    Idempotent: a second call (a worker's app factory after the supervising
    process's set-up) replaces the handler rather than adding one. Handlers that
    are not the gateway's (pytest's, an embedding host's) are left alone.
    """
    level = LEVELS[server.log_level]
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_gateway", False):
            root.removeHandler(handler)
    root.addHandler(make_handler(server.log_format))
    logging.getLogger("gateway").setLevel(level)
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        # uvicorn's own dictConfig (the factory path) gave them handlers of their own
        # and stopped propagation; through the root they share the gateway's format.
        logger.handlers = []
        logger.propagate = True
        if name != "uvicorn":
            logger.setLevel(level)


# --- the answer line -------------------------------------------------------------------


def _text(value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in ' ="\\') or not text.isprintable():
        return orjson.dumps(text).decode()
    return text


def log_answer(event: UsageEvent) -> None:
    """One line per settled answer on ``gateway.answers``: user, status, route,
    tokens, cost (a decimal string, never a float), outcome and time."""
    if not _answers.isEnabledFor(logging.INFO):
        return
    context = _current.get()
    fields: dict[str, Any] = {
        "user": event.user_id,
        "status": context.status if context is not None else None,
        "route": event.endpoint,
        "outcome": event.outcome,
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.total_tokens,
        "estimated": event.estimated,
        "cost": str(event.cost),
        "currency": event.currency,
        "model": event.model,
        "answer_id": event.answer_id,
        "upstream_ms": event.upstream_latency_ms,
        "overhead_ms": event.overhead_ms,
    }
    text = " ".join(
        f"{key}={_text('-' if value is None else value)}" for key, value in fields.items()
    )
    _answers.info(
        "answer %s",
        text,
        extra={"fields": fields, "request_id": event.request_id or "-"},
    )
