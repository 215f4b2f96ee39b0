#!/bin/sh
# Install the edgepack agent from the hub that served this script, with nothing from a
# package index (docs/agent.md, "Install from the hub"):
#
#     curl -fsS HUB/install.sh | sh -s -- --credentials edge-1.json     (or --token T)
#
# 1. download the hub's agent bundle (bundle.json, whose sha256 this script pins, and the
#    wheels for this machine, each checked against bundle.json's size and digest);
# 2. a venv with those wheels (pip from the bundle, --no-index);
# 3. the device's credentials (--credentials FILE, or with --token 'edgepack agent join HUB
#    --token T --state STATE_DIR', which enrols the device and writes them into STATE_DIR);
# 4. the bundle's signature checked against the publisher keys the credentials trust;
# 5. agent.toml, then the systemd service (or, without systemd, the agent started directly).
#
# Needs: root, Debian's python3 (3.11 or newer). Options: --prefix DIR (/opt/edgepack),
# --config-dir DIR (/etc/edgepack), --state-dir DIR (/var/lib/edgepack), --runtime R
# (process, docker; repeatable), --log FILE (without systemd), --ca FILE (the hub's CA),
# --id-from hostname|machine-id|ID (with --token: the device's id, default its hostname),
# --no-start.
set -eu

HUB_URL=@HUB_URL@
BUNDLE_DIGEST=@BUNDLE_DIGEST@

PREFIX=/opt/edgepack
CONFIG_DIR=/etc/edgepack
STATE_DIR=/var/lib/edgepack
LOG=/var/log/edgepack-agent.log
TOKEN=
ID_FROM=hostname
CREDENTIALS=
CA=
RUNTIMES=
START=1

say() { printf 'edgepack install: %s\n' "$*" >&2; }
die() { printf 'edgepack install: error: %s\n' "$*" >&2; exit 1; }
need_value() { [ "$#" -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }

while [ "$#" -gt 0 ]; do
    case "$1" in
        --token) need_value "$@"; TOKEN=$2; shift 2 ;;
        --id-from) need_value "$@"; ID_FROM=$2; shift 2 ;;
        --credentials) need_value "$@"; CREDENTIALS=$2; shift 2 ;;
        --prefix) need_value "$@"; PREFIX=$2; shift 2 ;;
        --config-dir) need_value "$@"; CONFIG_DIR=$2; shift 2 ;;
        --state-dir) need_value "$@"; STATE_DIR=$2; shift 2 ;;
        --log) need_value "$@"; LOG=$2; shift 2 ;;
        --ca) need_value "$@"; CA=$2; shift 2 ;;
        --runtime) need_value "$@"; RUNTIMES="$RUNTIMES --runtime $2"; shift 2 ;;
        --no-start) START=0; shift ;;
        *) die "unknown option $1 (see the comment at the top of this script)" ;;
    esac
done
[ -n "$TOKEN" ] || [ -n "$CREDENTIALS" ] || die "give --credentials FILE (from 'edgepack device enroll') or --token T"
[ -z "$TOKEN" ] || [ -z "$CREDENTIALS" ] || die "give --credentials FILE or --token T, not both"
[ -z "$CREDENTIALS" ] || [ -r "$CREDENTIALS" ] || die "$CREDENTIALS: cannot read it"
[ -z "$CA" ] || [ -r "$CA" ] || die "$CA: cannot read it"
[ "$(id -u)" = 0 ] || die "run it as root (it writes $PREFIX, $CONFIG_DIR and $STATE_DIR)"
command -v python3 >/dev/null || die "python3 not found; install Debian's python3 (3.11 or newer)"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "python3 is $(python3 -V 2>&1); the agent needs Python 3.11 or newer"

BUNDLE="$PREFIX/bundle"
VENV="$PREFIX/venv"
mkdir -p "$BUNDLE"

# 1. The bundle. Python's standard library downloads and hashes: the device needs no curl.
say "downloading the agent bundle from $HUB_URL"
FOUND=$(python3 - "$HUB_URL" "$BUNDLE_DIGEST" "$BUNDLE" "$CA" "$CREDENTIALS" <<'PY'
import hashlib, json, os, platform, re, ssl, sys, tempfile, urllib.request

hub, want, dest, ca, credentials = sys.argv[1:6]
arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine())
if arch is None:
    sys.exit(f"edgepack install: error: no agent bundle for machine {platform.machine()!r}")
context = None
if hub.startswith("https:"):
    context = ssl.create_default_context(cafile=ca or None)
    if not ca and credentials:
        pem = json.load(open(credentials)).get("ca_pem")
        if pem:
            context.load_verify_locations(cadata=pem)


def fetch(path, limit):
    with urllib.request.urlopen(hub + path, timeout=60, context=context) as answer:
        data = answer.read(limit + 1)
    if len(data) > limit:
        sys.exit(f"edgepack install: error: {hub}{path} is larger than {limit} bytes")
    return data


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def save(path, data):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path))
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


