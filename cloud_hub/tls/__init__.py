"""The hub's TLS material: a small CA of its own and the server certificates it issues."""
