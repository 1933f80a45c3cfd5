"""The proxy's pure HTTP helpers, as tables, and the one upstream error mapping."""

from __future__ import annotations

import json
import random
import re
import string
from urllib.parse import quote

import aiohttp
import httpx
import orjson
import pytest

from gateway.errors import BadRequest
from gateway.http import (
    _PATH_SAFE,
    KeyMask,
    canonical_path,
    connection_tokens,
    is_json,
    request_headers,
    response_headers,
    with_param,
)
from gateway.upstream_client import timeout_phase
from gateway.upstreams.transforms import DropEvents


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/chat-messages", "/chat-messages"),
        ("/messages/a b/suggested", "/messages/a%20b/suggested"),
        ("/files/100%", "/files/100%25"),
        ("/conversations/c1/", "/conversations/c1/"),
        ("/x:y@z!$&'()*+,;=-._~", "/x:y@z!$&'()*+,;=-._~"),
        ("/ü", "/%C3%BC"),
        ("/a..b/.c", "/a..b/.c"),
    ],
)
def test_canonical_path(path: str, expected: str) -> None:
    assert canonical_path(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "/a?b",
        "/a#b",
        "/a\\b",
        "/a\x00",
        "/a\x1f",
        "/a\x7f",
        "//a",
        "/a//b",
        "/./a",
        "/a/..",
        "/a/../b",
    ],
)
def test_canonical_path_refuses(path: str) -> None:
    with pytest.raises(BadRequest):
        canonical_path(path)


@pytest.mark.parametrize(
    ("query", "add", "expected"),
    [
        (b"", True, b"user=alice"),
        (b"", False, b""),
        (b"limit=20", True, b"limit=20&user=alice"),
        (b"limit=20", False, b"limit=20"),
        (b"user=victim", False, b"user=alice"),
        (b"%75ser=victim", False, b"user=alice"),
        (b"%75%73%65%72=victim", False, b"user=alice"),
        (b"US%65R=victim", False, b"US%65R=victim"),  # names are case-sensitive
        (b"user", False, b"user=alice"),  # a name without a value is still a name
        (b"user=a&user=b&x=1", False, b"x=1&user=alice"),
        (b"a=%2B&b=c+d&&user=v", False, b"a=%2B&b=c+d&user=alice"),  # kept byte for byte
        (b"us+er=v", False, b"us+er=v"),  # "+" decodes to a space: another name
        (b"user+=v", False, b"user+=v"),
        (b"x=user%3Dv", False, b"x=user%3Dv"),  # a value, not a name
    ],
)
def test_with_param(query: bytes, add: bool, expected: bytes) -> None:
    assert with_param(query, "user", "alice", add=add) == expected


