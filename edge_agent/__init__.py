"""The device side of edgepack: the agent daemon and the scoring server that runs a module."""
