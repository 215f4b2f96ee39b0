"""Content-addressed blob store (placeholder until its owner fills it in)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class BlobStore(Protocol):
    def has(self, digest: str) -> bool: ...


class FileBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def has(self, digest: str) -> bool:
        return False