def test_with_param_escapes_the_value() -> None:
    assert with_param(b"", "user", "a&b=c d/é") == b"user=a%26b%3Dc%20d%2F%C3%A9"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ([(b"Content-Type", b"a/b")], [(b"content-type", b"a/b")]),
        ([(b"Transfer-Encoding", b"chunked"), (b"X-A", b"1")], [(b"x-a", b"1")]),
        ([(b"X-Request-Id", b"up")], []),
        (
            [(b"Connection", b"X-Private, keep-alive"), (b"X-Private", b"1"), (b"X-B", b"2")],
            [(b"x-b", b"2")],
        ),
        ([(b"Keep-Alive", b"timeout=5"), (b"Upgrade", b"h2c")], []),
        # The operator's account: whose it is, and its rate limits (every user's
        # traffic, summed), OpenAI's and Anthropic's.
        (
            [
                (b"openai-organization", b"acme-operator-org"),
                (b"OpenAI-Project", b"proj_operator"),
                (b"x-ratelimit-limit-tokens", b"30000000"),
                (b"x-ratelimit-remaining-tokens", b"29123456"),
                (b"x-ratelimit-reset-requests", b"6ms"),
                (b"anthropic-organization-id", b"0b1c-operator"),
                (b"anthropic-workspace-id", b"wrkspc_operator"),
                (b"anthropic-ratelimit-requests-remaining", b"3999"),
                (b"anthropic-ratelimit-input-tokens-remaining", b"1999000"),
                (b"anthropic-priority-input-tokens-remaining", b"100"),
            ],
            [],
        ),
        # A router's, about the operator's key there and where it sends it.
        (
            [
                (b"x-litellm-key-spend", b"1234.5"),
                (b"x-litellm-model-api-base", b"https://internal.example/v1"),
                (b"llm_provider-openai-organization", b"acme-operator-org"),
                (b"x-portkey-last-used-option-params", b"{}"),
                (b"helicone-id", b"1"),
                (b"cf-aig-log-id", b"1"),
            ],
            [],
        ),
        # What a client needs to retry or to name its request stays, and the
        # rest of the answer's own headers.
        (
            [
                (b"retry-after", b"2"),
                (b"retry-after-ms", b"1500"),
                (b"x-should-retry", b"true"),
                (b"request-id", b"req_011"),
                (b"openai-processing-ms", b"210"),
                (b"openai-version", b"2020-10-01"),
                (b"openai-poll-after-ms", b"500"),
                (b"x-ratelimited", b"1"),
            ],
            [
                (b"retry-after", b"2"),
                (b"retry-after-ms", b"1500"),
                (b"x-should-retry", b"true"),
                (b"request-id", b"req_011"),
                (b"openai-processing-ms", b"210"),
                (b"openai-version", b"2020-10-01"),
                (b"openai-poll-after-ms", b"500"),
                (b"x-ratelimited", b"1"),
            ],
        ),
    ],
    ids=[
        "lower-cased",
        "hop-by-hop",
        "request-id",
        "connection-listed",
        "hop-by-hop-always",
        "operators-account",
        "router",
        "kept",
    ],
)
def test_response_headers(
    raw: list[tuple[bytes, bytes]], expected: list[tuple[bytes, bytes]]
) -> None:
    assert response_headers(raw) == expected


def test_connection_tokens() -> None:
    assert connection_tokens(b" Close , X-A,,") == frozenset({b"close", b"x-a"})


@pytest.mark.parametrize(
    ("media_type", "expected"),
    [
        (b"application/json", True),
        (b"application/vnd.api+json", True),
        (b"application/merge-patch+json", True),
        (b"text/json", False),
        (b"application/jsonp", False),
        (b"multipart/form-data", False),
    ],
)
def test_is_json(media_type: bytes, expected: bool) -> None:
    assert is_json(media_type) == expected


def test_request_headers_split() -> None:
    split = request_headers(
        [
            (b"host", b"gw"),
            (b"authorization", b"Bearer k"),
            (b"x-user", b"bob"),
            (b"connection", b"x-hop"),
            (b"x-hop", b"1"),
            (b"content-type", b"application/json; charset=utf-8"),
            (b"content-length", b"12"),
            (b"accept-encoding", b"gzip"),
            (b"x-custom", b"kept"),
            (b"access-control-request-method", b"POST"),
        ],
        b"x-user",
    )
    assert split.forward == [
        (b"content-type", b"application/json; charset=utf-8"),
        (b"x-custom", b"kept"),
        (b"access-control-request-method", b"POST"),
    ]
    assert split.authorization == b"Bearer k" and split.user_header == b"bob"
    assert split.content_length == 12 and split.accept_encoding == b"gzip"
    assert split.media_type == b"application/json" and split.preflight


def test_request_headers_drop_the_account_a_client_names() -> None:
    # Who the operator's key bills and whose objects it reaches is the
    # operator's choice (the upstream's table), in every dialect.
    split = request_headers(
        [
            (b"openai-organization", b"org-victim"),
            (b"openai-project", b"proj-victim"),
            (b"anthropic-workspace-id", b"wrkspc_victim"),
            (b"anthropic-user-profile-id", b"uprof_victim"),
            (b"openai-beta", b"assistants=v2"),
            (b"anthropic-version", b"2023-06-01"),
        ],
        b"x-user",
        b"x-api-key",
    )
    assert split.forward == [
        (b"openai-beta", b"assistants=v2"),
        (b"anthropic-version", b"2023-06-01"),
    ]


