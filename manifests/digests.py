"""Content digests in the ``sha256:<hex>`` form used for blobs and manifests."""

from __future__ import annotations

import hashlib
import re

DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"
_DIGEST_RE = re.compile(DIGEST_PATTERN)


def sha256_digest(data: bytes) -> str:
    """The ``sha256:<hex>`` digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def is_digest(value: str) -> bool:
    return bool(_DIGEST_RE.fullmatch(value))


def digest_hex(digest: str) -> str:
    """The hex part of a ``sha256:<hex>`` digest; raises ValueError on anything else."""
    if not is_digest(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return digest.split(":", 1)[1]