raw = fetch("/agent-bundle/bundle.json", 1 << 20)
if digest(raw) != want:
    sys.exit("edgepack install: error: bundle.json is not the one this script names (digest differs)")
signed = json.loads(raw)["signed"]
wheels = signed["wheels"].get(arch)
if not wheels:
    sys.exit(f"edgepack install: error: the hub's bundle has no wheels for {arch}")
os.makedirs(os.path.join(dest, arch), exist_ok=True)
for wheel in wheels:
    name = wheel["name"]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,200}\.whl", name):
        sys.exit(f"edgepack install: error: bundle.json names a wheel {name!r}")
    path = os.path.join(dest, arch, name)
    if os.path.isfile(path) and digest(open(path, "rb").read()) == wheel["digest"]:
        continue  # already here from an earlier run
    data = fetch(f"/agent-bundle/{arch}/{name}", wheel["size"])
    if len(data) != wheel["size"] or digest(data) != wheel["digest"]:
        sys.exit(f"edgepack install: error: {name} is not the wheel bundle.json names")
    save(path, data)
save(os.path.join(dest, "bundle.json"), raw)
pip = next(w["name"] for w in wheels if w["name"].startswith("pip-"))
extras = f"[{','.join(signed['extras'])}]" if signed.get("extras") else ""
print(arch, f"edgepack{extras}=={signed['version']}", pip)
PY
) || die "the download failed (above)"
set -- $FOUND
ARCH=$1 REQUIREMENT=$2 PIP_WHEEL=$3

# 2. The venv, from the bundle's wheels only (Debian's python3 has no pip: the bundle's runs).
say "installing $REQUIREMENT ($ARCH) into $VENV"
[ -x "$VENV/bin/python" ] || python3 -m venv --without-pip "$VENV" \
    || die "python3 cannot make a venv (is its venv module there?)"
PIP_CONFIG_FILE=/dev/null "$VENV/bin/python" "$BUNDLE/$ARCH/$PIP_WHEEL/pip" install --quiet --no-index \
    --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
    --find-links "$BUNDLE/$ARCH" "$REQUIREMENT" || die "pip could not install the bundle's wheels"
EDGEPACK="$VENV/bin/edgepack"

# 3. The device's credentials: the admin's file, or the device enrols itself with the token
#    ('edgepack agent join' writes its key, credentials.json and agent.toml into its folder).
mkdir -p "$CONFIG_DIR"
CONFIG="$CONFIG_DIR/agent.toml"
if [ -n "$TOKEN" ]; then
    "$EDGEPACK" agent join --help >/dev/null 2>&1 \
        || die "this hub's agent has no 'edgepack agent join': enroll the device and pass --credentials FILE"
    # shellcheck disable=SC2086
    "$EDGEPACK" agent join "$HUB_URL" --token "$TOKEN" --id-from "$ID_FROM" --state "$STATE_DIR" $RUNTIMES ${CA:+--ca "$CA"} \
        || die "'edgepack agent join' failed (above)"
    DEVICE_CREDENTIALS="$STATE_DIR/credentials.json"
    CONFIG="$STATE_DIR/agent.toml"
else
    DEVICE_CREDENTIALS="$CONFIG_DIR/device.json"
    (umask 077 && cp "$CREDENTIALS" "$DEVICE_CREDENTIALS.tmp") && mv "$DEVICE_CREDENTIALS.tmp" "$DEVICE_CREDENTIALS"
fi
chmod 600 "$DEVICE_CREDENTIALS"

# 4. The signature, with the keys the device trusts; nothing is configured or started before.
"$EDGEPACK" agent verify-bundle "$BUNDLE" --credentials "$DEVICE_CREDENTIALS" --arch "$ARCH" \
    || { rm -rf "$VENV"; die "the bundle is not trusted (above): nothing was configured or started"; }

# 5. agent.toml (join wrote its own) and the service.
if [ -z "$TOKEN" ]; then
    # shellcheck disable=SC2086
    "$EDGEPACK" agent init --credentials "$DEVICE_CREDENTIALS" --state-dir "$STATE_DIR" $RUNTIMES \
        --out "$CONFIG" --force
fi
[ "$START" = 1 ] || { say "installed; start it with: $EDGEPACK agent run --config $CONFIG"; exit 0; }
if [ -d /run/systemd/system ]; then
    "$EDGEPACK" agent install-service --config "$CONFIG"
    say "the agent runs as the systemd service edgepack-agent (journalctl -u edgepack-agent)"
else
    mkdir -p "$(dirname "$LOG")"
    nohup "$EDGEPACK" agent run --config "$CONFIG" >>"$LOG" 2>&1 </dev/null &
    say "systemd is not running here: started the agent directly (pid $!; log $LOG); it is not restarted on failure or at boot"
    echo "agent-pid $!"
fi
