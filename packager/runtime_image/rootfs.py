"""The base layer's root file system, made offline from Debian packages and local wheels.

1. ``debootstrap --variant=minbase`` the suite with python3 into a folder (its .deb files
   are kept in the cache, so a rebuild downloads nothing it already has);
2. ``pip download`` the pinned wheels *on the host*, for the image's Python, architecture
   and C library (``--only-binary=:all:``, so nothing is compiled and nothing runs);
3. inside the folder (``chroot``): a venv at ``/opt/edgepack/venv``, the wheels installed with
   ``--no-index`` by Debian's own pip wheel (Debian's python3 is externally managed, and pip
   need not live in the image), an import check, the unprivileged user;
4. strip what a container never reads (apt lists and caches, docs, man pages, locales,
   logs, the test suites inside packages) and the build host's traces (resolv.conf, hostname);
5. :func:`tar_stream` feeds the folder to ``docker import``.

debootstrap and chroot need root. Every command's output goes to one log file, which an
error names.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from manifests.errors import ConfigError, EdgepackError, FetchError
from packager.runtime_image.recipe import RUNTIME_UID, RUNTIME_USER, VENV, BaseRecipe

DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: A clean environment for commands run inside the new root: none of the host's pip, proxy
#: or locale settings may leak into the image.
_CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
_WHEELS_IN_ROOT = "tmp/edgepack-wheels"
_SBIN = "/usr/local/sbin:/usr/sbin:/sbin"
#: What a container never reads; removed from the root file system.
_STRIP = (
    "usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian",
    "var/cache/apt", "var/lib/apt/lists", "var/cache/debconf", "var/log", "root/.cache",
)  # fmt: skip
#: Build-host traces debootstrap copies in; Docker provides its own at run time.
_BLANK = ("etc/resolv.conf", "etc/hostname")


def _tool(name: str) -> str | None:
    # /usr/sbin is not on every user's PATH, and sudo may drop it.
    return shutil.which(name) or shutil.which(name, path=_SBIN)


def _env_with_sbin() -> dict[str, str]:
    """The caller's environment (a proxy for the mirror is welcome), with the sbin folders
    debootstrap's own helpers (chroot, mknod...) live in."""
    return {**os.environ, "PATH": os.environ.get("PATH", "/usr/bin:/bin") + ":" + _SBIN}


def require_tools() -> None:
    """Refuse early, with what to do, when this machine cannot build a base."""
    if _tool("debootstrap") is None:
        raise ConfigError(
            "debootstrap not found: the base image is built from Debian packages with it; "
            "install it (apt-get install debootstrap) and try again"
        )
    for name in ("chroot", "tar", "umount"):
        if _tool(name) is None:
            raise ConfigError(f"{name} not found: building the base image needs it (coreutils, tar, mount)")
    if os.geteuid() != 0:
        raise ConfigError(
            "building the base image runs debootstrap and chroot, which need root: run this "
            "command as root once (sudo -E edgepack runtime-image build …); the base is then "
            "cached, and later builds need only access to Docker"
        )


def _run(argv: list[str], log: Path, *, what: str, env: dict[str, str] | None = None,
         error: type[EdgepackError] = EdgepackError) -> None:  # fmt: skip
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0:
        raise error(
            f"{what} failed (exit code {done.returncode}): {_last_line(log)}; the full log is in {log}"
        )


def _last_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def download_wheels(recipe: BaseRecipe, dest: Path, log: Path) -> Path:
    """Fetch the pinned wheels for the image into ``dest`` (kept: files already there are not
    downloaded again) and write the requirement list beside them; returns that list's path."""
    dest.mkdir(parents=True, exist_ok=True)
    requirements = dest / "requirements.txt"
    requirements.write_text("\n".join(recipe.requirements) + "\n")
    platforms = [arg for p in recipe.wheel_platforms for arg in ("--platform", p)]
    _run(
        [sys.executable, "-m", "pip", "download", "--quiet",
         "--disable-pip-version-check", "--no-deps", "--only-binary=:all:",
         "--implementation", "cp", "--python-version", recipe.python, "--abi", recipe.python_tag,
         *platforms, "--dest", str(dest), "--requirement", str(requirements)],
        log, what="pip download of the runtime wheels", error=FetchError,
    )  # fmt: skip
    return requirements


def debootstrap(recipe: BaseRecipe, root: Path, *, mirror: str, debs: Path, log: Path) -> None:
    """A minimal Debian with python3 in ``root``; .deb files are kept in ``debs``."""
    debs.mkdir(parents=True, exist_ok=True)
    _run(
        [_tool("debootstrap") or "debootstrap", f"--variant={recipe.variant}", f"--arch={recipe.arch}",
         f"--include={','.join(recipe.packages)}", f"--cache-dir={debs.resolve()}",
         recipe.suite, str(root), mirror],
        log, what=f"debootstrap of Debian {recipe.suite} from {mirror}", error=FetchError,
        env=_env_with_sbin(),
    )  # fmt: skip


