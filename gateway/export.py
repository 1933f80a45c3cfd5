"""Exports of the ledger and the daily rows, as CSV or JSON, streamed.

Rows come from storage in batches and leave as bytes in batches: memory stays
flat however large the range (a year of ten thousand users' days is millions of
rows). Money is written as exact decimal strings in both formats. CSV cells that a
spreadsheet would run as formulas are neutralised (`csv_cell`); JSON is left raw.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import date
from typing import Any, Literal

import orjson

from gateway.reports import daily_dict, money
from gateway.storage import DailyUsage, ReportReads, UsageEvent

Format = Literal["csv", "json"]
Dataset = Literal["events", "daily"]

EVENT_COLUMNS: tuple[str, ...] = (
    "answer_id",
    "user_id",
    "team",
    "day",
    "created_at",
    "endpoint",
    "conversation_id",
    "request_id",
    "upstream",
    "model",
    "prompt_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "total_tokens",
    "cost",
    "currency",
    "outcome",
    "estimated",
    "web_searches",
    "upstream_latency_ms",
    "overhead_ms",
)
DAILY_COLUMNS: tuple[str, ...] = (
    "user_id",
    "team",
    *daily_dict(DailyUsage(user_id="", day=date.min), "").keys(),
)

# CSV injection (OWASP, "CSV Injection"): a spreadsheet opening the file runs a cell
# that starts with one of these as a formula (`=HYPERLINK(...)`, `@SUM(...)`, DDE via
# `=cmd|...`). Leading whitespace is skipped because some importers trim it before
# evaluating; the full-width forms because some spreadsheet locales read them as the
# ASCII ones. Tab, CR and LF are OWASP's other starts.
_FORMULA_START = re.compile(r"\s*[=+\-@\uff1d\uff0b\uff0d\uff20]|[\t\r\n]")
# A plain decimal number (a negative cost, "-5") is data a spreadsheet reads as a
# number, never a formula: it is written unaltered. ASCII digits only.
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)


def csv_cell(value: Any) -> Any:
    """A value as a CSV cell: booleans as true/false, text that a spreadsheet would
    run as a formula prefixed with a single quote (shown as text, docs/admin.md)."""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str) and _FORMULA_START.match(value) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


# Rows per write: large enough to keep the per-chunk overhead low, small enough
# that a chunk stays a few hundred KB at most.
_ROWS_PER_CHUNK = 500


def event_dict(event: UsageEvent, team: str | None = None) -> dict[str, Any]:
    return {
        "answer_id": event.answer_id,
        "user_id": event.user_id,
        "team": team,
        "day": event.day.isoformat(),
        "created_at": event.created_at.isoformat(),
        "endpoint": event.endpoint,
        "conversation_id": event.conversation_id,
        "request_id": event.request_id,
        "upstream": event.upstream,
        "model": event.model,
        "prompt_tokens": event.prompt_tokens,
        "cached_tokens": event.cached_tokens,
        "cache_write_tokens": event.cache_write_tokens,
        "completion_tokens": event.completion_tokens,
        "reasoning_tokens": event.reasoning_tokens,
        "total_tokens": event.total_tokens,
        "cost": money(event.cost),
        "currency": event.currency,
        "outcome": event.outcome,
        "estimated": event.estimated,
        "web_searches": event.web_searches,
        "upstream_latency_ms": event.upstream_latency_ms,
        "overhead_ms": event.overhead_ms,
    }


def daily_row_dict(row: DailyUsage, currency: str, team: str | None = None) -> dict[str, Any]:
    return {"user_id": row.user_id, "team": team, **daily_dict(row, currency)}


def rows(
    storage: ReportReads,
    dataset: Dataset,
    start: date,
    end: date,
    *,
    user_id: str | None = None,
    currency: str,
) -> tuple[Sequence[str], AsyncIterator[dict[str, Any]]]:
    """The columns and the rows (as dicts) of a dataset. A ledger row carries its
    own currency; a day row the database's, ``currency`` (gateway/currency.py).
    ``team`` is the user's team when the export is made (issue 21): rows keep no
    team of their own."""
    if dataset == "events":

        async def events() -> AsyncIterator[dict[str, Any]]:
            teams = await storage.user_teams()
            async for event in storage.events(start, end, user_id=user_id):
                yield event_dict(event, teams.get(event.user_id))

        return EVENT_COLUMNS, events()

    async def daily() -> AsyncIterator[dict[str, Any]]:
        teams = await storage.user_teams()
        async for row in storage.iter_daily(start, end, user_id=user_id):
            yield daily_row_dict(row, currency, teams.get(row.user_id))

    return DAILY_COLUMNS, daily()


async def encode(
    columns: Sequence[str],
    source: AsyncIterator[dict[str, Any]],
    fmt: Format,
    *,
    progress: Callable[[int], None] | None = None,
) -> AsyncIterator[bytes]:
    """The rows as CSV (with a header line) or as one JSON array, in chunks."""
    count = 0
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\r\n")
        writer.writeheader()
        async for row in source:
            writer.writerow({k: csv_cell(v) for k, v in row.items()})
            count += 1
            if count % _ROWS_PER_CHUNK == 0:
                yield buffer.getvalue().encode()
                buffer.seek(0)
                buffer.truncate()
                if progress:
                    progress(count)
        yield buffer.getvalue().encode()
    else:
        parts: list[bytes] = [b"["]
        async for row in source:
            parts.append((b",\n" if count else b"\n") + orjson.dumps(row))
            count += 1
            if count % _ROWS_PER_CHUNK == 0:
                yield b"".join(parts)
                parts.clear()
                if progress:
                    progress(count)
        parts.append(b"\n]\n")
        yield b"".join(parts)
    if progress:
        progress(count)
