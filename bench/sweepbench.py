"""What bench/packing.py and bench/multi_gpu.py share: the same seeded trials in every run, a GPU
utilisation sampler, a sweep driven against a Ray cluster under a time budget, and the comparison
of two runs' eval losses configuration by configuration.

Same trials: the benchmark draws its configurations itself (`seeded_configs`, a seeded RNG) and
hands them to every sweep as `search.points_to_evaluate` with `num_trials` equal to their number,
so one-at-a-time, packed and cohort runs, and 1- and 2-GPU runs, train exactly the same
configurations whatever order their workers ask for them in (a cohort worker seeds its sampler by
its Ray trial id, so a plain seeded sampler would not repeat across runs). Runs are compared by
configuration (`config_key`), not by trial label.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIG_KEYS = ("lora_r", "lora_alpha", "target_modules", "learning_rate", "batch")


# ----------------------------------------------------------------------------------------------
# pure helpers


def seeded_configs(n: int, seed: int, ranks: list[int], ratios: list[float], targets: list[str], lr: tuple[float, float],
                   pairs: list[list[int]]) -> list[dict[str, Any]]:  # fmt: skip
    """n distinct points for `search.points_to_evaluate` (lora_alpha given by its factor,
    lora_alpha_ratio), drawn from a seeded RNG: the same list on every machine and run."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for _ in range(n * 200):
        if len(out) == n:
            break
        point = {"lora_r": rng.choice(ranks), "lora_alpha_ratio": rng.choice(ratios), "target_modules": rng.choice(targets),
                 "learning_rate": float(f"{math.exp(rng.uniform(math.log(lr[0]), math.log(lr[1]))):.3g}"), "batch": list(rng.choice(pairs))}  # fmt: skip
        key = point_key(point)
        if key not in seen:
            seen.add(key)
            out.append(point)
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct configurations in this space, {n} asked for")
    return out


def _norm(value: Any) -> str:
    """One spelling for a value as written in a point or read back from an MLflow param."""
    if isinstance(value, (list, tuple)):
        return json.dumps([_norm(v) for v in value], separators=(",", ":"))
    text = str(value).strip()
    if text.startswith("["):
        try:
            return _norm(json.loads(text))
        except ValueError:
            return text.replace(" ", "")
    try:
        return f"{float(text):.6g}"
    except ValueError:
        return text


def config_key(row: dict[str, Any]) -> str:
    """A trial's configuration from its logged params (lora_r, lora_alpha, targets, lr, batch)."""
    return "|".join(f"{k}={_norm(row.get(k))}" for k in CONFIG_KEYS)


def point_key(point: dict[str, Any]) -> str:
    """The same key for a point of `seeded_configs` (lora_alpha = lora_r x lora_alpha_ratio)."""
    alpha = point["lora_r"] * point["lora_alpha_ratio"]
    return config_key({**point, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha})


def compare_losses(reference: list[dict[str, Any]], other: list[dict[str, Any]], tolerance: float = 0.01) -> dict[str, Any]:
    """Each configuration's final eval loss in `other` against `reference` (completed trials with a
    loss in both): relative difference, whether within `tolerance`, and the configurations one lacks."""

    def done(rows: list[dict]) -> dict[str, float]:
        return {config_key(r): float(r["eval_loss"]) for r in rows if r.get("status") == "completed" and isinstance(r.get("eval_loss"), (int, float))}

    ref, oth = done(reference), done(other)
    pairs = []
    for key in sorted(ref.keys() & oth.keys()):
        rel = (oth[key] - ref[key]) / abs(ref[key]) if ref[key] else float("inf")
        pairs.append({"config": key, "reference": round(ref[key], 5), "other": round(oth[key], 5), "rel_diff": round(rel, 5), "within": abs(rel) <= tolerance})
    worst = max((abs(p["rel_diff"]) for p in pairs), default=None)
    return {"tolerance": tolerance, "pairs": len(pairs), "within": sum(p["within"] for p in pairs), "max_abs_rel_diff": worst,
            "only_in_reference": len(ref.keys() - oth.keys()), "only_in_other": len(oth.keys() - ref.keys()), "per_config": pairs}  # fmt: skip


def makespan(rows: list[dict[str, Any]], wanted: int, wall: float) -> dict[str, Any]:
    """The sweep's wall time when all `wanted` trials completed; when the time budget cut it first,
    no figure (`seconds` None, `cut_at` its wall time): a cut sweep is not projected from the trials
    that finished (their mean carried the first trial's cold base load and start-up into every
    missing one), and trials/hour over the wall time is what remains comparable."""
    done = [r for r in rows if r.get("status") == "completed"]
    if len(done) >= wanted:
        return {"seconds": round(wall, 1), "completed": len(done)}
    return {"seconds": None, "completed": len(done), "cut_at": round(wall, 1)}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a and b else None


# ----------------------------------------------------------------------------------------------
# the edges: nvidia-smi, Ray, the sweep CLI


class GpuSampler(threading.Thread):
    """nvidia-smi every 0.5 s: {t, gpu, util, mem_mib} per GPU it can see (none on a CPU machine)."""

    def __init__(self, period_ms: int = 500) -> None:
        super().__init__(daemon=True)
        self.samples: list[dict[str, Any]] = []
        self.period_ms = period_ms
        self.stop = threading.Event()
        self.proc: subprocess.Popen | None = None

    def run(self) -> None:
        cmd = ["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-lms", str(self.period_ms)]
        try:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return  # no NVIDIA GPU here (dry run)
        for line in self.proc.stdout or []:
            if self.stop.is_set():
                break
            try:
                index, util, mem = (x.strip() for x in line.split(","))
                self.samples.append({"t": time.time(), "gpu": int(index), "util": float(util), "mem_mib": float(mem)})
            except ValueError:
                continue

    def finish(self) -> list[dict[str, Any]]:
        self.stop.set()
        if self.proc is not None:
            self.proc.terminate()
        self.join(timeout=5)
        return list(self.samples)


def start_ray(gpus: int, cpus: int, logical: bool) -> str:
    """A local Ray for the drivers to attach to; `logical`: every trial on device 0 (one GPU shown as several)."""
    import ray

    if logical:
        os.environ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"
    ctx = ray.init(num_gpus=gpus, num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    return ctx.address_info["gcs_address"]


def stop_ray() -> None:
    import ray

    ray.shutdown()
    os.environ.pop("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", None)


def start_driver(space_file: Path, address: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.Popen([sys.executable, "-m", "sweep", "run", str(space_file), "--address", address], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env=env)  # fmt: skip


def wait_drivers(drivers: list[subprocess.Popen], deadline: float, grace: float = 90.0) -> list[int | None]:
    """Wait for every driver; past `deadline` (the sweeps' own time_budget should have ended them
    first) SIGTERM stops them resumably, and after `grace` more seconds SIGKILL."""
    for d in drivers:
        try:
            d.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    late = [d for d in drivers if d.poll() is None]
    for d in late:
        d.terminate()
    for d in late:
        try:
            d.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            d.kill()
            d.wait()
    return [d.returncode for d in drivers]


def keep_log(log: Path, out: Path, name: str) -> str:
    """The whole driver log beside the result file (`<out stem>-<name>.log`, progress bars left out),
    so that a GPU run brings back every timestamped line (a gap between workers, a worker's load
    phases), not only the tail the JSON holds. Returns its path ("" when there is no log)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    kept = out.with_name(f"{out.stem}-{name}.log")
    kept.write_text("\n".join(line for line in lines if "it/s]" not in line and "examples/s]" not in line) + "\n")
    return str(kept)


def log_tail(log: Path, chars: int = 2500) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""
