#!/bin/sh
# Install the edgepack agent from the hub that served this script, with nothing from a
# package index (docs/agent.md, "Install from the hub"):
#
#     curl -fsS HUB/install.sh | sh -s -- --credentials edge-1.json
#     curl -fsS HUB/install.sh | sh -s -- --token-file /root/join-token    (or EDGEPACK_JOIN_TOKEN)
#
# 1. download the hub's agent bundle: bundle.json, whose sha256 this script pins and whose
#    Ed25519 signature is checked, by Python's standard library and the system's OpenSSL
#    (libcrypto, which Debian's python3 links), against the publisher keys the credentials
#    trust (with a token: those this script pins), before any code of the bundle runs; then
#    the wheels for this machine, each checked against bundle.json's size and digest;
# 2. a venv with those wheels (pip from the bundle, --no-index);
# 3. the device's credentials (--credentials FILE, or with a token 'edgepack agent join HUB
#    --token-file - --state STATE_DIR', the token on its stdin, which enrols the device and
#    writes them into STATE_DIR);
# 4. the bundle checked again by the installed agent against the keys of those credentials;
# 5. agent.toml, then the systemd service (or, without systemd, the agent started directly).
#
# Needs: root, Debian's python3 (3.11 or newer). Options: --prefix DIR (/opt/edgepack),
# --config-dir DIR (/etc/edgepack), --state-dir DIR (/var/lib/edgepack), --runtime R
# (process, docker; repeatable), --log FILE (without systemd), --ca FILE (the hub's CA),
# --token-file FILE (the provisioning token; or the variable EDGEPACK_JOIN_TOKEN; --token T
# works too, but shows the token to every local user in the process list), --id-from
# hostname|machine-id|ID (with a token: the device's id, default its hostname), --no-start.
set -eu

HUB_URL=@HUB_URL@
BUNDLE_DIGEST=@BUNDLE_DIGEST@
# The publisher keys this hub trusts: they check the bundle's signature when no credentials
# file (the admin's, which names its own) is given.
PUBLISHERS=@PUBLISHERS@

PREFIX=/opt/edgepack
CONFIG_DIR=/etc/edgepack
STATE_DIR=/var/lib/edgepack
LOG=/var/log/edgepack-agent.log
TOKEN=
TOKEN_FILE=
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
        --token) need_value "$@"; TOKEN=$2; shift 2
            say "warning: --token shows the token to every local user (ps); use --token-file FILE or EDGEPACK_JOIN_TOKEN" ;;
        --token-file) need_value "$@"; TOKEN_FILE=$2; shift 2 ;;
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
[ -z "$TOKEN" ] || [ -z "$TOKEN_FILE" ] || die "give --token-file FILE or --token T, not both"
if [ -n "$TOKEN_FILE" ]; then
    [ -r "$TOKEN_FILE" ] || die "$TOKEN_FILE: cannot read it"
    # read is the shell's own: the token is never any command's argument.
    IFS= read -r TOKEN <"$TOKEN_FILE" || [ -n "$TOKEN" ] || die "$TOKEN_FILE holds no token"
elif [ -z "$TOKEN" ] && [ -n "${EDGEPACK_JOIN_TOKEN:-}" ]; then
    TOKEN=$EDGEPACK_JOIN_TOKEN
fi
# Nothing this script starts (pip, the agent) inherits the token.
unset EDGEPACK_JOIN_TOKEN
[ -n "$TOKEN" ] || [ -n "$CREDENTIALS" ] \
    || die "give --credentials FILE (from 'edgepack device enroll') or --token-file FILE (or EDGEPACK_JOIN_TOKEN)"
[ -z "$TOKEN" ] || [ -z "$CREDENTIALS" ] || die "give --credentials FILE or a token, not both"
[ -z "$CREDENTIALS" ] || [ -r "$CREDENTIALS" ] || die "$CREDENTIALS: cannot read it"
[ -z "$CA" ] || [ -r "$CA" ] || die "$CA: cannot read it"
[ "$(id -u)" = 0 ] || die "run it as root (it writes $PREFIX, $CONFIG_DIR and $STATE_DIR)"
command -v python3 >/dev/null || die "python3 not found; install Debian's python3 (3.11 or newer)"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "python3 is $(python3 -V 2>&1); the agent needs Python 3.11 or newer"

