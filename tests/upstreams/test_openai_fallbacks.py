"""A router's fallbacks (gateway/upstreams/openai_fallbacks.py, review-sec F12):
models named outside ``model`` that an OpenAI-compatible router (LiteLLM proxy,
OpenRouter) answers with. Each must pass the plan's allow-list, be priced and
cost no more than ``model``; a field that names no model the gateway can check
is refused. Attacks against a real gateway in front of a router-like upstream,
then the pure functions by tables of cases."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from gateway.errors import Forbidden
from gateway.pricing import Price, PriceTable
from gateway.upstreams.openai_fallbacks import check_fallbacks, fallback_models
from tests.harness import USER, Harness, running_gateway
from tests.servers import read_body

PRICES = {
    "gpt-4o-mini": {"input": "0.15", "output": "0.60"},
    "gpt-4o": {"input": "2.5", "output": "10"},
    "llama-3-8b": {"input": "0.05", "output": "0.08"},
}
SETTINGS: dict[str, Any] = {
    "upstream": {"kind": "openai"},
    "prices": PRICES,
    "plans": {
        "free": {"models": ["gpt-4o-mini", "llama-3*"]},
        "pro": {},  # every model
    },
}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Xin chào"}]}


class Router:
    """An OpenAI-compatible router that answers with a fallback, as LiteLLM's proxy
    does with ``mock_testing_fallbacks`` or once ``model`` fails, and OpenRouter
    with ``models`` once ``model`` fails: the first model the request names in
    ``fallbacks`` or ``models``, else ``model``. ``x-router-model`` makes it name
    the model otherwise (a deployment's own name)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        request = orjson.loads(body)
        self.requests.append(request)
        named = [*(request.get("fallbacks") or ()), *(request.get("models") or ())]
        model = named[0] if named else request["model"]
        model = dict(scope["headers"]).get(b"x-router-model", model.encode()).decode()
        answer = {
            "id": f"chatcmpl-{len(self.requests):032d}",
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "chào"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100},
        }
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": orjson.dumps(answer)})


async def post(h: Harness, path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=h.url, timeout=20) as client:
        return await client.post(path, json=body, headers=h.auth(**headers))


async def nothing_reserved(h: Harness, router: Router) -> None:
    assert router.requests == []
    day = h.gateway.today()
    assert await h.storage.daily(day, day) == []
    assert await h.events() == []


def refused(response: httpx.Response, code: str) -> str:
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}  # OpenAI's shape
    assert (error["code"], error["type"]) == (code, "permission_error")
    message: str = error["message"]
    return message


# --- attacks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        {"fallbacks": ["gpt-4o"]},
        {"fallbacks": [{"gpt-4o-mini": ["gpt-4o"]}]},
        {"context_window_fallbacks": [{"gpt-4o-mini": ["gpt-4o"]}]},
        {"content_policy_fallbacks": [{"gpt-4o-mini": ["gpt-4o"]}]},
        {"context_window_fallback_dict": {"gpt-4o-mini": "gpt-4o"}},
        {"models": ["gpt-4o"]},
        {"models": ["gpt-4o-mini", "llama-3-8b", "gpt-4o"]},
    ],
    ids=[
        "litellm-fallbacks",
        "litellm-fallbacks-by-group",
        "litellm-context-window",
        "litellm-content-policy",
        "litellm-sdk-dict",
        "openrouter-models",
        "openrouter-models-last",
    ],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses", "/v1/embeddings"])
