from __future__ import annotations

import email.parser
import email.policy
from email.message import EmailMessage

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.multipart import MultipartError, UserFieldRewriter, boundary_from_content_type
from tests.drawing import Shape, utf8_characters
from tests.drawing import chunked as chunks_of

BOUNDARY = b"XyZzy"
USER = "alice"
# What the rewriter puts in front of the body's first delimiter.
OURS = b'--XyZzy\r\nContent-Disposition: form-data; name="user"\r\n\r\nalice\r\n'
FILE = b"\x00\xffPNG\r\nline two\rbare cr\nbare lf\r\n\r\n-- not a boundary\r\n"
END = b"--XyZzy--\r\n"


def part(disposition: bytes, value: bytes, *headers: bytes) -> bytes:
    head = b"".join(h + b"\r\n" for h in headers)
    return (
        b"--XyZzy\r\n"
        + head
        + b"Content-Disposition: "
        + disposition
        + b"\r\n\r\n"
        + value
        + b"\r\n"
    )


FILE_PART = part(b'form-data; name="file"; filename="a.png"', FILE, b"Content-Type: image/png")


def user(value: bytes = b"mallory", name: bytes = b'"user"') -> bytes:
    return part(b"form-data; name=" + name, value)


def rewrite(
    body: bytes, chunks: list[bytes] | None = None, **kwargs: object
) -> tuple[bytes, UserFieldRewriter]:
    rewriter = UserFieldRewriter(BOUNDARY, USER, **kwargs)  # type: ignore[arg-type]
    out = [rewriter.feed(chunk) for chunk in (chunks if chunks is not None else [body])]
    return b"".join(out) + rewriter.close(), rewriter


def one_byte(body: bytes) -> list[bytes]:
    return [body[i : i + 1] for i in range(len(body))]


def parse(body: bytes, boundary: bytes = BOUNDARY) -> EmailMessage:
    """The standard library's MIME parser, as an independent reader of the output."""
    head = b'Content-Type: multipart/form-data; boundary="' + boundary + b'"\r\n\r\n'
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    assert isinstance(message, EmailMessage)
    assert message.is_multipart()
    assert not message.defects
    return message


def fields(message: EmailMessage) -> list[tuple[str | None, bytes]]:
    out: list[tuple[str | None, bytes]] = []
    for item in message.iter_parts():
        assert isinstance(item, EmailMessage)
        assert not item.defects
        name = item.get_param("name", header="content-disposition")
        assert name is None or isinstance(name, str)
        payload = item.get_payload(decode=True)
        assert isinstance(payload, bytes)
        out.append((name, payload))
    return out


NEAR = b"\r\n--XyZz\r\n-XyZzy\r\n\r\n--\r\n--xyzzy\r\n"
IN_TEXT = b"XyZzy x--XyZzy XyZzy-- --XyZzy--x"


def unchanged(body: bytes) -> tuple[bytes, bytes]:
    return body, OURS + body


A = ("user", b"alice")  # our part, as a parser reads it
F = ("file", FILE)
M = ("_ser", b"mallory")

