"""Reading request bodies from ASGI: whole (bounded), streamed, rewritten, spooled.

The transport consumes a streamed body while sending it upstream and wraps what
the body raises, so every reader records its own failure in a `BodyFailure` for
the proxy to answer correctly (a client gone, a malformed or oversized upload).
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from typing import IO

from gateway.errors import PayloadTooLarge
from gateway.multipart import MultipartError, UserFieldRewriter
from gateway.types import Receive

# What an upload carries beside its files' content - the other form fields (the
# `user` field, a few flags), every part's delimiter and headers, and any
# preamble or epilogue (RFC 2046 5.1.1: ignored by parsers, and no browser, curl
# or requests sends more than a CRLF there) - may be this much; a body with more
# is refused too, so nothing carries a body past a limit under another name, in
# many empty parts, or around the parts.
FIELDS_ALLOWANCE = 64 * 1024
# Spooled uploads stay in memory up to this size, then move to a temporary file.
_SPOOL_IN_MEMORY = 1024 * 1024
_SPOOL_READ = 64 * 1024


class ClientGone(Exception):
    """The client disconnected while its request body was being read."""


class BodyFailure:
    __slots__ = ("error",)

    def __init__(self) -> None:
        self.error: Exception | None = None


def other_bytes(rewriter: UserFieldRewriter) -> int:
    """What an upload carries beside its files' content so far (held to
    `FIELDS_ALLOWANCE`): the body less the files' content (which lags by the
    few bytes that could start a delimiter until they are known not to)."""
    return rewriter.body_bytes - rewriter.file_bytes


def over_limit(rewriter: UserFieldRewriter, limit: int) -> bool:
    return rewriter.file_bytes > limit or other_bytes(rewriter) > FIELDS_ALLOWANCE


def file_too_large(limit: int) -> PayloadTooLarge:
    mb = limit / (1024 * 1024)
    return PayloadTooLarge(
        f"The file is larger than your plan allows ({mb:g} MB).", code="file_too_large"
    )


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole body, refused with 413 once it passes ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def stream_body(receive: Receive, failure: BodyFailure) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            failure.error = ClientGone()
            raise failure.error
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def rewritten_multipart(
    receive: Receive, rewriter: UserFieldRewriter, failure: BodyFailure, *, limit: int | None
) -> AsyncIterator[bytes]:
    """A multipart body streamed through ``rewriter``, refused past ``limit`` bytes
    of content (only reachable when Content-Length did not already decide)."""
    try:
        async for chunk in stream_body(receive, failure):
            out = rewriter.feed(chunk)
            if limit is not None and over_limit(rewriter, limit):
                raise file_too_large(limit)
            if out:
                yield out
        tail = rewriter.close()
    except (MultipartError, PayloadTooLarge) as exc:
        failure.error = exc
        raise
    if tail:
        yield tail


class PastUploadLimits(Exception):
    """An upload's files passed the bytes no upload limit lets through (the rest
    of the body is not read): the caller refuses it by that limit."""

    def __init__(self, file_bytes: int) -> None:
        super().__init__(f"{file_bytes} bytes of files")
        self.file_bytes = file_bytes


async def spool_multipart(
    receive: Receive,
    rewriter: UserFieldRewriter,
    *,
    limit: int | None,
    most_bytes: int | None = None,
) -> tuple[IO[bytes], int]:
    """Read a whole upload through ``rewriter`` into a temporary spool, refusing it
    as soon as its content passes ``limit`` bytes (None: no file size limit), so
    that no byte of a body that turns out too large is ever forwarded; or, raising
    `PastUploadLimits`, as soon as its files pass ``most_bytes`` (what the upload
    limits let through at most). Returns the spool (rewound) and its size.
    """
    spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)  # noqa: SIM115
    try:
        size = 0
        async for chunk in stream_body(receive, BodyFailure()):
            out = rewriter.feed(chunk)
            if limit is not None and over_limit(rewriter, limit):
                raise file_too_large(limit)
            if most_bytes is not None:
                if rewriter.file_bytes > most_bytes:
                    raise PastUploadLimits(rewriter.file_bytes)
                if other_bytes(rewriter) > FIELDS_ALLOWANCE:
                    # As under a file size limit: nothing carries what the
                    # limits count past them under another name, or around
                    # the parts.
                    raise PayloadTooLarge(
                        f"The upload's other form fields exceed {FIELDS_ALLOWANCE} bytes."
                    )
            # Writes of at most one chunk to a local temporary file: short enough
            # not to be worth a thread hop.
            spool.write(out)
            size += len(out)
        tail = rewriter.close()
        spool.write(tail)
        size += len(tail)
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool, size


async def read_spool(spool: IO[bytes]) -> AsyncIterator[bytes]:
    try:
        while chunk := spool.read(_SPOOL_READ):
            yield chunk
    finally:
        spool.close()
