#!/usr/bin/env bash
# Everything CI runs: system packages, .venv with edgepack[test], ruff, mypy, pytest.
#
#     bash scripts/test.sh [PYTEST ARGS...]     (default: the whole suite, two workers)
#
# Works on a fresh Debian machine as root with only Python 3.11; re-running is quick.
set -euo pipefail
source "$(dirname "$0")/setup-env.sh"
cd "$REPO"

step "system packages"
TEST_PACKAGES=(
    mosquitto   # the real MQTT broker tests start on ephemeral ports
    chromium    # headless browser for the dashboard tests (driven by Playwright)
    libatomic1  # Playwright's bundled node driver links it; a minimal Debian lacks it
    postgresql  # a throwaway PostgreSQL server per test worker (hub on PostgreSQL)
    docker.io   # the real Docker Engine the docker runtime and the runtime image tests use
    docker-registry  # a real container registry per test worker, on loopback
    debootstrap # the runtime image's base is built offline from Debian packages
    nginx       # the load balancer in front of several hub replicas (generated config)
    rabbitmq-server  # the clustered MQTT broker (rabbitmq_mqtt + rabbitmq_management plugins)
    systemd     # systemd-analyze verify checks the unit 'edgepack agent install-service' writes
)
ensure_apt_packages "${TEST_PACKAGES[@]}"

step "docker engine"
ensure_dockerd

step "python environment (.venv, edgepack[test])"
ensure_venv test

step "ruff"
ruff check .

step "mypy"
mypy

step "pytest"
# pytest exits 5 when it collected no test: that fails this script like any other failure.
if [ "$#" -gt 0 ]; then
    pytest "$@"
    exit
fi
# loadgroup: tests that share a heavy engine (the RabbitMQ cluster) run on one worker.
# The scaled-out engines (hub processes, the RabbitMQ cluster) wait for the second pass: next
# to the agent's timing-sensitive Docker tests they starve them of the two cores.
# --durations: the slowest tests in the log, to see where the 20-minute budget goes.
pytest -n 2 --dist loadgroup --durations=15 -m "not scale_out" tests

step "pytest: the hub suite again, every hub on PostgreSQL, and the scaled-out layout"
# What the SQL engine cannot change (sql_independent) ran in the first pass already.
EDGEPACK_TEST_POSTGRES=auto pytest -n 2 --dist loadgroup --durations=15 -m "not sql_independent" tests/hub
