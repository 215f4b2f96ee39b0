"""Broker password hashes, a contract between a device and its hub.

A device that joins by itself (``edgepack agent join``) makes its broker password on the
device and sends only these hashes, so the hub writes the broker's accounts without ever
seeing the password. Mosquitto 2 reads ``$7$<iterations>$<salt b64>$<hash b64>``:
PBKDF2-HMAC-SHA512 with a 12-byte salt and a 64-byte output (what ``mosquitto_passwd``
writes); RabbitMQ's ``rabbit_password_hashing_sha256`` is base64(salt + sha256(salt + password)).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

ITERATIONS = 101  # mosquitto_passwd's default
SALT_BYTES = 12
DIGEST_BYTES = 64
#: A hash a device sends may not ask the broker for more work per login than this (each
#: CONNECT recomputes it): a hostile device could otherwise make its own logins expensive
#: enough to slow the broker for everyone.
MAX_ITERATIONS = 10_000
RABBIT_SALT_BYTES = 4


def hash_password(password: str, *, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else os.urandom(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, dklen=DIGEST_BYTES)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def rabbit_hash(password: str, *, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256`` (a 4-byte salt and one round are
    RabbitMQ's format, not our choice): RabbitMQ cannot check the ``$7$`` hash."""
    salt = salt if salt is not None else os.urandom(RABBIT_SALT_BYTES)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def check_password(password: str, hashed: str) -> bool:
    try:
        _, tag, iters, salt_b64, digest_b64 = hashed.split("$")
        if tag != "7":
            return False
        salt = base64.b64decode(salt_b64)
        expected = base64.b64decode(digest_b64)
    except ValueError:
        return False
    got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(iters), dklen=len(expected))
    return hmac.compare_digest(got, expected)


def _b64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def mosquitto_hash_problem(hashed: str) -> str | None:
    """Why ``hashed`` is not a ``$7$`` hash the hub may put in the broker's password file
    (None when it is): the exact shape ``hash_password`` writes, iterations bounded."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != "7":
        return "not a '$7$<iterations>$<salt>$<hash>' Mosquitto hash"
    if not parts[2].isdigit() or not ITERATIONS <= int(parts[2]) <= MAX_ITERATIONS:
        return f"its iteration count must be from {ITERATIONS} to {MAX_ITERATIONS}"
    try:
        salt, digest = _b64(parts[3]), _b64(parts[4])
    except (binascii.Error, UnicodeEncodeError):
        return "its salt or hash is not base64"
    if len(salt) != SALT_BYTES or len(digest) != DIGEST_BYTES:
        return f"its salt must be {SALT_BYTES} bytes and its hash {DIGEST_BYTES}"
    return None


def rabbit_hash_problem(hashed: str) -> str | None:
    """Why ``hashed`` is not a RabbitMQ sha256 hash (None when it is)."""
    try:
        raw = _b64(hashed)
    except (binascii.Error, UnicodeEncodeError):
        return "not base64"
    if len(raw) != RABBIT_SALT_BYTES + 32:
        return f"must be {RABBIT_SALT_BYTES + 32} bytes (salt and sha256)"
    return None
