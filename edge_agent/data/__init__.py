"""Collected production data on the device: the spool's layout (shared by the scoring server,
which writes it, and the agent, which uploads it) and the agent's uploader."""