BUNDLE="$PREFIX/bundle"
VENV="$PREFIX/venv"

# 1. The bundle. Python's standard library downloads and hashes (the device needs no curl),
#    and checks bundle.json's signature with the system's libcrypto: no code of the bundle
#    runs, and nothing is written, before bundle.json is the one pinned here and is signed by
#    a trusted publisher.
say "downloading the agent bundle from $HUB_URL"
FOUND=$(python3 - "$HUB_URL" "$BUNDLE_DIGEST" "$BUNDLE" "$CA" "$CREDENTIALS" "$PUBLISHERS" <<'PY'
import ctypes, ctypes.util, hashlib, json, os, platform, re, ssl, sys, tempfile, urllib.request

hub, want, dest, ca, credentials, publishers = sys.argv[1:7]


def refuse(why):
    # Exit code 3 (a trust refusal, as the CLI's): the script stops with this line alone.
    print(f"edgepack install: error: {why}: nothing was installed", file=sys.stderr)
    sys.exit(3)


def no_constant(name):
    raise ValueError(f"{name} is not JSON")


arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine())
if arch is None:
    refuse(f"no agent bundle for machine {platform.machine()!r}")
try:
    trust = json.load(open(credentials))["publishers"] if credentials else json.loads(publishers)
except (OSError, ValueError, KeyError, TypeError):
    refuse(f"{credentials or 'this script'} names no publisher keys (not an edgepack credentials file?)")
context = None
if hub.startswith("https:"):
    context = ssl.create_default_context(cafile=ca or None)
    if not ca and credentials:
        pem = json.load(open(credentials)).get("ca_pem")
        if pem:
            context.load_verify_locations(cadata=pem)


def ed25519():
    """Ed25519 verification by OpenSSL's libcrypto (the one Python's hashlib loaded), checked
    on RFC 8032's first test vector so that a library that does not verify is never trusted."""
    import _hashlib  # noqa: F401  (maps the libcrypto Python itself uses)

    try:
        with open("/proc/self/maps") as maps:
            found = [ln.split()[-1] for ln in maps if os.path.basename(ln.split()[-1]).startswith("libcrypto.so")]
    except OSError:  # no /proc here
        found = []
    path = found[0] if found else ctypes.util.find_library("crypto")
    if not path:
        refuse("OpenSSL's libcrypto is not found, so the bundle's signature cannot be checked")
    lib = ctypes.CDLL(path)
    p, size = ctypes.c_void_p, ctypes.c_size_t
    lib.EVP_PKEY_new_raw_public_key.restype = p
    lib.EVP_PKEY_new_raw_public_key.argtypes = [ctypes.c_int, p, ctypes.c_char_p, size]
    lib.EVP_MD_CTX_new.restype = p
    lib.EVP_DigestVerifyInit.argtypes = [p, p, p, p, p]
    lib.EVP_DigestVerify.argtypes = [p, ctypes.c_char_p, size, ctypes.c_char_p, size]
    lib.EVP_MD_CTX_free.argtypes = lib.EVP_PKEY_free.argtypes = [p]

    def verify(key, sig, message):
        pkey = lib.EVP_PKEY_new_raw_public_key(1087, None, key, len(key))  # NID_ED25519
        ctx = lib.EVP_MD_CTX_new()
        try:
            return bool(pkey and ctx and len(sig) == 64 and lib.EVP_DigestVerifyInit(ctx, None, None, None, pkey) == 1
                        and lib.EVP_DigestVerify(ctx, sig, len(sig), message, len(message)) == 1)
        finally:
            lib.EVP_MD_CTX_free(ctx)
            lib.EVP_PKEY_free(pkey)

    key = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    sig = bytes.fromhex("e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")
    if not verify(key, sig, b"") or verify(key, sig, b"x"):
        refuse(f"{path} does not verify Ed25519 signatures correctly")
    return verify


