"""Dependencies point one way: CLI and apps → backend → passes → kernels; runtime → kernels.

Every import statement of every module (top-level and local imports alike) is read from the source with ``ast`` and
checked against the layer rules below; a subprocess then imports the whole library core and checks that no
application module was loaded as a side effect.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: layer → module prefixes its modules must never import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "kernels": ("fxdit.passes", "fxdit.backend", "fxdit.runtime", "fxdit.config", "fxdit.calibration",
                "fxdit.analysis", "fxdit.cost", "fxdit.dump", "fxdit.registry", "fxdit.apps", "fxdit.commands",
                "fxdit.cli"),
    "passes": ("fxdit.backend", "fxdit.runtime", "fxdit.dump", "fxdit.registry", "fxdit.apps", "fxdit.commands",
               "fxdit.cli"),
    "core": ("fxdit.apps", "fxdit.commands", "fxdit.cli"),
    "apps": ("fxdit.commands", "fxdit.cli"),
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("passes", "kernels"):
        parts = ["fxdit", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> str | None:
    if module.startswith("fxdit.kernels"):
        return "kernels"
    if module.startswith("fxdit.passes"):
        return "passes"
    if module.startswith("fxdit.apps"):
        return "apps"
    if module.startswith(("fxdit.commands", "fxdit.cli")):
        return None  # the CLI may import anything
    return "core"


def imported_modules(source: str, module: str) -> set[str]:
    """Every module named by an import in ``source``; ``from fxdit import x`` counts as ``fxdit.x``."""
    names: set[str] = set()
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def violations(source: str, module: str) -> list[str]:
    layer = _layer(module)
    if layer is None:
        return []
    bad = FORBIDDEN[layer]
    return sorted(f"{module} imports {name}" for name in imported_modules(source, module)
                  if any(name == p or name.startswith(p + ".") for p in bad))


def _sources() -> list[Path]:
    files = [*ROOT.joinpath("fxdit").rglob("*.py"), *ROOT.joinpath("passes").glob("*.py"),
             *ROOT.joinpath("kernels").glob("*.py")]
    return sorted(files)


def test_every_module_respects_the_layers() -> None:
    found = []
    for path in _sources():
        found += violations(path.read_text(), _module_name(path))
    assert not found, "\n".join(found)
    assert len(_sources()) > 30  # the walk saw the tree


@pytest.mark.parametrize("module, source, expected", [
    ("fxdit.backend", "from fxdit.apps import sampler\n", "fxdit.backend imports fxdit.apps"),
    ("fxdit.runtime", "def f():\n    import fxdit.apps.demo\n", "fxdit.runtime imports fxdit.apps.demo"),
    ("fxdit.calibration", "from fxdit import apps\n", "fxdit.calibration imports fxdit.apps"),
    ("fxdit.passes.find_blocks", "from fxdit.backend import fxdit_backend\n",
     "fxdit.passes.find_blocks imports fxdit.backend"),
    ("fxdit.kernels.ops", "from fxdit.passes._records import TokenGrid\n", "fxdit.kernels.ops imports fxdit.passes"),
    ("fxdit.kernels.ops", "from ..passes import pipeline\n", "fxdit.kernels.ops imports fxdit.passes"),
    ("fxdit.apps.demo", "from fxdit.commands import demo\n", "fxdit.apps.demo imports fxdit.commands"),
])
def test_the_checker_sees_a_wrong_import(module: str, source: str, expected: str) -> None:
    assert any(v.startswith(expected) for v in violations(source, module)), violations(source, module)


def test_allowed_imports_pass_the_checker() -> None:
    assert violations("from fxdit.passes.pipeline import PIPELINE\nfrom fxdit.kernels import ops\n",
                      "fxdit.backend") == []
    assert violations("from fxdit.backend import fxdit_backend\nfrom fxdit.apps import models\n",
                      "fxdit.commands.demo") == []


def test_importing_the_core_loads_no_application_module() -> None:
    code = ("import sys, fxdit, fxdit.backend, fxdit.runtime, fxdit.calibration, fxdit.cost, fxdit.dump, "
            "fxdit.analysis, fxdit.passes.pipeline, fxdit.kernels.ops\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('fxdit.apps', 'fxdit.commands', 'fxdit.cli')))\n"
            "print(bad)\n"
            "assert not bad, bad\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout
