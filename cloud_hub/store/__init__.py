"""Where the hub keeps bytes: the content-addressed blob store, streamed request bodies, and
the small files it writes whole (secrets, broker files)."""
