#!/usr/bin/env bash
# Azure ML v1 "deploy machine learning models", every `az ml` step of it, with the edgepack CLI.
#
# Each step shows the Azure command it replaces. Run it from examples/digits once the model is
# trained (`python train.py`), logged in to a hub (`edgepack login`, or EDGEPACK_HUB_URL and
# EDGEPACK_TOKEN), with your signing key (`edgepack keygen`) trusted by that hub, and a device
# whose tags match SELECTOR and whose agent runs (README, steps 7 to 9):
#
#     cd examples/digits && python train.py && bash ../azure_cli_walkthrough.sh
#
# SELECTOR (default site=berlin) picks the devices; PORT and LOCAL_PORT (8890, 8891) are where
# the two services listen on them. The script stops at the first step that fails (set -e), with
# that command's own error message and exit code.
set -euo pipefail

SELECTOR="${SELECTOR:-site=berlin}"
PORT="${PORT:-8890}"
LOCAL_PORT="${LOCAL_PORT:-8891}"
MODEL="${MODEL:-digits}"
SERVICE="${SERVICE:-myservice}"
LOCAL_SERVICE="${LOCAL_SERVICE:-mylocalservice}"

step() { printf '\n== %s\n' "$*"; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# --- Connect to your workspace -------------------------------------------------------------------
# Azure: az ml workspace list --resource-group=<my resource group>
step "the devices this hub reaches"
edgepack device list --selector "$SELECTOR"

# --- Register your model (optional) --------------------------------------------------------------
# Azure: az ml model register -n onnx_mnist -p mnist/model.onnx
step "register the model"
edgepack model register -n "$MODEL" -p model/digits.onnx --tag area=digits
edgepack model list --tag area=digits

# --- Deploy, using a registered model ------------------------------------------------------------
# Azure: az ml model deploy -m mymodel:1 --ic inferenceconfig.json --dc deploymentconfig.json
# (edgepack names the service with -n, as `az ml model deploy -n` does, and the devices with a
# tag selector where Azure names a compute target.)
step "deploy the registered model"
cat >"$work/deploymentconfig.json" <<EOF
{"computeType": "local", "port": $PORT}
EOF
edgepack deploy -n "$SERVICE" -m "$MODEL:1" --ic inferenceconfig.json --dc "$work/deploymentconfig.json" \
    --selector "$SELECTOR"

# Azure: service.wait_for_deployment(show_output=True), then the service's state
step "wait until every device is final, then the state"
edgepack service wait "$SERVICE" --timeout 300
edgepack service show "$SERVICE"

# --- Test the resulting web service --------------------------------------------------------------
# Azure: service.run(input_data) — through the hub's view of the service, on a Healthy device
step "score five digits through the device"
python3 -c 'import json; s = json.load(open("model/test_samples.json")); print(json.dumps({"data": s["data"][:5]}))' \
    >"$work/request.json"
edgepack service run "$SERVICE" --file "$work/request.json"

# Azure: service.get_logs()
step "the module's log on the first device"
device="$(edgepack device list --selector "$SELECTOR" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["id"])')"
edgepack service logs "$SERVICE" --device "$device" --tail 20

# --- Deploy, using a local model (never registered) ----------------------------------------------
# Azure: az ml model deploy --ic inferenceconfig.json --dc deploymentconfig.json
# The model lies in the inference config's sourceDirectory, and the entry script loads it from
# beside itself, as Azure's documentation asks of an unregistered model.
step "deploy a local model from the source directory"
mkdir "$work/local"
cp inferenceconfig.json model/digits.onnx "$work/local/"
sed 's|os.path.join(os.getenv("AZUREML_MODEL_DIR"), "digits.onnx")|os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.onnx")|' \
    score.py >"$work/local/score.py"
cat >"$work/local-deploymentconfig.json" <<EOF
{"computeType": "local", "port": $LOCAL_PORT}
EOF
edgepack deploy -n "$LOCAL_SERVICE" --ic "$work/local/inferenceconfig.json" \
    --dc "$work/local-deploymentconfig.json" --selector "$SELECTOR"
edgepack service wait "$LOCAL_SERVICE" --timeout 300
edgepack service run "$LOCAL_SERVICE" --file "$work/request.json"

# --- Delete resources ----------------------------------------------------------------------------
# Azure: az ml service delete -n <name of webservice>   (twice: both services)
step "delete both services"
edgepack service delete "$SERVICE" --yes
edgepack service delete "$LOCAL_SERVICE" --yes

# Azure: az ml model delete <model id>
step "delete the model"
edgepack model delete "$MODEL:1"
edgepack model list --tag area=digits
