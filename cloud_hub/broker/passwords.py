"""Password hashes in Mosquitto's password-file format.

Mosquitto 2 reads ``$7$<iterations>$<salt b64>$<hash b64>``: PBKDF2-HMAC-SHA512 over the
password with a 12-byte salt, 64-byte output (what ``mosquitto_passwd`` writes). The hub keeps
only this hash, so it can regenerate the password file without ever storing the password.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

ITERATIONS = 101  # mosquitto_passwd's default
SALT_BYTES = 12


def hash_password(password: str, *, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else os.urandom(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, dklen=64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def rabbit_hash(password: str, *, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password)).

    RabbitMQ cannot check the ``$7$`` hash above, so for a RabbitMQ broker the hub keeps this
    one too (a 4-byte salt and one round are RabbitMQ's format, not our choice).
    """
    salt = salt if salt is not None else os.urandom(4)
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