def test_request_headers_drop_cookies_keys_and_what_a_router_reads() -> None:
    # A router between the gateway and the provider reads these as whose call
    # it is (LiteLLM reads x-litellm-end-user-id before the body's user), which
    # stored key, provider or host the operator's key goes to, its budget, tags
    # and retries; a browser's cookies are the frontend's. None go upstream,
    # and nothing a real client sends is lost with them.
    kept = [
        (b"content-type", b"application/json"),
        (b"accept", b"application/json"),
        (b"user-agent", b"OpenAI/Python 3.57.0"),
        (b"openai-beta", b"assistants=v2"),
        (b"anthropic-version", b"2023-06-01"),
        (b"anthropic-beta", b"prompt-caching-2024-07-31"),
        (b"x-stainless-lang", b"python"),
        (b"x-stainless-retry-count", b"0"),
        (b"x-trace-id", b"t-1"),
    ]
    dropped = [
        (b"cookie", b"chat_session=s3cr3t"),
        (b"x-litellm-end-user-id", b"alice"),
        (b"x-litellm-customer-id", b"alice"),
        (b"x-litellm-tags", b"premium-deployment"),
        (b"x-litellm-spend-logs-metadata", b"{}"),
        (b"x-litellm-num-retries", b"50"),
        (b"x-litellm-timeout", b"3600"),
        (b"x-litellm-api-key", b"sk-other"),
        (b"x-portkey-virtual-key", b"operators-other-key"),
        (b"x-portkey-provider", b"openai"),
        (b"x-portkey-config", b"pc-operator"),
        (b"x-portkey-custom-host", b"https://attacker.example"),
        (b"helicone-user-id", b"alice"),
        (b"helicone-target-url", b"https://attacker.example"),
        (b"helicone-ratelimit-policy", b"1000000;w=60"),
        (b"cf-aig-custom-cost", b'{"total_cost":0}'),
        (b"cf-aig-collect-log", b"false"),
        (b"cf-aig-skip-cache", b"true"),
        # Keys in the headers other APIs take them in (LiteLLM reads Azure's
        # api-key before x-api-key, and behind an Anthropic upstream the
        # operator's key is in x-api-key, with no Authorization).
        (b"api-key", b"sk-other"),
        (b"x-goog-api-key", b"other"),
        (b"ocp-apim-subscription-key", b"other"),
    ]
    split = request_headers([*dropped[:9], *kept, *dropped[9:]], b"x-user", b"x-api-key")
    assert split.forward == kept
    # Where the dialect takes no key in x-api-key (OpenAI's, Dify's), a client's
    # is dropped as well.
    split = request_headers([*kept, (b"x-api-key", b"sk-other"), *dropped], b"x-user")
    assert split.forward == kept and split.api_key is None


@pytest.mark.parametrize(
    ("keys", "body", "expected"),
    [
        (["sk-operator-key"], b'{"m": "bad key sk-operator-key."}', b'{"m": "bad key ***."}'),
        (["sk-operator-key"], b"sk-operator-keysk-operator-key", b"******"),
        (["sk-operator-key"], b"no key here", b"no key here"),
        # Both of two keys, the longer first where one begins the other.
        (
            ["sk-operator", "sk-operator-key-2"],
            b"sk-operator-key-2 sk-operator",
            b"*** ***",
        ),
        # A key too short to be one is left alone: it would mask words.
        (["EMPTY", "test"], b"EMPTY test", b"EMPTY test"),
        ([], b"anything", b"anything"),
    ],
)
def test_key_mask_whole(keys: list[str], body: bytes, expected: bytes) -> None:
    assert KeyMask(keys).whole(body) == expected


