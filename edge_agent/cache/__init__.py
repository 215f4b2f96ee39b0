"""The device-side module cache: content-addressed blobs and verified module folders.

See :mod:`edge_agent.cache.modules` for the layout on disk.
"""

from edge_agent.cache.blobs import BlobStore, PendingBlob
from edge_agent.cache.layout import Placement, plan_layout
from edge_agent.cache.modules import InstalledModule, ModuleCache, PruneReport

__all__ = [
    "BlobStore",
    "InstalledModule",
    "ModuleCache",
    "PendingBlob",
    "Placement",
    "PruneReport",
    "plan_layout",
]
