"""Per-user gateway keys: generation and hashing.

A key is ``gwk_`` followed by 43 URL-safe characters (256 random bits). Only its
SHA-256 is stored: with that much entropy a fast hash is enough (no dictionary
to attack), and it lets a lookup be one indexed equality match.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

KEY_PREFIX = "gwk_"


@dataclass(frozen=True, slots=True)
class NewKey:
    id: str  # public id, e.g. "key_3f9a1c2b7d4e"
    secret: str  # shown once, never stored
    hash: str
    prefix: str  # the first characters, to recognise the key in listings


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key() -> NewKey:
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    return NewKey(
        id="key_" + secrets.token_hex(6),
        secret=secret,
        hash=hash_key(secret),
        prefix=secret[: len(KEY_PREFIX) + 6],
    )
