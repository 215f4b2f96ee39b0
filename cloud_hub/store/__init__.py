"""Where the hub keeps bytes: the content-addressed blob store and streamed request bodies."""
