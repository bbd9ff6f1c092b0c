"""A Python process started in the checkout root imports the ecosystem, and fxdit, without error.

The root holds the folders ``kernels/`` and ``passes/`` (installed as ``fxdit.kernels`` / ``fxdit.passes``). A
process started there has the root on ``sys.path``; were those folders regular packages, ``import kernels`` would
find this checkout's folder instead of the PyPI package of that name, which transformers imports. These tests start
real subprocesses in the root, the way ``python -m pytest``, ``python -c`` and a notebook do.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_top_level_folders_are_not_regular_packages():
    for name in ("kernels", "passes"):
        assert (ROOT / name).is_dir()
        assert not (ROOT / name / "__init__.py").exists(), (
            f"{name}/__init__.py makes {name}/ a regular package that shadows any installed '{name}' when a process "
            "starts in the checkout root")


_ECOSYSTEM = (
    "import sys, importlib.util\n"
    "assert sys.path[0] == '', sys.path[:2]\n"
    "import transformers, peft\n"
    "import transformers.integrations.hub_kernels\n"  # the module that imports the PyPI 'kernels' package
    "from diffusers import DiTTransformer2DModel, FluxTransformer2DModel, SD3Transformer2DModel\n"
    "from diffusers.loaders import peft as _peft_loader\n"
    "spec = importlib.util.find_spec('kernels')\n"
    "print('KERNELS', None if spec is None else spec.origin)\n"
)


def test_root_imports_transformers_peft_diffusers_and_fxdit():
    code = _ECOSYSTEM + (
        "import fxdit, fxdit.kernels.ops, fxdit.kernels.reference, fxdit.passes.pipeline as p\n"
        "import torch\n"
        "assert len(p.PIPELINE) >= 1\n"
        "print('OPS', fxdit.kernels.ops.__file__)\n"
        "print('PIPELINE', p.__file__)\n"
        "assert 'fxdit' in torch._dynamo.list_backends(), torch._dynamo.list_backends()\n"
    )
    root = _run(code, ROOT)
    assert root.returncode == 0, root.stderr[-3000:]
    assert f"OPS {ROOT / 'kernels' / 'ops.py'}" in root.stdout
    assert f"PIPELINE {ROOT / 'passes' / 'pipeline.py'}" in root.stdout
    elsewhere = _run(_ECOSYSTEM, ROOT.parent)
    assert elsewhere.returncode == 0, elsewhere.stderr[-3000:]
    # Whatever 'kernels' resolves to outside the checkout (the PyPI package, or nothing), it resolves to the same
    # inside it: an installed regular package wins over this checkout's namespace portion.
    kernels_root = [ln for ln in root.stdout.splitlines() if ln.startswith("KERNELS")]
    kernels_elsewhere = [ln for ln in elsewhere.stdout.splitlines() if ln.startswith("KERNELS")]
    if kernels_elsewhere != ["KERNELS None"]:
        assert kernels_root == kernels_elsewhere
    assert str(ROOT / "kernels" / "__init__") not in root.stdout
