#!/usr/bin/env bash
# The edgepack quick start: train the digits example, sign it into a module, verify it, serve
# it, and check that the service answers what scikit-learn predicts.
#
#     bash scripts/quickstart.sh
#
# Works on a fresh Debian machine as root with only Python 3.11; re-running is safe. Keys,
# trust store and module cache live in .edgepack-home/ (not ~/.edgepack).
# Set EDGEPACK_PORT to serve on another port than 8890.
set -euo pipefail
source "$(dirname "$0")/setup-env.sh"
cd "$REPO"

export EDGEPACK_HOME="$REPO/.edgepack-home"
EXAMPLE="$REPO/examples/digits"
BUNDLE="$EXAMPLE/dist/digits-1.edgepack"
KEY="$EDGEPACK_HOME/keys/publisher.key"
WORK="$EDGEPACK_HOME/quickstart"
mkdir -p "$WORK"

PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT

# wait_ready URL PID LOG: until URL answers 200, or fail showing LOG if PID dies or 60 s pass.
wait_ready() {
    python - "$@" <<'PY'
import sys, time, urllib.request, os
url, pid, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        break
    time.sleep(0.2)
sys.stderr.write(f"{url} did not become ready; its log:\n" + open(log).read())
sys.exit(1)
PY
}

# free_port PREFERRED: PREFERRED if nothing listens there, else a free ephemeral port.
free_port() {
    python - "$1" <<'PY'
import socket, sys
for port in (int(sys.argv[1]), 0):
    s = socket.socket()
    # As the server will: connections of a previous run in TIME_WAIT do not block the port.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    print(s.getsockname()[1])
    s.close()
    break
PY
}

# --- 1. set-up ----------------------------------------------------------------------------
step "1. system packages and .venv (edgepack[example])"
QUICKSTART_PACKAGES=(
    # hub + agent, when they join the quick start: mosquitto
)
ensure_apt_packages "${QUICKSTART_PACKAGES[@]}"
ensure_venv example

# --- 2. the model -------------------------------------------------------------------------
step "2. train the digits classifier (scikit-learn -> ONNX)"
python "$EXAMPLE/train.py" --out "$EXAMPLE/model"

# --- 3. a signing key ---------------------------------------------------------------------
step "3. signing key ($KEY)"
if [ -f "$KEY" ]; then
    echo "using the existing key"
else
    edgepack keygen "$KEY"
fi

# --- 4. build, verify, inspect ------------------------------------------------------------
step "4. build and sign the module"
(cd "$EXAMPLE" && edgepack build --ic inferenceconfig.json --dc deploymentconfig.json \
    -m model/digits.onnx -n digits -v 1 -k "$KEY")
step "5. verify and inspect it"
edgepack verify "$BUNDLE" --trust "${KEY%.key}.pub"
edgepack inspect "$BUNDLE"

# --- 6. serve and score -------------------------------------------------------------------
PORT="$(free_port "${EDGEPACK_PORT:-8890}")"
URL="http://127.0.0.1:$PORT"
step "6. serve it on $URL"
edgepack serve "$BUNDLE" --port "$PORT" --trust "${KEY%.key}.pub" > "$WORK/serve.log" 2>&1 &
PIDS+=("$!")
wait_ready "$URL/healthz" "${PIDS[-1]}" "$WORK/serve.log"
echo "ready"

step "7. score the held-out test digits and compare with scikit-learn"
python - "$EXAMPLE/model/test_samples.json" "$WORK/request.json" <<'PY'
import json, sys
samples = json.load(open(sys.argv[1]))
json.dump({"data": samples["data"]}, open(sys.argv[2], "w"))
PY
edgepack call "$URL/score" --file "$WORK/request.json" > "$WORK/response.json"
python - "$EXAMPLE/model/test_samples.json" "$WORK/response.json" <<'PY'
import json, sys
expected = json.load(open(sys.argv[1]))["expected"]
got = json.load(open(sys.argv[2]))["predictions"]
same = sum(int(a == b) for a, b in zip(expected, got))
print(f"predictions: {got[:12]} ...")
print(f"{same}/{len(expected)} predictions match scikit-learn's")
sys.exit(0 if same == len(expected) == len(got) else 1)
PY

# --- (hub and agent steps will go here: hub serve, push, device enroll, agent, deploy) ----

step "done"
echo "module:  $BUNDLE"
echo "try it:  source .venv/bin/activate && export EDGEPACK_HOME=$EDGEPACK_HOME"
echo "         edgepack serve $BUNDLE --port 8890 --trust ${KEY%.key}.pub"
