"""The files a Dify answer request names, read as Dify builds them
(gateway/upstreams/dify_files.py): every id a build could look a file up by, in
every place a build reads files from, so that none reaches Dify unchecked."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from gateway.errors import BadRequest
from gateway.upstreams.dify_files import (
    NO_FILES,
    NamedFiles,
    canonical_uuid,
    named_files,
    uploaded_file_id,
)

A = "0b7d4a52-7f3e-4c55-9a3c-2f1e6d3c9b10"
B = "8f14e45f-ceea-467f-a0e6-7a3c1b2d9e41"


def _local(file_id: str) -> dict[str, Any]:
    return {"type": "document", "transfer_method": "local_file", "upload_file_id": file_id}


def _reference(record_id: str) -> str:
    payload = orjson.dumps({"record_id": record_id, "storage_key": "k"})
    return "dify-file-ref:" + base64.urlsafe_b64encode(payload).decode()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"query": "hi", "inputs": {}}, NO_FILES),
        ({"query": "hi", "inputs": {"topic": "x"}, "files": []}, NO_FILES),
        ({"files": [_local(A)]}, NamedFiles(frozenset({A}))),
        # A file object given alone where Dify expects a list.
        ({"files": _local(A)}, NamedFiles(frozenset({A}))),
        # File-typed inputs: one file, or a list of them.
        ({"inputs": {"doc": _local(A)}}, NamedFiles(frozenset({A}))),
        ({"inputs": {"docs": [_local(A), _local(B)]}}, NamedFiles(frozenset({A, B}))),
        ({"files": [_local(A)], "inputs": {"doc": _local(A)}}, NamedFiles(frozenset({A}))),
        # Any spelling of a UUID Dify reads as the same file: one id.
        ({"files": [_local(A.upper()), _local("{" + A + "}")]}, NamedFiles(frozenset({A}))),
        # The other keys a build finds a file by: a tool's, a pipeline's, and the
        # fallbacks of newer builds (an encoded reference decoded as Dify does).
        ({"files": [{"transfer_method": "tool_file", "tool_file_id": B}]}, NamedFiles(frozenset({B}), True)),
        ({"files": [{"transfer_method": "datasource_file", "datasource_file_id": B}]}, NamedFiles(frozenset({B}), True)),
        ({"files": [{"transfer_method": "local_file", "related_id": B}]}, NamedFiles(frozenset({B}))),
        ({"files": [{"transfer_method": "local_file", "reference": _reference(B)}]}, NamedFiles(frozenset({B}))),
        ({"files": [{"transfer_method": "local_file", "reference": "dify-file-ref:%%"}]}, NamedFiles(frozenset({"dify-file-ref:%%"}))),
        # An upload id beside a URL: builds that keep a URL's uploaded copy read it.
        ({"files": [{"transfer_method": "remote_url", "url": "https://x/a.pdf", "upload_file_id": A}]}, NamedFiles(frozenset({A}), True)),
        # Given by value: a URL Dify fetches, or any method but an upload.
        ({"files": [{"transfer_method": "remote_url", "url": "https://x/a.pdf"}]}, NamedFiles(frozenset(), True)),
        ({"inputs": {"doc": {"transfer_method": "remote_url", "url": "https://x/a.pdf"}}}, NamedFiles(frozenset(), True)),
        ({"inputs": {"docs": [{"transfer_method": "LOCAL_FILE", "upload_file_id": A}]}}, NamedFiles(frozenset({A}), True)),
        # An empty id is none, as Dify reads it; objects that name no file are not files.
        ({"files": [{"transfer_method": "local_file", "upload_file_id": ""}]}, NO_FILES),
        ({"inputs": {"settings": {"tone": "formal"}}}, NO_FILES),
    ],
)  # fmt: skip
def test_named_files(body: dict[str, Any], expected: NamedFiles) -> None:
    assert named_files(body) == expected


@pytest.mark.parametrize("value", [123, ["a"], {"id": "a"}, True])
def test_a_file_id_that_is_not_a_string_is_refused(value: object) -> None:
    """What Dify would make of it (a list compared with a UUID column...) cannot be judged."""
    with pytest.raises(BadRequest, match="must be a string"):
        named_files({"files": [{"transfer_method": "local_file", "upload_file_id": value}]})


def test_canonical_ids() -> None:
    assert canonical_uuid(A.upper()) == A
    assert canonical_uuid(A.replace("-", "")) == A
    assert canonical_uuid("not-a-uuid") == "not-a-uuid"


def test_the_uploaded_file_id_is_read_from_the_upload_reply() -> None:
    reply = {"id": A.upper(), "name": "a.pdf", "size": 3, "extension": "pdf"}
    assert uploaded_file_id(orjson.dumps(reply)) == A
    assert uploaded_file_id(b"{}") is None
    assert uploaded_file_id(b'{"id": 7}') is None
    assert uploaded_file_id(b"not json") is None
    assert uploaded_file_id(b"[]") is None
