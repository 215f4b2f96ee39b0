"""The runtime image tests run against a real engine and registry (tests/docker_fixtures.py,
star-imported once, by tests/conftest.py, so that each worker starts one registry)."""