def install_wheels(recipe: BaseRecipe, root: Path, wheels: Path, requirements: Path, log: Path) -> None:
    """The venv and the wheels inside ``root``, checked by importing them there."""
    inside = root / _WHEELS_IN_ROOT
    shutil.rmtree(inside, ignore_errors=True)
    inside.mkdir(parents=True)
    # Only the pinned wheels go in: the cache folder still holds those of older pins, and
    # one of them must never stand in for a dependency the list forgot.
    for wheel in pinned_wheels(wheels, recipe.requirements):
        shutil.copy(wheel, inside / wheel.name)
    shutil.copy(requirements, inside / "requirements.txt")
    pip_wheel = _debian_pip_wheel(root)
    python = f"{VENV}/bin/python"
    chroot = [_tool("chroot") or "chroot", str(root)]
    _run([*chroot, "/usr/bin/python3", "-m", "venv", "--without-pip", VENV], log,
         what="creating the venv in the image", env=_CHROOT_ENV)  # fmt: skip
    _run(
        [*chroot, python, f"{pip_wheel}/pip", "install", "--quiet", "--no-index", "--no-cache-dir",
         "--disable-pip-version-check", "--root-user-action=ignore",
         "--find-links", f"/{_WHEELS_IN_ROOT}", "--requirement", f"/{_WHEELS_IN_ROOT}/requirements.txt"],
        log, what="installing the wheels in the image (a dependency missing from the pinned list?)",
        env=_CHROOT_ENV,
    )  # fmt: skip
    _run(
        [*chroot, python, "-c", "import onnxruntime, numpy, uvicorn, uvloop, httptools, orjson, "
         "pydantic, cryptography, inference_schema"],
        log, what="importing the runtime packages in the image", env=_CHROOT_ENV,
    )  # fmt: skip
    shutil.rmtree(inside)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_wheels(folder: Path, requirements: tuple[str, ...]) -> list[Path]:
    """The wheels in ``folder`` that the ``name==version`` pins ask for; every pin must have one."""
    wanted = {_normalise(r.split("==")[0]): r.split("==")[1] for r in requirements}
    found: list[Path] = []
    seen: set[str] = set()
    for wheel in sorted(folder.glob("*.whl")):
        name, _, rest = wheel.name.partition("-")
        version = rest.split("-", 1)[0]
        key = _normalise(name)
        if wanted.get(key) == version:
            found.append(wheel)
            seen.add(key)
    missing = sorted(set(wanted) - seen)
    if missing:
        raise EdgepackError(f"{folder}: no downloaded wheel for {', '.join(missing)}")
    return found


def _debian_pip_wheel(root: Path) -> str:
    found = sorted((root / "usr/share/python-wheels").glob("pip-*.whl"))
    if not found:
        raise EdgepackError(
            f"{root}: no pip wheel under /usr/share/python-wheels (is python3-venv installed?)"
        )
    return "/" + found[-1].relative_to(root).as_posix()


def add_user(root: Path, log: Path) -> None:
    """The unprivileged user the scoring server runs as (uid = gid = 10001, no home, no shell)."""
    chroot = [_tool("chroot") or "chroot", str(root)]
    _run([*chroot, "groupadd", "--system", "--gid", str(RUNTIME_UID), RUNTIME_USER], log,
         what="adding the runtime group", env=_CHROOT_ENV)  # fmt: skip
    _run(
        [*chroot, "useradd", "--system", "--uid", str(RUNTIME_UID), "--gid", str(RUNTIME_UID),
         "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", RUNTIME_USER],
        log, what="adding the runtime user", env=_CHROOT_ENV,
    )  # fmt: skip


def strip(root: Path) -> None:
    """Remove what a container never reads, keeping the folders themselves."""
    for rel in _STRIP:
        folder = root / rel
        if folder.is_dir() and not folder.is_symlink():
            for child in folder.iterdir():
                _remove(child)
    for rel in _BLANK:
        path = root / rel
        if path.is_symlink() or path.exists():
            path.unlink()
            path.write_bytes(b"")
    # The test suites shipped inside packages (numpy's alone is 17 MB) never run on a device.
    site = root / VENV.lstrip("/") / "lib"
    for tests in sorted(site.glob("python3*/site-packages/*/**/tests"), reverse=True):
        if tests.is_dir() and not tests.is_symlink():
            shutil.rmtree(tests)
    for wheel in (root / "usr/share/python-wheels").glob("setuptools-*.whl"):
        wheel.unlink()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def tree_size(root: Path) -> int:
    """Bytes of regular files under ``root`` (what the tar stream will roughly carry)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                total += st.st_size
    return total


def tar_stream(root: Path, chunk: int = 1 << 20) -> Iterator[bytes]:
    """``root`` as an uncompressed tar, in chunks: numeric owners, sorted names, and nothing
    under ``/dev``, ``/proc``, ``/sys`` (the engine provides those in every container)."""
    argv = ["tar", "--create", "--file=-", "--numeric-owner", "--sort=name", "--xattrs",
            "--directory", str(root),
            "--exclude=./dev/*", "--exclude=./proc/*", "--exclude=./sys/*", "."]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        while data := proc.stdout.read(chunk):
            yield data
    finally:
        proc.stdout.close()
        stderr = proc.stderr.read().decode(errors="replace").strip()
        proc.stderr.close()
        code = proc.wait()
    if code != 0:
        raise EdgepackError(f"tar of {root} failed (exit code {code}): {stderr.splitlines()[-1:]}")


def mounts_below(path: Path) -> list[Path]:
    """Mount points at or under ``path``, deepest first (from /proc/self/mountinfo)."""
    target = os.path.realpath(path)
    found: list[Path] = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) > 4:
                point = fields[4].encode().decode("unicode_escape")
                if point == target or point.startswith(target + "/"):
                    found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def remove_root(root: Path) -> None:
    """Delete a build folder. A debootstrap that was killed can leave /proc or a bind-mounted
    /dev mounted inside it: those are unmounted first, and nothing is deleted while any mount
    remains, since deleting through a bind mount would delete the host's files."""
    for point in mounts_below(root):
        subprocess.run([_tool("umount") or "umount", "--lazy", str(point)], check=False, capture_output=True)
    left = mounts_below(root)
    if left:
        raise EdgepackError(
            f"{root}: still has file systems mounted inside ({', '.join(map(str, left))}); "
            "unmount them (umount PATH) and delete the folder by hand"
        )
    if root.exists():
        shutil.rmtree(root)
