"""The engine's layers take their array module from the backend, never from numpy/cupy directly.

minibasis/autograd, minibasis/functions and minibasis/nn must run unchanged on
NumPy, CuPy and the strict stand-in, so none of their modules may import numpy
or cupy (``import numpy``, ``import numpy.linalg as la``, ``from numpy import
float32``, ``from cupy import ...``, ``importlib.import_module("numpy")`` or
``__import__("cupy")``). The source is parsed with ``ast`` (comments and
docstrings that mention numpy are fine); a second check imports every module and
looks for a numpy/cupy module object among its globals, whichever way it got there.
"""
from __future__ import annotations

import ast
import importlib
import pkgutil
import types
from pathlib import Path

import pytest

import minibasis

PACKAGE_ROOT = Path(minibasis.__file__).resolve().parent
ENGINE_PACKAGES = ("autograd", "functions", "nn")
FORBIDDEN = ("numpy", "cupy")


def _is_forbidden(module_name: str | None) -> bool:
    return bool(module_name) and module_name.split(".")[0] in FORBIDDEN


def forbidden_imports(source: str, filename: str = "<source>") -> list[str]:
    """``line: statement`` for every import of numpy or cupy in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {alias.name}" for alias in node.names if _is_forbidden(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and _is_forbidden(node.module):
                found.append(f"{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and node.args:
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str) and _is_forbidden(first.value):
                    found.append(f"{node.lineno}: {name}({first.value!r})")
    return found


def engine_files() -> list[Path]:
    files = []
    for package in ENGINE_PACKAGES:
        files += sorted((PACKAGE_ROOT / package).rglob("*.py"))
    single = PACKAGE_ROOT / "autograd.py"  # DESIGN.md's name, should autograd ever become one module
    if single.exists():
        files.append(single)
    return files


def test_the_engine_packages_exist():
    # Guards against the checks below passing vacuously after a rename.
    files = engine_files()
    for package in ENGINE_PACKAGES:
        assert any(f.relative_to(PACKAGE_ROOT).parts[0] == package for f in files), f"no files under {package}/"
    assert len(files) >= 6


@pytest.mark.parametrize("path", engine_files(), ids=lambda p: str(p.relative_to(PACKAGE_ROOT)))
def test_engine_module_does_not_import_numpy_or_cupy(path):
    found = forbidden_imports(path.read_text(encoding="utf-8"), str(path))
    assert not found, (f"{path.relative_to(PACKAGE_ROOT.parent)} imports an array library directly "
                       f"(use `from minibasis import backend` and backend.xp / backend.get_array_module): {found}")


def _engine_module_names() -> list[str]:
    names = []
    for package in ENGINE_PACKAGES:
        pkg = importlib.import_module(f"minibasis.{package}")
        names.append(pkg.__name__)
        names += [info.name for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{pkg.__name__}.")]
    return names


@pytest.mark.parametrize("module_name", _engine_module_names())
def test_engine_module_holds_no_array_library_object(module_name):
    """Catches indirect routes too, e.g. ``np = backend.numpy`` or ``from minibasis.backend import numpy``."""
    module = importlib.import_module(module_name)
    leaked = [name for name, value in vars(module).items()
              if isinstance(value, types.ModuleType) and _is_forbidden(value.__name__)]
    assert not leaked, f"{module_name} holds array-library modules as globals: {leaked}"


# -- the checker itself must be able to fail --------------------------------------------------
@pytest.mark.parametrize("source", [
    "import numpy",
    "import numpy as np",
    "import numpy.linalg as la",
    "import os, cupy",
    "from numpy import float32",
    "from numpy.lib.stride_tricks import as_strided",
    "from cupy import asnumpy",
    "import importlib\nxp = importlib.import_module('cupy')",
    "np = __import__('numpy')",
    "def f():\n    import numpy\n    return numpy",
    "try:\n    import cupy\nexcept ImportError:\n    cupy = None",
])
def test_checker_flags_every_way_of_importing(source):
    assert forbidden_imports(source)


@pytest.mark.parametrize("source", [
    "from minibasis import backend\nxp = backend.xp",
    '"""Uses numpy through the backend; import numpy is not written here."""',
    "# import numpy\nx = 1",
    "import numpyro_like_name_but_not_numpy",
    "from . import numpy_helpers",
])
def test_checker_passes_clean_sources(source):
    assert forbidden_imports(source) == []
