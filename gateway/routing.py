"""Default deny (issue 20): what the proxy does with a route's role before it
forwards anything.

The dialect classifies a request (``Upstream.route``); this module decides, from
that route alone and before the body is read where it can:

- ``unknown`` routes are refused 404 and ``operator`` routes 403, both in the
  upstream's error shape - unless the operator's allow-list (``upstream.allow``)
  names them, when they are forwarded as an unmetered pass-through;
- a ``side_cost`` must have its price in ``[call_prices]``, or it is refused 403
  (never forwarded free);
- a route naming an answer the upstream keeps (``owned_answer``: a scoped read,
  or a side cost such as Dify's text-to-audio of a message) is forwarded only
  when the ledger shows that answer is the caller's; otherwise 404, as if it
  did not exist; so is an answer naming stored files (``check_files``) that are
  not the caller's uploads.

The roles and the table of every dialect are in docs/security.md.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from gateway.allowlist import AllowList
from gateway.errors import STORAGE_UNAVAILABLE, Forbidden, NotFound, StorageError
from gateway.pricing import CallPrice
from gateway.upstreams import Route
from gateway.usage import Metered, Usage

if TYPE_CHECKING:
    from gateway.metrics import Metrics
    from gateway.storage import AnswerOwner, Ownership

__all__ = ["ALLOWED", "RouteGuard", "side_cost_result"]

log = logging.getLogger("gateway.routing")

# A route the operator's allow-list forwards: unmetered, like a pass-through.
ALLOWED: Final = Route("allowed", "allowed", role="passthrough")


class RouteGuard:
    """Applies the roles; one per proxy."""

    __slots__ = ("_metrics", "_storage")

    def __init__(self, storage: Ownership, *, metrics: Metrics) -> None:
        self._storage = storage
        self._metrics = metrics

    def admit_route(
        self,
        method: str,
        path: str,
        route: Route,
        *,
        call_prices: Mapping[str, CallPrice],
        allow: AllowList,
        refined: bool = False,
    ) -> Route:
        """The route to forward, or the refusal for a route the gateway must not forward.

        ``allow``: the allow-lists of the request's mount (``upstream.allow``).
        ``refined``: the route a body made of a metered one; the allow-list, which
        names paths, never turns it into an unmetered pass-through."""
        role = route.role
        if role == "unknown" or role == "operator":
            if not refined and allow and allow.allows(method, path):
                log.debug("%s %s: forwarded by upstream.allow", method, path)
                return ALLOWED
            if role == "operator":
                raise Forbidden(
                    "This endpoint is for the operator only; it is not available "
                    "through the gateway.",
                    code="endpoint_not_allowed",
                )
            raise NotFound("This endpoint is not available through the gateway.", code="not_found")
        if role == "side_cost":
            self.call_price(route, call_prices)
        return route

    def call_price(self, route: Route, prices: Mapping[str, CallPrice]) -> CallPrice:
        """A side cost's price in ``prices`` (``call_prices``), or the refusal when
        it has none."""
        price = prices.get(route.call or "")
        if price is None:
            raise Forbidden(
                "This call is billed per use and has no price configured; "
                "it is not available through the gateway.",
                code="call_not_priced",
            )
        return price

    async def check_owner(self, route: Route, user_id: str) -> AnswerOwner | None:
        """For a stored answer's object: refuse unless the ledger names the caller.
        Returns the ledger's owner row: the named upstream that gave the answer,
        where the object is kept (issue 23), and when; None for a route that
        names no stored answer."""
        answer_id = route.owned_answer
        if answer_id is None:
            return None
        try:
            owner = await self._storage.answer_owner(answer_id)
        except StorageError as exc:
            # Fails closed: without the ledger nobody's objects are shown.
            self._metrics.inc("gateway_storage_errors_total", operation="answer_owner")
            raise StorageError(STORAGE_UNAVAILABLE) from exc
        if owner is None or owner.user_id != user_id:
            # 404, not 403: another user's object must not be told from a missing one.
            raise NotFound(f"No object found with id '{answer_id}'.", code="not_found")
        return owner

    async def check_files(self, file_ids: frozenset[str], user_id: str) -> None:
        """For an answer naming stored files by id (Dify's uploads, review F9):
        refuse unless each is an upload the gateway kept for the caller. The
        upstream finds such a file in the whole workspace, whoever uploaded it;
        the gateway knows only the uploads that passed through it, so a file it
        does not know (one uploaded before it kept them, or elsewhere) is
        refused too. One query for all the ids."""
        try:
            owners = await self._storage.upload_owners(file_ids)
        except StorageError as exc:
            # Fails closed, as check_owner: without the records nobody's files are used.
            self._metrics.inc("gateway_storage_errors_total", operation="upload_owners")
            raise StorageError(STORAGE_UNAVAILABLE) from exc
        for file_id in sorted(file_ids):
            if owners.get(file_id) != user_id:
                # 404, as for another user's object: not told from a missing one.
                raise NotFound(f"No object found with id '{file_id}'.", code="not_found")


def side_cost_result(price: CallPrice) -> Metered:
    """What a side call is charged: its price, per call. (Dify's paid side calls
    report no tokens; a dialect whose side calls do would meter them here.)"""
    usage = Usage(cost=price.price, currency=price.currency)
    return Metered(None, None, None, usage, "complete")
