"""A bare device for install tests: Debian bookworm ``minbase`` with ``python3`` and nothing else
(no pip, no venv package, no curl, no package index configured), entered with ``chroot``.

- :func:`bare_rootfs` is made once per machine with ``debootstrap`` (about a minute; its .deb
  files are kept beside it) and reused by every session and checkout; a lock makes a second
  worker wait instead of building it too. debootstrap and chroot need root (CI runs as root).
- :class:`Device` is one test's device: an overlay mount of that root (so each test writes its
  own upper layer and the cached root stays bare) with ``/proc`` mounted, and its teardown
  kills every process whose root is the device's before it unmounts.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOTFS_CACHE = Path(os.environ.get("EDGEPACK_TEST_DEVICE_ROOTFS", "/var/tmp/edgepack-test/device-rootfs"))
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
#: What the device's commands see: none of the test runner's variables (pip's, proxies, venv).
DEVICE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
              "LANG": "C.UTF-8"}  # fmt: skip


def _need_root() -> None:
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        pytest.fail("a bare device root needs root and debootstrap (bash scripts/test.sh installs it)",
                    pytrace=False)  # fmt: skip


def bare_rootfs() -> Path:
    """The cached bare root (built when missing)."""
    _need_root()
    ROOTFS_CACHE.mkdir(parents=True, exist_ok=True)
    root = ROOTFS_CACHE / f"{SUITE}-amd64"
    with (ROOTFS_CACHE / "build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / "usr/bin/python3").exists():
            return root
        building = ROOTFS_CACHE / f"{SUITE}-amd64.building"
        shutil.rmtree(building, ignore_errors=True)
        (ROOTFS_CACHE / "debs").mkdir(exist_ok=True)
        log = ROOTFS_CACHE / "debootstrap.log"
        with log.open("wb") as out:
            done = subprocess.run(
                ["debootstrap", "--variant=minbase", "--include=python3",
                 f"--cache-dir={ROOTFS_CACHE / 'debs'}", SUITE, str(building), MIRROR],
                stdout=out, stderr=subprocess.STDOUT, check=False,
            )  # fmt: skip
        if done.returncode != 0:
            pytest.fail(f"debootstrap failed (exit code {done.returncode}); see {log}", pytrace=False)
        building.rename(root)
        return root


@dataclass
class Device:
    """A bare device's root, mounted at ``root``."""

    root: Path

    def run(
        self, argv: list[str], *, stdin: bytes | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[bytes]:
        """``argv`` inside the device, as root, with a clean environment."""
        return subprocess.run(["chroot", str(self.root), *argv], input=stdin, capture_output=True,
                              env=DEVICE_ENV, timeout=timeout, check=False)  # fmt: skip

    def processes(self) -> list[int]:
        """Every process whose root is this device's."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(entry / "root") == str(self.root):
                        found.append(int(entry.name))
        return found

    def kill_all(self) -> None:
        for _ in range(50):
            pids = self.processes()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)


#: The device's own writes (the agent's venv with onnxruntime is about 250 MB).
DEVICE_LAYER_MB = 2048


@contextlib.contextmanager
def mounted_device(base: Path, work: Path) -> Iterator[Device]:
    """``base`` as a fresh device under ``work`` (an overlay whose writes land in a tmpfs at
    ``work/layer``: an overlay's upper layer cannot be on another overlay, and CI's file system
    is one, a container's root)."""
    layer, root = work / "layer", work / "root"
    for folder in (layer, root):
        folder.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DEVICE_LAYER_MB}m,mode=0755", "tmpfs", str(layer)],
                   check=True)  # fmt: skip
    try:
        upper, scratch = layer / "upper", layer / "work"
        upper.mkdir()
        scratch.mkdir()
        layers = f"lowerdir={base},upperdir={upper},workdir={scratch}"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", layers, str(root)], check=True)
        device = Device(root)
        try:
            subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
            yield device
        finally:
            device.kill_all()
            subprocess.run(["umount", "--lazy", str(root / "proc")], check=False)
            subprocess.run(["umount", "--lazy", str(root)], check=False)
    finally:
        subprocess.run(["umount", "--lazy", str(layer)], check=False)
