"""The refusal-message catalogue (gateway/messages.py): tables of languages,
templates, formats and configuration errors - pure, no I/O."""

from __future__ import annotations

import ast
import string
import tomllib
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gateway.auth import _jwt_errors
from gateway.config import parse_config, render_config
from gateway.errors import ConfigError, Forbidden, GatewayError, QuotaExceeded
from gateway.messages import (
    ALIASES,
    ENTRIES,
    LANGUAGES,
    Catalogue,
    choose_language,
    english,
    recognise,
)
from gateway.quota.plans import LIMIT_CODES

ROOT = Path(__file__).resolve().parent.parent
HCM = ZoneInfo("Asia/Ho_Chi_Minh")
MIDNIGHT = datetime(2026, 12, 7, 0, 0, tzinfo=HCM)


# --- Accept-Language (RFC 9110 12.5.4) ------------------------------------------------


@pytest.mark.parametrize(
    ("header", "default", "expected"),
    [
        (None, "en", "en"),
        ("", "en", "en"),
        ("", "vi", "vi"),
        ("vi", "en", "vi"),
        ("VI", "en", "vi"),
        ("vi-VN", "en", "vi"),  # a more specific tag: RFC 4647 lookup truncates it
        ("vi-Latn-VN", "en", "vi"),
        ("en-US", "vi", "en"),
        ("fr", "en", "en"),  # nothing the gateway has: the default
        ("fr", "vi", "vi"),
        ("fr, vi;q=0.1", "en", "vi"),  # anything acceptable beats the default
        ("en, vi", "vi", "en"),  # equal weights: the one named first
        ("vi, en", "en", "vi"),
        ("en;q=0.5, vi", "en", "vi"),  # weights decide, not order
        ("vi-VN,vi;q=0.9,en-US;q=0.8,en;q=0.7", "en", "vi"),  # a Vietnamese browser
        ("en-US,en;q=0.9,vi;q=0.8", "vi", "en"),
        ("*", "vi", "vi"),  # any language: the default is one
        ("*", "en", "en"),
        ("fr, *;q=0.5", "vi", "vi"),
        ("en;q=0, *", "en", "vi"),  # "anything but English"
        ("vi;q=0", "vi", "vi"),  # nothing acceptable left: the default anyway
        ("vi;q=0, en;q=0", "vi", "vi"),
        ("vi-VN;q=0.2, vi;q=0.8, en;q=0.5", "en", "vi"),  # the exact range wins for vi
        ("vi;q=0.2, vi-VN;q=0.9, en;q=0.5", "en", "en"),  # ... also when it is lower
        ("vi;q=1.0", "en", "vi"),
        ("vi;q=0.001, en;q=0", "en", "vi"),
        ("vi;q=2, en;q=0.5", "vi", "en"),  # a malformed weight drops its element
        ("vi;q=abc", "en", "en"),
        ("vi;q=nan", "en", "en"),
        ("vi;q=0.0001", "en", "en"),  # at most three decimals
        ("vi ; q = 0.5 , en ; q = 0.4", "en", "vi"),  # whitespace around ; and =
        ("vi;level=1", "en", "vi"),  # unknown parameters are ignored
        ("vi_VN", "en", "en"),  # not a language range
        ("v!", "en", "en"),
        (",,vi,,", "en", "vi"),  # empty list elements (RFC 9110 5.6.1)
        ("vie", "en", "en"),  # another language, not vi
        ("envi", "vi", "vi"),
    ],
)
def test_accept_language(header: str | None, default: str, expected: str) -> None:
    assert choose_language(header, default) == expected


def test_several_accept_language_lines_are_one_list() -> None:
    catalogue = Catalogue("en")
    headers = [(b"accept-language", b"fr"), (b"accept-language", b"vi;q=0.5")]
    assert catalogue.language(headers) == "vi"
    assert catalogue.language([(b"x-other", b"vi")]) == "en"
    assert Catalogue("vi").language([]) == "vi"


# --- the catalogue itself -----------------------------------------------------------


