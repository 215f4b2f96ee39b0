"""Model tags (``key=value``) and tag filters: pure functions, tested as tables."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from manifests.errors import ConfigError

TAG_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def parse_tag(text: str) -> tuple[str, str]:
    """``key=value`` → ``(key, value)``; the value may be empty, the key may not."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not TAG_KEY.fullmatch(key):
        raise ConfigError(
            f"tag {text!r} is not key=value (key: letters, digits, '_', '.', '-'); "
            "write it like --tag framework=onnx"
        )
    return key, value.strip()


def parse_tags(texts: Iterable[str]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for text in texts:
        key, value = parse_tag(text)
        if tags.setdefault(key, value) != value:
            raise ConfigError(f"tag {key!r} is given twice with different values; keep one")
    return tags


def parse_filters(texts: Iterable[str]) -> dict[str, str | None]:
    """Tag filters: ``key=value`` (that value) or a bare ``key`` (any value)."""
    filters: dict[str, str | None] = {}
    for text in texts:
        if "=" in text:
            key, value = parse_tag(text)
            filters[key] = value
        else:
            key = text.strip()
            if not TAG_KEY.fullmatch(key):
                raise ConfigError(f"tag filter {text!r} is neither key nor key=value")
            filters[key] = None
    return filters


def check_tags(tags: Mapping[str, str]) -> dict[str, str]:
    for key in tags:
        if not TAG_KEY.fullmatch(key):
            raise ConfigError(f"tag key {key!r} is invalid (letters, digits, '_', '.', '-'; max 64)")
    return dict(tags)


def matches(tags: Mapping[str, str], filters: Mapping[str, str | None]) -> bool:
    """True when every filter holds: the key is present and, if a value is given, equal."""
    return all(key in tags and (want is None or tags[key] == want) for key, want in filters.items())
