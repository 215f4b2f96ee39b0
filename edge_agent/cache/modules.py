"""The device's module cache: verified blobs plus one ready-to-run folder per module.

On disk::

    <root>/blobs/sha256/<hex>            content-addressed blobs (read-only)
    <root>/modules/<manifest-hex>/       one folder per installed module (files read-only)
        module.json                      the exact verified manifest bytes
        src/...  model/...               laid out from the manifest's ``files``

A module folder is built under a temp name beside its final one and renamed into place only
when complete, so a folder under a manifest digest's name is always whole; its name is the
digest of the ``module.json`` inside it. Files are hard links to the blobs when the file
system allows it (no second copy of a large model), copies otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from edge_agent.cache.blobs import BLOB_MODE, PART_SUFFIX, BlobStore, PendingBlob, cache_errors
from edge_agent.cache.layout import MANIFEST_FILE, Placement, plan_layout
from manifests.durable import fsync_dir
from manifests.verified import VerifiedModule, parse_module_manifest

if TYPE_CHECKING:
    from manifests.bundle import BlobSink
from manifests.digests import digest_hex, is_digest, sha256_digest
from manifests.errors import ConfigError, FetchError, TrustError
from manifests.module import MODEL_ROOT, ModuleManifest
from manifests.signing import TrustStore, parse_envelope

MODULES_DIR = "modules"
#: temp files and folders older than this are leftovers of a crash, not work in progress
STALE_AFTER_S = 3600.0
FOLDER_MODE = 0o555


@dataclass(frozen=True)
class InstalledModule:
    """A module whose folder is complete and whose manifest was verified."""

    dir: Path
    manifest: ModuleManifest
    manifest_digest: str
    signers: tuple[str, ...] = ()


@dataclass(frozen=True)
class PruneReport:
    modules_removed: int
    blobs_removed: int
    bytes_freed: int


class ModuleCache:
    """A content-addressed module cache rooted at ``root``.

    It is a :class:`manifests.bundle.BlobSink`: ``verify_bundle(stream, trust, sink=cache)``
    stores each blob once its digest is confirmed, and skips blobs already held.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = BlobStore(root)
        self.modules = root / MODULES_DIR

    # --- blobs (BlobSink) -------------------------------------------------------------------

    def has(self, digest: str) -> bool:
        """True when blob ``digest`` is held; it will never be written or downloaded again."""
        return self.blobs.has(digest)

    def begin(self, digest: str, size: int) -> PendingBlob:
        """Start writing one blob (from a bundle or a download); see :class:`PendingBlob`."""
        return self.blobs.begin(digest, size)

    def blob_path(self, digest: str) -> Path:
        return self.blobs.path(digest)

    # --- modules ----------------------------------------------------------------------------

    def module_dir(self, manifest_digest: str) -> Path:
        try:
            return self.modules / digest_hex(manifest_digest)
        except ValueError:
            raise TrustError(f"{manifest_digest!r} is not a manifest digest; refused") from None

    def install_bundle(
        self,
        path: Path,
        trust: TrustStore,
        progress: Callable[[int], None] | None = None,
    ) -> InstalledModule:
        """Verify the bundle at ``path`` into the cache and materialise its module folder.

        Refuses (:class:`TrustError`) exactly what ``verify_bundle`` refuses; a blob that fails
        its digest never lands in the cache. Installing the same module again reuses what is
        held. ``progress`` gets the byte count of each chunk verified.
        """
        # The single-file form needs tarfile; the agent, fetching blob by blob, never does.
        from manifests.bundle import verify_bundle

        try:
            fh = path.open("rb")
        except FileNotFoundError:
            raise ConfigError(f"{path}: bundle not found") from None
        with fh:
            verified = verify_bundle(
                fh, trust, sink=self.bundle_sink(), progress=progress, what=str(path)
            )
        return self.install_verified(verified)

    def bundle_sink(self) -> BlobSink:
        """The sink to hand to ``verify_bundle``: the same store, but blobs are hashed once,
        by ``verify_bundle``, which commits a blob only when its digest matched."""
        return _BundleSink(self.blobs)

    def install_verified(self, verified: VerifiedModule) -> InstalledModule:
        """Materialise an already verified module whose blobs are all held; a file system
        failure is a :class:`CacheError`."""
        with cache_errors(f"module {verified.manifest.ref}"):
            folder = self.materialize(verified)
        return InstalledModule(
            dir=folder,
            manifest=verified.manifest,
            manifest_digest=verified.manifest_digest,
            signers=tuple(verified.signers),
        )

    def materialize(self, verified: VerifiedModule) -> Path:
        """Build ``modules/<manifest-hex>/`` from held blobs; return it.

        A no-op when the folder is already complete. Raises :class:`FetchError` when a blob is
        missing (download it first) and :class:`TrustError` on any unsafe path.
        """
        if sha256_digest(verified.manifest_bytes) != verified.manifest_digest:
            raise TrustError("manifest bytes do not match the manifest digest; refused")
        final = self.module_dir(verified.manifest_digest)
        placements = plan_layout(verified.manifest)
        if _is_complete(final, verified.manifest_bytes, placements):
            return final
        for p in placements:
            if self.blobs.size(p.digest) != p.size:
                raise FetchError(
                    f"module {verified.manifest.ref}: blob {p.digest} for {p.path} is not in "
                    f"the cache at {self.root}; download it first"
                )
        self.modules.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(final):
            self._discard(final)  # damaged or foreign: rebuilt below
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=PART_SUFFIX, dir=self.modules))
        try:
            self._build(tmp, verified.manifest_bytes, placements)
            try:
                os.rename(tmp, final)
            except OSError as exc:
                # Another installer finished the same module first: theirs is as good as ours.
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not _is_complete(
                    final, verified.manifest_bytes, placements
                ):
                    raise
                self._discard(tmp)
                return final
            fsync_dir(self.modules)
        except BaseException:
            self._discard(tmp)
            raise
        return final

    def open_installed(self, manifest_digest: str, trust: TrustStore) -> InstalledModule | None:
        """The installed module for ``manifest_digest`` with its signatures checked again
        (e.g. when the agent restarts), or ``None`` when it is not installed."""
        folder = self.module_dir(manifest_digest)
        with cache_errors(f"module {manifest_digest[:19]}"):
            try:
                data = (folder / MANIFEST_FILE).read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                return None
            if sha256_digest(data) != manifest_digest:
                return None
            verified = parse_module_manifest(data, trust, what=str(folder / MANIFEST_FILE))
            if not _is_complete(folder, data, plan_layout(verified.manifest)):
                return None
        return InstalledModule(
            dir=folder,
            manifest=verified.manifest,
            manifest_digest=manifest_digest,
            signers=tuple(verified.signers),
        )

    def installed(self) -> list[str]:
        """Manifest digests of every module folder present."""
        if not self.modules.is_dir():
            return []
        return sorted(
            "sha256:" + e.name for e in os.scandir(self.modules) if is_digest("sha256:" + e.name)
        )

    def prune(self, keep: set[str], keep_blobs: frozenset[str] = frozenset()) -> PruneReport:
        """Remove every module folder not in ``keep`` (manifest digests) and every blob that no
        kept module uses and that is not in ``keep_blobs`` (e.g. blobs of a module whose
        download is still under way). Leftovers of crashed writers are removed too."""
        needed = set(keep_blobs)
        modules_removed = 0
        if self.modules.is_dir():
            cutoff = time.time() - STALE_AFTER_S
            for entry in os.scandir(self.modules):
                path = Path(entry.path)
                digest = "sha256:" + entry.name
                if entry.name.endswith(PART_SUFFIX):
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        self._discard(path)
                    continue
                if not is_digest(digest):
                    continue  # not ours: leave it alone
                manifest = _read_manifest(path) if digest in keep else None
                if manifest is None:
                    self._discard(path)
                    modules_removed += 1
                    continue
                needed.update(f.digest for f in manifest.files)
        blobs_removed = bytes_freed = 0
        for digest in list(self.blobs.digests()):
            if digest not in needed:
                bytes_freed += self.blobs.remove(digest)
                blobs_removed += 1
        for digest in list(self.blobs.partials()):
            if digest not in needed:
                bytes_freed += self.blobs.remove_partial(digest)
        self.blobs.remove_stale_parts(STALE_AFTER_S)
        return PruneReport(modules_removed, blobs_removed, bytes_freed)

    # --- internals --------------------------------------------------------------------------

    def _build(self, tmp: Path, manifest_bytes: bytes, placements: list[Placement]) -> None:
        manifest_path = tmp / MANIFEST_FILE
        with manifest_path.open("xb") as fh:
            fh.write(manifest_bytes)
            fh.flush()
            os.fchmod(fh.fileno(), BLOB_MODE)
            os.fsync(fh.fileno())
        # model/ exists even without model files (a local model lies in src/): scripts list
        # or join AZUREML_MODEL_DIR, which names it, as Azure's does a folder that exists.
        model_root = tmp / MODEL_ROOT
        model_root.mkdir(exist_ok=True)
        folders = {tmp, model_root}
        for p in placements:
            target = _safe_target(tmp, p.path)
            _make_folders(tmp, target)
            _place(self.blobs.path(p.digest), target)
            folders.add(target.parent)
        # Read-only folders too: a running module cannot change itself (nor leave
        # __pycache__ behind), so the folder stays exactly what was verified.
        for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
            fsync_dir(folder)
            os.chmod(folder, FOLDER_MODE)

    def _discard(self, path: Path) -> None:
        """Remove a module folder (or anything in its place) without following links."""
        if path.is_symlink() or not path.is_dir():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        # Renaming first makes the removal atomic for readers: the name is gone at once.
        doomed = path.with_name(f".{path.name}.doomed{PART_SUFFIX}")
        try:
            os.rename(path, doomed)
        except OSError:
            doomed = path
        for folder, _, _ in os.walk(doomed):  # os.walk never follows links
            with contextlib.suppress(OSError):
                os.chmod(folder, 0o755)
        shutil.rmtree(doomed, ignore_errors=True)


