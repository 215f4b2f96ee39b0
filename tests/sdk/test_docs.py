"""The porting guide names only what ``import edgepack`` has: every call in the edgepack column
of ``docs/azure-ml-sdk.md`` exists and takes the keywords the guide writes."""

from __future__ import annotations

import inspect
import re
from typing import Any

import edgepack
from tests.conftest import REPO

GUIDE = REPO / "docs" / "azure-ml-sdk.md"
#: the lower-case names the guide uses for objects, and what they are
OBJECTS: dict[str, Any] = {
    "hub": edgepack.Hub,
    "model": edgepack.Model,
    "service": edgepack.Service,
    "device": edgepack.Device,
    "env": edgepack.Environment("guide"),
}
CALL = re.compile(r"\b([A-Za-z_]\w*)((?:\.[a-z_]\w*)*)(?:\(([^)]*)\))?")
KEYWORD = re.compile(r"(?:^|[(,]\s*)(\w+)=")


def edgepack_column() -> list[str]:
    """The code spans of the guide's table's edgepack column."""
    text = GUIDE.read_text()
    table = text.split("## The calls, one by one", 1)[1].split("\n## ", 1)[0]
    spans: list[str] = []
    for row in table.splitlines():
        cells = row.split(" | ")
        if len(cells) >= 3 and not row.startswith("|---"):
            spans += re.findall(r"`([^`]+)`", cells[1])
    return spans


def resolve(root: str, chain: str) -> Any:
    if root in OBJECTS:
        target = OBJECTS[root]
    elif root in edgepack.__all__:
        target = getattr(edgepack, root)
    else:
        return None
    for part in chain.strip(".").split(".") if chain else []:
        assert hasattr(target, part), f"{root}{chain}: edgepack has no {part!r}"
        target = getattr(target, part)
    return target


def test_every_call_in_the_guide_exists_with_its_keywords() -> None:
    spans = edgepack_column()
    assert len(spans) > 40, spans  # the table was read
    checked = 0
    for span in spans:
        for match in CALL.finditer(span):
            root, chain, args = match.groups()
            target = resolve(root, chain)
            if target is None or args is None or not callable(target):
                continue
            params = inspect.signature(target).parameters
            # A catch-all named "unknown" only refuses (with a did-you-mean); it takes nothing.
            takes_any = any(
                p.kind is inspect.Parameter.VAR_KEYWORD and p.name != "unknown" for p in params.values()
            )
            for keyword in KEYWORD.findall(args):
                assert takes_any or keyword in params, f"{span}: {root}{chain} takes no {keyword}="
            checked += 1
    assert checked > 30


def errors_table() -> list[tuple[list[str], str | None, int]]:
    """The guide's error table: (classes, the parent named in parentheses, CLI exit code)."""
    text = GUIDE.read_text()
    table = text.split("## Errors", 1)[1].split("\n## ", 1)[0]
    rows: list[tuple[list[str], str | None, int]] = []
    for row in table.splitlines():
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        if len(cells) != 3 or not cells[2].isdigit():
            continue
        names, _, parent = cells[0].partition("(")
        parents = re.findall(r"`(\w+)`", parent)
        rows.append((re.findall(r"`(\w+)`", names), parents[0] if parents else None, int(cells[2])))
    return rows


def test_every_error_the_guide_names_is_importable_with_its_parent_and_exit_code() -> None:
    rows = errors_table()
    assert len(rows) >= 14, rows  # the table was read
    for names, parent, exit_code in rows:
        for name in names:
            assert name in edgepack.__all__, f"the guide's {name} is not importable from edgepack"
            cls = getattr(edgepack, name)
            assert issubclass(cls, edgepack.EdgepackError), name
            assert cls.exit_code == exit_code, f"{name} exits {cls.exit_code}, the guide says {exit_code}"
            if parent is not None:
                assert issubclass(cls, getattr(edgepack, parent)), f"{name} is not a {parent}"


def test_what_the_guide_leaves_out_is_not_there() -> None:
    # A script that calls them fails at the call, instead of doing something else.
    assert not hasattr(edgepack.Model, "profile") and not hasattr(edgepack.Model, "package")
    assert not hasattr(edgepack.Service, "get_token")
    for name in ("Run", "Experiment", "Dataset"):
        assert name not in edgepack.__all__
