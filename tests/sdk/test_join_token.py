"""Where ``edgepack agent join`` takes the provisioning token from: a file or stdin first (no
process list shows them), then ``--token`` (kept for compatibility), then the environment."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from manifests.errors import ConfigError
from packager.sdk.enrolment import JOIN_TOKEN_ENV, MAX_TOKEN_FILE_BYTES, join_token
from packager.sdk.errors import BadArgument

TOKEN = "ep_join_" + "a" * 43


def test_the_token_comes_from_a_file_stdin_the_option_or_the_environment(tmp_path: Path) -> None:
    (tmp_path / "t").write_text(f"  {TOKEN}\n")
    none = io.BytesIO()
    assert join_token(token=None, token_file=str(tmp_path / "t"), environ={}, stdin=none) == TOKEN
    stdin = io.BytesIO(TOKEN.encode() + b"\n")
    assert join_token(token=None, token_file="-", environ={}, stdin=stdin) == TOKEN
    assert join_token(token=TOKEN, token_file=None, environ={JOIN_TOKEN_ENV: "other"}, stdin=none) == TOKEN
    assert join_token(token=None, token_file=None, environ={JOIN_TOKEN_ENV: TOKEN}, stdin=none) == TOKEN


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\n", "holds no provisioning token"),
        (b"two words\n", "holds no provisioning token"),
        (b"x" * (MAX_TOKEN_FILE_BYTES + 1), f"larger than {MAX_TOKEN_FILE_BYTES} bytes"),
    ],
)
def test_a_file_without_one_token_is_refused(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "t").write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        join_token(token=None, token_file=str(tmp_path / "t"), environ={}, stdin=io.BytesIO())


def test_no_token_or_two_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BadArgument, match="--token-file FILE"):
        join_token(token=None, token_file=None, environ={}, stdin=io.BytesIO())
    with pytest.raises(BadArgument, match="not both"):
        join_token(token=TOKEN, token_file="-", environ={}, stdin=io.BytesIO())
    with pytest.raises(ConfigError, match="cannot read it"):
        join_token(token=None, token_file=str(tmp_path / "missing"), environ={}, stdin=io.BytesIO())
