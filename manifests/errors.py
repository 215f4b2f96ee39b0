"""The edgepack error tree.

Few roots, specific leaves (as python-tuf does it): a caller catches the category it can act
on. Every message says what went wrong *and* what to do next.
"""

from __future__ import annotations


class EdgepackError(Exception):
    """Root of every error edgepack raises on purpose."""

    #: process exit code the CLI uses for this category
    exit_code: int = 1


class ConfigError(EdgepackError):
    """A configuration or input file is malformed, misspelled or inconsistent."""

    exit_code = 2


class TrustError(EdgepackError):
    """Something signed is not trustworthy: bad or missing signature, tampered content,
    untrusted key, rollback, expiry, unsafe archive path."""

    exit_code = 3


class FetchError(EdgepackError):
    """A transfer failed (network, HTTP status, truncated download). Usually temporary."""

    exit_code = 4


class RuntimeFailure(EdgepackError):
    """A module could not be started or kept running (init() failed, port taken, crash)."""

    exit_code = 5
