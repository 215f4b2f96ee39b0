"""The one durable write (``manifests.durable``) every part uses: its contract.

The order of the system calls is the contract a power cut tests (data synced before the
rename, the rename synced by the folder's fsync); these tests record the real calls, made
for real on a real file system, and check that order and what is left on disk."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from manifests import durable
from manifests.durable import durable_output, replace_all_durably, write_durable


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every fsync, sync and rename the durable write makes, in order, with what it was on
    (the real calls are made: this records them, it does not replace them)."""
    seen: list[tuple[str, str]] = []
    real_fsync, real_replace, real_sync = os.fsync, os.replace, os.sync

    def fsync(fd: int) -> None:
        seen.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen.append(("replace", f"{src} -> {dst}"))
        real_replace(src, dst)

    def sync() -> None:
        seen.append(("sync", ""))
        real_sync()

    monkeypatch.setattr(durable.os, "fsync", fsync)
    monkeypatch.setattr(durable.os, "replace", replace)
    monkeypatch.setattr(durable.os, "sync", sync)
    return seen


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_the_file_is_synced_then_renamed_from_its_own_folder_then_the_folder_is_synced(
    tmp_path: Path, calls: list[tuple[str, str]]
) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    write_durable(target, b"new")
    assert target.read_bytes() == b"new"
    (sync_file, file_synced), (rename, renamed), (sync_dir, dir_synced) = calls
    assert (sync_file, rename, sync_dir) == ("fsync", "replace", "fsync")
    temp, final = renamed.split(" -> ")
    assert file_synced == temp and Path(temp).parent == tmp_path and final == str(target)
    assert dir_synced == str(tmp_path)
    assert os.listdir(tmp_path) == ["state.json"]


def test_the_file_has_its_mode_from_the_first_byte_whatever_the_umask(
    tmp_path: Path, loose_umask: None
) -> None:
    target = tmp_path / "hub.key"
    with durable_output(target, mode=0o600) as fh:
        fh.write(b"secret")
        (temp,) = [p for p in tmp_path.iterdir() if p.name != "hub.key"]
        assert stat.S_IMODE(temp.stat().st_mode) == 0o600  # never readable by others, even now
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    write_durable(tmp_path / "acl", b"public", mode=0o644)
    assert stat.S_IMODE((tmp_path / "acl").stat().st_mode) == 0o644
    write_durable(tmp_path / "default", b"x")
    assert stat.S_IMODE((tmp_path / "default").stat().st_mode) == 0o600  # private unless asked


def test_a_write_that_fails_leaves_the_old_file_and_no_temp_file(
    tmp_path: Path, calls: list[tuple[str, str]]
) -> None:
    target = tmp_path / "desired.json"
    target.write_bytes(b"the old state")
    with pytest.raises(RuntimeError), durable_output(target) as fh:
        fh.write(b"half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"the old state"
    assert os.listdir(tmp_path) == ["desired.json"]
    assert [c for c, _ in calls if c == "replace"] == []


def test_a_batch_is_synced_once_before_any_rename_and_each_folder_after(
    tmp_path: Path, calls: list[tuple[str, str]]
) -> None:
    staged = []
    for name in ("edge-1.json", "edge-2.json", "edge-3.json"):
        temp = tmp_path / f".{name}.part"
        temp.write_bytes(name.encode())
        staged.append((temp, tmp_path / name))
    replace_all_durably(staged)
    assert [c for c, _ in calls] == ["sync", "replace", "replace", "replace", "fsync"]
    assert calls[-1] == ("fsync", str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["edge-1.json", "edge-2.json", "edge-3.json"]
    assert (tmp_path / "edge-2.json").read_bytes() == b"edge-2.json"