def check_signature(raw):
    """What manifests.signing.verify_envelope checks: at least `threshold` distinct trusted
    keys signed the canonical JSON of the `signed` object as received."""
    try:
        keys = {}
        for entry in trust.get("keys", []):
            key = bytes.fromhex(entry["public_key"])
            if len(key) == 32 and hashlib.sha256(key).hexdigest() == entry["keyid"]:
                keys[entry["keyid"]] = key
        threshold = max(1, int(trust.get("threshold", 1)))
    except (AttributeError, ValueError, KeyError, TypeError):
        refuse("the trusted publisher keys are not valid")
    try:
        envelope = json.loads(raw, parse_constant=no_constant)
        signed, signatures = envelope["signed"], envelope["signatures"]
        if not isinstance(signed, dict) or not isinstance(signatures, list):
            raise TypeError
        message = json.dumps(signed, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                             allow_nan=False).encode()
        offered = [(str(s["keyid"]), bytes.fromhex(s["sig"])) for s in signatures]
    except (ValueError, KeyError, TypeError, RecursionError):
        refuse("bundle.json is not a signed agent bundle")
    verify = ed25519()
    good, bad = set(), []
    for keyid, sig in offered:
        if keyid not in keys or keyid in good:
            continue
        if verify(keys[keyid], sig, message):
            good.add(keyid)
        else:
            bad.append(keyid)
    if len(good) >= threshold:
        return signed
    if bad:
        refuse(f"bundle.json's signature by key {bad[0][:16]} does not match its content (modified after signing)")
    if not keys:
        refuse("no trusted publisher keys to check bundle.json's signature with")
    signers = ", ".join(keyid[:16] for keyid, _ in offered)
    if not good:
        refuse(f"bundle.json is signed by untrusted key(s) {signers}, not by a publisher the device trusts")
    refuse(f"bundle.json has {len(good)} trusted signature(s), {threshold} required")


def fetch(path, limit):
    with urllib.request.urlopen(hub + path, timeout=60, context=context) as answer:
        data = answer.read(limit + 1)
    if len(data) > limit:
        refuse(f"{hub}{path} is larger than {limit} bytes")
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
    refuse("bundle.json is not the one this script names (digest differs)")
signed = check_signature(raw)
wheels = signed["wheels"].get(arch)
if not wheels:
    refuse(f"the hub's bundle has no wheels for {arch}")
os.makedirs(os.path.join(dest, arch), exist_ok=True)
for wheel in wheels:
    name = wheel["name"]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,200}\.whl", name):
        refuse(f"bundle.json names a wheel {name!r}")
    path = os.path.join(dest, arch, name)
    if os.path.isfile(path) and digest(open(path, "rb").read()) == wheel["digest"]:
        continue  # already here from an earlier run
    data = fetch(f"/agent-bundle/{arch}/{name}", wheel["size"])
    if len(data) != wheel["size"] or digest(data) != wheel["digest"]:
        refuse(f"{name} is not the wheel bundle.json names")
    save(path, data)
save(os.path.join(dest, "bundle.json"), raw)
pip = next(w["name"] for w in wheels if w["name"].startswith("pip-"))
extras = f"[{','.join(signed['extras'])}]" if signed.get("extras") else ""
print(arch, f"edgepack{extras}=={signed['version']}", pip)
PY
) || { status=$?; [ "$status" = 3 ] && exit 3; die "the download failed (above)"; }
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
    COLUMNS=200 "$EDGEPACK" agent join --help 2>/dev/null | grep -q -e --token-file \
        || die "this hub's agent cannot take the token on stdin ('edgepack agent join --token-file -'): rebuild the bundle, or enroll the device and pass --credentials FILE"
    # The token goes on join's stdin (printf is the shell's own): no process list shows it.
    # shellcheck disable=SC2086
    printf '%s\n' "$TOKEN" | "$EDGEPACK" agent join "$HUB_URL" --token-file - --id-from "$ID_FROM" \
        --state "$STATE_DIR" $RUNTIMES ${CA:+--ca "$CA"} \
        || die "'edgepack agent join' failed (above)"
    DEVICE_CREDENTIALS="$STATE_DIR/credentials.json"
    CONFIG="$STATE_DIR/agent.toml"
else
    DEVICE_CREDENTIALS="$CONFIG_DIR/device.json"
    (umask 077 && cp "$CREDENTIALS" "$DEVICE_CREDENTIALS.tmp") && mv "$DEVICE_CREDENTIALS.tmp" "$DEVICE_CREDENTIALS"
fi
chmod 600 "$DEVICE_CREDENTIALS"

# 4. The signature again, by the installed agent, with the keys of the device's credentials
#    (a token's join brought them); nothing is configured or started before.
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
