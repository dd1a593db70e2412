"""DESIGN.md's layers: a module imports only from its own package or from lower layers."""

from __future__ import annotations

import ast

from tests.conftest import ROOT

LAYERS = {
    "config": 1,
    "obs": 1,
    "db": 2,
    "synth": 2,
    "hl7": 2,
    "dicom": 3,
    "fhir": 3,
    "workflow": 4,
    "servers": 5,
    "service": 6,
    # The command line is the outer shell: `serve` hands its settings to the composition root.
    "cli": 7,
    "__main__": 8,
}


def _package(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_imports_point_down() -> None:
    package_root = ROOT / "fabricatord"
    violations = []
    for path in package_root.rglob("*.py"):
        if "migrations" in path.parts:
            continue
        relative = path.relative_to(ROOT).with_suffix("")
        own = relative.parts[1] if len(relative.parts) > 1 else ""
        if own == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                if not name.startswith("fabricatord."):
                    continue
                target = _package(name)
                if target == own or target == "__init__":
                    continue
                if LAYERS[target] >= LAYERS[own]:
                    violations.append(f"{relative}: imports {name} (layer {LAYERS[target]} >= {LAYERS[own]})")
    assert violations == []
