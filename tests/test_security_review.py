"""Adversarial review: hostile input to the contracts, the packager and the scoring server.

Each test here failed before the fix it names; together they pin down what an attacker (or a
careless user) must not get through.
"""

from __future__ import annotations

import io

import pytest

from manifests.bundle import BLOB_PREFIX, MANIFEST_NAME, verify_bundle
from manifests.digests import digest_hex, is_digest, sha256_digest
from manifests.errors import TrustError
from tests.factory import Forge, Member, default_files, tar_bytes


def test_a_digest_with_a_trailing_newline_is_not_a_digest() -> None:
    # Python's '$' also matches before a final newline; identifiers must match in full.
    good = sha256_digest(b"x")
    assert is_digest(good)
    assert not is_digest(good + "\n")


def test_a_blob_member_whose_name_ends_in_a_newline_is_refused() -> None:
    forge = Forge()
    files = default_files()
    members = [Member(MANIFEST_NAME, forge.module(files=files).manifest_bytes)]
    for digest, data in sorted({sha256_digest(d): d for d in files.values()}.items()):
        members.append(Member(BLOB_PREFIX + digest_hex(digest) + "\n", data))
    with pytest.raises(TrustError, match="unexpected member"):
        verify_bundle(io.BytesIO(tar_bytes(members)), forge.trust)
