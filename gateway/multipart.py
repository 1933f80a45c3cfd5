"""Put the authenticated user into a streaming ``multipart/form-data`` body (sans-io).

Dify takes the ``user`` of ``POST /files/upload`` from a form field it never
verifies, so the gateway must make the upstream read *its* user there without
holding the (many MB) file in memory and, ideally, without losing the
Content-Length. `UserFieldRewriter` turns the client's body into one that is
exactly `added_bytes` longer:

* a new first part ``name="<field>"`` holding the user id is inserted; Werkzeug
  (Dify's parser) returns the first value of a repeated field;
* every client part named ``<field>`` is renamed in place to a name of the same
  length (``user`` -> ``_ser``), so parsers that keep the *last* value agree too;
* everything else passes through byte for byte, preamble and epilogue included
  (`body_bytes` counts all of it, so a limit can bound what is not a file too).

Where the new part goes. RFC 2046 section 5.1.1 reads::

    multipart-body := [preamble CRLF] dash-boundary transport-padding CRLF
                      body-part *encapsulation close-delimiter ...
    delimiter      := CRLF dash-boundary

The part is inserted immediately before the body's first dash-boundary, so::

    no preamble:  <part> --b ...                 (<part> ends with CRLF, which
    preamble:     P CRLF <part> --b ...           opens the delimiter "CRLF --b")

With a preamble, the CRLF that ended it now ends it in front of our dash-boundary,
so the preamble stays a preamble and nothing lands inside our value; the growth is
the same in both cases, which is what lets `added_bytes` be known before the first
byte arrives.

Where parsers disagree, refuse. A part the gateway does not see but the upstream
does could carry another ``user``, so input that real parsers read differently is
a `MultipartError` rather than a guess: ``--boundary`` after a bare CR or LF
(Werkzeug takes either alone as a line break), in the preamble anywhere but at a
line start (Werkzeug finds the first boundary without one), or right after a
part's headers; a delimiter line with more than transport padding after it; a
part with no headers (Werkzeug then reads its content as headers); header lines
that are not CRLF-terminated ``Name: value`` lines, or that contain the boundary;
and RFC 2231 ``name*`` parameters (RFC 7578 section 4.2 rules that encoding out
for ``filename*``, no client uses it for ``name``, and Werkzeug decodes it). RFC
7578 section 4.1 has senders choose a boundary absent from the content, so none
of this refuses what a browser, curl or requests sends.

Renaming errs the other way: ``name`` parameters are looked for in every header
of a part and read every way a parser might, so a look-alike (``Content-Type:
...; name=user``) may be renamed too. That is harmless; a missed one is not.
"""

from __future__ import annotations

import re

__all__ = ["MultipartError", "UserFieldRewriter", "boundary_from_content_type"]


class MultipartError(ValueError):
    """The body is not multipart/form-data the gateway can pass on safely."""


_CRLF = b"\r\n"
_PADDING = b" \t"  # RFC 2046 transport-padding is LWSP-char: SPACE / HTAB
_WS = b" \t\r\n"  # whitespace inside a (possibly folded) header

# RFC 2046 section 5.1.1: boundary := 0*69<bchars> bcharsnospace
_BCHARS = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'()+_,-./:=? ")
# Unquoted, the boundary must also be an RFC 9110 token: Werkzeug stops reading an
# unquoted value at the first non-token character and would split on another one.
_TOKEN_BCHARS = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'+_-.")
_FIELD_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

_MEDIA_PARAM_RE = re.compile(r'([^\s=;"]+)\s*=\s*(?:"([^"\\]*)"|([^\s;"]*))\s*(?:;|\Z)')
_MEDIA_SEP = " \t;"

# A `name` parameter key anywhere in a part's header block. It over-approximates
# what Werkzeug, python-multipart and the email package accept (any header, any
# case, whitespace or folds around "="): renaming a look-alike is harmless, missing
# a real one is not.
_NAME_PARAM_RE = re.compile(rb"(?<![^;: \t\r\n])name[ \t\r\n]*([*=])[ \t\r\n]*", re.IGNORECASE)
# Header lines (field name: printable ASCII but ":"), each maybe folded (RFC 5322).
_HEADER_BLOCK_RE = re.compile(rb"(?:[!-9;-~]+:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)*")
_QUOTED_RE = re.compile(rb'(?:[^"\\]|\\.)*', re.DOTALL)
_ESCAPE_RE = re.compile(rb"\\(.)", re.DOTALL)
_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]*")

