"""Imports point one way: library → experiments (verbs) → cli.

* nothing under minibasis/ except the CLI entry (``minibasis/__main__.py``) imports ``minibasis.cli``;
* ``minibasis.training``, ``minibasis.measure`` and the model-file module import nothing from
  ``minibasis.experiments`` (nor ``minibasis.cli``);
* no verb module imports another verb module.

The source is parsed with ``ast``, so imports inside functions count too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import minibasis
from minibasis.cli import VERBS

ROOT = Path(minibasis.__file__).resolve().parent
VERB_MODULES = {f"minibasis.experiments.{module}" for module, _ in VERBS.values()}


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports (``from a import b`` gives a and a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_files() -> list[Path]:
    files = sorted((ROOT / "training").rglob("*.py")) + [ROOT / "measure.py"]
    files += [p for p in (ROOT / "model_files.py", ROOT / "serialization") if p.exists()]
    return [f for p in files for f in ([p] if p.is_file() else sorted(p.rglob("*.py")))]


def test_only_the_cli_entry_imports_minibasis_cli():
    offenders = [module_name(p) for p in sorted(ROOT.rglob("*.py"))
                 if p.name != "__main__.py" and p != ROOT / "cli.py"
                 and any(n == "minibasis.cli" or n.startswith("minibasis.cli.") for n in imported_modules(p))]
    assert offenders == []


@pytest.mark.parametrize("path", library_files(), ids=lambda p: module_name(p))
def test_library_modules_import_nothing_from_the_verbs(path):
    bad = sorted(n for n in imported_modules(path)
                 if n.startswith(("minibasis.experiments", "minibasis.cli")))
    assert bad == [], f"{module_name(path)} imports {bad}"


@pytest.mark.parametrize("verb", sorted(VERB_MODULES))
def test_no_verb_imports_another_verb(verb):
    path = ROOT.parent / (verb.replace(".", "/") + ".py")
    others = sorted(n for n in imported_modules(path) if n in VERB_MODULES - {verb})
    assert others == [], f"{verb} imports {others}"


def test_the_check_sees_an_upward_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from minibasis.experiments import sweep\n")
    assert "minibasis.experiments.sweep" in imported_modules(sample)
