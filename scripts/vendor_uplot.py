"""Vendor uPlot (the dashboard's charting library) from the npm registry, pinned by sha256.

The dashboard must work on an offline network and the hub serves nothing from a CDN, so the
library's files are committed under ``cloud_hub/dashboard/vendor/``; CI never needs the
network for them. This script is how they got there, and how to move to another version:
change ``VERSION`` and ``SHA256`` (the tarball's digest, checked before anything is written).

    python scripts/vendor_uplot.py           # fetch, check, write the three files
    python scripts/vendor_uplot.py --check   # exit 1 if the committed files differ from the tarball's
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tarfile
import urllib.request
from pathlib import Path

VERSION = "1.6.32"
SHA256 = "4b8a8191e425658e3ea8c8c1314b0fc679c861ee3a1af2b20c7b16ba50b5133d"
TARBALL = f"https://registry.npmjs.org/uplot/-/uplot-{VERSION}.tgz"
MAX_TARBALL_BYTES = 4 * 2**20  # the 1.6 tarballs are ~130 KiB

REPO = Path(__file__).resolve().parent.parent
VENDOR = REPO / "cloud_hub" / "dashboard" / "vendor"
# member of the tarball → file name under VENDOR
FILES = {
    "package/dist/uPlot.iife.min.js": "uPlot.iife.min.js",
    "package/dist/uPlot.min.css": "uPlot.min.css",
    "package/LICENSE": "uPlot.LICENSE",
}


def fetch() -> bytes:
    with urllib.request.urlopen(TARBALL, timeout=60) as answer:
        data: bytes = answer.read(MAX_TARBALL_BYTES + 1)
    if len(data) > MAX_TARBALL_BYTES:
        raise SystemExit(f"error: {TARBALL} is larger than {MAX_TARBALL_BYTES} bytes")
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"error: {TARBALL} has sha256 {digest}, expected {SHA256}; nothing written")
    return data


def members(data: bytes) -> dict[str, bytes]:
    """The vendored files' bytes, read by name (no path from the archive is ever written)."""
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member, name in FILES.items():
            handle = tar.extractfile(member)
            if handle is None:
                raise SystemExit(f"error: {member} is missing from {TARBALL}")
            out[name] = handle.read()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    files = members(fetch())
    if args.check:
        stale = [n for n, b in files.items() if not (VENDOR / n).is_file() or (VENDOR / n).read_bytes() != b]
        for name in stale:
            print(f"{VENDOR / name} differs from uPlot {VERSION}", file=sys.stderr)
        return 1 if stale else 0
    VENDOR.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (VENDOR / name).write_bytes(data)
        print(f"wrote {VENDOR / name} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
