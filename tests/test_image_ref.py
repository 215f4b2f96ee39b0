"""Image references as a manifest records them: parsed by Docker's grammar, pinned by digest."""

from __future__ import annotations

import pytest

from manifests.image_ref import ImageRef, parse_image_ref
from packager.runtime_image.pinning import local_digest

DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("text", "repository", "tag", "digest", "registry"),
    [
        ("edgepack/runtime:py311", "edgepack/runtime", "py311", None, "docker.io"),
        ("python", "python", None, None, "docker.io"),
        ("127.0.0.1:5000/edgepack/runtime:py311", "127.0.0.1:5000/edgepack/runtime", "py311", None,
         "127.0.0.1:5000"),
        (f"127.0.0.1:5000/edgepack/runtime@{DIGEST}", "127.0.0.1:5000/edgepack/runtime", None, DIGEST,
         "127.0.0.1:5000"),
        (f"localhost/a/b:v1.2_x@{DIGEST}", "localhost/a/b", "v1.2_x", DIGEST, "localhost"),
        ("registry.example.com/team/model-runtime", "registry.example.com/team/model-runtime", None, None,
         "registry.example.com"),
        ("localhost:5000/x", "localhost:5000/x", None, None, "localhost:5000"),
    ],
)  # fmt: skip
def test_parse(text: str, repository: str, tag: str | None, digest: str | None, registry: str) -> None:
    ref = parse_image_ref(text)
    assert (ref.repository, ref.tag, ref.digest, ref.registry) == (repository, tag, digest, registry)
    assert str(ref) == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "no repository"),
        (":tag", "no repository"),
        ("Edgepack/runtime", "not a valid repository name component"),
        ("edgepack//runtime", "not a valid repository name component"),
        ("edgepack/runtime:", "not a valid tag"),
        ("edgepack/runtime:-x", "not a valid tag"),
        ("edgepack/runtime@sha256:abc", "digest must be sha256"),
        ("edgepack/runtime@md5:" + "0" * 32, "digest must be sha256"),
    ],
)
def test_refuse(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_image_ref(text)


def test_pinned_drops_the_tag_and_needs_a_digest() -> None:
    ref = parse_image_ref("127.0.0.1:5000/edgepack/runtime:py311")
    assert ref.name == "127.0.0.1:5000/edgepack/runtime:py311"
    assert ref.pinned(DIGEST) == f"127.0.0.1:5000/edgepack/runtime@{DIGEST}"
    with pytest.raises(ValueError, match="no digest"):
        ref.pinned()


def test_spellings_of_one_docker_hub_repository_compare_equal() -> None:
    names = ["python", "docker.io/python", "docker.io/library/python", "library/python"]
    assert {parse_image_ref(n).canonical_repository for n in names} == {"docker.io/library/python"}
    assert ImageRef("127.0.0.1:5000/a").canonical_repository == "127.0.0.1:5000/a"


def test_local_digest_picks_the_repo_digest_of_the_same_repository() -> None:
    other = "sha256:" + "f" * 64
    repo_digests = [f"127.0.0.1:6000/edgepack/runtime@{other}", f"127.0.0.1:5000/edgepack/runtime@{DIGEST}"]
    assert local_digest(parse_image_ref("127.0.0.1:5000/edgepack/runtime:py311"), repo_digests) == DIGEST
    assert local_digest(parse_image_ref("127.0.0.1:7000/edgepack/runtime:py311"), repo_digests) is None
    assert local_digest(parse_image_ref("python:3.11"), [f"python@{DIGEST}"]) == DIGEST
