"""Threshold alerts: which crossings a settle checks, and their delivery.

A settle decides in its own transaction whether it crossed a threshold for the
first time (see `gateway.storage`); each crossing queues one outbox row per
channel. `OutboxWorker`, a background task of every replica, claims due rows
(rows another replica holds are skipped), delivers them by webhook (signed per
Standard Webhooks) or email, and reschedules failures with exponential backoff.
Delivery is at least once: a worker that dies mid-delivery leaves its claim to
expire and the row is sent again, with the same ``webhook-id`` so that the
receiver can tell. See docs/admin.md, "Alerts".
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from decimal import Decimal
from email.message import EmailMessage
from typing import Any

import aiosmtplib
import httpx
import orjson

from gateway.clock import Clock, Periods
from gateway.config import AlertsConfig, Plan
from gateway.errors import StorageError
from gateway.quota.limits import Limit
from gateway.storage import (
    ALERT_LIMITS,
    Alert,
    AlertCheck,
    AlertRequest,
    Crossing,
    Outbox,
    OutboxItem,
    alert_spec,
)
from gateway.tls import client_context

log = logging.getLogger("gateway.alerts")

EVENT_TYPE = "usage.threshold_crossed"
_LABELS: Mapping[str, str] = {
    "queries_per_day": "queries today",
    "tokens_per_day": "tokens today",
    "tokens_per_month": "tokens this month",
    "web_searches_per_day": "web searches today",
    "cost_per_day": "spending today",
    "cost_per_month": "spending this month",
}


def alert_request(
    plan: Plan, alerts: AlertsConfig, periods: Periods, limits: Sequence[Limit] = ()
) -> AlertRequest | None:
    """What a settle for a user of ``plan`` (overrides applied) checks, if anything.

    ``limits``: the limits the user's requests are admitted under (their plan's,
    `plans.plan_limits`, and their team's, `plans.team_limits`). Besides the
    plan's four original keys, every one of them counted per day or month is
    watched (issue 21): money budgets, ``[[plans.NAME.limits]]`` entries,
    per-model limits and the team's limits (whose usage is the team's; each
    member whose answer finds a threshold crossed is told once). Rates, which
    refill within a minute or an hour, and open streams are not."""
    thresholds = alerts.thresholds if plan.alert_thresholds is None else plan.alert_thresholds
    if not thresholds or not alerts.channels:
        return None
    shares = tuple(sorted(set(thresholds)))
    day, month = periods.day.isoformat(), periods.month_start.strftime("%Y-%m")
    checks = []
    for name in ALERT_LIMITS:
        value = getattr(plan, name)
        if value is None or value <= 0:
            continue
        checks.append(AlertCheck(name, month if name.endswith("_month") else day, value, shares))
    for limit in limits:
        if limit.per not in ("day", "month") or limit.max <= 0:
            continue
        if limit.scope == "user" and limit.name in ALERT_LIMITS:
            continue  # above
        value = limit.max if limit.meter == "cost" else int(limit.max)
        period = month if limit.per == "month" else day
        checks.append(AlertCheck(limit.name, period, value, shares, alert_spec(limit)))
    if not checks:
        return None
    return AlertRequest(tuple(checks), periods.month_start, alerts.channels)


def _amount(value: int | Decimal) -> int | str:
    """A count as a number, money as its exact decimal string."""
    return str(value) if isinstance(value, Decimal) else value


def crossing_dict(c: Crossing) -> dict[str, Any]:
    return {
        "user_id": c.user_id,
        "limit": c.limit,
        "period": c.period,
        "threshold": c.threshold,
        "limit_value": _amount(c.value),
        "used": _amount(c.used),
    }


def alert_dict(alert: Alert) -> dict[str, Any]:
    """A recorded crossing as the admin API shows it."""
    return {
        **crossing_dict(alert.crossing),
        "created_at": alert.created_at.isoformat(),
        "deliveries": [
            {
                "channel": d.channel,
                "status": d.status,
                "attempts": d.attempts,
                "last_error": d.last_error,
                "delivered_at": d.delivered_at.isoformat() if d.delivered_at else None,
            }
            for d in alert.deliveries
        ],
    }


def describe(limit: str) -> str:
    """The counter a limit watches, in words (a limit of the general form, by
    its name)."""
    if limit in _LABELS:
        return _LABELS[limit]
    if limit.startswith("team_"):
        return "the team's " + describe(limit.removeprefix("team_"))
    return limit


# --- what is sent ----------------------------------------------------------------


def message_id(item: OutboxItem) -> str:
    """Stable across retries of one delivery (the receiver's deduplication key)."""
    return f"alert_{item.id}"


def payload(item: OutboxItem) -> dict[str, Any]:
    return {
        "type": EVENT_TYPE,
        "timestamp": item.created_at.isoformat(),
        "data": crossing_dict(item.crossing),
    }


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: v1, base64 HMAC-SHA256 of
    ``id.timestamp.body`` keyed with the base64-decoded ``whsec_`` secret."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def plain_line(text: str) -> str:
    """``text`` on one line with no control characters: a header value the email
    library accepts whatever a user id holds (U+2028 and U+0085 are line breaks
    to it, and valid in a user id)."""
    one_line = " ".join(text.splitlines())
    return "".join(ch for ch in one_line if unicodedata.category(ch) != "Cc")


def email_message(item: OutboxItem, alerts: AlertsConfig) -> EmailMessage:
    c = item.crossing
    what = describe(c.limit)
    message = EmailMessage()
    message["From"] = plain_line(alerts.email_from)
    message["To"] = plain_line(", ".join(alerts.email_to))
    message["Subject"] = plain_line(f"{c.user_id} reached {c.threshold}% of {what}")
    message["Message-ID"] = f"<{message_id(item)}@gateway>"
    message.set_content(
        f"User {c.user_id} has used {c.used} of {c.value} {what} ({c.period}), "
        f"reaching the {c.threshold}% alert threshold.\n"
    )
    return message


class DeliveryFailed(Exception):
    pass


# --- the worker ------------------------------------------------------------------


class OutboxWorker:
    def __init__(
        self,
        storage: Outbox,
        settings: Callable[[], AlertsConfig],
        clock: Clock,
        *,
        batch: int = 20,
        on_attempt: Callable[[str, str], None] = lambda channel, result: None,
    ) -> None:
        self.storage = storage
        # Told (channel, "delivered" | "retry" | "failed" | "unrecorded") after each attempt.
        self._on_attempt = on_attempt
        self._settings = settings  # read each time: a reload may change them
        self.clock = clock
        self.batch = batch
        self._wake = asyncio.Event()
        self._client: httpx.AsyncClient | None = None

    @property
    def alerts(self) -> AlertsConfig:
        return self._settings()

    def wake(self) -> None:
        """Look at the outbox now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        try:
            while True:
                try:
                    claimed = await self.run_once() if self.alerts.channels else 0
                except Exception:  # the worker outlives any one round (see run_once)
                    log.exception("alert delivery round failed; trying again at the next poll")
                    claimed = 0
                if claimed < self.batch:
                    self._wake.clear()
                    try:
                        async with asyncio.timeout(self.alerts.poll_interval):
                            await self._wake.wait()
                    except TimeoutError:
                        pass
        finally:
            if self._client is not None:
                await self._client.aclose()

    def _http(self) -> httpx.AsyncClient:
        # Made when first needed, so that a worker restarted after its client was
        # closed has one again.
        if self._client is None or self._client.is_closed:
            self._client = httpx.AsyncClient(verify=client_context(), follow_redirects=False)
        return self._client

    async def run_once(self) -> int:
        """Claim and deliver what is due; returns how many rows were claimed.

        Each row is on its own: a delivery that fails in any way is recorded as a
        failed attempt, and a result the database cannot take is logged and left
        to the claim's expiry (the row is sent again then). One bad row, or a
        database blip, never stops the rest."""
        now = self.clock.now()
        # Held long enough for one attempt on every claimed row.
        hold = timedelta(
            seconds=30 + self.batch * max(self.alerts.webhook_timeout, self.alerts.smtp_timeout)
        )
        try:
            items = await self.storage.claim_outbox(
                now=now, claim_until=now + hold, limit=self.batch
            )
        except StorageError as exc:  # the database is away: try again at the next poll
            log.warning("alert outbox unavailable: %s", exc.message)
            return 0
        for item in items:
            try:
                result = await self._attempt(item, self.alerts)
            except Exception as exc:
                message = exc.message if isinstance(exc, StorageError) else repr(exc)
                log.error(
                    "alert %s by %s: the result could not be recorded, it is sent again "
                    "when its claim expires: %s",
                    message_id(item),
                    item.channel,
                    message,
                    exc_info=not isinstance(exc, StorageError),
                )
                result = "unrecorded"
            self._on_attempt(item.channel, result)
        return len(items)

    async def _attempt(self, item: OutboxItem, alerts: AlertsConfig) -> str:
        error = await self._deliver(item, alerts)
        if error is None:
            await self.storage.outbox_delivered(item.id, now=self.clock.now())
            return "delivered"
        attempts = item.attempts + 1
        retry_at = None
        if attempts < alerts.max_attempts:
            delay = min(alerts.retry_initial * 2 ** (attempts - 1), alerts.retry_max)
            retry_at = self.clock.now() + timedelta(seconds=delay)
        log.warning(
            "alert %s by %s failed (attempt %d%s): %s",
            message_id(item),
            item.channel,
            attempts,
            "" if retry_at else ", giving up",
            error,
        )
        await self.storage.outbox_failed(item.id, error=error, retry_at=retry_at)
        return "retry" if retry_at else "failed"

    async def _deliver(self, item: OutboxItem, alerts: AlertsConfig) -> str | None:
        """Send one row; the error that stopped it, or None once it is delivered."""
        try:
            if item.channel == "webhook" and alerts.webhook_url:
                await self._webhook(item, alerts)
            elif item.channel == "email" and alerts.email_to:
                await self._email(item, alerts)
            else:
                raise DeliveryFailed(f"the {item.channel} channel is not configured")
        except (DeliveryFailed, httpx.HTTPError, aiosmtplib.SMTPException, OSError) as exc:
            return _error_text(exc)
        except Exception as exc:  # anything else is this row's failure too, not the worker's
            log.exception("alert %s by %s failed unexpectedly", message_id(item), item.channel)
            return _error_text(exc)
        return None

    async def _webhook(self, item: OutboxItem, alerts: AlertsConfig) -> None:
        body = orjson.dumps(payload(item))
        msg_id = message_id(item)
        timestamp = int(self.clock.now().timestamp())
        response = await self._http().post(
            alerts.webhook_url,
            timeout=alerts.webhook_timeout,
            content=body,
            headers={
                "content-type": "application/json",
                "webhook-id": msg_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(alerts.webhook_secret, msg_id, timestamp, body),
            },
        )
        if not response.is_success:
            raise DeliveryFailed(f"webhook answered {response.status_code}")

    async def _email(self, item: OutboxItem, a: AlertsConfig) -> None:
        await aiosmtplib.send(
            email_message(item, a),
            hostname=a.smtp_host,
            port=a.smtp_port,
            username=a.smtp_username or None,
            password=a.smtp_password or None,
            use_tls=a.smtp_tls == "tls",
            start_tls=a.smtp_tls == "starttls",
            timeout=a.smtp_timeout,
        )


def _error_text(exc: BaseException) -> str:
    """What a failed attempt records: the error in words, on one line, without
    control characters (PostgreSQL refuses a NUL in text), at most 500 characters."""
    if isinstance(exc, BaseExceptionGroup):  # e.g. every address of a host refused
        text = "; ".join(_error_text(e) for e in exc.exceptions)
    else:
        text = str(exc) or type(exc).__name__
    return plain_line(text)[:500]
