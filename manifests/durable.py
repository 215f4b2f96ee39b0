"""The one durable write of the whole tree: the contracts package's only piece of I/O.

Every part writes the files that matter the same way (the hub its secrets and broker files,
the CLI its keys, bundles and credentials, the agent its state and instance records, the
scoring server its state file): a temp file in the target's folder, created with the final
mode whatever the umask, written, **fsynced**, renamed over the target, then the **folder
fsynced** so that the rename itself survives a power cut. A crash leaves the old file or the
new one, never half of one, and a reader never sees a partial file. It lives in ``manifests``
because that is the one package the hub, the agent and the CLI all may import
(``tests/test_layers.py``); it imports nothing of ours.

Streamed content-addressed blobs (the hub's blob store, the agent's cache) keep writers of
their own: their temp file is renamed only after its digest was checked.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

__all__ = ["durable_output", "fsync_dir", "replace_all_durably", "write_durable"]

#: Mode of a file written without one: private, since the files that matter here are secrets
#: or state more often than not.
DEFAULT_MODE = 0o600


def fsync_dir(folder: Path) -> None:
    """Make the entries of ``folder`` (a rename into it, a file created in it) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """A temp name beside ``path`` that no other writer uses (pid and a random suffix), hidden
    and named after the file so that a leftover says whose it was."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def durable_output(path: Path, *, mode: int = DEFAULT_MODE) -> Iterator[IO[bytes]]:
    """A binary file to write ``path``'s new content into; when the block ends without an
    error it replaces ``path`` durably (file fsync, rename, folder fsync). On an error the
    temp file is removed and ``path`` is untouched.

    The temp file is created with ``mode`` (never through a link, never over another file) and
    set to it again whatever the umask, so a secret is never readable by others, not even for
    a moment."""
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_durable(path: Path, data: bytes, *, mode: int = DEFAULT_MODE) -> None:
    """Replace ``path`` with ``data`` durably (see :func:`durable_output`)."""
    with durable_output(path, mode=mode) as fh:
        fh.write(data)


def replace_all_durably(staged: Sequence[tuple[Path, Path]]) -> None:
    """Rename many written temp files over their targets, ``(temp, target)`` pairs, with the
    same durability as :func:`write_durable` at the cost of one sync instead of one per file
    (bulk enrolment writes thousands): every file's data is synced once before any of them is
    renamed into place, then each folder is fsynced once."""
    os.sync()
    for tmp, target in staged:
        os.replace(tmp, target)
    for folder in sorted({target.parent for _, target in staged}):
        fsync_dir(folder)
