"""Refusal messages in the user's language: one catalogue, chosen by Accept-Language.

Every refusal the gateway itself makes has a message code here (the error
``code`` it is sent with, or a finer name where several messages share a code)
and a template per language with named fields (``{limit}``, ``{reset}``, ...).
The error code, status and headers of a refusal never depend on the language:
only its ``message`` does (docs/quotas.md, "Refusal messages").

- A raise site names its message with ``key=`` and ``fields=`` on the
  `GatewayError` (admission does, for the limits: the reset time is a datetime
  formatted per language, and a limit a per-user override set says "your
  limit", not "your plan"). A refusal raised without a key is recognised by its
  English text, which is the built-in English template: so the raise sites
  elsewhere keep their plain English strings, and a test checks that every one
  of them is in the catalogue.
- `Catalogue` is built once per configuration load: the built-in templates with
  the operator's ``[messages.LANG]`` templates (validated at load by
  `check_templates`) over them. Nothing here runs for a request that is not
  refused.
- `choose_language` picks the language from Accept-Language (RFC 9110 12.5.4).
"""

from __future__ import annotations

import difflib
import logging
import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Final

from gateway.errors import GatewayError

__all__ = [
    "ALIASES",
    "ENTRIES",
    "LANGUAGES",
    "Catalogue",
    "check_templates",
    "choose_language",
    "english",
    "recognise",
]

log = logging.getLogger("gateway.messages")

# The languages with a built-in template for every message; `[messages.LANG]`
# may replace templates in these, not add languages.
LANGUAGES: Final = ("en", "vi")

# Fields that are numbers: written per language (vi: 200.000, 0,5).
_NUMERIC: Final = frozenset({"limit", "used", "remaining", "seconds", "max_count", "max_bytes"})
# Fields derived from ``reset`` (a datetime, already in accounting.timezone).
_RESET: Final = ("reset", "reset_time", "reset_date")
_LIMIT_FIELDS: Final = ("limit", "used", "remaining", *_RESET)


@dataclass(frozen=True, slots=True)
class Entry:
    code: str  # the error code the message is sent with
    en: str
    vi: str
    fields: frozenset[str]  # the placeholders a template may use


def _placeholders(template: str) -> list[str]:
    """The field names of ``template``; ValueError for anything but ``{name}``."""
    names = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(
                f"placeholder {{{name}}} is not a name (write {{limit}}, not {{0}} or {{}})"
            )
        if spec or conversion:
            raise ValueError(f"placeholder {{{name}}} takes no format or conversion")
        names.append(name)
    return names


def _e(code: str, en: str, vi: str, *, extra: Iterable[str] = ()) -> Entry:
    return Entry(code, en, vi, frozenset(_placeholders(en)) | frozenset(extra))


_LIMIT_EN = "You have used all {limit} {what} of your plan for {period}. {it} {reset}."
_OWN_EN = "You have reached your limit of {limit} {what} for {period}. {it} {reset}."
_PLAN_VI = (
    "Bạn đã dùng hết {limit} {what} {period} theo gói của bạn. Hạn mức sẽ được đặt lại {reset}."
)
_OWN_VI = (
    "Bạn đã dùng hết {limit} {what} {period} theo hạn mức của bạn. Hạn mức sẽ được đặt lại {reset}."
)


def _limit(
    code: str, what_en: str, period_en: str, what_vi: str, period_vi: str, *, it: str = "It resets"
) -> dict[str, Entry]:
    """A limit's refusal, in its two forms: the plan's limit, and the user's own
    (a per-user override): "your limit" rather than "your plan"."""

    def fill(template: str, what: str, period: str) -> str:
        return template.replace("{what}", what).replace("{period}", period).replace("{it}", it)

    return {
        code: _e(
            code,
            fill(_LIMIT_EN, what_en, period_en),
            fill(_PLAN_VI, what_vi, period_vi),
            extra=_LIMIT_FIELDS,
        ),
        f"{code}_own": _e(
            code,
            fill(_OWN_EN, what_en, period_en),
            fill(_OWN_VI, what_vi, period_vi),
            extra=_LIMIT_FIELDS,
        ),
    }


_RATE_FIELDS: Final = (*_LIMIT_FIELDS, "seconds")


def _rate(code: str, what_en: str, what_vi: str) -> dict[str, Entry]:
    """A rate's refusal (a sliding minute): when it frees up is seconds away."""
    return {
        code: _e(
            code,
            f"You have reached your plan's limit of {{limit}} {what_en} a minute. "
            "Try again in {seconds} seconds.",
            f"Bạn đã dùng hết {{limit}} {what_vi} mỗi phút theo gói của bạn. "
            "Vui lòng thử lại sau {seconds} giây.",
            extra=_RATE_FIELDS,
        ),
        f"{code}_own": _e(
            code,
            f"You have reached your limit of {{limit}} {what_en} a minute. "
            "Try again in {seconds} seconds.",
            f"Bạn đã dùng hết {{limit}} {what_vi} mỗi phút theo hạn mức của bạn. "
            "Vui lòng thử lại sau {seconds} giây.",
            extra=_RATE_FIELDS,
        ),
    }


