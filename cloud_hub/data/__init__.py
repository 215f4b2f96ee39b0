"""Production data collected on devices (Azure's ``ModelDataCollector``), received in batches,
stored under Azure's layout, listed and downloaded (see :mod:`manifests.data` and
docs/data-collection.md)."""