def test_key_mask_finds_a_key_split_between_chunks_wherever_it_is_cut() -> None:
    key = "app-upstream-secret"
    body = b'{"error": "budget exceeded for app-upstream-secret; app-upstream-secret"}'
    expected = KeyMask([key]).whole(body)
    assert key.encode() not in expected
    for first in range(len(body) + 1):
        for second in range(first, len(body) + 1):
            mask = KeyMask([key])
            chunks = [body[:first], body[first:second], body[second:]]
            passed = b"".join(mask.feed(chunk) for chunk in chunks) + mask.end()
            assert passed == expected, (first, second)


def test_key_mask_masks_a_key_that_begins_another_in_its_place_wherever_it_is_cut() -> None:
    # review5 R5-4: a chunk ending right after the shorter key (the longer's
    # prefix) had the shorter masked and the longer's rest passed in the clear.
    short, long = "sk-operator-shared", "sk-operator-shared-backup-7f3a9c"
    body = f'{{"error": "invalid key {long}, or {short}"}}'.encode()
    expected = KeyMask([short, long]).whole(body)
    assert expected == b'{"error": "invalid key ***, or ***"}'
    for cut in range(len(body) + 1):
        mask = KeyMask([short, long])
        passed = mask.feed(body[:cut]) + mask.feed(body[cut:]) + mask.end()
        assert passed == expected, cut


@pytest.mark.parametrize(
    "quoted",
    [
        "q3\\u002BVx9/Lm2Kp8\\u002bRt4/Wz6Ys1",  # .NET: '+' as \u002B
        "q3+Vx9\\/Lm2Kp8+Rt4\\/Wz6Ys1",  # PHP: '/' as \/
        "q3\\u002BVx9\\/Lm2Kp8+Rt4\\u002fWz6Ys1",  # any mix
    ],
)
def test_key_mask_masks_a_key_quoted_json_escaped(quoted: str) -> None:
    # review5 R5-5: the escaped bytes did not match, and the client's JSON
    # parser gave the key back whole.
    key = "q3+Vx9/Lm2Kp8+Rt4/Wz6Ys1"
    body = b'{"error": {"message": "Invalid API key: ' + quoted.encode() + b'"}}'
    assert key in orjson.loads(body)["error"]["message"]
    assert orjson.loads(KeyMask([key]).whole(body)) == {
        "error": {"message": "Invalid API key: ***"}
    }
    for cut in range(len(body) + 1):
        mask = KeyMask([key])
        passed = mask.feed(body[:cut]) + mask.feed(body[cut:]) + mask.end()
        assert passed == KeyMask([key]).whole(body), cut


def test_a_key_mask_with_no_key_is_false_and_passes_chunks_as_they_are() -> None:
    mask = KeyMask(["short"])
    assert not mask
    assert mask.feed(b"short") == b"short" and mask.end() == b""
    assert KeyMask(["long-enough"])


@pytest.mark.parametrize(
    "raw",
    [
        [(b"content-type", b"a/b"), (b"content-type", b"c/d")],
        [(b"content-length", b"twelve")],
    ],
)
def test_request_headers_refuse_ambiguity(raw: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(BadRequest):
        request_headers(raw, b"x-user")


def _caused(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (httpx.ConnectTimeout("t"), "connect"),
        (httpx.PoolTimeout("t"), "connect"),
        (httpx.ReadTimeout("t"), "read"),
        (TimeoutError(), "read"),
        (httpx.ConnectError("refused"), None),
        (httpx.RemoteProtocolError("broken"), None),
        # httpx-aiohttp reports every aiohttp connection error as ConnectTimeout.
        (_caused(httpx.ConnectTimeout("t"), aiohttp.ClientConnectionError("refused")), None),
        (_caused(httpx.ConnectTimeout("t"), aiohttp.ServerTimeoutError("slow")), "read"),
        (_caused(httpx.ConnectTimeout("t"), aiohttp.ConnectionTimeoutError("slow")), "connect"),
    ],
)
def test_timeout_phase(exc: BaseException, expected: str | None) -> None:
    assert timeout_phase(exc) == expected


