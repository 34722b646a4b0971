"""The import graph points one way: sweep -> trainable -> core, sweep -> core.

core/ is the shared vocabulary, pure Python: it imports none of the heavy frameworks, not even
inside a function, so validating a space file or estimating memory never pulls them in. trainable/
(what runs on a worker) never imports sweep/ (the driver)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("ray", "mlflow", "torch", "bitsandbytes", "transformers", "peft", "optuna")


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, at any depth (functions too)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    here = list(parts[:-1])  # the package the file is in (for __init__.py, the package itself)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if not node.level:
                out.append((node.lineno, node.module or ""))
                continue
            base = ".".join(here[: len(here) - node.level + 1])  # relative: against the file's package
            if node.module:
                out.append((node.lineno, f"{base}.{node.module}"))
            else:  # from . import rules: each name may be a module
                out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return out


def modules(package: str) -> list[Path]:
    found = sorted((ROOT / package).rglob("*.py"))
    assert found, f"no modules in {package}/"
    return found


def offending(package: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in modules(package):
        for line, name in imports(path):
            if name.split(".")[0] in forbidden:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return bad


def test_trainable_never_imports_sweep() -> None:
    assert offending("trainable", ("sweep",)) == []


def test_core_imports_no_framework_and_nothing_above_it() -> None:
    assert offending("core", HEAVY + ("sweep", "trainable")) == []


@pytest.mark.parametrize("source, expected", [
    ("import torch", ["torch"]),
    ("def f():\n    from ray import tune\n", ["ray"]),
    ("from . import rules", ["core.rules"]),
    ("from .estimate import GB", ["core.estimate"]),
])  # fmt: skip
def test_the_check_sees_imports_inside_functions_and_relative_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, expected: list[str]) -> None:
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "core").mkdir()
    path = tmp_path / "core" / "probe.py"
    path.write_text(source)
    assert [name for _, name in imports(path)] == expected


def test_importing_core_loads_no_framework() -> None:
    """Every core module, imported in a fresh interpreter, leaves the frameworks out of sys.modules."""
    names = sorted(f"core.{p.stem}" for p in (ROOT / "core").glob("*.py") if p.stem != "__init__")
    code = (
        "import sys, importlib\n"
        f"for name in {['core', *names]!r}: importlib.import_module(name)\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing core loaded {out.stdout.strip()}"