# Scanner states.
_PREAMBLE, _DELIMITER, _HEADERS, _CONTENT, _CLOSE, _EPILOGUE, _CLOSED = range(7)


def _valid_boundary(boundary: str) -> bool:
    return (
        0 < len(boundary) <= 70
        and not boundary.endswith(" ")
        and all(char in _BCHARS for char in boundary)
    )


def boundary_from_content_type(content_type: str) -> bytes | None:
    """The boundary of a ``multipart/form-data`` Content-Type, or None.

    None also when the boundary is missing, not valid per RFC 2046, given twice or
    in RFC 2231 form: parsers would disagree on which boundary the body uses.
    """
    media, _, rest = content_type.partition(";")
    if media.strip().lower() != "multipart/form-data":
        return None
    boundary: str | None = None
    pos = len(rest) - len(rest.lstrip(_MEDIA_SEP))
    while pos < len(rest):
        match = _MEDIA_PARAM_RE.match(rest, pos)
        if match is None:
            return None
        key, quoted, token = match.groups()
        key = key.lower()
        if key.startswith("boundary*"):
            return None
        if key == "boundary":
            if boundary is not None:
                return None
            if quoted is not None:
                boundary = quoted
            elif all(char in _TOKEN_BCHARS for char in token):
                boundary = token
            else:
                return None
        pos = len(rest) - len(rest[match.end() :].lstrip(_MEDIA_SEP))
    if boundary is None or not _valid_boundary(boundary):
        return None
    return boundary.encode("ascii")


def _run(pattern: re.Pattern[bytes], data: bytes, pos: int) -> bytes:
    """What `pattern`, which also matches the empty string, matches at `pos`."""
    match = pattern.match(data, pos)
    return b"" if match is None else match.group()


def _field_value_at(block: bytes, pos: int, field: bytes) -> int | None:
    """Where to rename the parameter value starting at `pos` if it reads as `field`.

    The value is read every way a parser might (quoted with or without backslash
    escapes, a token cut at the first non-token byte or at ";"), each also with
    whitespace stripped. The answer is the value's first non-whitespace byte: once
    that is "_", no reading of it can be `field`.
    """
    if block[pos : pos + 1] == b'"':
        start = pos + 1
        end = block.find(b'"', start)
        plain = block[start:] if end < 0 else block[start:end]
        escaped = _ESCAPE_RE.sub(rb"\1", _run(_QUOTED_RE, block, start))
        readings = (plain, escaped)
    else:
        start = pos
        stop = len(block)
        for sep in (b";", _CRLF):
            found = block.find(sep, pos)
            if 0 <= found < stop:
                stop = found
        readings = (_run(_TOKEN_RE, block, pos), block[pos:stop])
    if not any(value == field or value.strip(_WS) == field for value in readings):
        return None
    rest = block[start:]
    return start + len(rest) - len(rest.lstrip(_WS))