def _dropping_usage() -> DropEvents:
    return DropEvents(lambda event: b'"usage"' in event)


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b"data: a\n\ndata: b\n\n"], b"data: a\n\ndata: b\n\n"),
        ([b'data: a\n\ndata: {"usage":1}\n\ndata: [DONE]\n\n'], b"data: a\n\ndata: [DONE]\n\n"),
        ([b'data: {"us', b'age":1}\n', b"\ndata: b\r\n\r\n"], b"data: b\r\n\r\n"),
        ([b"data: a\r\r", b'data: {"usage":1}\r\r'], b"data: a\r\r"),
        ([b": ping\n\ndata: a"], b": ping\n\ndata: a"),  # the incomplete rest, at the end
        ([b'data: {"usage":1}'], b""),
        # CRLF is one line ending: a two-line event is dropped whole, not line by line.
        ([b'data: a\r\ndata: {"usage":1}\r\n\r\ndata: b\r\n\r\n'], b"data: b\r\n\r\n"),
        # A CR at the end of a chunk may be half of a CRLF.
        ([b"data: a\r", b"\n\r\n", b'data: {"usage":1}\r', b"\n\r\n"], b"data: a\r\n\r\n"),
    ],
)
def test_drop_events(chunks: list[bytes], expected: bytes) -> None:
    transform = _dropping_usage()
    out = b"".join(transform.feed(chunk) for chunk in chunks) + transform.flush()
    assert out == expected


def test_drop_events_passes_a_run_with_nothing_to_drop_as_it_is() -> None:
    transform = DropEvents(
        lambda event: b'"usage"' in event,
        marks=lambda run: [m.start() for m in re.finditer(rb'"usage"', run)],
    )
    chunk = b"data: a\n\ndata: b\n\n"
    assert transform.feed(chunk) is chunk
    assert transform.feed(b'data: {"usage":1}\n\ndata: c\n\n') == b"data: c\n\n"


def test_a_path_quote_would_not_change_is_returned_as_it_is() -> None:
    """`canonical_path` skips ``quote`` for a path it would return unchanged
    (issue 24): random paths of every kind of character, against ``quote``
    itself."""
    rng = random.Random(24)
    alphabet = string.printable + "äé€😀\u00a0\u2028" + "/" * 20
    as_is = 0
    for _ in range(5000):
        path = "/" + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        try:
            got = canonical_path(path)
        except BadRequest:
            continue
        assert got == quote(path, safe=_PATH_SAFE), path
        as_is += got == path
    assert as_is > 100


@pytest.mark.parametrize(
    "key", ['local"pass-123', "local\\pass-123", "cl\u00e9-secr\u00e8te-1", "emoji-\U0001f600-key"]
)
def test_key_mask_masks_a_key_with_json_short_escapes_or_non_ascii_escaped(key: str) -> None:
    """Review 6, R6-5: JSON's two-character escapes (every encoder writes \\" and
    \\\\) and \\uXXXX for a non-ASCII character (ensure_ascii; a surrogate pair
    past the BMP) were not found."""
    message = {"error": {"message": "bad key " + key}}
    for quoted in (
        orjson.dumps(message),
        json.dumps(message).encode(),
        re.sub(
            r"\\u[0-9a-f]{4}", lambda m: "\\u" + m.group()[2:].upper(), json.dumps(message)
        ).encode(),
    ):
        masked = KeyMask([key]).whole(quoted)
        assert orjson.loads(masked)["error"]["message"] == "bad key ***", masked
        mask = KeyMask([key])
        fed = b"".join(mask.feed(quoted[i : i + 3]) for i in range(0, len(quoted), 3)) + mask.end()
        assert fed == masked