def _names(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


@pytest.mark.parametrize("code", list(ENTRIES))
def test_every_message_has_every_language_with_only_its_fields(code: str) -> None:
    entry = ENTRIES[code]
    for language in LANGUAGES:
        template = getattr(entry, language)
        assert template and _names(template) <= entry.fields, (code, language)
    # Vietnamese is written out, not copied from the English.
    assert entry.vi != entry.en
    # The number the refusal is about is in both (the model, the tool, the limit...).
    assert _names(entry.vi) == _names(entry.en), code


def test_every_limit_has_both_its_messages() -> None:
    # A limit added to plans.LIMIT_CODES needs its messages here, or its refusal
    # could not be written.
    for code in LIMIT_CODES.values():
        assert ENTRIES[code].code == ENTRIES[f"{code}_own"].code == code
        assert {"limit"} <= ENTRIES[code].fields == ENTRIES[f"{code}_own"].fields


def test_every_alias_names_a_message() -> None:
    assert set(ALIASES.values()) <= set(ENTRIES)
    assert not set(ALIASES) & set(ENTRIES)


@pytest.mark.parametrize("code", list(ENTRIES))
def test_every_english_text_is_recognised_as_its_own_message(code: str) -> None:
    entry = ENTRIES[code]
    sample = {name: f"<{name}>" for name in entry.fields}
    text = entry.en.format_map(sample)
    found = recognise(text)
    assert found is not None
    same_text = [c for c, e in ENTRIES.items() if e.en == entry.en]
    assert found[0] == same_text[0]  # the "own" twin of a text that names no plan
    if found[0] == code:
        assert found[1] == {name: f"<{name}>" for name in _names(entry.en)}


# The modules whose refusals reach a client through the proxy's one error renderer.
_PROXY_PATH = [
    "proxy.py",
    "routing.py",
    "bodies.py",
    "auth.py",
    "http.py",
    "upstream_client.py",
    "admission.py",
    "upstreams",
]
_ERRORS = {
    name
    for name, value in vars(__import__("gateway.errors", fromlist=["x"])).items()
    if isinstance(value, type) and issubclass(value, GatewayError)
}


def _raised_texts() -> list[tuple[str, str]]:
    """Every English message a GatewayError is built with, literally, on the
    proxy path (formatted values replaced by a sample)."""
    found = []
    files: list[Path] = []
    for name in _PROXY_PATH:
        path = ROOT / "gateway" / name
        files += sorted(path.glob("*.py")) if path.is_dir() else [path]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if called not in _ERRORS:
                continue
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                text = arg.value
            elif isinstance(arg, ast.JoinedStr):
                text = "".join(
                    str(part.value) if isinstance(part, ast.Constant) else "x1"
                    for part in arg.values
                )
            else:
                continue  # built elsewhere (admission names its messages)
            found.append((f"{path.name}:{node.lineno}", text))
    return found


def test_every_refusal_on_the_proxy_path_is_in_the_catalogue() -> None:
    texts = _raised_texts()
    assert len(texts) > 40  # the scan found the raise sites
    texts += [("auth.py:_jwt_errors", message) for _, message in _jwt_errors()]
    # The OpenAI dialect names the model, or says there is none, in a variable.
    for named in ("The model 'o3-pro'", "A request without a model"):
        texts += [(w, t.replace("x1 has no price", f"{named} has no price")) for w, t in texts]
    texts = [(w, t) for w, t in texts if not t.startswith("x1 has no price")]
    missing = [(where, text) for where, text in texts if recognise(text) is None]
    assert not missing, f"refusals without a catalogue entry: {missing}"


# --- rendering ------------------------------------------------------------------------


def quota(code: str, **fields: object) -> QuotaExceeded:
    return QuotaExceeded(english(code, **fields), code="x", key=code, fields=fields)


@pytest.mark.parametrize(
    ("code", "fields", "language", "expected"),
    [
        (
            "daily_query_limit",
            {"limit": 50, "used": 50, "reset": MIDNIGHT},
            "en",
            "You have used all 50 questions of your plan for today. "
            "It resets at 2026-12-07 00:00 +07.",
        ),
        (
            "daily_query_limit",
            {"limit": 50, "used": 50, "reset": MIDNIGHT},
            "vi",
            "Bạn đã dùng hết 50 câu hỏi hôm nay theo gói của bạn. "
            "Hạn mức sẽ được đặt lại lúc 00:00 ngày 7/12.",
        ),
        (
            "daily_query_limit_own",
            {"limit": 5, "used": 5, "reset": MIDNIGHT},
            "en",
            "You have reached your limit of 5 questions for today. "
            "It resets at 2026-12-07 00:00 +07.",
        ),
        (
            "daily_query_limit_own",
            {"limit": 5, "used": 5, "reset": MIDNIGHT},
            "vi",
            "Bạn đã dùng hết 5 câu hỏi hôm nay theo hạn mức của bạn. "
            "Hạn mức sẽ được đặt lại lúc 00:00 ngày 7/12.",
        ),
        (
            "monthly_token_limit",
            {"limit": 2_000_000, "used": 2_001_234, "reset": datetime(2027, 1, 1, tzinfo=HCM)},
            "vi",
            "Bạn đã dùng hết 2.000.000 token tháng này theo gói của bạn. "
            "Hạn mức sẽ được đặt lại lúc 00:00 ngày 1/1.",
        ),
        (
            "monthly_token_limit",
            {"limit": 2_000_000, "used": 2_001_234, "reset": datetime(2027, 1, 1, tzinfo=HCM)},
            "en",
            "You have used all 2000000 tokens of your plan for this month. "
            "It resets at 2027-01-01 00:00 +07.",
        ),
        (
            "web_search_limit",
            {"limit": 3, "used": 3, "reset": datetime(2026, 12, 6, 17, tzinfo=UTC)},
            "en",
            "You have used all 3 web searches of your plan for today. "
            "They reset at 2026-12-06 17:00 UTC.",
        ),
        (
            "concurrent_stream_limit_own",
            {"limit": 2},
            "vi",
            "Bạn đang có 2 câu trả lời chưa hoàn tất. "
            "Vui lòng đợi một câu trả lời xong rồi thử lại.",
        ),
    ],
)
def test_limit_messages(code: str, fields: dict[str, object], language: str, expected: str) -> None:
    assert Catalogue().render(quota(code, **fields), language) == (expected, language)


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        ("Invalid gateway key.", "Khóa gateway không hợp lệ."),
        (
            "The request body exceeds the limit of 1048576 bytes.",
            "Nội dung yêu cầu vượt quá giới hạn 1.048.576 byte.",
        ),
        (
            "The file is larger than your plan allows (0.5 MB).",
            "Tệp vượt quá dung lượng gói của bạn cho phép (0,5 MB).",
        ),
        (
            "The model 'o3-pro' has no price on this gateway, so its use cannot be charged.",
            "Mô hình 'o3-pro' chưa được định giá trên gateway này nên không thể tính phí.",
        ),
        (
            "The tool 'web_search' has no price on this gateway "
            '([call_prices."openai.web_search"]), so it is not available.',
            "Công cụ 'web_search' chưa được định giá trên gateway này "
            '([call_prices."openai.web_search"]) nên không dùng được.',
        ),
        (
            "Invalid type for 'stream': expected a boolean, but got a string instead.",
            "Kiểu của 'stream' không hợp lệ: cần giá trị boolean nhưng nhận được một chuỗi.",
        ),
        ("Missing X-Gateway-User header naming the end user.", None),
        ("No object found with id 'resp_123456'.", "Không tìm thấy đối tượng có id 'resp_123456'."),
    ],
)
def test_refusals_raised_in_english_are_sent_in_vietnamese(
    raised: str, expected: str | None
) -> None:
    message, language = Catalogue().render(GatewayError(raised), "vi")
    assert language == "vi"
    if expected is not None:
        assert message == expected
    assert Catalogue().render(GatewayError(raised), "en") == (raised, "en")


