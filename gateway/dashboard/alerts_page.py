"""The alerts page at /dashboard/alerts: recent threshold crossings and how
their deliveries went (docs/admin.md, "Alerts")."""

from __future__ import annotations

from decimal import Decimal
from typing import Final

from starlette.responses import Response

from gateway.alerts import describe
from gateway.dashboard.formats import NumberFormat
from gateway.dashboard.render import Html, concat, render, user_path
from gateway.dashboard.signin import Page, signed_in

SHOWN: Final = 200

_PAGE = """<h1>Alerts</h1>
<p class="muted">{summary}</p>
<div class="scroll">
<table class="alerts stack">
<thead><tr><th scope="col">When</th><th scope="col">User</th><th scope="col">Reached</th>
<th scope="col" class="num">Used</th><th scope="col">Deliveries</th></tr></thead>
<tbody>
{rows}</tbody>
</table>
</div>
"""

_ROW = """<tr>
<td data-label="When">{when}</td>
<td data-label="User"><a href="{href}">{user}</a></td>
<td data-label="Reached">{threshold}% of {what} ({period})</td>
<td class="num" data-label="Used">{used} / {value}</td>
<td data-label="Deliveries">{deliveries}</td>
</tr>
"""


@signed_in
async def alerts(page: Page) -> Response:
    found = await page.gateway.storage.list_alerts(limit=SHOWN)
    numbers = page.numbers
    rows = concat(
        render(
            _ROW,
            when=a.created_at.astimezone(page.gateway.tz).strftime("%Y-%m-%d %H:%M"),
            href=user_path(page.base, a.crossing.user_id),
            user=a.crossing.user_id,
            threshold=a.crossing.threshold,
            what=describe(a.crossing.limit),
            period=a.crossing.period,
            used=_shown(numbers, a.crossing.used),
            value=_shown(numbers, a.crossing.value),
            deliveries=concat(
                render(
                    '<span class="delivery {status}" title="{error}">{channel}: {status}'
                    " ({attempts})</span> ",
                    channel=d.channel,
                    status=d.status,
                    attempts=d.attempts,
                    error=d.last_error or "",
                )
                for d in a.deliveries
            )
            or Html('<span class="muted">none</span>'),
        )
        for a in found
    ) or Html('<tr><td colspan="5" class="muted">No alerts yet.</td></tr>\n')
    summary = (
        f"The latest {SHOWN} crossings." if len(found) == SHOWN else f"{len(found)} crossings."
    )
    return page.document("Alerts", render(_PAGE, summary=summary, rows=rows))


def _shown(numbers: NumberFormat, value: int | Decimal) -> str:
    """A count, or an amount of money (a money budget's alert)."""
    return numbers.money(value) if isinstance(value, Decimal) else numbers.number(value)
