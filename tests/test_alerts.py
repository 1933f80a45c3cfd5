"""Threshold alerts end to end: real answers through the gateway, a real webhook
receiver (uvicorn) verifying Standard Webhooks signatures with the reference
library, a real SMTP server (aiosmtpd)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from email import message_from_bytes
from typing import Any

import httpx
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from gateway.alerts import alert_request, sign
from gateway.clock import periods_at
from gateway.config import parse_config
from gateway.errors import ConfigError
from tests.harness import USER, Harness, running_gateway
from tests.servers import read_body, serve

SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()
ADMIN = "alerts-admin-token-0123456789abcdef"
CHAT = {"query": "Xin chào", "inputs": {}, "response_mode": "blocking"}
ANSWER_TOKENS = 1168  # what the fake Dify charges per answer


class Receiver:
    """A webhook endpoint: verifies every request, fails the first ``failures``."""

    def __init__(self, failures: int = 0) -> None:
        self.webhook = Webhook(SECRET)
        self.failures = failures
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
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def settings(**alerts: Any) -> dict[str, Any]:
    return {
        "plans": {"free": {"tokens_per_day": 2400}},
        "alerts": {"thresholds": [40, 90], "poll_interval": 0.05, "retry_initial": 0, **alerts},
    }


@contextlib.asynccontextmanager
async def gateway_with(database_url: str, **alerts: Any) -> AsyncIterator[Harness]:
    env = {"TEST_WEBHOOK_SECRET": SECRET, "GATEWAY_ADMIN_TOKEN": ADMIN}
    async with running_gateway(database_url, settings=settings(**alerts), env=env) as h:
        yield h


async def ask(h: Harness, count: int = 1) -> None:
    async with httpx.AsyncClient(base_url=h.url) as client:
        for _ in range(count):
            response = await client.post("/v1/chat-messages", json=CHAT, headers=h.auth())
            assert response.status_code == 200
    await h.gateway.wait_finished(h.gateway.finished.value)


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
        await h.gateway.outbox_attempts.wait_for(2)  # refused once, then delivered
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
        await h.gateway.outbox_attempts.wait_for(3)
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
        await h.gateway.outbox_attempts.wait_for(3)
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
        await h.gateway.outbox_attempts.wait_for(1)
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
        await h.gateway.outbox_attempts.wait_for(2)
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
        await h.gateway.outbox_attempts.wait_for(1)
        async with httpx.AsyncClient(base_url=h.url) as client:
            signed_in = await client.post("/dashboard/login", data={"token": ADMIN})
            assert signed_in.status_code == 303
            page = await client.get("/dashboard/alerts")
    assert page.status_code == 200
    assert "40% of tokens today" in page.text
    assert "email: delivered (1)" in page.text
    assert f'href="/dashboard/users/{USER}"' in page.text


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