# (id, input body, expected output, every field as the standard library reads the output)
CASES: list[tuple[str, bytes, bytes, list[tuple[str | None, bytes]]]] = [
    (
        "user before file",
        user() + FILE_PART + END,
        OURS + part(b'form-data; name="_ser"', b"mallory") + FILE_PART + END,
        [A, M, F],
    ),
    (
        "user after file",
        FILE_PART + user() + END,
        OURS + FILE_PART + part(b'form-data; name="_ser"', b"mallory") + END,
        [A, F, M],
    ),
    ("user absent", *unchanged(FILE_PART + END), [A, F]),
    (
        "two user parts",
        user(b"a") + FILE_PART + user(b"b") + END,
        OURS + user(b"a", b'"_ser"') + FILE_PART + user(b"b", b'"_ser"') + END,
        [A, ("_ser", b"a"), F, ("_ser", b"b")],
    ),
    (
        "unquoted name",
        user(name=b"user") + FILE_PART + END,
        OURS + user(name=b"_ser") + FILE_PART + END,
        [A, M, F],
    ),
    (
        "name after other parameters, header after others, header name in caps",
        b'--XyZzy\r\nContent-Type: text/plain\r\nCONTENT-DISPOSITION: form-data; x="1"; name="user"'
        b"\r\n\r\nmallory\r\n" + FILE_PART + END,
        OURS
        + b'--XyZzy\r\nContent-Type: text/plain\r\nCONTENT-DISPOSITION: form-data; x="1"; name="_ser"'
        b"\r\n\r\nmallory\r\n" + FILE_PART + END,
        [A, M, F],
    ),
    (
        "parameter name in caps, spaces around =",
        user(name=b' "user"').replace(b"name=", b"NAME =") + FILE_PART + END,
        OURS + user(name=b' "_ser"').replace(b"name=", b"NAME =") + FILE_PART + END,
        [A, M, F],
    ),
    (
        "folded header",
        part(b'form-data;\r\n name="user"', b"mallory") + FILE_PART + END,
        OURS + part(b'form-data;\r\n name="_ser"', b"mallory") + FILE_PART + END,
        [A, M, F],
    ),
    (
        "backslash escape in the quoted name",
        user(name=b'"\\user"') + FILE_PART + END,
        OURS + user(name=b'"_user"') + FILE_PART + END,
        [A, ("_user", b"mallory"), F],
    ),
    (
        "filename on a part named user",
        part(b'form-data; name="user"; filename="user"', FILE) + END,
        OURS + part(b'form-data; name="_ser"; filename="user"', FILE) + END,
        [A, ("_ser", FILE)],
    ),
    (
        "other names are left alone",
        *unchanged(
            user(name=b'"User"')
            + user(name=b"username")
            + part(b"form-data; name=x", b"user")
            + END
        ),
        [A, ("User", b"mallory"), ("username", b"mallory"), ("x", b"user")],
    ),
    (
        "preamble",
        b"This is the preamble.\r\n-XyZzy\r\n" + FILE_PART + END,
        b"This is the preamble.\r\n-XyZzy\r\n" + OURS + FILE_PART + END,
        [A, F],
    ),
    ("empty preamble", b"\r\n" + FILE_PART + END, b"\r\n" + OURS + FILE_PART + END, [A, F]),
    ("epilogue with a part in it", *unchanged(FILE_PART + END + b"epilogue\r\n" + user()), [A, F]),
    (
        "CRLF and near-delimiters in the content",
        *unchanged(part(b'form-data; name="file"', NEAR) + END),
        [A, ("file", NEAR)],
    ),
    (
        "boundary string in the content without CRLF before its dashes",
        *unchanged(part(b'form-data; name="file"', IN_TEXT) + END),
        [A, ("file", IN_TEXT)],
    ),
    ("empty content", *unchanged(part(b'form-data; name="file"', b"") + END), [A, ("file", b"")]),
    (
        "transport padding after delimiters",
        *unchanged(FILE_PART.replace(b"--XyZzy\r\n", b"--XyZzy \t\r\n") + b"--XyZzy-- \t\r\n"),
        [A, F],
    ),
    ("no CRLF after the closing delimiter", *unchanged(FILE_PART + b"--XyZzy--"), [A, F]),
    ("no parts at all", *unchanged(END), [A]),
    (
        "look-alike parameter in another header is renamed too",
        part(b'form-data; name="file"', FILE, b'Content-Type: text/plain; name="user"') + END,
        OURS
        + part(b'form-data; name="file"', FILE, b'Content-Type: text/plain; name="_ser"')
        + END,
        [A, F],
    ),
]


