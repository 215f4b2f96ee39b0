"""The base image's root file system steps that need no network: which wheels go in, what is
stripped, what the tar stream carries, and deleting a build folder safely."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from manifests.errors import EdgepackError
from packager.runtime_image.recipe import VENV
from packager.runtime_image.rootfs import mounts_below, pinned_wheels, remove_root, strip, tar_stream


def touch(path: Path, content: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_only_the_pinned_wheels_go_in(tmp_path: Path) -> None:
    for name in (
        "typing_extensions-4.16.0-py3-none-any.whl",
        "typing_extensions-4.12.0-py3-none-any.whl",
        "pydantic_core-2.50.5-cp311-cp311-manylinux_2_17_x86_64.whl",
        "six-1.16.0-py2.py3-none-any.whl",
    ):
        touch(tmp_path / name)
    found = pinned_wheels(tmp_path, ("pydantic-core==2.50.5", "typing-extensions==4.16.0"))
    assert [p.name for p in found] == [
        "pydantic_core-2.50.5-cp311-cp311-manylinux_2_17_x86_64.whl",
        "typing_extensions-4.16.0-py3-none-any.whl",
    ]
    with pytest.raises(EdgepackError, match="no downloaded wheel for numpy"):
        pinned_wheels(tmp_path, ("numpy==2.4.6", "six==1.16.0"))


def test_strip_removes_what_a_container_never_reads(tmp_path: Path) -> None:
    site = tmp_path / VENV.lstrip("/") / "lib/python3.11/site-packages"
    keep = [
        touch(tmp_path / "usr/bin/python3"),
        touch(site / "numpy/__init__.py"),
        touch(site / "numpy/testing/__init__.py"),
        touch(site / "tests/__init__.py"),  # a top-level package that happens to be called tests
        touch(tmp_path / "usr/share/python-wheels/pip-23.0.1-py3-none-any.whl"),
    ]
    gone = [
        touch(tmp_path / "usr/share/doc/python3/copyright"),
        touch(tmp_path / "usr/share/man/man1/python3.1.gz"),
        touch(tmp_path / "usr/share/locale/de/LC_MESSAGES/apt.mo"),
        touch(tmp_path / "var/lib/apt/lists/deb.debian.org_dists_bookworm_InRelease"),
        touch(tmp_path / "var/cache/apt/pkgcache.bin"),
        touch(tmp_path / "var/log/dpkg.log"),
        touch(site / "numpy/_core/tests/test_umath.py"),
        touch(site / "numpy/tests/test_public_api.py"),
        touch(tmp_path / "usr/share/python-wheels/setuptools-66.1.1-py3-none-any.whl"),
    ]
    touch(tmp_path / "etc/resolv.conf", b"nameserver 10.0.0.1\n")
    touch(tmp_path / "etc/hostname", b"build-host\n")
    strip(tmp_path)
    assert all(p.exists() for p in keep)
    assert not any(p.exists() for p in gone)
    assert (tmp_path / "usr/share/doc").is_dir() and (tmp_path / "var/log").is_dir()
    assert (tmp_path / "etc/resolv.conf").read_bytes() == b""
    assert (tmp_path / "etc/hostname").read_bytes() == b""


def test_the_tar_stream_leaves_out_dev_proc_and_sys_contents(tmp_path: Path) -> None:
    root = tmp_path / "root"
    touch(root / "etc/os-release", b"bookworm\n")
    touch(root / "proc/1/status")
    touch(root / "sys/kernel/x")
    touch(root / "dev/null-copy")
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/python").symlink_to("python3")
    data = b"".join(tar_stream(root, chunk=512))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = set(tar.getnames())
        assert tar.getmember("./usr/bin/python").issym()
        assert {m.uname for m in tar.getmembers()} == {""}  # numeric owners only
    assert {"./etc/os-release", "./proc", "./sys", "./dev"} <= names
    assert not {n for n in names if n.startswith(("./proc/", "./sys/", "./dev/"))}


def test_a_build_folder_is_deleted_without_deleting_what_is_mounted_in_it(tmp_path: Path) -> None:
    # A killed debootstrap can leave the host's /dev bind-mounted inside its folder.
    host_dev = tmp_path / "host-dev"
    precious = touch(host_dev / "precious")
    root = tmp_path / "rootfs-stale"
    (root / "dev").mkdir(parents=True)
    touch(root / "etc/passwd")
    subprocess.run(["mount", "--bind", str(host_dev), str(root / "dev")], check=True)
    assert mounts_below(root) == [root / "dev"]
    remove_root(root)
    assert not root.exists()
    assert precious.read_bytes() == b"x"
    assert mounts_below(tmp_path) == []