async def test_a_model_outside_the_plan_cannot_answer_as_a_routers_fallback(
    database_url: str, extra: dict[str, Any], path: str
) -> None:
    """The attack: the plan allows gpt-4o-mini; the request names it as ``model``
    and gpt-4o where a router reads fallbacks (provoking the failure that makes
    it fall back is easy: a context gpt-4o-mini cannot take). Before, it was
    forwarded unchanged and answered, and charged, as gpt-4o. Now refused 403
    ``model_not_in_plan``, naming the fallback, before anything is reserved."""
    router = Router()
    async with running_gateway(database_url, upstream=router, settings=SETTINGS) as h:
        response = await post(h, path, {**CHAT, "input": "hi", **extra})
        await nothing_reserved(h, router)
    assert refused(response, "model_not_in_plan") == (
        "The model 'gpt-4o' is not available on your plan."
    )


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"fallbacks": ["llama-3-8b"], "mock_testing_fallbacks": True}, "mock_testing_fallbacks"),
        ({"mock_testing_fallbacks": True}, "mock_testing_fallbacks"),  # the router's own
        ({"mock_testing_context_fallbacks": True}, "mock_testing_context_fallbacks"),
        (
            {"mock_testing_content_policy_fallbacks": "true"},
            "mock_testing_content_policy_fallbacks",
        ),
        ({"route": "fallback"}, "route"),  # OpenRouter picks the fallback
        (
            {"model_list": [{"model_name": "gpt-4o-mini", "litellm_params": {"model": "gpt-4o"}}]},
            "model_list",
        ),
        ({"user_config": {"model_list": [{"model_name": "gpt-4o-mini"}]}}, "user_config"),
        ({"fallbacks": "gpt-4o"}, "fallbacks"),
        (
            {"fallbacks": [{"model": "llama-3-8b", "api_base": "https://elsewhere.example"}]},
            "fallbacks",
        ),
        ({"models": [["gpt-4o"]]}, "models"),
    ],
    ids=[
        "forced-fallback",
        "forced-router-fallback",
        "forced-context-fallback",
        "forced-content-fallback",
        "openrouter-route",
        "litellm-model-list",
        "litellm-user-config",
        "not-a-list",
        "sdk-deployment",
        "nested-list",
    ],
)
@pytest.mark.parametrize("plan", ["free", "pro"])
async def test_a_fallback_the_gateway_cannot_check_is_refused(
    sqlite_url: str, extra: dict[str, Any], field: str, plan: str
) -> None:
    """A field that makes the router answer with a model the request does not
    name (its own fallbacks, forced; a deployment the request defines under an
    allowed name), or names models in a shape the gateway does not read, is
    refused 403 ``model_fallback_not_allowed`` whatever the plan allows."""
    router = Router()
    async with running_gateway(sqlite_url, upstream=router, settings=SETTINGS) as h:
        await h.storage.set_plan(USER, plan)
        response = await post(h, "/v1/chat/completions", {**CHAT, **extra})
        await nothing_reserved(h, router)
    assert refused(response, "model_fallback_not_allowed") == (
        f"The field {field} can make the upstream answer with a model this gateway "
        "cannot check, so it is not available."
    )


async def test_only_a_fallback_no_dearer_than_the_model_is_answered(sqlite_url: str) -> None:
    """The attack without an allow-list: a money budget reserves the bound of the
    model asked for (gpt-4o-mini); an answer from gpt-4o would cost up to 17 times
    that. Refused 403 ``model_fallback_not_allowed``. A fallback that costs no more
    goes through unchanged, and the answer is charged as the model it reports
    (llama-3-8b's price, not gpt-4o-mini's) or, when it reports a name the table
    does not price (a router's deployment), at the price of the model asked for,
    which no fallback that goes exceeds."""
    router = Router()
    async with running_gateway(sqlite_url, upstream=router, settings=SETTINGS) as h:
        await h.storage.set_plan(USER, "pro")
        dearer = await post(h, "/v1/chat/completions", {**CHAT, "models": ["gpt-4o"]})
        await nothing_reserved(h, router)
        body = {**CHAT, "fallbacks": ["llama-3-8b"]}
        fell_back = await post(h, "/v1/chat/completions", body)
        assert fell_back.status_code == 200, fell_back.text
        await h.probes.wait_finished(1)
        deployment = await post(
            h, "/v1/chat/completions", body, **{"x-router-model": "azure/llama-deployment"}
        )
        assert deployment.status_code == 200, deployment.text
        await h.probes.wait_finished(2)
        events = sorted(await h.events(), key=lambda event: event.cost)
    assert refused(dearer, "model_fallback_not_allowed") == (
        "The fallback model 'gpt-4o' costs more than 'gpt-4o-mini', the model the "
        "request names: name it as the model instead."
    )
    assert router.requests == [{**body, "user": USER}] * 2
    # 1000 input and 100 output tokens at llama-3-8b's, then gpt-4o-mini's prices.
    assert [(event.model, event.cost) for event in events] == [
        ("llama-3-8b", Decimal("0.000058")),
        ("azure/llama-deployment", Decimal("0.00021")),
    ]


