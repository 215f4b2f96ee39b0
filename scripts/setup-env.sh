# Shared by scripts/quickstart.sh and scripts/test.sh (sourced, not run): installs what is
# missing and nothing else, so re-running either script is quick and changes nothing.
# Needs: Debian (apt-get), root or sudo, python3 >= 3.11.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
die() { printf '\033[1;31merror:\033[0m %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# ensure_apt_packages PKG...: install the Debian packages that are not installed yet.
ensure_apt_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "apt-get not found; install ${missing[*]} by hand"
    echo "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends \
        "${missing[@]}"
}

# ensure_python: a python3 >= 3.11 that can make virtual environments.
ensure_python() {
    command -v python3 >/dev/null || ensure_apt_packages python3
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "python3 is $(python3 -V 2>&1); edgepack needs Python 3.11 or newer"
    # Debian's python3 leaves venv's pip bootstrap to a separate package.
    python3 -c 'import ensurepip, venv' 2>/dev/null || ensure_apt_packages python3-venv
}

# ensure_venv EXTRAS: .venv with edgepack installed editable with those extras (comma-separated)
# (e.g. "hub,example" or "test"). Reinstalls only when pyproject.toml or the extras changed.
ensure_venv() {
    local extras="$1" stamp="$VENV/.edgepack-install-$1" want
    ensure_python
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    want="$extras $(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        "$VENV/bin/python" -m pip install -q -e "$REPO[$extras]"
        echo "$want" > "$stamp"
    fi
    export PATH="$VENV/bin:$PATH"
}

# ensure_dockerd: a Docker Engine that answers `docker info`; starts dockerd in the
# background when none does (CI machines boot without one) and waits for it.
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/edgepack-dockerd.log}"
ensure_dockerd() {
    local waited=0 limit="${DOCKERD_TIMEOUT:-60}"
    docker info >/dev/null 2>&1 && return 0
    command -v dockerd >/dev/null || die "dockerd not found; install it with apt-get install docker.io"
    # One already starting (its socket not up yet) is waited for, not started twice.
    if ! pgrep -x dockerd >/dev/null; then
        echo "starting dockerd (log: $DOCKERD_LOG)"
        as_root sh -c "nohup dockerd >>'$DOCKERD_LOG' 2>&1 </dev/null &"
    fi
    until docker info >/dev/null 2>&1; do
        [ "$waited" -ge "$limit" ] \
            && die "dockerd did not answer within ${limit} s; see the end of $DOCKERD_LOG"
        sleep 1
        waited=$((waited + 1))
    done
    echo "dockerd answers (after ${waited} s)"
}