class UserFieldRewriter:
    """Stream a multipart/form-data body, making `user_id` its `field` value.

    ``feed`` returns the output ready to forward (possibly ``b""``); ``close`` ends
    the input. Memory stays bounded: part content is passed on as it arrives, less
    a tail of ``len(boundary) + 3`` bytes that could hold the start of a delimiter;
    only a part's header block is held whole, up to `max_header_bytes`.

    After a `MultipartError` the output so far must not reach the upstream as a
    complete request: abort it. Nothing emitted before an error ends the body (the
    closing delimiter is held back until it is known to be well formed).
    """

    __slots__ = (
        "_at_start",
        "_body_bytes",
        "_buf",
        "_content_bytes",
        "_content_start",
        "_cr_dash",
        "_dash",
        "_error",
        "_field",
        "_file_bytes",
        "_in_file",
        "_keep",
        "_lf_dash",
        "_max_header",
        "_part",
        "_rename",
        "_search",
        "_state",
    )

    def __init__(
        self, boundary: bytes, user_id: str, *, field: str = "user", max_header_bytes: int = 16384
    ) -> None:
        if not (boundary.isascii() and _valid_boundary(boundary.decode("ascii"))):
            raise ValueError(f"not a valid RFC 2046 boundary: {boundary!r}")
        if "\r" in user_id or "\n" in user_id:
            # A line break would let the value close our part and forge more.
            raise ValueError("user_id must not contain CR or LF")
        if not _FIELD_RE.fullmatch(field):
            raise ValueError(f"field must be a non-empty RFC 9110 token: {field!r}")
        self._dash = b"--" + boundary
        self._field = field.encode("ascii")
        self._rename = ord("-") if field.startswith("_") else ord("_")
        self._part = b"".join(
            (
                self._dash,
                b'\r\nContent-Disposition: form-data; name="',
                self._field,
                b'"\r\n\r\n',
                user_id.encode("utf-8"),
                _CRLF,
            )
        )
        self._max_header = max_header_bytes
        # The unemitted tail: a "--boundary" (or "\n--boundary") starting in it, and the
        # bytes before it that tell a delimiter from content, are here when it completes.
        self._keep = len(self._dash) + 1
        self._lf_dash = b"\n" + self._dash
        self._cr_dash = b"\r" + self._dash
        self._buf = b""
        self._state = _PREAMBLE
        self._search = 0  # where the search for the end of a header block resumes
        self._at_start = True  # nothing of the body consumed yet
        self._content_start = False  # _buf starts right after a part's header block
        self._content_bytes = 0
        self._file_bytes = 0  # content of parts that carry a filename
        self._body_bytes = 0  # everything fed
        self._in_file = False
        self._error: MultipartError | None = None

    @property
    def added_bytes(self) -> int:
        """How many bytes longer the output is than the input, whatever the input."""
        return len(self._part)

    @property
    def content_bytes(self) -> int:
        """Part content seen so far, for upload limits; our inserted part is excluded.

        Client parts named like the field count too: they are renamed, not dropped,
        so leaving them out would let a client stream any amount past a limit.
        """
        return self._content_bytes

    @property
    def file_bytes(self) -> int:
        """Content seen so far in file parts (those whose headers give a filename)."""
        return self._file_bytes

    @property
    def body_bytes(self) -> int:
        """The client's body fed so far, all of it: part content, delimiters,
        header blocks, and the preamble and epilogue (RFC 2046 section 5.1.1),
        which parsers ignore but which are passed on too."""
        return self._body_bytes

    @property
    def finished(self) -> bool:
        """Whether the whole body went through, well formed (`close` returned)."""
        return self._state == _CLOSED and self._error is None

    def feed(self, chunk: bytes) -> bytes:
        """Take the next piece of the body; return the output ready to forward."""
        if self._error is not None:
            raise MultipartError(str(self._error))
        if self._state == _CLOSED:
            raise RuntimeError("feed() after close()")
        if not chunk:
            return b""
        self._body_bytes += len(chunk)
        self._buf = self._buf + chunk if self._buf else bytes(chunk)
        out: list[bytes] = []
        try:
            while self._step(out):
                pass
        except MultipartError as exc:
            self._error = exc
            raise
        return b"".join(out)

    def close(self) -> bytes:
        """End of input: the rest of the output, or `MultipartError` if it was cut short."""
        if self._error is not None:
            raise MultipartError(str(self._error))
        state, rest = self._state, self._buf
        self._state, self._buf = _CLOSED, b""
        if state == _EPILOGUE:
            return rest
        if state == _CLOSE and not rest[len(self._dash) + 2 :].strip(_PADDING):
            return rest  # "--boundary--" and padding, then the end: no epilogue
        if state == _CLOSED:
            return b""
        self._error = MultipartError(
            "multipart body ended before its closing delimiter --boundary-- (truncated?)"
        )
        raise self._error

    def _step(self, out: list[bytes]) -> bool:
        """Advance the scanner over `_buf`; True if it should be called again."""
        buf = self._buf
        dash = self._dash
        state = self._state

        if state == _PREAMBLE:
            i = buf.find(dash)
            if i < 0:
                self._release(out, len(buf) - self._keep)
                return False
            # The first "--boundary" anywhere must open the first delimiter: Werkzeug
            # takes it as one even without a line break before it (RFC 2046 wants one).
            if not ((i == 0 and self._at_start) or buf[i - 2 : i] == _CRLF):
                raise MultipartError("the first --boundary is not at the start of a line")
            out.append(buf[:i])
            out.append(self._part)
            self._buf = buf[i:]
            self._state = _DELIMITER
            return True

        if state == _CONTENT:
            if self._content_start and buf.startswith(dash):
                # RFC 2046 reads this as a part without a body, Werkzeug as body data.
                raise MultipartError("--boundary right after a part's header block")
            # Look for "--boundary" after LF and after CR: after anything else it is
            # data to every parser, so it costs no Python-level work.
            i = buf.find(self._lf_dash)
            cr = buf.find(self._cr_dash)
            if i < 0 and cr < 0:
                self._release(out, len(buf) - self._keep)
                return False
            # Werkzeug also takes CR or LF alone as the line break of a delimiter.
            if 0 <= cr < i or i < 0 or (buf[i - 1] if i else 0x0A) != 0x0D:
                raise MultipartError("--boundary after a bare CR or LF")
            out.append(buf[: i + 1])
            self._content_bytes += i - 1
            if self._in_file:
                self._file_bytes += i - 1
            self._buf = buf[i + 1 :]
            self._state = _DELIMITER
            return True

        if state == _DELIMITER:  # _buf starts with the dash-boundary
            n = len(dash)
            if len(buf) < n + 2:
                return False
            if buf[n : n + 2] == b"--":
                self._state = _CLOSE  # held back until the line is known to be well formed
                return True
            j = buf.find(_CRLF, n)
            pad = buf[n:] if j < 0 else buf[n:j]
            if j < 0 and pad.endswith(b"\r"):
                pad = pad[:-1]
            if pad.strip(_PADDING):
                raise MultipartError("a delimiter line has more than transport padding after it")
            if len(pad) > self._max_header:
                raise MultipartError("a delimiter line is longer than max_header_bytes")
            if j < 0:
                return False
            out.append(buf[:j])
            self._buf = buf[j:]
            self._state = _HEADERS
            return True

        if state == _HEADERS:  # _buf starts with the CRLF that ends the delimiter line
            j = buf.find(b"\r\n\r\n", self._search)
            if j < 0 or j + 2 > self._max_header:
                if len(buf) - 2 > self._max_header:
                    raise MultipartError(f"a part's header block is over {self._max_header} bytes")
                self._search = max(0, len(buf) - 3)
                return False
            block = buf[2 : j + 2]
            out.append(self._headers(block, buf[: j + 4]))
            self._in_file = b"filename" in block.lower()
            self._buf = buf[j + 4 :]
            self._state = _CONTENT
            self._content_start = True
            self._search = 0
            return True

        if state == _CLOSE:  # _buf starts with "--boundary--"
            n = len(dash) + 2
            j = buf.find(_CRLF, n)
            pad = buf[n:] if j < 0 else buf[n:j]
            if j < 0 and pad.endswith(b"\r"):
                pad = pad[:-1]
            if pad.strip(_PADDING):
                # RFC 2046 allows only transport padding here; the email package would
                # not take "--boundary--x" as the end and read on.
                raise MultipartError("the closing delimiter has more than padding after it")
            if len(pad) > self._max_header:
                raise MultipartError("the closing delimiter line is longer than max_header_bytes")
            if j < 0:
                return False
            self._state = _EPILOGUE
            # fall through: the epilogue is passed on as it is

        out.append(self._buf)
        self._buf = b""
        return False

    def _release(self, out: list[bytes], n: int) -> None:
        """Pass on the first `n` bytes of `_buf` (preamble or content), if any."""
        if n > 0:
            out.append(self._buf[:n])
            self._buf = self._buf[n:]
            self._at_start = self._content_start = False
            if self._state == _CONTENT:
                self._content_bytes += n
                if self._in_file:
                    self._file_bytes += n

    def _headers(self, block: bytes, raw: bytes) -> bytes:
        """Check one part's header lines (`block`) and return `raw` with the field renamed."""
        if not block:
            # RFC 7578 section 4.2: every part has a Content-Disposition. Werkzeug reads
            # past an empty header block and takes the next lines for headers instead.
            raise MultipartError("a part has no headers")
        if not _HEADER_BLOCK_RE.fullmatch(block):
            # RFC 5322 section 2.2 (via RFC 2046): "Name: value" lines ending in CRLF.
            # Werkzeug also ends a line at CR or LF alone, and the email package ends
            # the headers at a line that is not a header: either could hide one from us.
            raise MultipartError("part headers are not CRLF-terminated `Name: value` lines")
        if self._dash in block:
            raise MultipartError("part headers contain the --boundary")
        renamed: bytearray | None = None
        for match in _NAME_PARAM_RE.finditer(block):
            if match.group(1) == b"*":
                raise MultipartError("RFC 2231 name* parameters are not accepted in form-data")
            at = _field_value_at(block, match.end(), self._field)
            if at is not None:
                if renamed is None:
                    renamed = bytearray(raw)
                renamed[2 + at] = self._rename
        return raw if renamed is None else bytes(renamed)