async def test_an_unpriced_fallback_is_refused_not_charged_as_the_model(sqlite_url: str) -> None:
    """Before, an answer from a fallback the table does not price was charged at
    the price of the model asked for; now the fallback is refused 403
    ``model_not_priced``, as it would be as ``model``. Fields that name no
    fallback (null, empty, false) are forwarded as they are."""
    router = Router()
    async with running_gateway(sqlite_url, upstream=router, settings=SETTINGS) as h:
        response = await post(h, "/v1/chat/completions", {**CHAT, "fallbacks": ["llama-3-405b"]})
        await nothing_reserved(h, router)
        none = {"fallbacks": None, "models": [], "route": None, "mock_testing_fallbacks": False}
        plain = await post(h, "/v1/chat/completions", {**CHAT, **none})
    assert refused(response, "model_not_priced") == (
        "The model 'llama-3-405b' has no price on this gateway, so its use cannot be charged."
    )
    assert plain.status_code == 200, plain.text
    assert router.requests == [{**CHAT, **none, "user": USER}]


async def test_a_fallback_to_a_search_model_is_refused(sqlite_url: str) -> None:
    """A chat search model searches the web on every answer, a call priced per
    answer from the request's ``model``: as a fallback its searches would go
    uncharged. Refused like a dearer model."""
    settings = {
        **SETTINGS,
        "prices": {**PRICES, "gpt-4o-mini-search-preview": PRICES["gpt-4o-mini"]},
        "call_prices": {"openai.chat_web_search": {"price": "0.03"}},
    }
    router = Router()
    async with running_gateway(sqlite_url, upstream=router, settings=settings) as h:
        await h.storage.set_plan(USER, "pro")
        body = {**CHAT, "fallbacks": ["gpt-4o-mini-search-preview"]}
        response = await post(h, "/v1/chat/completions", body)
        await nothing_reserved(h, router)
    refused(response, "model_fallback_not_allowed")


# --- the pure functions ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({}, ()),
        (CHAT, ()),
        ({"fallbacks": None}, ()),
        ({"fallbacks": []}, ()),
        ({"fallbacks": ["a", "b"]}, ("a", "b")),
        ({"fallbacks": ["a", {"x": ["b", "c"]}, {"y": []}]}, ("a", "b", "c")),
        ({"models": ["a"], "fallbacks": ["b"]}, ("b", "a")),
        ({"context_window_fallbacks": [{"x": ["a"]}]}, ("a",)),
        ({"content_policy_fallbacks": [{"x": ["a"], "y": ["b"]}]}, ("a", "b")),
        ({"context_window_fallback_dict": {"x": "a"}}, ("a",)),
        ({"mock_testing_fallbacks": False, "route": None}, ()),
    ],
)
def test_fallback_models_names_each_model_a_router_may_answer_with(
    body: dict[str, Any], named: tuple[str, ...]
) -> None:
    assert fallback_models(body) == named


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"mock_testing_fallbacks": True}, "mock_testing_fallbacks"),
        ({"mock_testing_fallbacks": 1}, "mock_testing_fallbacks"),
        ({"mock_testing_context_fallbacks": "yes"}, "mock_testing_context_fallbacks"),
        ({"mock_testing_content_policy_fallbacks": True}, "mock_testing_content_policy_fallbacks"),
        ({"model_list": []}, "model_list"),
        ({"user_config": {}}, "user_config"),
        ({"route": "fallback"}, "route"),
        ({"fallbacks": "a"}, "fallbacks"),
        ({"fallbacks": [1]}, "fallbacks"),
        ({"fallbacks": [""]}, "fallbacks"),
        ({"fallbacks": [None]}, "fallbacks"),
        ({"fallbacks": [{"model": "a"}]}, "fallbacks"),
        ({"fallbacks": [{"x": "a"}]}, "fallbacks"),
        ({"fallbacks": [{"x": [{"model": "a"}]}]}, "fallbacks"),
        ({"models": {"a": "b"}}, "models"),
        ({"models": [["a"]]}, "models"),
        ({"context_window_fallbacks": {"x": ["a"]}}, "context_window_fallbacks"),
        ({"context_window_fallback_dict": ["a"]}, "context_window_fallback_dict"),
        ({"context_window_fallback_dict": {"x": ["a"]}}, "context_window_fallback_dict"),
    ],
)
def test_fallback_models_refuses_a_field_it_cannot_read(body: dict[str, Any], field: str) -> None:
    with pytest.raises(Forbidden) as refusal:
        fallback_models(body)
    assert refusal.value.code == "model_fallback_not_allowed"
    assert refusal.value.fields == {"field": field}


