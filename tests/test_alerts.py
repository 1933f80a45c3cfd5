"""Threshold alerts end to end: real answers through the gateway, a real webhook
receiver (uvicorn) verifying Standard Webhooks signatures with the reference
library, a real SMTP server (aiosmtpd)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from email import message_from_bytes
from typing import Any

import httpx
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from gateway.alerts import OutboxWorker, alert_request, sign
from gateway.clock import SystemClock, periods_at
from gateway.config import DatabaseConfig, parse_config
from gateway.errors import ConfigError
from gateway.storage import OutboxItem, Storage, UsageEvent, open_storage
from tests.harness import USER, Harness, running_gateway
from tests.servers import read_body, serve
from tests.tcpproxy import TCPProxy

SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()
ADMIN = "alerts-admin-token-0123456789abcdef"
CHAT = {"query": "Xin chào", "inputs": {}, "response_mode": "blocking"}
ANSWER_TOKENS = 1168  # what the fake Dify charges per answer
WEBHOOK = {"webhook_secret_env": "TEST_WEBHOOK_SECRET"}


class Receiver:
    """A webhook endpoint: verifies every request, fails the first ``failures``;
    ``before_first_answer`` runs once, before the first request is answered."""

    def __init__(
        self,
        failures: int = 0,
        before_first_answer: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.webhook = Webhook(SECRET)
        self.failures = failures
        self.before_first_answer = before_first_answer
        self.ids: list[str] = []  # webhook-id of every attempt, verified or not
        self.verified: list[Any] = []
        self.refused = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.ids.append(headers.get("webhook-id", ""))
        try:
            payload = self.webhook.verify(body, headers)
        except WebhookVerificationError:
            self.refused += 1
            status = 401
        else:
            if self.failures:
                self.failures -= 1
                status = 503
            else:
                self.verified.append(payload)
                status = 204
        if self.before_first_answer is not None:
            hook, self.before_first_answer = self.before_first_answer, None
            await hook()
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def settings(**alerts: Any) -> dict[str, Any]:
    return {
        "plans": {"free": {"tokens_per_day": 2400}},
        "alerts": {"thresholds": [40, 90], "poll_interval": 0.05, "retry_initial": 0, **alerts},
    }


@contextlib.asynccontextmanager
async def gateway_with(
    database_url: str, extra: dict[str, Any] | None = None, **alerts: Any
) -> AsyncIterator[Harness]:
    env = {
        "TEST_WEBHOOK_SECRET": SECRET,
        "GATEWAY_ADMIN_TOKEN": ADMIN,
    }
    config = {**settings(**alerts), **(extra or {})}
    async with running_gateway(database_url, settings=config, env=env) as h:
        yield h


async def ask(h: Harness, count: int = 1, headers: dict[str, Any] | None = None) -> None:
    async with httpx.AsyncClient(base_url=h.url) as client:
        for _ in range(count):
            response = await client.post(
                "/v1/chat-messages", json=CHAT, headers=headers or h.auth()
            )
            assert response.status_code == 200
    await h.probes.wait_finished(h.probes.finished.value)


async def admin_alerts(h: Harness) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=h.url) as client:
        response = await client.get("/admin/alerts", headers={"Authorization": f"Bearer {ADMIN}"})
    assert response.status_code == 200
    data: list[dict[str, Any]] = response.json()["data"]
    return data


async def test_a_crossing_is_sent_once_signed_and_retried_until_delivered(
    database_url: str,
) -> None:
    receiver = Receiver(failures=1)
    async with (
        serve(receiver) as url,
        gateway_with(
            database_url, webhook_url=url + "/hook", webhook_secret_env="TEST_WEBHOOK_SECRET"
        ) as h,
    ):
        await ask(h)  # 1168 of 2400: 40% crossed
        await h.probes.outbox_attempts.wait_for(2)  # refused once, then delivered
        assert len(receiver.verified) == 1 and receiver.refused == 0
        # A retry is the same message: the receiver can tell it from a new one.
        assert len(receiver.ids) == 2 and receiver.ids[0] == receiver.ids[1]
        assert receiver.verified[0]["type"] == "usage.threshold_crossed"
        assert receiver.verified[0]["data"] == {
            "user_id": USER,
            "limit": "tokens_per_day",
            "period": periods_at(h.gateway.clock.now(), h.gateway.tz).day.isoformat(),
            "threshold": 40,
            "limit_value": 2400,
            "used": ANSWER_TOKENS,
        }
        await ask(h)  # 2336: 90% crossed
        await h.probes.outbox_attempts.wait_for(3)
        await ask(h)  # 3504: nothing new to announce
        alerts = await admin_alerts(h)
        assert sorted((a["threshold"], a["used"]) for a in alerts) == [
            (40, ANSWER_TOKENS),
            (90, 2 * ANSWER_TOKENS),
        ]
        forty = next(a for a in alerts if a["threshold"] == 40)
        assert forty["deliveries"] == [
            {
                "channel": "webhook",
                "status": "delivered",
                "attempts": 2,
                "last_error": None,
                "delivered_at": forty["deliveries"][0]["delivered_at"],
            }
        ]
        assert forty["deliveries"][0]["delivered_at"] is not None
    assert [p["data"]["threshold"] for p in receiver.verified] == [40, 90]
    metrics = h.gateway.metrics
    assert metrics.get("gateway_alert_deliveries_total", channel="webhook", result="retry") == 1
    assert metrics.get("gateway_alert_deliveries_total", channel="webhook", result="delivered") == 2
    assert len(set(receiver.ids)) == 2


async def test_a_delivery_that_keeps_failing_is_given_up(sqlite_url: str) -> None:
    receiver = Receiver(failures=100)
    async with (
        serve(receiver) as url,
        gateway_with(
            sqlite_url,
            webhook_url=url + "/hook",
            webhook_secret_env="TEST_WEBHOOK_SECRET",
            max_attempts=3,
        ) as h,
    ):
        await ask(h)
        await h.probes.outbox_attempts.wait_for(3)
        ((delivery,),) = [a["deliveries"] for a in await admin_alerts(h)]
    assert (delivery["status"], delivery["attempts"]) == ("failed", 3)
    assert delivery["last_error"] == "webhook answered 503"
    assert len(receiver.ids) == 3 and not receiver.verified


class Mailbox:
    """An aiosmtpd handler keeping what it receives."""

    def __init__(self) -> None:
        self.messages: list[tuple[Envelope, bytes]] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.content
        assert isinstance(content, bytes)
        self.messages.append((envelope, content))
        return "250 OK"


@contextlib.asynccontextmanager
async def smtp_server(mailbox: Mailbox) -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(mailbox), "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_a_crossing_is_emailed(sqlite_url: str) -> None:
    mailbox = Mailbox()
    async with (
        smtp_server(mailbox) as port,
        gateway_with(
            sqlite_url,
            email_to=["ops@example.com", "billing@example.com"],
            email_from="gateway@example.com",
            smtp_port=port,
        ) as h,
    ):
        await ask(h)
        await h.probes.outbox_attempts.wait_for(1)
        ((delivery,),) = [a["deliveries"] for a in await admin_alerts(h)]
    assert (delivery["channel"], delivery["status"]) == ("email", "delivered")
    ((envelope, content),) = mailbox.messages
    assert envelope.mail_from == "gateway@example.com"
    assert envelope.rcpt_tos == ["ops@example.com", "billing@example.com"]
    message = message_from_bytes(content)
    assert message["Subject"] == f"{USER} reached 40% of tokens today"
    text = message.get_payload(decode=True)
    assert isinstance(text, bytes)
    assert f"has used {ANSWER_TOKENS} of 2400 tokens today" in text.decode()


async def test_an_unreachable_smtp_server_is_retried(sqlite_url: str) -> None:
    mailbox = Mailbox()
    async with smtp_server(mailbox) as port:
        pass  # closed again: nothing listens on the port
    async with gateway_with(
        sqlite_url, email_to=["ops@example.com"], smtp_port=port, smtp_timeout=2, max_attempts=2
    ) as h:
        await ask(h)
        await h.probes.outbox_attempts.wait_for(2)
        ((delivery,),) = [a["deliveries"] for a in await admin_alerts(h)]
    assert (delivery["status"], delivery["attempts"]) == ("failed", 2)
    assert delivery["last_error"]


async def test_the_dashboard_lists_alerts(sqlite_url: str) -> None:
    mailbox = Mailbox()
    async with (
        smtp_server(mailbox) as port,
        gateway_with(sqlite_url, email_to=["ops@example.com"], smtp_port=port) as h,
    ):
        await ask(h)
        await h.probes.outbox_attempts.wait_for(1)
        async with httpx.AsyncClient(base_url=h.url) as client:
            signed_in = await client.post("/dashboard/login", data={"token": ADMIN})
            assert signed_in.status_code == 303
            page = await client.get("/dashboard/alerts")
    assert page.status_code == 200
    assert "40% of tokens today" in page.text
    assert "email: delivered (1)" in page.text
    assert f'href="/dashboard/users/{USER}"' in page.text


# --- the worker survives what it cannot deliver or record ------------------------------


@pytest.mark.parametrize("user", ["ann\u2028e", "ann\x85e"], ids=["U+2028", "U+0085"])
async def test_a_user_id_with_a_line_break_gets_its_email_with_a_clean_subject(
    sqlite_url: str, user: str
) -> None:
    """A line break to the email library. No credential names such a user any
    more (`auth.valid_user_id`), but one made before that, or by hand, must not
    stop the delivery of any alert."""
    mailbox = Mailbox()
    async with (
        smtp_server(mailbox) as port,
        gateway_with(sqlite_url, email_to=["ops@example.com"], smtp_port=port) as h,
    ):
        key = await h.add_user(user)
        await ask(h, headers=h.auth(key))
        await h.probes.outbox_attempts.wait_for(1)
        ((delivery,),) = [a["deliveries"] for a in await admin_alerts(h)]
    assert (delivery["status"], delivery["attempts"]) == ("delivered", 1)
    ((_, content),) = mailbox.messages
    message = message_from_bytes(content)
    assert message["Subject"] == "ann e reached 40% of tokens today"


async def test_a_delivery_failing_in_an_unforeseen_way_is_a_failed_attempt(
    sqlite_url: str,
) -> None:
    """A URL the configuration takes but the HTTP client refuses (port 99999)
    raises no HTTP error: it is still the delivery's failure, recorded and retried
    by the usual rules, and the worker goes on."""
    async with gateway_with(
        sqlite_url, webhook_url="http://127.0.0.1:99999/hook", max_attempts=2, **WEBHOOK
    ) as h:
        await ask(h)
        await h.probes.outbox_attempts.wait_for(2)
        ((delivery,),) = [a["deliveries"] for a in await admin_alerts(h)]
    assert (delivery["status"], delivery["attempts"]) == ("failed", 2)
    # The cause, not the exception group the HTTP client wraps it in.
    assert "port" in delivery["last_error"] and "TaskGroup" not in delivery["last_error"]
    assert (
        h.gateway.metrics.get("gateway_alert_deliveries_total", channel="webhook", result="failed")
        == 1
    )


@pytest.mark.postgres
async def test_the_database_failing_while_a_delivery_is_recorded_does_not_stop_the_worker(
    pg_behind_proxy: tuple[str, TCPProxy],
) -> None:
    """The receiver takes the first alert while the database goes down: its
    result cannot be recorded (it is sent again once its claim expires), and the
    next crossing is still delivered once the database is back."""
    url, proxy = pg_behind_proxy
    receiver = Receiver(before_first_answer=proxy.cut)
    async with (
        serve(receiver) as hook,
        gateway_with(
            url,
            {"database": {"connect_timeout": 1.0, "command_timeout": 2.0}},
            webhook_url=hook + "/hook",
            **WEBHOOK,
        ) as h,
    ):
        await ask(h)  # 40% crossed
        await h.probes.outbox_attempts.wait_for(1)
        await proxy.restore()
        await ask(h)  # 90% crossed
        await h.probes.outbox_attempts.wait_for(2)
        deliveries = {a["threshold"]: a["deliveries"][0] for a in await admin_alerts(h)}
    assert [p["data"]["threshold"] for p in receiver.verified] == [40, 90]
    metrics = h.gateway.metrics
    assert (
        metrics.get("gateway_alert_deliveries_total", channel="webhook", result="unrecorded") == 1
    )
    assert (deliveries[40]["status"], deliveries[40]["attempts"]) == ("pending", 0)
    assert (deliveries[90]["status"], deliveries[90]["attempts"]) == ("delivered", 1)


class FailsOneClaim:
    """A real storage whose first outbox claim fails with an error that is not a
    StorageError (what a driver bug or an unreadable row would raise)."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.failed = False

    async def claim_outbox(self, **kw: Any) -> list[OutboxItem]:
        if not self.failed:
            self.failed = True
            raise RuntimeError("cannot read the outbox")
        return await self.storage.claim_outbox(**kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)


