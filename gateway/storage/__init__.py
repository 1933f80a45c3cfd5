"""Storage: one async interface split by role (base.py), two backends chosen by the URL scheme."""

from __future__ import annotations

import functools
import hashlib
from importlib import resources

from gateway.config import DatabaseConfig
from gateway.errors import ConfigError
from gateway.storage.base import (
    ALERT_LIMITS,
    Accounting,
    Admission,
    AdmissionLimits,
    Alert,
    AlertCheck,
    AlertLimit,
    AlertRequest,
    AnswerOwner,
    ApiKey,
    ConversationFeatures,
    Counters,
    Crossing,
    DailyUsage,
    Delivery,
    Directory,
    DirectoryReads,
    Health,
    Lease,
    Lifecycle,
    Outbox,
    OutboxItem,
    OverrideValue,
    Ownership,
    PausedForm,
    PausedForms,
    Pending,
    ReportReads,
    Storage,
    Team,
    TeamSummary,
    UsageEvent,
    UsageGroup,
    User,
    UserSort,
    UserSummary,
    WebSearch,
    alert_spec,
    parse_alert_spec,
    summed,
)

__all__ = [
    "ALERT_LIMITS",
    "Accounting",
    "Admission",
    "AdmissionLimits",
    "Alert",
    "AlertCheck",
    "AlertLimit",
    "AlertRequest",
    "AnswerOwner",
    "ApiKey",
    "ConversationFeatures",
    "Counters",
    "Crossing",
    "DailyUsage",
    "Delivery",
    "Directory",
    "DirectoryReads",
    "Health",
    "Lease",
    "Lifecycle",
    "Outbox",
    "OutboxItem",
    "OverrideValue",
    "Ownership",
    "PausedForm",
    "PausedForms",
    "Pending",
    "ReportReads",
    "Storage",
    "Team",
    "TeamSummary",
    "UsageEvent",
    "UsageGroup",
    "User",
    "UserSort",
    "UserSummary",
    "WebSearch",
    "alert_spec",
    "functions",
    "migrations",
    "open_storage",
    "parse_alert_spec",
    "summed",
]


def migrations(backend: str) -> list[tuple[int, str]]:
    """The versioned migrations of a backend: (version, SQL), in order.

    Files are named ``NNNN_description.sql`` under ``sql/<backend>/``; a version
    once released is never edited, only followed by a new file. Read once per
    process (`_read_migrations`): every start and every storage's `migrate` asks.
    """
    return list(_read_migrations(backend))


@functools.cache
def _read_migrations(backend: str) -> tuple[tuple[int, str], ...]:
    folder = resources.files("gateway.storage") / "sql" / backend
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text(encoding="utf-8")))
    return tuple(sorted(found))


def functions(backend: str) -> tuple[str, list[str]]:
    """The live SQL functions of a backend (``sql/<backend>/functions/``, one
    file per function, each a CREATE OR REPLACE), in name order, and a hash of
    them all: `migrate` applies them whenever the hash differs from the one it
    applied last (issue 21: functions are defined once, not re-created in
    migration after migration). Read and hashed once per process.

    Every change to them ships with a migration (an empty marker will do, as
    PostgreSQL 0032): the hash tells a set apart, not which is newer, and only
    an unknown migration makes an older release's `migrate` refuse the
    database instead of putting its own functions back during a rolling update
    (review-rec REC-4; tests/test_deploy.py's FUNCTION_SETS checks it)."""
    digest, texts = _read_functions(backend)
    return digest, list(texts)


@functools.cache
def _read_functions(backend: str) -> tuple[str, tuple[str, ...]]:
    folder = resources.files("gateway.storage") / "sql" / backend / "functions"
    if not folder.is_dir():
        return "", ()
    texts = tuple(
        entry.read_text(encoding="utf-8")
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".sql")
    )
    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    return digest, texts


async def open_storage(config: DatabaseConfig) -> Storage:
    """Connect to the database named by ``config.url`` (not yet migrated)."""
    url = config.url
    if url.startswith("sqlite:///"):
        from gateway.storage.sqlite import SQLiteStorage

        return await SQLiteStorage.open(
            url.removeprefix("sqlite:///"),
            timeout=config.command_timeout,
            max_batch=config.max_batch,
        )
    if url.startswith(("postgresql://", "postgres://")):
        from gateway.storage.postgres import PostgresStorage

        return await PostgresStorage.open(
            url,
            min_size=config.pool_min_size,
            max_size=config.pool_max_size,
            connect_timeout=config.connect_timeout,
            command_timeout=config.command_timeout,
            max_batch=config.max_batch,
        )
    raise ConfigError(f"database.url: unsupported URL scheme in {url.split('://')[0]!r}")
