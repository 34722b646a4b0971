"""Write the version locks the images install with `pip install --no-deps`.

docker/requirements.lock: the exact versions, taken from the current environment, of lora-sweep's
dependency closure (pyproject's dependencies plus the `postgres` extra, markers evaluated for this
interpreter), without torch and the CUDA packages torch brings (nvidia-*, cuda-*, triton): each
image installs its own torch build on top of it.

docker/requirements-gpu.lock (--gpu): torch==TORCH_VERSION from PyPI (its CUDA 13.0 build) and the
CUDA packages it pulls in, resolved by pip against PyPI for CPython 3.11 on manylinux x86_64 with
requirements.lock as constraints (metadata only: nothing is downloaded but the resolver's needs).

    python docker/make_lock.py            # rewrite docker/requirements.lock from this environment
    python docker/make_lock.py --gpu      # rewrite docker/requirements-gpu.lock (needs PyPI)
    python docker/make_lock.py --check    # exit 1 if requirements.lock differs from what this would write

Run it where `pip install -e ".[postgres]"` (plus torch) is installed, with the images' Python
minor version (3.11). Every requirement must be satisfied by what is installed; anything missing
is reported and nothing is written.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "docker" / "requirements.lock"
GPU_LOCK = ROOT / "docker" / "requirements-gpu.lock"
TORCH_VERSION = "2.13.0"  # the same in Dockerfile.cpu; the GPU image's from requirements-gpu.lock
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)] + ["manylinux2014_x86_64", "linux_x86_64"]
EXTRAS = ("postgres",)
# Needed in the images but missing from pyproject: SQLAlchemy 2.1 (under MLflow and Optuna) opens
# postgresql:// URLs with psycopg 3, not with the extra's psycopg2. Harmless once pyproject has it.
IMAGE_EXTRA = ("psycopg[binary]",)
TORCH = "torch"
GPU_PREFIXES = ("nvidia-", "cuda-", "triton")  # torch's CUDA build brings these; per image, not locked
HEADER = """\
# lora-sweep's dependency closure for Python {py} on Linux x86_64, exact versions: pyproject's
# dependencies, its postgres extra, and psycopg[binary] (SQLAlchemy 2.1 opens postgresql:// URLs
# with psycopg 3). Torch and its CUDA packages (nvidia-*, cuda-*, triton) are left out: each
# Dockerfile installs its own torch build on top. Installed with `pip install --no-deps -r`, so
# this file must be complete: the images run `pip check` after installing.
# Written by `python docker/make_lock.py`; do not edit by hand.
"""


def _roots() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in EXTRAS:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in [*lines, *IMAGE_EXTRA]]


def _applies(req: Requirement, extras: frozenset[str]) -> bool:
    if req.marker is None:
        return True
    env = default_environment()
    return any(req.marker.evaluate({**env, "extra": e}) for e in (extras or {""}))


def closure() -> tuple[dict[str, str], list[str]]:
    """{distribution name: version} of everything the roots need (torch's own dependencies too,
    torch itself and its CUDA packages not), and the problems found."""
    pins: dict[str, str] = {}
    problems: list[str] = []
    seen: set[tuple[str, frozenset[str]]] = set()
    todo: list[tuple[Requirement, frozenset[str]]] = [(r, frozenset()) for r in _roots()]
    while todo:
        req, parent_extras = todo.pop()
        if not _applies(req, parent_extras):
            continue
        name = canonicalize_name(req.name)
        if name.startswith(GPU_PREFIXES):
            continue
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            problems.append(f"{req} is not installed")
            continue
        version = dist.version
        if not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req}: installed {dist.metadata['Name']} {version} does not satisfy it")
        if name != TORCH:
            pins[dist.metadata["Name"]] = version.split("+")[0]
        extras = frozenset(req.extras)
        todo += [(Requirement(line), extras) for line in dist.requires or []]
    return pins, problems


def render(pins: dict[str, str]) -> str:
    py = ".".join(map(str, sys.version_info[:2]))
    body = "".join(f"{name}=={pins[name]}\n" for name in sorted(pins, key=canonicalize_name))
    return HEADER.format(py=py) + body


GPU_HEADER = """\
# torch {torch} from PyPI (built for CUDA 13.0: needs an NVIDIA driver >= 580) and the CUDA packages
# it brings, and the project's `gpu` extra (liger-kernel), for CPython 3.11 on Linux x86_64;
# installed by docker/Dockerfile with --no-deps after requirements.lock. Written by
# `python docker/make_lock.py --gpu` (pip's resolver against PyPI with requirements.lock as
# constraints); do not edit by hand.
"""


def _gpu_extra() -> list[str]:
    """pyproject's `gpu` extra (liger-kernel): the GPU image installs the project with it."""
    import tomllib

    return list(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"])


GPU_EXTRA = _gpu_extra()


def gpu_lock() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--isolated", "--quiet", "--dry-run", "--ignore-installed",
               "--only-binary=:all:", "--implementation", "cp", "--python-version", "3.11", "--target", str(Path(tmp) / "t"),
               *[arg for p in PLATFORMS for arg in ("--platform", p)],
               "--report", str(report), "-c", str(LOCK), f"torch=={TORCH_VERSION}", *GPU_EXTRA]  # fmt: skip
        subprocess.run(cmd, check=True)
        installed = json.loads(report.read_text())["install"]
    locked = {canonicalize_name(line.split("==")[0]) for line in LOCK.read_text().splitlines() if "==" in line}
    pins = {i["metadata"]["name"]: i["metadata"]["version"] for i in installed if canonicalize_name(i["metadata"]["name"]) not in locked}
    body = "".join(f"{name}=={pins[name]}\n" for name in sorted(pins, key=canonicalize_name))
    return GPU_HEADER.format(torch=TORCH_VERSION) + body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with docker/requirements.lock instead of writing it")
    parser.add_argument("--gpu", action="store_true", help="write docker/requirements-gpu.lock (asks PyPI)")
    args = parser.parse_args()
    if args.gpu:
        GPU_LOCK.write_text(gpu_lock())
        print(f"wrote {GPU_LOCK.relative_to(ROOT)}")
        return 0
    pins, problems = closure()
    if problems:
        print("cannot lock; install the project's dependencies first:\n  " + "\n  ".join(sorted(problems)), file=sys.stderr)
        return 2
    text = render(pins)
    if args.check:
        same = LOCK.exists() and LOCK.read_text() == text
        print(f"{LOCK.relative_to(ROOT)} is {'up to date' if same else 'stale: run python docker/make_lock.py'}")
        return 0 if same else 1
    LOCK.write_text(text)
    print(f"wrote {LOCK.relative_to(ROOT)}: {len(pins)} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
