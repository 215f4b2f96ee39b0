"""The developer side of edgepack: the ``edgepack`` CLI, keys, building and verifying modules."""