@pytest.mark.parametrize(
    ("body", "expected", "seen"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_rewrite(body: bytes, expected: bytes, seen: list[tuple[str | None, bytes]]) -> None:
    for chunks in ([body], one_byte(body), [body[:7], body[7:40], body[40:]]):
        out, rewriter = rewrite(body, chunks)
        assert out == expected
        assert len(out) == len(body) + rewriter.added_bytes
    assert fields(parse(out)) == seen


def test_preamble_and_epilogue_survive() -> None:
    preamble, epilogue = b"pre\r\namble", b"the end\r\n"
    out, _ = rewrite(preamble + b"\r\n" + FILE_PART + END + epilogue)
    message = parse(out)
    assert message.preamble == preamble.decode()
    assert message.epilogue == epilogue.decode()


def test_body_bytes_counts_everything_around_the_files_in_any_chunking() -> None:
    """Review of issue 21: a limit on what is not a file must see the framing,
    the preamble and the epilogue too: they are forwarded as well."""
    preamble, epilogue = b"pre\r\namble", b"the end\r\n" * 3
    body = preamble + b"\r\n" + FILE_PART + END + epilogue
    for chunks in ([body], one_byte(body)):
        _, rewriter = rewrite(body, chunks)
        assert rewriter.body_bytes == len(body)
        assert rewriter.file_bytes == len(FILE)
        assert rewriter.finished
    rewriter = UserFieldRewriter(BOUNDARY, USER)
    rewriter.feed(body[:-1])
    assert not rewriter.finished


def test_content_bytes_counts_every_client_part() -> None:
    body = user(b"mallory") + FILE_PART + part(b'form-data; name="x"', b"12") + END
    for chunks in ([body], one_byte(body)):
        _, rewriter = rewrite(body, chunks)
        assert rewriter.content_bytes == len(b"mallory") + len(FILE) + 2


def test_content_bytes_grows_while_streaming() -> None:
    rewriter = UserFieldRewriter(BOUNDARY, USER)
    head = FILE_PART[: FILE_PART.index(b"\r\n\r\n") + 4]
    assert rewriter.feed(head) != b""
    assert rewriter.content_bytes == 0
    rewriter.feed(b"x" * 100_000)
    # All but the tail that could hold the start of a delimiter is passed on at once.
    assert 100_000 - len(b"\r\n--XyZzy") <= rewriter.content_bytes < 100_000


def test_memory_stays_bounded() -> None:
    rewriter = UserFieldRewriter(BOUNDARY, USER)
    rewriter.feed(FILE_PART[: FILE_PART.index(b"\r\n\r\n") + 4])
    chunk = b"\r\n--XyZz" * 8192
    for _ in range(100):
        assert len(rewriter.feed(chunk)) >= len(chunk) - 16
    assert len(rewriter._buf) <= len(b"--XyZzy") + 1


def test_non_ascii_user_id_is_utf8() -> None:
    rewriter = UserFieldRewriter(BOUNDARY, "José 🙂")
    out = rewriter.feed(FILE_PART + END) + rewriter.close()
    assert out.startswith(
        b'--XyZzy\r\nContent-Disposition: form-data; name="user"\r\n\r\nJos\xc3\xa9 '
    )
    assert ("user", "José 🙂".encode()) in fields(parse(out))


def test_other_field_name() -> None:
    rewriter = UserFieldRewriter(BOUNDARY, USER, field="_uid")
    out = rewriter.feed(part(b"form-data; name=_uid", b"x") + END) + rewriter.close()
    assert fields(parse(out)) == [("_uid", b"alice"), ("-uid", b"x")]


ERRORS: list[tuple[str, bytes, dict[str, int]]] = [
    ("empty body", b"", {}),
    ("no delimiter at all", b"just text\r\n", {}),
    ("truncated in content", FILE_PART[:-20], {}),
    ("truncated in headers", FILE_PART[:30], {}),
    ("truncated after the delimiter", b"--XyZzy", {}),
    ("truncated in the closing delimiter", FILE_PART + b"--XyZzy-", {}),
    ("truncated in the CRLF after the closing delimiter", FILE_PART + b"--XyZzy--\r", {}),
    (
        "header block too large",
        part(b'form-data; name="file"', b"x", b"X-Pad: " + b"a" * 100) + END,
        {"max_header_bytes": 64},
    ),
    (
        "header block without end too large",
        b"--XyZzy\r\n" + b"X: y\r\n" * 20,
        {"max_header_bytes": 64},
    ),
    ("delimiter padding too long", b"--XyZzy" + b" " * 100 + b"\r\n", {"max_header_bytes": 64}),
    ("boundary after bare LF", part(b'form-data; name="file"', b"a\n--XyZzy\r\nb") + END, {}),
    ("boundary after bare CR", part(b'form-data; name="file"', b"a\r--XyZzy\r\nb") + END, {}),
    (
        "boundary right after the headers",
        b"--XyZzy\r\nContent-Disposition: form-data; name=x\r\n\r\n--XyZzy--\r\n",
        {},
    ),
    (
        "boundary after a bare LF right after the headers",
        part(b'form-data; name="file"', b"\n--XyZzy\r\n") + END,
        {},
    ),
    ("boundary in the preamble, not at a line start", b"pre--XyZzy\r\n" + FILE_PART + END, {}),
    ("boundary line in the preamble", b"pre\r\n--XyZzy is here\r\n" + FILE_PART + END, {}),
    ("first boundary after a bare LF", b"pre\n" + FILE_PART + END, {}),
    ("delimiter followed by garbage", FILE_PART + b"--XyZzyX\r\n" + END, {}),
    ("delimiter followed by a longer boundary", FILE_PART + b"--XyZzy0\r\n" + END, {}),
    ("closing delimiter followed by garbage", FILE_PART + b"--XyZzy--x\r\n", {}),
    (
        "bare LF in headers",
        b"--XyZzy\r\nX: a\nContent-Disposition: form-data; name=user\r\n\r\nx\r\n" + END,
        {},
    ),
    (
        "bare CR in headers",
        b"--XyZzy\r\nX: a\rContent-Disposition: form-data; name=user\r\n\r\nx\r\n" + END,
        {},
    ),
    (
        "header line without a colon",
        part(b"form-data; name=x", b"x", b"Content-Type text/plain") + END,
        {},
    ),
    (
        "header name with a space",
        part(b"form-data; name=x", b"x", b"Content Type: text/plain") + END,
        {},
    ),
    ("folded first header line", part(b"form-data; name=x", b"x", b" X: y") + END, {}),
    (
        "part without headers",
        b"--XyZzy\r\n\r\nContent-Disposition: form-data; name=user\r\n\r\nx\r\n" + END,
        {},
    ),
    ("boundary in headers", part(b'form-data; name="f"; filename="--XyZzy"', b"x") + END, {}),
    ("RFC 2231 name", part(b"form-data; name*=utf-8''user", b"x") + END, {}),
    ("RFC 2231 continued name", part(b"form-data; name*0=us; name*1=er", b"x") + END, {}),
]


@pytest.mark.parametrize(("body", "kwargs"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_malformed(body: bytes, kwargs: dict[str, int]) -> None:
    for chunks in ([body], one_byte(body)):
        rewriter = UserFieldRewriter(BOUNDARY, USER, **kwargs)  # type: ignore[arg-type]
        out = b""
        with pytest.raises(MultipartError):
            for chunk in chunks:
                out += rewriter.feed(chunk)
            rewriter.close()
        # What got out before the error never ends the body: the upstream cannot take
        # it for a complete request even if the caller fails to abort it.
        assert b"--XyZzy--" not in out
        # The error sticks.
        with pytest.raises(MultipartError):
            rewriter.feed(b"x")
        with pytest.raises(MultipartError):
            rewriter.close()


@pytest.mark.parametrize("user_id", ["a\rb", "a\nb", "alice\r\n--XyZzy", "\n"])
def test_line_break_in_user_id_is_refused(user_id: str) -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        UserFieldRewriter(BOUNDARY, user_id)


@pytest.mark.parametrize(
    "boundary", [b"", b"a" * 71, b"ends with space ", b"semi;colon", b'quo"te', b"caf\xc3\xa9"]
)
def test_bad_boundary_is_refused(boundary: bytes) -> None:
    with pytest.raises(ValueError, match="boundary"):
        UserFieldRewriter(boundary, USER)


@pytest.mark.parametrize("field", ["", "us er", 'a"b', "a\r\nb", "é"])
def test_bad_field_is_refused(field: str) -> None:
    with pytest.raises(ValueError, match="field"):
        UserFieldRewriter(BOUNDARY, USER, field=field)


def test_feed_after_close() -> None:
    rewriter = UserFieldRewriter(BOUNDARY, USER)
    rewriter.feed(END)
    assert rewriter.close() == b""
    with pytest.raises(RuntimeError):
        rewriter.feed(b"x")


def test_empty_chunks() -> None:
    rewriter = UserFieldRewriter(BOUNDARY, USER)
    assert rewriter.feed(b"") == b""
    out = rewriter.feed(END) + rewriter.feed(b"") + rewriter.close()
    assert out == OURS + END


@pytest.mark.parametrize(
    ("content_type", "boundary"),
    [
        ("multipart/form-data; boundary=XyZzy", b"XyZzy"),
        ("multipart/form-data;boundary=XyZzy", b"XyZzy"),
        ("Multipart/Form-Data; BOUNDARY=XyZzy", b"XyZzy"),
        ("multipart/form-data; charset=utf-8; boundary=a'b+c_d-e.f", b"a'b+c_d-e.f"),
        ("multipart/form-data; boundary=XyZzy; charset=utf-8", b"XyZzy"),
        ("multipart/form-data; boundary = XyZzy ;", b"XyZzy"),
        (
            "multipart/form-data; boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW",
            b"----WebKitFormBoundary7MA4YWxkTrZu0gW",
        ),
        ('multipart/form-data; boundary="a b:c=d?e/f(g),h"', b"a b:c=d?e/f(g),h"),
        ("multipart/form-data; boundary=" + "a" * 70, b"a" * 70),
        ('multipart/form-data; boundary="==="', b"==="),
        ("application/json", None),
        ("multipart/mixed; boundary=XyZzy", None),
        ("multipart/form-data", None),
        ("multipart/form-data; charset=utf-8", None),
        ("multipart/form-data; boundary=", None),
        ('multipart/form-data; boundary=""', None),
        ("multipart/form-data; boundary=" + "a" * 71, None),
        ('multipart/form-data; boundary="ends with space "', None),
        ("multipart/form-data; boundary=a:b", None),  # not a token: quote it
        ("multipart/form-data; boundary=a b", None),
        ('multipart/form-data; boundary="a\\"b"', None),
        ('multipart/form-data; boundary="a@b"', None),
        ("multipart/form-data; boundary=a; boundary=b", None),
        ("multipart/form-data; boundary*=utf-8''abc", None),
        ("multipart/form-data; junk; boundary=abc", None),
    ],
)
def test_boundary_from_content_type(content_type: str, boundary: bytes | None) -> None:
    assert boundary_from_content_type(content_type) == boundary


# Property tests ------------------------------------------------------------------------

BCHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'()+_,-./:=? "


_BOUNDARIES = [st.text(BCHARS, min_size=1, max_size=3), st.text(BCHARS, min_size=1, max_size=70)]


def _boundary(draw: st.DrawFn, shape: Shape) -> bytes:
    # Mostly short, so that content collides with pieces of the boundary often.
    text = draw(shape.pick(_BOUNDARIES))
    return (text.rstrip(" ") or "b").encode()


class _Content:
    """Content of up to 8 pieces, each read from a `Shape`: up to 20 bytes as
    drawn, a piece of multipart syntax, or a delimiter cut short."""

    def __init__(self, shape: Shape, boundary: bytes) -> None:
        self._shape = shape
        self._delimiter = b"\r\n--" + boundary
        self._syntax = [
            b"\r",
            b"\n",
            b"\r\n",
            b"-",
            b"--",
            b"\r\n\r\n",
            boundary,
            b"--" + boundary,
            b'name="user"',
        ]

    def piece(self) -> bytes:
        shape = self._shape
        kind = shape.below(3)
        if kind == 0:
            return shape.take(shape.below(21))
        if kind == 1:
            return shape.pick(self._syntax)
        return self._delimiter[: 1 + shape.below(len(self._delimiter) - 1)]  # partial delimiters

    def __call__(self) -> bytes:
        return b"".join(self.piece() for _ in range(self._shape.below(9)))


_NAMES = ["user", "user", "User", "x", "username"]


def _break_delimiters(data: bytes, boundary: bytes, *, anywhere: bool = False) -> bytes:
    """`data` made safe as content (or as a preamble, with `anywhere`)."""
    dash = b"--" + boundary
    # "!" is not a boundary character, so a changed byte cannot be part of a new match.
    while True:
        before = data
        data = data.replace(b"\r" + dash, b"\r" + dash[:-1] + b"!")
        data = data.replace(b"\n" + dash, b"\n" + dash[:-1] + b"!")
        if anywhere or data.startswith(dash):
            data = data.replace(dash, dash[:-1] + b"!")
        if data == before:
            return data


def _body(draw: st.DrawFn, shape: Shape) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """A well-formed body: (boundary, body, its (name, content) parts in order)."""
    boundary = _boundary(draw, shape)
    content = _Content(shape, boundary)
    parts = [(shape.pick(_NAMES), content()) for _ in range(shape.below(5))]
    file = _break_delimiters(content(), boundary)
    parts.insert(shape.below(len(parts) + 1), ("file", file))
    chunks: list[bytes] = []
    if shape.flag():
        chunks.append(_break_delimiters(content(), boundary, anywhere=True) + b"\r\n")
    out: list[tuple[str, bytes]] = []
    for name, value in parts:
        value = _break_delimiters(value, boundary)
        quoted = shape.flag()
        disposition = f'form-data; name="{name}"' if quoted else f"form-data; name={name}"
        if name == "file":
            disposition += '; filename="f.bin"'
        chunks.append(b"--" + boundary + b"\r\nContent-Disposition: " + disposition.encode())
        chunks.append(b"\r\n\r\n" + value + b"\r\n")
        out.append((name, value))
    chunks.append(b"--" + boundary + b"--")
    if shape.flag():
        chunks.append(b"\r\n" + content())
    return boundary, b"".join(chunks), out


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    return _body(draw, Shape(draw))


def _run(boundary: bytes, user_id: str, chunks: list[bytes]) -> tuple[bytes, UserFieldRewriter]:
    rewriter = UserFieldRewriter(boundary, user_id)
    out = b"".join(rewriter.feed(chunk) for chunk in chunks)
    return out + rewriter.close(), rewriter


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.data(),
    bodies(),
    st.text(utf8_characters("\r\n"), max_size=12),
)
def test_any_chunking_gives_the_one_shot_output(
    data: st.DataObject, sample: tuple[bytes, bytes, list[tuple[str, bytes]]], user_id: str
) -> None:
    boundary, body, parts = sample
    whole, rewriter = _run(boundary, user_id, [body])
    chunked, chunked_rewriter = _run(boundary, user_id, chunks_of(data.draw, body))
    assert chunked == whole
    assert len(whole) == len(body) + rewriter.added_bytes
    file = next(value for name, value in parts if name == "file")
    # Every client part counts, the ones named "user" too (see content_bytes).
    assert rewriter.content_bytes == chunked_rewriter.content_bytes
    assert rewriter.content_bytes == sum(len(value) for _, value in parts)
    seen = fields(parse(whole, boundary))
    assert [value for name, value in seen if name == "user"] == [user_id.encode()]
    assert [value for name, value in seen if name == "file"] == [file]
    others = [(n, v) for n, v in parts if n not in ("user", "file")]
    assert [(n, v) for n, v in seen if n not in ("user", "_ser", "file")] == others


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A well-formed body with a few pieces of multipart syntax put in or cut out."""
    shape = Shape(draw)
    boundary, body, _ = _body(draw, shape)
    pieces = [
        b"--" + boundary,
        b"\r\n--" + boundary + b"\r\n",
        b"--" + boundary + b"--",
        b"\r\n",
        b"\r",
        b"\n",
        b"\r\n\r\n",
        b" ",
        b"-",
        b"Content-Disposition: form-data; ",
        b'name="user"',
        b"name=user",
        b"name*=",
    ]
    for _ in range(shape.below(4)):
        at = shape.below(len(body) + 1)
        if shape.flag():
            body = body[:at] + shape.pick(pieces) + body[at:]
        else:
            body = body[:at] + body[at + 1 + shape.below(4) :]
    return boundary, body


@settings(max_examples=150, deadline=None)
@given(st.data(), mutated())
def test_any_input_any_chunking_same_outcome(
    data: st.DataObject, sample: tuple[bytes, bytes]
) -> None:
    boundary, body = sample
    added = UserFieldRewriter(boundary, USER).added_bytes
    try:
        whole: bytes | None = _run(boundary, USER, [body])[0]
    except MultipartError:
        whole = None
    try:
        chunked: bytes | None = _run(boundary, USER, chunks_of(data.draw, body))[0]
    except MultipartError:
        chunked = None
    assert chunked == whole
    if whole is not None:
        assert len(whole) == len(body) + added
        # Whatever is let through, the standard library reads our user, and only it.
        assert [v for n, v in fields(parse(whole, boundary)) if n == "user"] == [b"alice"]


def test_file_bytes_count_only_parts_with_a_filename() -> None:
    body = (
        b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.txt"\r\n\r\n0123456789\r\n'
        b'--b\r\nContent-Disposition: form-data; name="user"\r\n\r\nmallory\r\n'
        b"--b--\r\n"
    )
    rewriter = UserFieldRewriter(b"b", "alice")
    for i in range(0, len(body), 3):
        rewriter.feed(body[i : i + 3])
    rewriter.close()
    assert rewriter.file_bytes == 10
    assert rewriter.content_bytes == 5 + 10 + 7
