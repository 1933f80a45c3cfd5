"""The files a Dify answer request names, read as Dify reads them (review F9, F5).

Dify builds a request's files from ``files[*]`` and from the file-typed
``inputs.*`` values (one file object, or a list of them), whichever app type
runs it (chat, completion, workflow, a resumed form). It finds a file named by
id within the whole workspace, with no end-user check in 1.x
(``factories/file_factory.py``: ``UploadFile.id == upload_file_id AND
UploadFile.tenant_id == tenant``), so the gateway lets a request name only the
uploads it kept for the caller; and it fetches a ``remote_url`` file itself,
past the plan's upload limits. The wire facts are in docs/upstreams/dify.md
("Files").

Pure: no I/O; the proxy looks the ids up (`gateway.routing.RouteGuard.check_files`).
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import orjson

from gateway.errors import BadRequest

__all__ = ["NO_FILES", "NamedFiles", "canonical_uuid", "named_files", "uploaded_file_id"]

# The keys under which a Dify build finds a file by id: the upload's
# (``local_file``, and ``remote_url`` in builds that take an uploaded copy of a
# URL), a tool's file, a knowledge pipeline's file, and the fallbacks newer
# builds read (``resolve_mapping_file_id``: ``reference``, then ``related_id``).
_ID_KEYS: Final = (
    "upload_file_id",
    "tool_file_id",
    "datasource_file_id",
    "reference",
    "related_id",
)
# What Dify sends through `POST /files/upload`; any other method (remote_url,
# tool_file, datasource_file, or none at all) is not an upload of the caller's.
_UPLOADED: Final = "local_file"
# Newer builds write a file's reference as this prefix and base64url JSON
# carrying ``record_id`` (core/workflow/file_reference.py).
_REFERENCE_PREFIX: Final = "dify-file-ref:"


@dataclass(frozen=True, slots=True)
class NamedFiles:
    """The ids of the files a request names (canonical, `canonical_uuid`),
    and whether any file comes otherwise than as an upload (``by_value``: a
    ``transfer_method`` other than ``local_file``)."""

    ids: frozenset[str] = frozenset()
    by_value: bool = False

    def __bool__(self) -> bool:
        return bool(self.ids) or self.by_value


NO_FILES: Final = NamedFiles()


def canonical_uuid(value: str) -> str:
    """An id Dify reads as a UUID (a file's, a conversation's), as the gateway
    keeps it: in its canonical lower-case form (Dify and PostgreSQL read
    ``A1B2...``, braces or no hyphens as the same one), anything else as it is."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return value


def _reference_id(value: str) -> str:
    """The record id a newer build reads from a ``dify-file-ref:`` reference
    (itself when it is not one, as Dify reads it)."""
    if not value.startswith(_REFERENCE_PREFIX):
        return value
    encoded = value.removeprefix(_REFERENCE_PREFIX)
    try:
        payload = orjson.loads(base64.urlsafe_b64decode(encoded.encode()))
    except (ValueError, binascii.Error, orjson.JSONDecodeError):
        return value
    record = payload.get("record_id") if isinstance(payload, dict) else None
    return record if isinstance(record, str) and record else value


def _file_objects(body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every object Dify may build a file from: the items of ``files`` (an
    object given alone too), and each object value of ``inputs``, or object in
    a list value (the gateway does not know which inputs the app types as
    files, so it reads them all)."""
    files = body.get("files")
    if isinstance(files, dict):
        yield files
    elif isinstance(files, list):
        yield from (item for item in files if isinstance(item, dict))
    inputs = body.get("inputs")
    if isinstance(inputs, dict):
        for value in inputs.values():
            if isinstance(value, dict):
                yield value
            elif isinstance(value, list):
                yield from (item for item in value if isinstance(item, dict))


def named_files(body: dict[str, Any] | None) -> NamedFiles:
    """The files an answer request names (see `NamedFiles`). A file id that is
    not a string is refused (400): what Dify would make of it cannot be judged."""
    if body is None or ("files" not in body and not body.get("inputs")):
        return NO_FILES
    ids: set[str] = set()
    by_value = False
    for item in _file_objects(body):
        if "transfer_method" in item and item["transfer_method"] != _UPLOADED:
            by_value = True
        for key in _ID_KEYS:
            value = item.get(key)
            if value is None or value == "":
                continue  # Dify reads an empty id as none
            if not isinstance(value, str):
                raise BadRequest("A file id in the request must be a string.")
            ids.add(canonical_uuid(_reference_id(value)))
    if not ids and not by_value:
        return NO_FILES
    return NamedFiles(frozenset(ids), by_value)


def uploaded_file_id(body: bytes | bytearray) -> str | None:
    """The id of the file an accepted `POST /files/upload` created (its body's
    ``id``), canonical; None when the body names none."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    value = obj.get("id") if isinstance(obj, dict) else None
    return canonical_uuid(value) if isinstance(value, str) and value else None
