"""The hub client's former home: its names now live in the SDK (``packager.sdk``).

Kept so that code written against them keeps working; there is no logic here.
"""

from __future__ import annotations

from packager.sdk.config import HubConfig
from packager.sdk.errors import HubError as HubRequestError
from packager.sdk.errors import error_body as hub_error
from packager.sdk.errors import raise_for_hub_error

__all__ = ["HubConfig", "HubRequestError", "hub_error", "raise_for_hub_error"]
