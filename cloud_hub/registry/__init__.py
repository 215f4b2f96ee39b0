"""The registry: models (versioned per name) and pushed modules, over the blob store.

- ``tables``: the rows (files are ``(path, digest, size)`` rows pointing into the blob store).
- ``modules``: push (verify the whole bundle into a staging area, then publish and commit),
  look-ups (``get_module``, ``module_by_digest``), delete.
- ``models``: register over uploaded blobs (versions allocated in the database), look-ups,
  updates of tags/description/properties, delete.
- ``usage``: which deployments use a module or model (a delete is refused while any does).
- ``blob_refs``: the registry lock, freeing blobs nothing uses, garbage collection.
- ``tags``: pure parsing and matching of ``key=value`` tags and filters.
"""