class _BundleSink:
    def __init__(self, blobs: BlobStore) -> None:
        self._blobs = blobs

    def has(self, digest: str) -> bool:
        return self._blobs.has(digest)

    def begin(self, digest: str, size: int) -> PendingBlob:
        return self._blobs.begin(digest, size, hashed_by_caller=True)


def _safe_target(root: Path, rel: str) -> Path:
    target = Path(os.path.normpath(root / rel))
    if not target.is_relative_to(root) or target == root:
        raise TrustError(f"path {rel!r} leaves the module folder; refused")
    return target


def _make_folders(root: Path, target: Path) -> None:
    """Create the folders above ``target`` one by one, never through a symlink, and refuse a
    target that exists already."""
    current = root
    for part in target.relative_to(root).parts[:-1]:
        current = current / part
        with contextlib.suppress(FileExistsError):
            os.mkdir(current)
        if not stat.S_ISDIR(os.lstat(current).st_mode):
            raise TrustError(f"{current.relative_to(root)} is a link or a file; refused")
    if os.path.lexists(target):
        raise TrustError(f"{target.relative_to(root)} exists already in the module folder; refused")


def _place(blob: Path, target: Path) -> None:
    """Hard-link the blob at ``target``; copy it when the file system cannot link."""
    try:
        os.link(blob, target, follow_symlinks=False)
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
    with blob.open("rb") as src, target.open("xb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        os.fchmod(dst.fileno(), BLOB_MODE)
        os.fsync(dst.fileno())


def _is_complete(folder: Path, manifest_bytes: bytes, placements: list[Placement]) -> bool:
    """True when ``folder`` is a real folder holding this manifest and every file at its
    size. Sizes, not digests: the folder was built from digest-checked blobs, and this check
    runs on every install, so it must stay cheap."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return False
        if (folder / MANIFEST_FILE).read_bytes() != manifest_bytes:
            return False
        for p in placements:
            st = os.lstat(folder / p.path)
            if not stat.S_ISREG(st.st_mode) or st.st_size != p.size:
                return False
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def _read_manifest(folder: Path) -> ModuleManifest | None:
    """The manifest of an installed module folder, or ``None`` when it is damaged. Signatures
    are not checked: the folder was only built after they were, and pruning only needs to
    know which blobs the module uses."""
    try:
        data = (folder / MANIFEST_FILE).read_bytes()
        if sha256_digest(data) != "sha256:" + folder.name:
            return None
        return ModuleManifest.model_validate(parse_envelope(data).signed)
    except (OSError, TrustError, ValidationError):
        return None
