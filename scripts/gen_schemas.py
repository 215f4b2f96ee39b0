"""Write the JSON Schema of every contract into ``manifests/schemas/<name>.json``.

The models in ``manifests/`` are the source of truth; the files are generated from them so
that tools in other languages can validate edgepack documents. ``tests/test_schemas.py``
fails when the committed files drift from the models.

    python scripts/gen_schemas.py            # rewrite the files
    python scripts/gen_schemas.py --check    # exit 1 if any file is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SCHEMA_DIR = REPO / "manifests" / "schemas"

sys.path.insert(0, str(REPO))

from manifests.schemas import all_schemas  # noqa: E402  (needs the repository on sys.path)


def render(schema: dict[str, Any]) -> str:
    """The file text for one schema: pretty, sorted keys, one trailing newline."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def expected_files(out_dir: Path = SCHEMA_DIR) -> dict[Path, str]:
    return {out_dir / f"{name}.json": render(schema) for name, schema in all_schemas().items()}


def stale_files(out_dir: Path = SCHEMA_DIR) -> list[Path]:
    """Files that are missing, differ from the models, or belong to no contract."""
    expected = expected_files(out_dir)
    stale = [p for p, text in expected.items() if not p.exists() or p.read_text() != text]
    stale += [p for p in sorted(out_dir.glob("*.json")) if p not in expected]
    return stale


def write(out_dir: Path = SCHEMA_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    expected = expected_files(out_dir)
    for path in sorted(out_dir.glob("*.json")):
        if path not in expected:
            path.unlink()
    for path, text in expected.items():
        if not path.exists() or path.read_text() != text:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text)
            tmp.replace(path)
    return sorted(expected)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report out-of-date files")
    parser.add_argument("--out", type=Path, default=SCHEMA_DIR, help="output folder")
    args = parser.parse_args()
    if args.check:
        stale = stale_files(args.out)
        for path in stale:
            print(f"out of date: {path}", file=sys.stderr)
        if stale:
            print("run: python scripts/gen_schemas.py", file=sys.stderr)
        return 1 if stale else 0
    for path in write(args.out):
        print(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
