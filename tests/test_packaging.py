"""Packaging: one import namespace (sparse24.*), no top-level ``kernels``, light imports."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
KERNELS_DIR = REPO / "kernels"


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _run(code: str, cwd: pathlib.Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=dict(os.environ), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.parametrize(
    "module, folder",
    [("sparse24", "sparse24"), ("sparse24.kernels", "kernels"), ("sparse24.torch_ops", "torch_ops"),
     ("sparse24.jax_ops", "jax_ops")],
)
def test_subpackages_map_to_repo_folders(module, folder):
    mod = importlib.import_module(module)
    path = pathlib.Path(mod.__file__).resolve()
    assert path.parent.name == folder
    assert path.parent == REPO / folder  # this checkout, not a stale copy elsewhere


def test_no_top_level_kernels_package():
    if _hf_kernels_installed():
        pytest.skip("the Hugging Face `kernels` distribution is installed, so `kernels` is legitimately importable")
    assert importlib.util.find_spec("kernels") is None
    assert "kernels" not in sys.modules


def test_no_top_level_kernels_package_outside_repo(tmp_path):
    if _hf_kernels_installed():
        pytest.skip("the Hugging Face `kernels` distribution is installed, so `kernels` is legitimately importable")
    out = _run("import importlib.util, sparse24.kernels; print(importlib.util.find_spec('kernels'))", tmp_path)
    assert out == "None"


def test_pyproject_packages():
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = conf["packages"]
    assert "kernels" not in packages and "torch_ops" not in packages and "jax_ops" not in packages
    assert all(p == "sparse24" or p.startswith("sparse24.") for p in packages), packages
    assert {"sparse24.kernels", "sparse24.torch_ops", "sparse24.jax_ops"} <= set(packages)
    package_dir = conf.get("package-dir", {})
    assert all(k == "sparse24" or k.startswith("sparse24.") for k in package_dir), package_dir
    assert package_dir.get("sparse24.kernels") == "kernels"


def _editable_mappings(dist) -> list[dict]:
    """MAPPING dicts of setuptools' editable finders listed in the distribution's RECORD
    (read with ast: nothing is executed)."""
    mappings = []
    for f in dist.files or []:
        name = pathlib.PurePath(str(f)).name
        if not (name.startswith("__editable__") and name.endswith("_finder.py")):
            continue
        tree = ast.parse(pathlib.Path(dist.locate_file(f)).read_text())
        for node in tree.body:
            target = node.target if isinstance(node, ast.AnnAssign) else (
                node.targets[0] if isinstance(node, ast.Assign) else None)
            if isinstance(target, ast.Name) and target.id == "MAPPING":
                mappings.append(ast.literal_eval(node.value))
    return mappings


def _installed_sparse24():
    """The installed sparse24 distributions (a build's sparse24.egg-info inside the checkout is
    not an install; it is found only when the repository root is on sys.path)."""
    dists = []
    for dist in importlib.metadata.distributions(name="sparse24"):
        where = getattr(dist, "_path", None)
        # skip a build's egg-info in the checkout (not an install); a virtual environment
        # inside the checkout (CI's .venv) is an install
        if where is not None and pathlib.Path(where).suffix == ".egg-info" and REPO in pathlib.Path(where).resolve().parents:
            continue
        dists.append(dist)
    assert dists, "sparse24 is not installed in this environment"
    return dists


def _is_editable(dist) -> bool:
    text = dist.read_text("direct_url.json")
    return bool(text) and json.loads(text).get("dir_info", {}).get("editable", False)


@pytest.mark.parametrize("dist", _installed_sparse24(), ids=lambda d: str(getattr(d, "_path", "dist")))
def test_installed_distribution_has_no_top_level_kernels(dist):
    top_level = dist.read_text("top_level.txt")
    if top_level is not None:
        names = set(top_level.split())
        assert "kernels" not in names, names
        assert names <= {"sparse24"}, names
    files = [str(f) for f in dist.files or []]
    assert files, "sparse24's RECORD lists no files"
    # A regular install would list kernels/... at the top of site-packages.
    assert not [f for f in files if pathlib.PurePath(f).parts[0] in ("kernels", "torch_ops", "jax_ops")]
    # An editable install maps import names to folders: only sparse24 names.
    mappings = _editable_mappings(dist)
    for mapping in mappings:
        assert all(k == "sparse24" or k.startswith("sparse24.") for k in mapping), mapping
        assert pathlib.Path(mapping["sparse24.kernels"]).resolve() == KERNELS_DIR.resolve()
    # No .pth path entry puts the repository root (and so kernels/) on sys.path.
    pth_files = [f for f in files if f.endswith(".pth")]
    for f in pth_files:
        for line in pathlib.Path(dist.locate_file(f)).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith(("#", "import ")):
                assert pathlib.Path(line).resolve() != REPO, f"{f} adds the repository root to sys.path"
    if _is_editable(dist):
        assert mappings or pth_files, "editable install with neither a finder mapping nor a .pth file"


ALLOWED_TOP = {"triton", "__future__"}
FORBIDDEN = {"torch", "jax", "jaxlib", "numpy", "sparse24"}


def _kernel_files():
    files = sorted(KERNELS_DIR.glob("*.py"))
    assert files and (KERNELS_DIR / "__init__.py") in files
    return files


@pytest.mark.parametrize("path", _kernel_files(), ids=lambda p: p.name)
def test_kernels_import_only_triton_stdlib_and_relative(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            tops = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level > 0:
                continue  # relative: stays inside sparse24.kernels
            tops = [node.module.split(".")[0]]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
            "import_module", "__import__"
        ):
            bad.append(f"line {node.lineno}: dynamic import")
            continue
        else:
            continue
        for top in tops:
            if top in FORBIDDEN or not (top in ALLOWED_TOP or top in sys.stdlib_module_names):
                bad.append(f"line {node.lineno}: import {top}")
    assert not bad, f"{path.name}: {bad}"


def test_import_sparse24_is_light(tmp_path):
    out = _run("import sys, sparse24; print('torch' in sys.modules, 'jax' in sys.modules)", tmp_path)
    assert out == "False False"


def test_sparsity_config_from_fresh_process(tmp_path):
    out = _run("import sparse24; print(sparse24.SparsityConfig.parse('2:4'))", tmp_path)
    assert out == "2:4,sink=0,recent=64,sparse_decode=true"


def test_regular_install_is_not_shadowed_by_a_clone_named_sparse24(tmp_path):
    """A clone in a folder named ``sparse24``, imported from the folder above it: the folder
    (no ``__init__.py``) would be a namespace package ``sparse24`` if no regular package came
    later on sys.path. A regular (non-editable) install, what the README's main-job command
    does, is a regular package, so it wins (an editable install maps names through a finder
    that runs after the path search: the README says to run from another folder then)."""
    wheels, target, parent = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    (parent / "sparse24" / "sparse24").mkdir(parents=True)  # the clone's shape: no __init__.py at its root
    (parent / "sparse24" / "kernels").mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next(wheels.glob("sparse24-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = dict(os.environ, PYTHONPATH=str(target))
    proc = subprocess.run(
        [sys.executable, "-c", "import sparse24; from sparse24 import SparsityConfig; print(sparse24.__file__)"],
        cwd=parent, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert pathlib.Path(proc.stdout.strip()).resolve().is_relative_to(target.resolve())
