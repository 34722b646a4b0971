"""Where a benchmark's numbers came from, written into every raw result file.

    from provenance import provenance, with_provenance
    Path(out).write_text(json.dumps(with_provenance(results), indent=2))

Records the commit (+dirty), the date, the exact command, the GPU(s) and driver, and the versions of
torch, transformers, peft, bitsandbytes, ray (and a few more, when importable). Never raises:
a field that cannot be read says why.
"""

from __future__ import annotations

import datetime
import platform
import shlex
import subprocess
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "ray", "triton", "liger-kernel", "optuna", "mlflow", "accelerate")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit() -> str:
    head = _git("rev-parse", "HEAD")
    if head is None:
        import os

        return os.environ.get("LORA_SWEEP_GIT_COMMIT", "unknown")
    return head + ("+dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")


def _diff_hash() -> str | None:
    import hashlib

    diff = _git("diff", "HEAD")
    return hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None


def versions() -> dict[str, str | None]:
    """Installed versions (None: not installed). Read from package metadata: nothing is imported."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def devices() -> dict[str, Any]:
    """GPU names, driver and CUDA versions from nvidia-smi and torch; on a CPU machine, says so."""
    info: dict[str, Any] = {"gpus": [], "driver_version": None, "cuda_visible_devices": None}
    import os

    info["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=index,name,driver_version,memory.total", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        for line in smi.stdout.strip().splitlines() if smi.returncode == 0 else []:
            index, name, driver, memory = (x.strip() for x in line.split(","))
            info["gpus"].append({"index": index, "name": name, "memory": memory})
            info["driver_version"] = driver
    except (OSError, subprocess.SubprocessError):
        info["nvidia_smi"] = "not available"
    try:
        import torch

        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["device_name"] = torch.cuda.get_device_name(0)
            info["device_count"] = torch.cuda.device_count()
        else:
            info["device_name"] = "cpu (no CUDA device)"
    except Exception as exc:  # torch missing or broken: the record says so instead of failing the run
        info["device_name"] = f"unknown ({type(exc).__name__}: {exc})"
    return info


@lru_cache(maxsize=1)
def provenance() -> dict[str, Any]:
    """Computed once per process; the command is the one this process was started with."""
    return {
        "commit": commit(),
        "diff_sha256": _diff_hash(),  # with a +dirty commit: which uncommitted state ran
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "cwd": str(Path.cwd()),
        "host": platform.node(),
        "python": platform.python_version(),
        **devices(),
        "versions": versions(),
    }


def with_provenance(results: Any) -> dict[str, Any]:
    """{"provenance": ..., "results": results} (dicts keep their keys beside "provenance")."""
    if isinstance(results, dict):  # a result file read back and extended gets today's provenance
        return {"provenance": provenance(), **{k: v for k, v in results.items() if k != "provenance"}}
    return {"provenance": provenance(), "results": results}


def estimated_vram_gb(run: Any) -> float | None:
    """A trial's estimated VRAM from its MLflow run. The sweep logs it as a *param* (it is part of
    the trial's config, beside gpu_share); a trial refused before it started logs it as a metric."""
    value = run.data.params.get("estimated_vram_gb")
    if value is None:
        value = run.data.metrics.get("estimated_vram_gb")
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
