"""DESIGN.md §2: who may import whom. contouring/ and dose/ know nothing of DICOM, Flask or the
database; only service/ wires packages together."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "heartloop"

ALLOWED = {
    "config": set(),
    "core": set(),
    "store": {"core", "config"},
    "dicom_node": {"core", "store", "config"},
    "contouring": {"core", "config"},
    "dose": {"core"},
    "review_ui": {"core", "store", "config"},
    "phantom": {"core"},
    "service": {"config", "core", "store", "dicom_node", "contouring", "dose", "review_ui", "phantom"},
}
FORBIDDEN_THIRD_PARTY = {
    "contouring": {"pydicom", "pynetdicom", "flask", "sqlalchemy"},
    "dose": {"pydicom", "pynetdicom", "flask", "sqlalchemy", "torch"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_dependency_rule(package):
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "heartloop" and len(parts) > 1 and parts[1] in ALLOWED and parts[1] != package:
                assert parts[1] in ALLOWED[package], f"{path.relative_to(ROOT)} imports heartloop.{parts[1]}"
            assert parts[0] not in FORBIDDEN_THIRD_PARTY.get(package, set()), \
                f"{path.relative_to(ROOT)} imports {parts[0]}"