def _budget(code: str, period_en: str, period_vi: str) -> dict[str, Entry]:
    """A money budget's refusal ({limit} is an exact decimal amount)."""
    return {
        code: _e(
            code,
            f"You have used all {{limit}} of your plan's budget for {period_en}. It resets {{reset}}.",
            f"Bạn đã dùng hết ngân sách {{limit}} {period_vi} theo gói của bạn. "
            "Hạn mức sẽ được đặt lại {reset}.",
            extra=_LIMIT_FIELDS,
        ),
        f"{code}_own": _e(
            code,
            f"You have reached your budget of {{limit}} for {period_en}. It resets {{reset}}.",
            f"Bạn đã dùng hết ngân sách {{limit}} {period_vi} theo hạn mức của bạn. "
            "Hạn mức sẽ được đặt lại {reset}.",
            extra=_LIMIT_FIELDS,
        ),
    }


_STREAMS_EN = "You already have {limit} answers in progress. Wait for one to finish and try again."
_STREAMS_VI = (
    "Bạn đang có {limit} câu trả lời chưa hoàn tất. Vui lòng đợi một câu trả lời xong rồi thử lại."
)

# Message code -> entry. The English templates are the texts the gateway has
# always sent (tests pin several); keep them when editing.
ENTRIES: Final[Mapping[str, Entry]] = {
    # --- limits (429), raised by admission with structured fields ---
    **_limit("daily_query_limit", "questions", "today", "câu hỏi", "hôm nay"),
    **_limit("daily_token_limit", "tokens", "today", "token", "hôm nay"),
    **_limit("monthly_token_limit", "tokens", "this month", "token", "tháng này"),
    **_limit(
        "web_search_limit", "web searches", "today", "lượt tìm kiếm web", "hôm nay", it="They reset"
    ),
    **_rate("request_rate_limit", "requests", "yêu cầu"),
    **_rate("token_rate_limit", "tokens", "token"),
    **_budget("daily_cost_limit", "today", "hôm nay"),
    # A [[plans.NAME.limits]] entry: {what} is its meter ("input tokens"),
    # {window} its window ("day", "minute").
    "team_limit": _e(
        "team_limit",
        "Your team has reached its limit of {limit} {what} per {window}. It frees up {reset}.",
        "Nhóm của bạn đã dùng hết {limit} {what} mỗi {window}. Hạn mức sẽ được đặt lại {reset}.",
        extra=_RATE_FIELDS,
    ),
    "plan_limit": _e(
        "plan_limit",
        "You have reached your plan's limit of {limit} {what} per {window}. It frees up {reset}.",
        "Bạn đã dùng hết {limit} {what} mỗi {window} theo gói của bạn. "
        "Hạn mức sẽ được đặt lại {reset}.",
        extra=_RATE_FIELDS,
    ),
    **_budget("monthly_cost_limit", "this month", "tháng này"),
    "concurrent_stream_limit": _e("concurrent_stream_limit", _STREAMS_EN, _STREAMS_VI),
    "concurrent_stream_limit_own": _e("concurrent_stream_limit", _STREAMS_EN, _STREAMS_VI),
    # --- features and uploads (403, 413) ---
    "feature_not_in_plan": _e(
        "feature_not_in_plan",
        "Advanced RAG is not included in your plan.",
        "Gói của bạn không bao gồm RAG nâng cao.",
    ),
    "feature_not_in_plan_own": _e(
        "feature_not_in_plan",
        "Advanced RAG is turned off for your account.",
        "RAG nâng cao đã bị tắt đối với tài khoản của bạn.",
    ),
    # Dify's blocking workflow run, under a money budget (review-dify D1).
    "cost_unreported": _e(
        "cost_unreported",
        "A workflow run in blocking mode does not report what it cost, and your plan "
        'limits spending: run it with "response_mode": "streaming".',
        "Lượt chạy workflow ở chế độ blocking không báo chi phí, mà gói của bạn giới hạn "
        'chi tiêu: hãy chạy với "response_mode": "streaming".',
    ),
    "cost_unbounded": _e(
        "cost_unbounded",
        "The option {option} makes the upstream add to the prompt what the request does "
        "not hold, so its cost cannot be bounded, and your plan limits spending.",
        "Tùy chọn {option} khiến upstream thêm vào prompt những nội dung không có trong yêu "
        "cầu, nên không giới hạn được chi phí, mà gói của bạn giới hạn chi tiêu.",
    ),
    "file_too_large": _e(
        "file_too_large",
        "The file is larger than your plan allows ({limit} MB).",
        "Tệp vượt quá dung lượng gói của bạn cho phép ({limit} MB).",
    ),
    "request_too_large": _e(
        "request_too_large",
        "The request body exceeds the limit of {limit} bytes.",
        "Nội dung yêu cầu vượt quá giới hạn {limit} byte.",
    ),
    "upload_fields_too_large": _e(
        "request_too_large",
        "The upload's other form fields exceed {limit} bytes.",
        "Các trường khác của biểu mẫu tải lên vượt quá {limit} byte.",
    ),
    # --- credentials (401) ---
    "missing_token": _e(
        "unauthorized",
        "Missing token: send 'Authorization: Bearer <token>'.",
        "Thiếu token: vui lòng gửi 'Authorization: Bearer <token>'.",
    ),
    "missing_key": _e(
        "unauthorized",
        "Missing gateway key: send 'Authorization: Bearer <your key>'.",
        "Thiếu khóa gateway: vui lòng gửi 'Authorization: Bearer <khóa của bạn>'.",
    ),
    "invalid_key": _e("unauthorized", "Invalid gateway key.", "Khóa gateway không hợp lệ."),
    "revoked_key": _e(
        "unauthorized", "This gateway key has been revoked.", "Khóa gateway này đã bị thu hồi."
    ),
    "missing_service_key": _e(
        "unauthorized",
        "Missing service key: send 'Authorization: Bearer <service key>'.",
        "Thiếu khóa dịch vụ: vui lòng gửi 'Authorization: Bearer <khóa dịch vụ>'.",
    ),
    "invalid_service_key": _e("unauthorized", "Invalid service key.", "Khóa dịch vụ không hợp lệ."),
    "user_header_not_utf8": _e(
        "unauthorized",
        "Invalid {header} header: the user id must be UTF-8.",
        "Header {header} không hợp lệ: mã người dùng phải là UTF-8.",
    ),
    "missing_user_header": _e(
        "unauthorized",
        "Missing {header} header naming the end user.",
        "Thiếu header {header} cho biết người dùng cuối.",
    ),
    "invalid_user_header": _e(
        "unauthorized", "Invalid {header} header.", "Header {header} không hợp lệ."
    ),
    "unknown_user": _e("unauthorized", "Unknown user.", "Người dùng không tồn tại."),
    "token_malformed": _e("unauthorized", "Token is malformed.", "Token sai định dạng."),
    "token_algorithm": _e(
        "unauthorized",
        "Token algorithm {algorithm} is not accepted.",
        "Thuật toán {algorithm} của token không được chấp nhận.",
    ),
    "token_algorithm_invalid": _e(
        "unauthorized",
        "Token algorithm is not accepted.",
        "Thuật toán của token không được chấp nhận.",
    ),
    "token_missing_claim": _e(
        "unauthorized", "Token has no {claim} claim.", "Token thiếu claim {claim}."
    ),
    "token_user_claim": _e(
        "unauthorized",
        "Token claim {claim} is not a user id.",
        "Claim {claim} của token không phải là mã người dùng.",
    ),
    "token_expired": _e("unauthorized", "Token has expired.", "Token đã hết hạn."),
    "token_not_yet_valid": _e("unauthorized", "Token is not yet valid.", "Token chưa có hiệu lực."),
    "token_audience": _e(
        "unauthorized",
        "Token audience is not accepted.",
        "Audience của token không được chấp nhận.",
    ),
    "token_issuer": _e(
        "unauthorized", "Token issuer is not accepted.", "Issuer của token không được chấp nhận."
    ),
    "token_signature": _e(
        "unauthorized", "Token signature is invalid.", "Chữ ký của token không hợp lệ."
    ),
    "token_invalid": _e("unauthorized", "Token is invalid.", "Token không hợp lệ."),
    "token_key_unknown": _e(
        "unauthorized", "Token key id is not known.", "Không nhận ra key id của token."
    ),
    # --- routes the gateway does not forward (403, 404) ---
    "endpoint_not_allowed": _e(
        "endpoint_not_allowed",
        "This endpoint is for the operator only; it is not available through the gateway.",
        "Endpoint này chỉ dành cho người vận hành, không dùng được qua gateway.",
    ),
    "endpoint_not_metered": _e(
        "endpoint_not_metered",
        "This endpoint is not available through the gateway: its usage cannot be metered.",
        "Endpoint này không dùng được qua gateway vì không đo được mức sử dụng.",
    ),
    "not_found": _e(
        "not_found",
        "This endpoint is not available through the gateway.",
        "Endpoint này không dùng được qua gateway.",
    ),
    "object_not_found": _e(
        "not_found", "No object found with id '{id}'.", "Không tìm thấy đối tượng có id '{id}'."
    ),
    "call_not_priced": _e(
        "call_not_priced",
        "This call is billed per use and has no price configured; "
        "it is not available through the gateway.",
        "Lệnh gọi này tính phí theo lượt nhưng chưa được định giá, "
        "nên không dùng được qua gateway.",
    ),
    # Review F5: a file the upstream fetches itself passes the plan's upload limits.
    "file_transfer_not_allowed": _e(
        "file_transfer_not_allowed",
        "Your plan limits uploads: attach files by uploading them "
        "(transfer_method local_file), not by URL.",
        "Gói của bạn giới hạn việc tải tệp lên: hãy đính kèm tệp bằng cách tải lên "
        "(transfer_method local_file), không dùng URL.",
    ),
    # --- models (403): a plan's allow-list (issue 21, gateway/model_access.py) ---
    "model_not_in_plan": _e(
        "model_not_in_plan",
        "The model {model} is not available on your plan.",
        "Mô hình {model} không có trong gói của bạn.",
    ),
    "model_not_in_plan_unnamed": _e(
        "model_not_in_plan",
        "Your plan allows only some models: name the model to use in the request "
        "(and in each tool that runs a model of its own).",
        "Gói của bạn chỉ cho phép một số mô hình: vui lòng ghi rõ mô hình cần dùng trong "
        "yêu cầu (và trong mỗi công cụ tự chạy một mô hình riêng).",
    ),
    # Issue 23: no upstream of the request's mount serves the model (404).
    "model_not_served": _e(
        "model_not_found",
        "The model {model} is not served here.",
        "Mô hình {model} không được phục vụ tại đây.",
    ),
    "model_not_priced": _e(
        "model_not_priced",
        "The model {model} has no price on this gateway, so its use cannot be charged.",
        "Mô hình {model} chưa được định giá trên gateway này nên không thể tính phí.",
    ),
    "model_not_priced_unnamed": _e(
        "model_not_priced",
        "A request without a model has no price on this gateway, so its use cannot be charged.",
        "Yêu cầu không ghi rõ mô hình nên gateway này không thể tính phí.",
    ),
    # Review-sec F12: fields that make a router answer with another model.
    "model_fallback_not_allowed": _e(
        "model_fallback_not_allowed",
        "The field {field} can make the upstream answer with a model this gateway "
        "cannot check, so it is not available.",
        "Trường {field} có thể khiến upstream trả lời bằng một mô hình mà gateway này "
        "không kiểm tra được, nên không dùng được.",
    ),
    "model_fallback_dearer": _e(
        "model_fallback_not_allowed",
        "The fallback model {model} costs more than {requested}, the model the request "
        "names: name it as the model instead.",
        "Mô hình dự phòng {model} đắt hơn {requested}, mô hình được ghi trong yêu cầu: "
        "hãy ghi nó làm mô hình chính.",
    ),
    "tool_not_priced": _e(
        "tool_not_priced",
        "The tool {tool} has no price on this gateway "
        '([call_prices."openai.{name}"]), so it is not available.',
        "Công cụ {tool} chưa được định giá trên gateway này "
        '([call_prices."openai.{name}"]) nên không dùng được.',
    ),
    "tool_not_priced_anthropic": _e(
        "tool_not_priced",
        "The tool {tool} has no price on this gateway "
        '([call_prices."anthropic.{name}"]), so it is not available.',
        "Công cụ {tool} chưa được định giá trên gateway này "
        '([call_prices."anthropic.{name}"]) nên không dùng được.',
    ),
    # Review-sec F2: what the client asks for that the upstream bills above the
    # table's rates (OpenAI's priority tier, Anthropic's fast mode, long context).
    "service_tier_not_priced": _e(
        "service_tier_not_priced",
        "The service tier {tier} has no price on this gateway, so it is not available.",
        "Mức dịch vụ {tier} chưa được định giá trên gateway này nên không dùng được.",
    ),
    "option_not_priced": _e(
        "option_not_priced",
        "The option {option} has no price on this gateway, so it is not available.",
        "Tùy chọn {option} chưa được định giá trên gateway này nên không dùng được.",
    ),
    # OpenRouter's plugins but its web search (review 9).
    "plugin_not_priced": _e(
        "tool_not_priced",
        "The plugin {plugin} has no price on this gateway, so it is not available.",
        "Plugin {plugin} chưa được định giá trên gateway này nên không dùng được.",
    ),
    # Perplexity's Sonar Deep Research: it bills every search it decides to run.
    "model_not_bounded": _e(
        "model_not_bounded",
        "The model {model} bills each web search it decides to run, and no request can "
        "bound how many, so it is not available through the gateway.",
        "Mô hình {model} tính phí từng lượt tìm kiếm web mà nó tự quyết định chạy, và "
        "không yêu cầu nào giới hạn được số lượt đó, nên không dùng được qua gateway.",
    ),
    # Review-meter F2: a server tool that runs a model of its own (Anthropic's
    # advisor), as often as the answer decides, billed by that model's tokens.
    "tool_not_bounded": _e(
        "tool_not_bounded",
        "The tool {tool} runs the model {model} as often as the answer decides, billed "
        "by that model's tokens, which no call price holds, so it is not available "
        "through the gateway.",
        "Công cụ {tool} chạy mô hình {model} bao nhiêu lần tùy câu trả lời quyết định, "
        "tính phí theo token của mô hình đó, điều mà không mức giá mỗi lượt gọi nào giới "
        "hạn được, nên không dùng được qua gateway.",
    ),
    # Anthropic's 1-hour prompt cache: opened per model by the price it names.
    "option_not_priced_setting": _e(
        "option_not_priced",
        "The option {option} has no price on this gateway ({setting}), so it is not available.",
        "Tùy chọn {option} chưa được định giá trên gateway này ({setting}) nên không dùng được.",
    ),
    # --- malformed requests (400) ---
    "method_case": _e(
        "invalid_param",
        "The request method must be written in upper case.",
        "Phương thức của yêu cầu phải viết in hoa.",
    ),
    "invalid_json": _e(
        "invalid_param",
        "The request body is not valid JSON.",
        "Nội dung yêu cầu không phải JSON hợp lệ.",
    ),
    "body_not_object": _e(
        "invalid_param",
        "The request body must be a JSON object.",
        "Nội dung yêu cầu phải là một đối tượng JSON.",
    ),
    "body_too_deep": _e(
        "invalid_param",
        "The request body is nested too deeply to forward.",
        "Nội dung yêu cầu lồng nhau quá sâu nên không chuyển tiếp được.",
    ),
    "message_id_type": _e(
        "invalid_param",
        "The message_id must be a string.",
        "Trường message_id phải là một chuỗi.",
    ),
    "file_id_type": _e(
        "invalid_param",
        "A file id in the request must be a string.",
        "Mã tệp trong yêu cầu phải là một chuỗi.",
    ),
    "multipart_boundary": _e(
        "invalid_param",
        "The multipart body has no valid boundary.",
        "Nội dung multipart không có boundary hợp lệ.",
    ),
    "multipart_malformed": _e(
        "invalid_param",
        "Malformed multipart body: {detail}",
        "Nội dung multipart sai định dạng: {detail}",
    ),
    "path_characters": _e(
        "invalid_param",
        "The request path contains characters that are not allowed.",
        "Đường dẫn của yêu cầu chứa ký tự không được phép.",
    ),
    "path_segments": _e(
        "invalid_param",
        "The request path must not contain empty, '.' or '..' segments.",
        "Đường dẫn của yêu cầu không được chứa đoạn rỗng, '.' hoặc '..'.",
    ),
    "content_length": _e(
        "invalid_param", "Invalid Content-Length header.", "Header Content-Length không hợp lệ."
    ),
    "key_header_twice": _e(
        "invalid_param",
        "More than one {header} header.",
        "Yêu cầu có nhiều hơn một header {header}.",
    ),
    "credentials_disagree": _e(
        "invalid_param",
        "The Authorization and {header} headers carry different credentials: "
        "send the gateway key in one of them.",
        "Header Authorization và header {header} mang hai thông tin xác thực khác nhau: "
        "hãy gửi khóa gateway trong một header thôi.",
    ),
    "models_limit": _e(
        "invalid_param",
        "limit: the page size must be an integer from 1 to 1000.",
        "limit: kích thước trang phải là số nguyên từ 1 đến 1000.",
    ),
    "models_cursors": _e(
        "invalid_param",
        "after_id and before_id cannot both be set.",
        "Không thể đặt cùng lúc after_id và before_id.",
    ),
    "content_type_twice": _e(
        "invalid_param",
        "More than one Content-Type header.",
        "Yêu cầu có nhiều hơn một header Content-Type.",
    ),
    "invalid_url": _e(
        "invalid_param", "The request URL is not valid.", "URL của yêu cầu không hợp lệ."
    ),
    "stream_options": _e(
        "invalid_param",
        "stream_options must be an object.",
        "stream_options phải là một đối tượng.",
    ),
    "metadata_object": _e(
        "invalid_param",
        "metadata must be an object.",
        "metadata phải là một đối tượng.",
    ),
    # Review 9: what a router in front of the provider reads over the checked body.
    "router_field": _e(
        "invalid_param",
        "The field {field} is not accepted: it is not part of the API, and a router in "
        "front of the provider would read it over what the gateway checked.",
        "Trường {field} không được chấp nhận: nó không thuộc API, và bộ định tuyến phía "
        "trước nhà cung cấp sẽ đọc nó thay cho những gì gateway đã kiểm tra.",
    ),
    "plugins_array": _e(
        "invalid_param",
        "plugins must be an array.",
        "plugins phải là một mảng.",
    ),
    "provider_object": _e(
        "invalid_param",
        "provider must be an object.",
        "provider phải là một đối tượng.",
    ),
    "max_tokens_required": _e(
        "invalid_param",
        "max_tokens must be a positive integer (the Messages API requires it).",
        "max_tokens phải là một số nguyên dương (Messages API bắt buộc trường này).",
    ),
    "invalid_type": _e(
        "invalid_type",
        "Invalid type for '{name}': expected a boolean, but got {type} instead.",
        "Kiểu của '{name}' không hợp lệ: cần giá trị boolean nhưng nhận được {type}.",
    ),
    "background_not_supported": _e(
        "background_not_supported",
        "Background responses are not available through the gateway.",
        "Phản hồi chạy nền (background) không dùng được qua gateway.",
    ),
    # --- the gateway or the upstream failed (5xx) ---
    "storage_unavailable": _e(
        "storage_unavailable",
        "The usage database is unavailable; try again shortly.",
        "Hệ thống ghi nhận mức sử dụng tạm thời không khả dụng, vui lòng thử lại sau ít phút.",
    ),
    "upstream_unavailable": _e(
        "upstream_unavailable",
        "The upstream service is unreachable.",
        "Không kết nối được tới dịch vụ upstream.",
    ),
    "upstream_timeout": _e(
        "upstream_timeout",
        "The upstream did not answer in time.",
        "Dịch vụ upstream không phản hồi kịp thời.",
    ),
    "upstream_lost": _e(
        "upstream_error",
        "The upstream connection was lost.",
        "Mất kết nối tới dịch vụ upstream.",
    ),
    "history_too_large": _e(
        "upstream_error",
        "The upstream history page is too large to filter.",
        "Trang lịch sử từ upstream quá lớn để lọc.",
    ),
    "history_unreadable": _e(
        "upstream_unavailable",
        "The upstream history page could not be read.",
        "Không đọc được trang lịch sử từ upstream.",
    ),
    "history_not_object": _e(
        "upstream_error",
        "The upstream history page is not a JSON object.",
        "Trang lịch sử từ upstream không phải là một đối tượng JSON.",
    ),
    "model_list_too_large": _e(
        "upstream_error",
        "The upstream model list is too large to filter.",
        "Danh sách mô hình từ upstream quá lớn để lọc.",
    ),
    "model_list_unreadable": _e(
        "upstream_unavailable",
        "The upstream model list could not be read.",
        "Không đọc được danh sách mô hình từ upstream.",
    ),
    "model_list_not_object": _e(
        "upstream_error",
        "The upstream model list is not a JSON object.",
        "Danh sách mô hình từ upstream không phải là một đối tượng JSON.",
    ),
    "internal_server_error": _e(
        "internal_server_error",
        "The gateway failed to handle the request.",
        "Gateway gặp lỗi khi xử lý yêu cầu.",
    ),
}

