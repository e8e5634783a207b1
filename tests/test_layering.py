"""The floors of the package, enforced: imports only go down.

1. ``sparse24.kernels`` (folder ``kernels/``): Triton sources; imports triton only.
2. The foundation: ``sparse24.{config, validation, backends, layouts, reference,
   jax_reference}``: what the ops may import.
3. The ops: ``sparse24.torch_ops`` (``torch_ops/``), ``sparse24.jax_ops`` (``jax_ops/``).
4. The integrations on top: ``sparse24.{hf, flax, eval, plan, passkey, demo, models, testing, __main__}``.

Every import statement counts, function-local ones included (they are still
dependencies, only later). Relative imports are resolved through the package mapping of
``pyproject.toml`` (``kernels/`` is installed as ``sparse24.kernels``).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FOLDERS = {"sparse24": "sparse24", "kernels": "sparse24.kernels", "torch_ops": "sparse24.torch_ops",
           "jax_ops": "sparse24.jax_ops"}

KERNELS = {"sparse24.kernels"}
FOUNDATION = {f"sparse24.{m}" for m in ("config", "validation", "backends", "layouts", "reference", "jax_reference")}
OPS = {"sparse24.torch_ops", "sparse24.jax_ops"}
INTEGRATIONS = {f"sparse24.{m}" for m in ("hf", "hf_families", "flax", "eval", "plan", "passkey", "demo", "models", "testing", "__main__")}
FLOOR = {**{m: 1 for m in KERNELS}, **{m: 2 for m in FOUNDATION}, **{m: 3 for m in OPS},
         **{m: 4 for m in INTEGRATIONS}, "sparse24": 2}  # the package root exports SparsityConfig only


def _modules():
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield ".".join([package, *parts]), path, path.name == "__init__.py"


def _floor_of(module: str) -> int | None:
    """Floor of a sparse24 module: that of its longest registered prefix."""
    best = None
    for name, floor in FLOOR.items():
        if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[0])):
            best = (name, floor)
    return None if best is None else best[1]


def _imports(module: str, path: pathlib.Path, is_package: bool) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    base = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base[: len(base) - (node.level - 1)]
                target = ".".join(pkg + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)  # `from sparse24 import hf`
    return {name for name in found if name == "sparse24" or name.startswith("sparse24.")}


MODULES = list(_modules())


def test_every_module_has_a_floor():
    assert len(MODULES) > 15
    unplaced = [m for m, _, _ in MODULES if _floor_of(m) is None]
    assert not unplaced, f"place these modules on a floor in tests/test_layering.py: {unplaced}"


@pytest.mark.parametrize("module,path,is_package", MODULES, ids=[m for m, _, _ in MODULES])
def test_imports_only_go_down(module, path, is_package):
    own = _floor_of(module)
    upward = []
    for target in sorted(_imports(module, path, is_package)):
        floor = _floor_of(target)
        if floor is None:  # `from sparse24 import SparsityConfig` names a symbol, not a module
            continue
        same_part = target.split(".")[:2] == module.split(".")[:2]
        if floor > own or (floor == own and own == 3 and not same_part):
            upward.append(target)
    assert not upward, f"{module} (floor {own}) imports {upward} from a floor above it (or the other framework's ops)"


def test_the_check_can_fail(tmp_path):
    """The scanner sees function-local and relative imports (so the test above is not blind)."""
    bad = tmp_path / "validation.py"
    bad.write_text("def f():\n    from sparse24.torch_ops import attention\n    from .hf import sparsify\n")
    found = _imports("sparse24.validation", bad, False)
    assert {"sparse24.torch_ops", "sparse24.hf"} <= found
    assert _floor_of("sparse24.torch_ops") > _floor_of("sparse24.validation")
