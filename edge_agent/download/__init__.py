"""Fetching a module into the device's cache: verified manifest, only the missing blobs,
resumed where an interrupted download stopped."""