TABLE = PriceTable(
    {
        "mini": Price(input=Decimal(1), output=Decimal(2)),
        "same": Price(input=Decimal(1), output=Decimal(2)),
        "cheap": Price(input=Decimal("0.5"), output=Decimal(1)),
        "dear-out": Price(input=Decimal("0.5"), output=Decimal(3)),
        "dear-cache": Price(input=Decimal(1), output=Decimal(2), cache_write_input=Decimal(2)),
        "dear-audio": Price(input=Decimal(1), output=Decimal(2), audio_output=Decimal(9)),
        "cached": Price(input=Decimal(1), output=Decimal(2), cached_input=Decimal("0.1")),
        # 1-hour cache writes (review4 R4-2): mini's are 2x input, 2.
        "dear-1h": Price(input=Decimal(1), output=Decimal(2), cache_write_1h_input=Decimal(3)),
        "same-1h": Price(input=Decimal(1), output=Decimal(2), cache_write_1h_input=Decimal(2)),
    }
)


@pytest.mark.parametrize(
    ("fallback", "code"),
    [
        ("mini", None),
        ("same", None),
        ("cheap", None),
        ("cached", None),  # a cheaper cache read
        ("mini-2024-08-06", None),  # a snapshot, at its model's price
        ("dear-out", "model_fallback_not_allowed"),
        ("dear-cache", "model_fallback_not_allowed"),
        ("dear-audio", "model_fallback_not_allowed"),
        ("dear-1h", "model_fallback_not_allowed"),  # a router in front of Claude
        ("same-1h", None),
        ("unknown", "model_not_priced"),
    ],
)
def test_check_fallbacks_takes_priced_fallbacks_no_dearer_than_the_model(
    fallback: str, code: str | None
) -> None:
    body = {"model": "mini", "fallbacks": [fallback]}
    if code is None:
        check_fallbacks(body, "mini", TABLE, allow_unpriced=False)
        return
    with pytest.raises(Forbidden) as refusal:
        check_fallbacks(body, "mini", TABLE, allow_unpriced=False)
    assert refusal.value.code == code


def test_check_fallbacks_with_unpriced_models_allowed() -> None:
    """``unpriced_models = "allow"``: an unpriced fallback costs what an unpriced
    model does (0), so it goes; a priced one is dearer than an unpriced model."""
    check_fallbacks({"fallbacks": ["unknown"]}, "mini", TABLE, allow_unpriced=True)
    check_fallbacks({"fallbacks": ["other"]}, "unknown", TABLE, allow_unpriced=True)
    with pytest.raises(Forbidden):
        check_fallbacks({"fallbacks": ["cheap"]}, "unknown", TABLE, allow_unpriced=True)


def test_check_fallbacks_refuses_a_fallback_that_makes_a_paid_call_the_model_does_not() -> None:
    def calls(model: str | None) -> list[str]:
        return ["search"] if model is not None and model.startswith("same") else []

    check_fallbacks({"fallbacks": ["cheap"]}, "mini", TABLE, allow_unpriced=False, calls=calls)
    check_fallbacks({"fallbacks": ["cheap"]}, "same", TABLE, allow_unpriced=False, calls=calls)
    with pytest.raises(Forbidden):
        check_fallbacks({"fallbacks": ["same"]}, "mini", TABLE, allow_unpriced=False, calls=calls)