async def test_a_delivery_round_that_fails_is_logged_and_the_next_one_delivers(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = Receiver()
    storage = await open_storage(DatabaseConfig(url=sqlite_url))
    await storage.migrate()
    await storage.ensure_user(USER, plan="free")
    now = datetime.now(UTC)
    periods = periods_at(now, UTC)
    plans = {"free": {"tokens_per_day": 2000}}
    async with serve(receiver) as url:
        config = parse_config(
            {
                "alerts": {**settings(webhook_url=url + "/hook", **WEBHOOK)["alerts"]},
                "plans": plans,
            },
            env={"TEST_WEBHOOK_SECRET": SECRET},
        )
        request = alert_request(config.plan("free"), config.alerts, periods)
        answer = UsageEvent(
            answer_id="m1",
            user_id=USER,
            day=periods.day,
            created_at=now,
            endpoint="chat-messages",
            prompt_tokens=900,
            completion_tokens=100,
            total_tokens=1000,
            cost=Decimal("0.001"),
        )
        await storage.settle(answer, alerts=request)  # 50% of 2000: 40% crossed
        attempted = asyncio.Event()
        worker = OutboxWorker(
            FailsOneClaim(storage),  # type: ignore[arg-type]
            lambda: config.alerts,
            SystemClock(),
            on_attempt=lambda channel, result: attempted.set(),
        )
        task = asyncio.create_task(worker.run())
        try:
            async with asyncio.timeout(10):
                await attempted.wait()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await storage.close()
    assert [p["data"]["threshold"] for p in receiver.verified] == [40]
    assert any("alert delivery round failed" in r.message for r in caplog.records)


async def test_a_background_job_that_dies_is_logged_and_a_supervised_one_restarted(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken() -> None:
        raise RuntimeError("a bug")

    runs: list[int] = []
    restarted = asyncio.Event()

    async def crashes_once() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            raise RuntimeError("first run fails")
        restarted.set()

    async with gateway_with(sqlite_url) as h:
        task = h.gateway.spawn(broken())
        with pytest.raises(RuntimeError):
            await task
        h.gateway.spawn(h.gateway.supervise("crashes once", crashes_once, restart_delay=0))
        async with asyncio.timeout(10):
            await restarted.wait()
    died = [r for r in caplog.records if "background task" in r.message and "died" in r.message]
    assert len(died) == 1 and died[0].exc_info and died[0].exc_info[1] is task.exception()
    assert any("crashes once failed; restarting" in r.message for r in caplog.records)
    assert runs == [0, 1]


# --- configuration ---------------------------------------------------------------------


def test_the_signature_is_the_standard_one() -> None:
    body = b'{"type":"usage.threshold_crossed"}'
    headers = {
        "webhook-id": "alert_7",
        "webhook-timestamp": "1700000000",
        "webhook-signature": sign(SECRET, "alert_7", 1700000000, body),
    }
    verifier = Webhook(SECRET)
    with pytest.raises(WebhookVerificationError):  # too old: the timestamp is signed too
        verifier.verify(body, headers)
    now = str(int(time.time()))
    headers["webhook-timestamp"] = now
    headers["webhook-signature"] = sign(SECRET, "alert_7", int(now), body)
    assert verifier.verify(body, headers) == {"type": "usage.threshold_crossed"}


@pytest.mark.parametrize(
    ("alerts", "env", "message"),
    [
        ({"webhook_url": "http://h/x"}, {}, "GATEWAY_WEBHOOK_SECRET is not set"),
        ({"webhook_url": "http://h/x"}, {"GATEWAY_WEBHOOK_SECRET": "s3cret"}, "Standard"),
        ({"webhook_url": "http://h/x"}, {"GATEWAY_WEBHOOK_SECRET": "whsec_***"}, "Standard"),
        # A key found from one captured signature in 256 tries (review 4, R4-4).
        ({"webhook_url": "http://h/x"}, {"GATEWAY_WEBHOOK_SECRET": "whsec_AQ=="}, "1 bytes"),
        (
            {"webhook_url": "http://h/x"},
            {"GATEWAY_WEBHOOK_SECRET": "whsec_" + base64.b64encode(b"k" * 15).decode()},
            "key is 15 bytes; a key that short can be guessed - use at least 16",
        ),
        ({"webhook_url": "ftp://h/x"}, {}, "alerts.webhook_url"),
        ({"thresholds": [0]}, {}, "alerts.thresholds[0]: expected a number >= 1"),
        ({"thresholds": ["80"]}, {}, "alerts.thresholds[0]: expected an integer"),
        ({"thresholds": 80}, {}, "alerts.thresholds: expected an array of integers"),
    ],
)
def test_bad_alert_settings_are_refused(
    alerts: dict[str, Any], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"alerts": alerts}, env=env)
    assert message in caught.value.message


def test_plans_choose_their_thresholds() -> None:
    config = parse_config(
        {
            "alerts": {"thresholds": [80, 100], "email_to": ["ops@example.com"]},
            "plans": {
                "free": {"tokens_per_day": 1000, "tokens_per_month": 20000},
                "pro": {"tokens_per_day": 1000, "alert_thresholds": [90]},
                "quiet": {"tokens_per_day": 1000, "alert_thresholds": []},
                "unlimited": {},
            },
        },
        env={},
    )
    periods = periods_at(datetime(2026, 12, 2, 12, tzinfo=UTC), config.tz)
    free = alert_request(config.plan("free"), config.alerts, periods)
    assert free is not None and free.channels == ("email",)
    assert [(c.limit, c.period, c.value, c.thresholds) for c in free.checks] == [
        ("tokens_per_day", "2026-12-02", 1000, (80, 100)),
        ("tokens_per_month", "2026-12", 20000, (80, 100)),
    ]
    pro = alert_request(config.plan("pro"), config.alerts, periods)
    assert pro is not None and pro.checks[0].thresholds == (90,)
    assert alert_request(config.plan("quiet"), config.alerts, periods) is None
    assert alert_request(config.plan("unlimited"), config.alerts, periods) is None
    silent = parse_config({"alerts": {"thresholds": [80]}}, env={})  # no channel
    assert alert_request(silent.plan("free"), silent.alerts, periods) is None


async def test_money_budgets_general_and_team_limits_are_watched(database_url: str) -> None:
    """Issue 21: besides the four original keys, every limit per day or month a
    request is admitted under is watched - a money budget (amounts as decimal
    strings), a [[plans.NAME.limits]] entry, the team's limits (the team's
    usage) - and rates are not."""
    receiver = Receiver()
    extra = {
        "plans": {
            "free": {
                "cost_per_day": "0.01",
                "requests_per_minute": 2,
                "limits": [{"meter": "queries", "per": "month", "max": 4}],
            },
            "team": {"queries_per_day": 3},
        }
    }
    async with (
        serve(receiver) as url,
        gateway_with(database_url, extra, webhook_url=url + "/hook", **WEBHOOK) as h,
    ):
        bob = await h.add_user("bob")
        await h.gateway.accounts.create_team("acme", plan="team")
        await h.gateway.accounts.set_team(USER, "acme")
        await h.gateway.accounts.set_team("bob", "acme")
        await ask(h, headers=h.auth(**{"x-fake-total-price": "0.005"}))
        await h.probes.wait_finished(1)
        await ask(h, headers={"Authorization": f"Bearer {bob}"})
        await h.probes.wait_finished(2)
        await ask(h, headers=h.auth(**{"x-fake-total-price": "0.0045"}))
        await h.probes.wait_finished(3)
        alerts = await admin_alerts(h)
        await h.probes.outbox_attempts.wait_for(len(alerts))
    day = periods_at(h.gateway.clock.now(), h.gateway.tz).day
    seen = sorted(
        (a["user_id"], a["limit"], a["period"], a["threshold"], a["limit_value"], a["used"])
        for a in alerts
    )
    month = day.strftime("%Y-%m")
    assert seen == sorted([
        # Each member whose answer finds the team's threshold crossed is told.
        ("bob", "team_queries_per_day", day.isoformat(), 40, 3, 2),
        (USER, "cost_per_day", day.isoformat(), 40, "0.01", "0.005"),
        (USER, "cost_per_day", day.isoformat(), 90, "0.01", "0.0095"),
        (USER, "queries_per_month", month, 40, 4, 2),
        (USER, "team_queries_per_day", day.isoformat(), 40, 3, 3),
        (USER, "team_queries_per_day", day.isoformat(), 90, 3, 3),
    ])  # fmt: skip
    assert sorted(p["data"]["limit"] for p in receiver.verified) == sorted(s[1] for s in seen)


def test_an_alert_request_watches_every_limit_per_day_or_month() -> None:
    from gateway.quota.plans import plan_limits, team_limits
    from gateway.settle import _alerts_read, _alerts_to_json

    config = parse_config(
        {
            "alerts": {"thresholds": [50], "email_to": ["ops@example.com"]},
            "plans": {
                "free": {
                    "queries_per_day": 10,
                    "cost_per_month": "5.00",
                    "requests_per_minute": 3,
                    "max_concurrent_streams": 2,
                    "limits": [
                        {"meter": "cost", "per": "day", "max": "1", "models": ["o3"]},
                        {"meter": "queries", "per": "hour", "max": 9},
                    ],
                },
                "team": {"tokens_per_day": 5000},
            },
        },
        env={},
    )
    periods = periods_at(datetime(2026, 12, 2, 12, tzinfo=UTC), config.tz)
    plan = config.plan("free")
    limits = (*plan_limits(plan), *team_limits(config.plan("team")))
    request = alert_request(plan, config.alerts, periods, limits)
    assert request is not None
    assert [(c.limit, c.period, c.value, c.spec) for c in request.checks] == [
        ("queries_per_day", "2026-12-02", 10, None),
        ("cost_per_month", "2026-12", Decimal("5.00"), "9:2:1:"),
        ("cost_per_day[o3]", "2026-12-02", Decimal("1"), "9:1:1:m:o3"),
        ("team_tokens_per_day", "2026-12-02", 5000, "8:1:2:"),
    ]
    # A spooled settle keeps them (docs/quotas.md, "Crash safety").
    assert _alerts_read(_alerts_to_json(request)) == request
