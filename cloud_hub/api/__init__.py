"""The hub's HTTP API (FastAPI): one router module per area."""