# The limits' names (plan keys, X-RateLimit-Resource) name their messages too:
# ``[messages.vi] queries_per_day = "..."`` is ``daily_query_limit``.
ALIASES: Final[Mapping[str, str]] = {
    "queries_per_day": "daily_query_limit",
    "tokens_per_day": "daily_token_limit",
    "tokens_per_month": "monthly_token_limit",
    "web_searches_per_day": "web_search_limit",
    "max_concurrent_streams": "concurrent_stream_limit",
    "requests_per_minute": "request_rate_limit",
    "tokens_per_minute": "token_rate_limit",
    "cost_per_day": "daily_cost_limit",
    "cost_per_month": "monthly_cost_limit",
    "advanced_rag": "feature_not_in_plan",
    **{
        f"{name}_own": f"{code}_own"
        for name, code in (
            ("queries_per_day", "daily_query_limit"),
            ("tokens_per_day", "daily_token_limit"),
            ("tokens_per_month", "monthly_token_limit"),
            ("web_searches_per_day", "web_search_limit"),
            ("max_concurrent_streams", "concurrent_stream_limit"),
            ("requests_per_minute", "request_rate_limit"),
            ("tokens_per_minute", "token_rate_limit"),
            ("cost_per_day", "daily_cost_limit"),
            ("cost_per_month", "monthly_cost_limit"),
            ("advanced_rag", "feature_not_in_plan"),
        )
    },
}


