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


# sweep/'s sub-packages, lowest first: each imports only those before it (and core, trainable)
SWEEP_LAYERS = ("config", "folder", "readback", "engine", "cli")


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "sweep" and parts[1] in SWEEP_LAYERS else None


def test_sweep_sub_packages_import_downwards_only() -> None:
    """config <- folder <- readback <- engine <- cli: the commands sit on the engine, the engine on
    the read-back and the sweep folder, everything on the config; nothing imports upwards, so no
    import circle can form between them."""
    bad = []
    for path in modules("sweep"):
        parts = path.relative_to(ROOT).parts
        here = parts[1] if len(parts) > 2 else None
        if here not in SWEEP_LAYERS:
            continue
        for line, name in imports(path):
            there = layer_of(name)
            if there is not None and SWEEP_LAYERS.index(there) > SWEEP_LAYERS.index(here):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name} ({here} may import only {', '.join(SWEEP_LAYERS[: SWEEP_LAYERS.index(here) + 1])})")
    assert bad == []


def test_sweep_has_only_its_sub_packages_and_the_entry_point() -> None:
    loose = sorted(p.name for p in (ROOT / "sweep").glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert loose == [], f"modules outside sweep/'s sub-packages ({', '.join(SWEEP_LAYERS)}): {loose}"


def test_no_import_circle_between_sweep_modules() -> None:
    """Every import counts, those inside functions too: a circle is a circle however it is hidden."""
    found = {}
    for path in modules("sweep"):
        rel = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = path
    graph: dict[str, set[str]] = {}
    for name, path in found.items():
        deps = set()
        for _, imported in imports(path):
            parts = imported.split(".")
            owner = next((".".join(parts[:k]) for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in found), None)
            if owner is not None and owner != name:
                deps.add(owner)
        graph[name] = deps

    circles, state = [], dict.fromkeys(graph, 0)  # 0 unseen, 1 on the path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state[nxt] == 1:
                circles.append(" -> ".join(path[path.index(nxt):] + [node, nxt]) if nxt in path else f"{node} -> {nxt}")
            elif state[nxt] == 0:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if state[node] == 0:
            visit(node, [])
    assert circles == []