def test_key_mask_reads_a_body_of_near_misses_in_linear_time() -> None:
    """Review 7, R7-3: a backslash's raw spelling was the start of its escaped
    one (``\\\\``), so a key of backslashes against a body just short of it was
    tried in every split: Fibonacci(n) - 40 took 6 s, 60 would outlast the
    suite's timeout, the event loop blocked all along. Now the key as it is and
    its JSON-escaped form are two alternatives."""
    key = "\\" * 60
    mask = KeyMask([key])
    assert mask.whole(b"\\" * 59 + b"x") == b"\\" * 59 + b"x"
    assert mask.whole(b"<" + b"\\" * 60 + b">") == b"<***>"
    assert b"\\" not in mask.whole(b"<" + b"\\\\" * 60 + b">")  # JSON-escaped


@pytest.mark.parametrize(
    "key",
    ["sk-[abc]\\def-ghij", "sk-\x00\x01\x7f-abcdefgh", "sk-\U0001f600-abcdef", "sk-(?:x)|.*+?{}^$"],
)
def test_key_mask_masks_keys_of_any_character(key: str) -> None:
    """Review 7: regex metacharacters, controls and astral characters, as they
    are and JSON-escaped."""
    mask = KeyMask([key])
    for spelled in (json.dumps(key), json.dumps(key, ensure_ascii=False)):
        assert mask.whole(spelled.encode()) == b'"***"'
    assert mask.whole(key.encode()) == b"***"


def test_request_headers_drop_what_a_router_reads_spelled_with_underscores() -> None:
    # A server that reads headers as CGI variables (WSGI's environ, PHP, a
    # proxy normalising names) takes x_litellm_end_user_id for
    # x-litellm-end-user-id: HTTP_X_LITELLM_END_USER_ID either way. Each name
    # the gateway drops is dropped in that spelling too; other underscores pass.
    kept = [
        (b"content-type", b"application/json"),
        (b"x_trace_id", b"t-1"),
        (b"x_custom_flag", b"1"),
    ]
    dropped = [
        (b"x_litellm_end_user_id", b"alice"),
        (b"x-litellm_api_key", b"sk-other"),
        (b"x_portkey_custom_host", b"https://attacker.example"),
        (b"helicone_target_url", b"https://attacker.example"),
        (b"cf_aig_custom_cost", b'{"total_cost":0}'),
        (b"openai_organization", b"org-other"),
        (b"anthropic_workspace_id", b"wrkspc-other"),
        (b"x_api_key", b"sk-other"),
        (b"api_key", b"sk-other"),
        (b"x_request_id", b"someone-elses-answer"),
        (b"x_user", b"bob"),  # the trusted user header, which the gateway reads
        (b"content_type", b"text/plain"),
        (b"transfer_encoding", b"chunked"),
    ]
    split = request_headers([*dropped[:5], *kept, *dropped[5:]], b"x-user", b"x-api-key")
    assert split.forward == kept
    assert split.user_header is None and split.api_key is None


def test_request_headers_drop_what_a_router_reads_spelled_with_dots() -> None:
    # A server that makes every character but a letter or a digit "_" in its
    # CGI variables (lighttpd) takes x.litellm.end.user.id for
    # x-litellm-end-user-id too: dropped as the underscore spelling is, while
    # a name the gateway does not drop passes in any spelling.
    kept = [(b"x.trace.id", b"t-1"), (b"x-custom.flag", b"1")]
    dropped = [
        (b"x.litellm.end.user.id", b"alice"),
        (b"x-portkey.custom-host", b"https://attacker.example"),
        (b"helicone.target.url", b"https://attacker.example"),
        (b"openai.organization", b"org-other"),
        (b"x.api.key", b"sk-other"),
        (b"x.user", b"bob"),
        (b"x~request~id", b"someone-elses-answer"),
    ]
    split = request_headers([*dropped, *kept], b"x-user", b"x-api-key")
    assert split.forward == kept
    assert split.user_header is None and split.api_key is None