def test_a_message_outside_the_catalogue_is_sent_as_raised_and_said_to_be_english() -> None:
    assert Catalogue().render(GatewayError("Something new."), "vi") == ("Something new.", "en")


def test_a_raise_site_missing_a_field_gets_its_english_message_not_a_crash(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = QuotaExceeded("You are out.", key="daily_query_limit", fields={})
    assert Catalogue().render(broken, "vi") == ("You are out.", "en")
    assert "cannot render" in caplog.text


def test_reset_placeholders_and_decimal_money() -> None:
    templates = {
        "vi": {"daily_query_limit": "{limit}|{used}|{remaining}|{reset_time}|{reset_date}"},
        "en": {"daily_query_limit": "{limit}|{used}|{remaining}|{reset_time}|{reset_date}"},
    }
    catalogue = Catalogue("en", templates)
    refusal = quota("daily_query_limit", limit=12000, used=9000, reset=MIDNIGHT)
    assert catalogue.render(refusal, "vi")[0] == "12.000|9.000|3.000|00:00|7/12"
    assert catalogue.render(refusal, "en")[0] == "12000|9000|3000|00:00|7 Dec"
    money = Forbidden("x", key="file_too_large", fields={"limit": Decimal("1234.50")})
    assert Catalogue().render(money, "vi")[0].endswith("(1.234,50 MB).")
    assert Catalogue().render(money, "en")[0].endswith("(1234.50 MB).")


def test_operator_templates_replace_only_their_own_language_and_message() -> None:
    catalogue = Catalogue("en", {"vi": {"daily_query_limit": "Hết {limit} câu hỏi."}})
    refusal = quota("daily_query_limit", limit=3, used=3, reset=MIDNIGHT)
    assert catalogue.render(refusal, "vi") == ("Hết 3 câu hỏi.", "vi")
    assert catalogue.render(refusal, "en")[0].startswith("You have used all 3 questions")
    own = quota("daily_query_limit_own", limit=3, used=3, reset=MIDNIGHT)
    assert catalogue.render(own, "vi")[0].startswith("Bạn đã dùng hết 3 câu hỏi")


# --- configuration ----------------------------------------------------------------------


def test_templates_load_by_code_or_by_limit_name() -> None:
    config = parse_config(
        {
            "messages": {
                "default_language": "vi",
                "vi": {
                    "queries_per_day": "Bạn đã dùng hết {limit} câu hỏi hôm nay. "
                    "Hạn mức được đặt lại {reset}.",
                    "daily_token_limit_own": "Hết {limit} token.",
                },
                "en": {"invalid_key": "Sign in again."},
            }
        },
        env={},
    )
    messages = config.messages
    assert messages.default_language == "vi"
    assert dict(messages.templates["vi"]) == {
        "daily_query_limit": "Bạn đã dùng hết {limit} câu hỏi hôm nay. "
        "Hạn mức được đặt lại {reset}.",
        "daily_token_limit_own": "Hết {limit} token.",
    }
    assert dict(messages.templates["en"]) == {"invalid_key": "Sign in again."}
    assert parse_config({}, env={}).messages.default_language == "en"


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ({"default_language": "fr"}, "messages.default_language: expected one of 'en', 'vi'"),
        ({"fr": {"invalid_key": "x"}}, "messages.fr: unknown language"),
        ({"vi": {"queries_per_dya": "x"}}, "messages.vi.queries_per_dya: unknown message code"),
        (
            {"vi": {"queries_per_day": "Hết {limt} câu."}},
            "messages.vi.queries_per_day: unknown placeholder {limt}",
        ),
        (
            {"en": {"invalid_key": "Bad key {limit}."}},
            "messages.en.invalid_key: unknown placeholder {limit} (this message has: none)",
        ),
        ({"vi": {"queries_per_day": "Hết {0} câu."}}, "messages.vi.queries_per_day: placeholder"),
        ({"vi": {"queries_per_day": "Hết {} câu."}}, "messages.vi.queries_per_day: placeholder"),
        (
            {"vi": {"queries_per_day": "{limit.__class__}"}},
            "messages.vi.queries_per_day: placeholder",
        ),
        ({"vi": {"queries_per_day": "{limit:>9}"}}, "messages.vi.queries_per_day: placeholder"),
        ({"vi": {"queries_per_day": "{limit!r}"}}, "messages.vi.queries_per_day: placeholder"),
        ({"vi": {"queries_per_day": "Hết {limit"}}, "messages.vi.queries_per_day: "),
        ({"vi": {"queries_per_day": 5}}, "messages.vi.queries_per_day: expected a string"),
        (
            {"vi": {"queries_per_day": "a", "daily_query_limit": "b"}},
            "messages.vi.daily_query_limit: the same message as messages.vi.queries_per_day",
        ),
        ({"queries_per_day": "x"}, "messages.queries_per_day: unknown key"),
        ([], "messages: expected a table"),
    ],
)
def test_an_unusable_template_is_refused_at_load_naming_its_key(
    messages: object, error: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"messages": messages}, env={})
    assert error in info.value.message
    assert "\n" not in info.value.message


def test_every_message_code_and_placeholder_is_documented() -> None:
    docs = (ROOT / "docs" / "quotas.md").read_text()
    missing = [code for code in ENTRIES if f"`{code}`" not in docs]
    assert not missing, f"message codes missing from docs/quotas.md: {missing}"
    fields = set().union(*(entry.fields for entry in ENTRIES.values()))
    assert not [name for name in fields if f"`{{{name}}}`" not in docs]


def test_check_config_shows_the_templates_as_toml_that_loads_again() -> None:
    templates = {"invalid_key": 'Dòng 1\nDòng "2" \\ {{không phải placeholder}}'}
    config = parse_config({"messages": {"default_language": "vi", "vi": templates}}, env={})
    shown = render_config(config)
    again = tomllib.loads(shown[shown.index("[messages]") :])["messages"]
    assert again == {"default_language": "vi", "vi": templates}