# --- validation (at configuration load) ------------------------------------------


def check_templates(table: Mapping[str, object], prefix: str) -> dict[str, str]:
    """One language's operator templates, by message code (aliases resolved);
    ValueError naming the key (``{prefix}{key}: ...``) for anything unusable."""
    out: dict[str, str] = {}
    given: dict[str, str] = {}
    for key, template in table.items():
        code = ALIASES.get(key, key)
        entry = ENTRIES.get(code)
        if entry is None:
            close = difflib.get_close_matches(key, [*ENTRIES, *ALIASES], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{prefix}{key}: unknown message code{hint}")
        if not isinstance(template, str):
            raise ValueError(f"{prefix}{key}: expected a string, got {type(template).__name__}")
        if code in given:
            raise ValueError(
                f"{prefix}{key}: the same message as {prefix}{given[code]}; set only one"
            )
        try:
            names = _placeholders(template)
        except ValueError as exc:
            raise ValueError(f"{prefix}{key}: {exc}") from None
        unknown = [name for name in names if name not in entry.fields]
        if unknown:
            allowed = ", ".join(f"{{{name}}}" for name in sorted(entry.fields)) or "none"
            raise ValueError(
                f"{prefix}{key}: unknown placeholder {{{unknown[0]}}} (this message has: {allowed})"
            )
        given[code] = key
        out[code] = template
    return out


# --- choosing the language -------------------------------------------------------

# RFC 9110 12.4.2: qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )
_QVALUE = re.compile(r"(?:0(?:\.\d{0,3})?|1(?:\.0{0,3})?)\Z")
_RANGE = re.compile(r"(?:\*|[a-z]{1,8}(?:-[a-z0-9]{1,8})*)\Z")


def choose_language(
    header: str | None, default: str, available: tuple[str, ...] = LANGUAGES
) -> str:
    """The language to answer in for an Accept-Language value (RFC 9110 12.5.4).

    A range names a language when it is the language (``vi``), a more specific
    tag of it (``vi-VN``: RFC 4647 lookup truncates it to ``vi``) or ``*``; the
    most specific range that names a language gives its weight. The heaviest
    language wins (then the one named first, then ``default``); weight 0 means
    "not this one". Nothing acceptable, no header or a malformed one: ``default``.
    """
    if not header:
        return default
    # language -> (specificity, q, position) of the most specific range naming it
    found: dict[str, tuple[int, float, int]] = {}
    for position, item in enumerate(header.split(",")):
        tag, *params = item.split(";")
        tag = tag.strip().lower()
        if not _RANGE.match(tag):
            continue  # malformed element: ignored, as a recipient may (RFC 9110 5.6.1)
        q: float | None = 1.0
        for param in params:
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                value = value.strip()
                q = float(value) if _QVALUE.match(value) else None
        if q is None:
            continue
        for language in available:
            if tag == language:
                specificity = 2
            elif tag.startswith(language + "-"):
                specificity = 1
            elif tag == "*":
                specificity = 0
            else:
                continue
            seen = found.get(language)
            if seen is None or specificity > seen[0] or (specificity == seen[0] and q > seen[1]):
                found[language] = (specificity, q, position)
    acceptable = [
        (-q, position, language != default, language)
        for language, (_, q, position) in found.items()
        if q > 0
    ]
    return min(acceptable)[3] if acceptable else default


# --- recognising a refusal raised as plain English -------------------------------


def _pattern(template: str) -> re.Pattern[str]:
    parts: list[str] = []
    seen: set[str] = set()
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name is not None:
            parts.append(f"(?P={name})" if name in seen else f"(?P<{name}>.+?)")
            seen.add(name)
    return re.compile("".join(parts) + r"\Z", re.DOTALL)


_FIXED: Final[dict[str, str]] = {}
_PATTERNS: Final[list[tuple[str, re.Pattern[str]]]] = []
for _code, _entry in ENTRIES.items():
    if _entry.en not in _FIXED and not _placeholders(_entry.en):
        _FIXED[_entry.en] = _code
    elif _placeholders(_entry.en):
        _PATTERNS.append((_code, _pattern(_entry.en)))


def recognise(message: str) -> tuple[str, dict[str, object]] | None:
    """The message code and fields of a refusal's built-in English text, or None."""
    code = _FIXED.get(message)
    if code is not None:
        return code, {}
    for code, pattern in _PATTERNS:
        match = pattern.match(message)
        if match is not None:
            return code, {name: _parsed(name, value) for name, value in match.groupdict().items()}
    return None


_INTEGER = re.compile(r"\d+\Z")
_DECIMAL = re.compile(r"\d+\.\d+\Z")


def _parsed(name: str, value: str) -> object:
    if name in _NUMERIC:
        if _INTEGER.match(value):
            return int(value)
        if _DECIMAL.match(value):
            return Decimal(value)
    return value


# --- rendering ---------------------------------------------------------------------

_MONTHS_EN: Final = (
    "Jan",
    "Feb",
    "Mar",
    "Apr",
    "May",
    "Jun",
    "Jul",
    "Aug",
    "Sep",
    "Oct",
    "Nov",
    "Dec",
)
# English words some raise sites put in a field, as Vietnamese says them.
_VI_WORDS: Final[Mapping[str, str]] = {
    "a string": "một chuỗi",
    "an integer": "một số nguyên",
    "a decimal": "một số thập phân",
    "an array": "một mảng",
    "an object": "một đối tượng",
}


def _number(value: int | Decimal, language: str) -> str:
    text = format(value, "f") if isinstance(value, Decimal) else str(value)
    if language != "vi":
        return text  # as the gateway has always written them: 200000, 0.5
    # Vietnamese groups thousands with a dot and writes a decimal comma.
    grouped = format(value, ",f") if isinstance(value, Decimal) else f"{value:,}"
    return grouped.replace(",", "\0").replace(".", ",").replace("\0", ".")


def _reset_fields(reset: datetime | None, language: str) -> dict[str, str]:
    if reset is None:
        later = "sau" if language == "vi" else "later"
        return {"reset": later, "reset_time": later, "reset_date": later}
    time = f"{reset.hour:02d}:{reset.minute:02d}"
    if language == "vi":
        date = f"{reset.day}/{reset.month}"
        return {"reset": f"lúc {time} ngày {date}", "reset_time": time, "reset_date": date}
    zone = reset.strftime("%Z")
    return {
        "reset": f"at {reset.strftime('%Y-%m-%d %H:%M')} {zone}".strip(),
        "reset_time": time,
        "reset_date": f"{reset.day} {_MONTHS_EN[reset.month - 1]}",
    }


def _values(fields: Mapping[str, object], language: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for name, value in fields.items():
        if name == "reset" and (value is None or isinstance(value, datetime)):
            values.update(_reset_fields(value, language))
        elif isinstance(value, int | Decimal) and not isinstance(value, bool):
            values[name] = _number(value, language)
        elif language == "vi" and isinstance(value, str) and value in _VI_WORDS:
            values[name] = _VI_WORDS[value]
        else:
            values[name] = str(value)
    limit, used = fields.get("limit"), fields.get("used")
    if isinstance(limit, int) and isinstance(used, int) and "remaining" not in fields:
        values["remaining"] = _number(max(limit - used, 0), language)
    return values


def english(code: str, **fields: object) -> str:
    """The built-in English text of a message (what ``GatewayError.message`` holds)."""
    return ENTRIES[code].en.format_map(_values(fields, "en"))


class Catalogue:
    """The templates in force: built-in, with the operator's over them. One per
    configuration load."""

    __slots__ = ("_templates", "default")

    def __init__(
        self, default: str = "en", templates: Mapping[str, Mapping[str, str]] | None = None
    ) -> None:
        self.default = default
        self._templates: dict[str, dict[str, str]] = {
            language: {code: getattr(entry, language) for code, entry in ENTRIES.items()}
            for language in LANGUAGES
        }
        for language, own in (templates or {}).items():
            self._templates[language].update(own)

    def language(self, headers: Iterable[tuple[bytes, bytes]]) -> str:
        """The language for a request's raw (ASGI, lower-case) headers."""
        values = [v for k, v in headers if k == b"accept-language"]
        header = b",".join(values).decode("latin-1") if values else None
        return choose_language(header, self.default)

    def render(self, exc: GatewayError, language: str) -> tuple[str, str]:
        """``exc``'s message in ``language``, and the language it is in: its own
        (English) message when it is not in the catalogue."""
        code, fields = exc.key, exc.fields
        if code is None:
            found = recognise(exc.message)
            if found is None:
                return exc.message, "en"
            code, fields = found
        template = self._templates[language].get(code)
        if template is None:
            return exc.message, "en"
        try:
            return template.format_map(_values(fields, language)), language
        except Exception:
            # A raise site that gave too few (or odd) fields: a bug, logged; the
            # refusal still goes out, in English.
            log.exception("message %s: cannot render it in %s", code, language)
            return exc.message, "en"
