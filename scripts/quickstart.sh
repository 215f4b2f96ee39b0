#!/usr/bin/env bash
# The edgepack quick start: train the digits example, sign it into a module, verify it, serve
# it, check that the service answers what scikit-learn predicts, then start a broker and a hub,
# register the model, push the module, enroll a device, deploy to it, run the device's agent
# (process runtime), score through the device's module, and print the dashboard address.
#
#     bash scripts/quickstart.sh
#
# Works on a fresh Debian machine as root with only Python 3.11; re-running is safe. Keys,
# trust store and module cache live in .edgepack-home/ (not ~/.edgepack).
# Set EDGEPACK_PORT, EDGEPACK_HUB_PORT, EDGEPACK_MQTT_PORT to move the scoring service (8890),
# the hub (8800) or the broker (1883) to other ports; EDGEPACK_KEEP_RUNNING=1|0 to keep them up.
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
step "1. system packages and .venv (edgepack[hub,example])"
QUICKSTART_PACKAGES=(
    mosquitto   # the MQTT broker between hub and devices
)
ensure_apt_packages "${QUICKSTART_PACKAGES[@]}"
ensure_venv hub,example   # the hub runs here too; a device needs only the base install

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

# --- 8. the hub and its broker -------------------------------------------------------------
# A fresh hub each run, so that re-running registers, enrolls and deploys the same things.
HUB_DATA="$WORK/hub"
BROKER_DIR="$WORK/broker"
rm -rf "$HUB_DATA" "$BROKER_DIR"
MQTT_PORT="$(free_port "${EDGEPACK_MQTT_PORT:-1883}")"
HUB_PORT="$(free_port "${EDGEPACK_HUB_PORT:-8800}")"
HUB="http://127.0.0.1:$HUB_PORT"
step "8. Mosquitto on 127.0.0.1:$MQTT_PORT with accounts and ACL generated by the hub"
edgepack hub broker-config --out "$BROKER_DIR" --data-dir "$HUB_DATA" --port "$MQTT_PORT"
mosquitto -c "$BROKER_DIR/mosquitto.conf" > "$WORK/mosquitto.log" 2>&1 &
PIDS+=("$!")

step "9. the hub on $HUB"
edgepack hub serve --data-dir "$HUB_DATA" --port "$HUB_PORT" --trust "${KEY%.key}.pub" \
    --mqtt-host 127.0.0.1 --mqtt-port "$MQTT_PORT" --broker-dir "$BROKER_DIR" \
    --broker-pid-file "$BROKER_DIR/mosquitto.pid" > "$WORK/hub.log" 2>&1 &
PIDS+=("$!")
wait_ready "$HUB/docs" "${PIDS[-1]}" "$WORK/hub.log"
edgepack login --hub "$HUB" --token "$(cat "$HUB_DATA/admin_token")"

step "10. register the model, push the module, enroll a device, deploy to a selector"
edgepack model register -n digits -p "$EXAMPLE/model/digits.onnx" --tag framework=onnx \
    --tag dataset=sklearn-digits
edgepack push "$BUNDLE"
edgepack device enroll edge-berlin-1 --tag site=berlin --out "$WORK/edge-berlin-1.json"
# The example's deploymentconfig.json, on the process runtime (no Docker needed) and a free port.
DEVICE_PORT="$(free_port "${EDGEPACK_DEVICE_PORT:-8891}")"
python - "$EXAMPLE/deploymentconfig.json" "$WORK/deploymentconfig.json" "$DEVICE_PORT" <<'PY'
import json, sys
dc = json.load(open(sys.argv[1]))
dc["port"] = int(sys.argv[3])
dc["edgepack"] = {"runtime": "process"}
json.dump(dc, open(sys.argv[2], "w"), indent=2)
PY
edgepack deploy -n digits-svc -m digits:1 --dc "$WORK/deploymentconfig.json" \
    --selector site=berlin
edgepack service show digits-svc

step "11. the device: its agent (process runtime) runs what the hub signs"
AGENT_DIR="$WORK/agent"
rm -rf "$AGENT_DIR"
edgepack agent init --credentials "$WORK/edge-berlin-1.json" --runtime process \
    --state-dir "$AGENT_DIR/state" --service-host 127.0.0.1 --out "$AGENT_DIR/agent.toml"
# --stop-modules: when the quick start ends, the module stops with the agent.
edgepack agent run --config "$AGENT_DIR/agent.toml" --stop-modules > "$WORK/agent.log" 2>&1 &
PIDS+=("$!")
edgepack service wait digits-svc --timeout 120 || { tail -n 40 "$WORK/agent.log"; exit 1; }
edgepack agent status --config "$AGENT_DIR/agent.toml"

step "12. score through the device's module on 127.0.0.1:$DEVICE_PORT and compare with scikit-learn"
edgepack call "http://127.0.0.1:$DEVICE_PORT/score" --file "$WORK/request.json" > "$WORK/device-response.json"
python - "$EXAMPLE/model/test_samples.json" "$WORK/device-response.json" <<'PY'
import json, sys
expected = json.load(open(sys.argv[1]))["expected"]
got = json.load(open(sys.argv[2]))["predictions"]
same = sum(int(a == b) for a, b in zip(expected, got))
print(f"the device's module: {same}/{len(expected)} predictions match scikit-learn's")
sys.exit(0 if same == len(expected) == len(got) else 1)
PY
echo "its log, through the hub:"
edgepack service logs digits-svc --device edge-berlin-1 --tail 5

step "done"
echo "module:     $BUNDLE (scored locally above: $URL)"
echo "device:     edge-berlin-1 serves it on http://127.0.0.1:$DEVICE_PORT/score (agent log: $WORK/agent.log)"
echo "dashboard:  $HUB/   (admin token in $HUB_DATA/admin_token)"
echo "CLI:        source .venv/bin/activate && export EDGEPACK_HOME=$EDGEPACK_HOME"
echo "            edgepack device list; edgepack service list; edgepack model list"
echo "            edgepack agent status --config $AGENT_DIR/agent.toml"
# Keep the services up for a person at a terminal; a script or CI run ends here.
if [ "${EDGEPACK_KEEP_RUNNING:-$([ -t 0 ] && echo 1 || echo 0)}" = 1 ]; then
    echo "hub, broker, agent and scoring services keep running; press Ctrl-C to stop them"
    wait
fi
