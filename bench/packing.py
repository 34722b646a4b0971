"""Packing trials onto one GPU (issue 5): the same 16 Gemma 3 1B LoRA trials one at a time and
packed with `gpus_per_trial: auto`, plus a deliberately oversized trial beside a healthy one.

    python bench/packing.py --out results.json [--trials 16] [--steps 10]

Each sweep runs as a user runs it (`python -m sweep run space.yaml`, its own local Ray) on a
random-weight Gemma 3 1B (bench/realsize.py); random search with a fixed seed, so both sweeps
train the same 16 configurations. While a sweep runs, nvidia-smi samples GPU utilisation every
0.5 s. Read back from MLflow: every trial's status, load and train seconds, whether it reused a
warm worker's base model, its GPU share and peak memory.

Reported: sweep wall time, GPU-busy fraction (samples with utilisation > 0) and mean utilisation,
per-trial start overhead (load_seconds) with and without base-model reuse against the trial's
train_seconds, and trials lost to OOM. Targets: packed wall <= 0.35 x one-at-a-time; start on a
warm worker <= 10% of training time; no OOM in the packed run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from provenance import estimated_vram_gb, with_provenance  # noqa: E402
from realsize import build_checkpoint  # noqa: E402

DEMO = ROOT / "search_spaces" / "data" / "demo"

SPACE = """\
name: {name}
model: {{id: {model}, embeddings: new_tokens}}
data: {{train: {demo}/train.jsonl, eval: {demo}/eval.jsonl, max_seq_len: 1024}}
train: {{max_steps: {steps}, eval_every: {steps}, log_every: 5{train_extra}}}
search:
  algorithm: {algorithm}
  seed: 0
  num_trials: {trials}
  max_concurrent: {concurrent}
  scheduler: {{type: none}}
space:
{space}
resources: {resources}
tracking: {{results_dir: {results}}}
"""
REALISTIC = """\
  lora_r: [8, 16, 32, 64]
  lora_alpha: {ratio_of: lora_r, choices: [1, 2]}
  target_modules: [attention, all-linear]
  learning_rate: {loguniform: [5.0e-5, 1.0e-3]}
  batch: {pairs: [[1, 8], [2, 4], [4, 2], [8, 1]]}"""
# Beside a healthy trial, one whose micro-batch cannot fit half a GPU: 64 x 1024 tokens' logits
# alone (model loss, no checkpointing) are over 200 GB.
OVERSIZED = """\
  batch: [[1, 1], [64, 1]]"""
OVERSIZED_TRAIN = ", gradient_checkpointing: off, loss: model"


class GpuSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = []  # (utilisation %, memory used MiB)
        self.stop = threading.Event()

    def run(self) -> None:
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-lms", "500"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:
            if self.stop.is_set():
                break
            try:
                util, mem = (float(x) for x in line.split(","))
                self.samples.append((util, mem))
            except ValueError:
                continue
        proc.terminate()


def write_space(work: Path, name: str, model: Path, space: str, resources: str, trials: int, steps: int, concurrent: str, algorithm: str, train_extra: str) -> Path:
    space_file = work / f"{name}.yaml"
    space_file.write_text(SPACE.format(name=name, model=model, demo=DEMO, steps=steps, algorithm=algorithm, trials=trials, concurrent=concurrent,
                                       space=space, resources=resources, results=work / "sweeps", train_extra=train_extra))  # fmt: skip
    return space_file


def run_sweep(work: Path, name: str, space: str, resources: str, trials: int, steps: int, concurrent: str, algorithm: str, train_extra: str) -> dict:
    results = work / "sweeps"
    space_file = write_space(work, name, work / "gemma3-1b", space, resources, trials, steps, concurrent, algorithm, train_extra)
    sampler = GpuSampler()
    sampler.start()
    started = time.perf_counter()
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "sweep", "run", str(space_file)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path})
    wall = time.perf_counter() - started
    sampler.stop.set()
    out = {"name": name, "wall_seconds": round(wall, 1), "returncode": proc.returncode, "stdout_tail": proc.stdout[-2500:]}
    if proc.returncode != 0:
        out["stderr_tail"] = proc.stderr[-3000:]
        return out
    samples = sampler.samples
    out["gpu_busy_fraction"] = sum(1 for u, _ in samples if u > 0) / max(len(samples), 1)
    out["gpu_mean_utilisation"] = sum(u for u, _ in samples) / max(len(samples), 1) / 100
    out["gpu_peak_memory_used_gb"] = max((m for _, m in samples), default=0) / 1024
    sweep_dir = max((p for p in results.iterdir() if p.name.startswith(name + "-")), key=lambda p: p.stat().st_mtime)
    out["trials"] = read_trials(sweep_dir)
    return out


def read_trials(sweep_dir: Path) -> list[dict]:
    from mlflow import MlflowClient

    meta = json.loads((sweep_dir / "sweep.json").read_text())
    client = MlflowClient(meta["mlflow_uri"])
    runs = client.search_runs(
        [client.get_run(meta["parent_run_id"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{meta['parent_run_id']}'",
        max_results=1000,
    )
    rows = []
    for r in runs:
        rows.append({
            "trial": r.data.tags.get("trial"),
            "status": r.data.tags.get("trial_status"),
            "error": (r.data.tags.get("error") or "")[-300:],
            "reused": r.data.params.get("base_model_reused") == "True",
            "gpu_share": r.data.params.get("gpu_share"),
            "batch": r.data.params.get("batch"),
            **{k: r.data.metrics.get(k) for k in ("load_seconds", "train_seconds", "peak_vram_gb", "peak_vram_reserved_gb", "eval_loss", "tokens_per_sec")},
            "estimated_vram_gb": estimated_vram_gb(r),  # a param of the trial (its config), not a metric
        })  # fmt: skip
    return sorted(rows, key=lambda x: x["trial"] or "")


def overhead(trials: list[dict], reused: bool) -> dict:
    rows = [t for t in trials if t["reused"] == reused and t["load_seconds"] and t["train_seconds"]]
    if not rows:
        return {"n": 0}
    load = sum(t["load_seconds"] for t in rows) / len(rows)
    train = sum(t["train_seconds"] for t in rows) / len(rows)
    return {"n": len(rows), "mean_load_seconds": round(load, 2), "mean_train_seconds": round(train, 2), "load_over_train": round(load / train, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--workdir", default="/tmp/packing")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: serial, packed, oom")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    build_checkpoint("1b", work / "gemma3-1b")
    results: dict = {}
    parts = {
        "serial": ("serial", REALISTIC, "{gpus_per_trial: 1, cpus_per_trial: 2}", args.trials, "1"),
        "packed": ("packed", REALISTIC, "{gpus_per_trial: auto, cpus_per_trial: 2}", args.trials, "auto"),
        "oom": ("oom-beside-healthy", OVERSIZED, "{gpus_per_trial: 0.5, cpus_per_trial: 2}", 2, "2"),
    }
    for key, (name, space, resources, trials, concurrent) in parts.items():
        if key in args.skip.split(","):
            continue
        algorithm, extra = ("grid", OVERSIZED_TRAIN) if key == "oom" else ("random", ", gradient_checkpointing: auto")
        results[key] = run_sweep(work, name, space, resources, trials, args.steps, concurrent, algorithm, extra)
        Path(args.out).write_text(json.dumps(with_provenance(results), indent=2))
        print(json.dumps({k: v for k, v in results[key].items() if k not in ("trials", "stdout_tail")}), flush=True)
    for key in ("serial", "packed"):
        if key in results and "trials" in results[key]:
            trials = results[key]["trials"]
            results[key]["overhead_fresh"] = overhead(trials, reused=False)
            results[key]["overhead_reused"] = overhead(trials, reused=True)
            results[key]["oom"] = sum(1 for t in trials if t["status"] == "oom")
    if "serial" in results and "packed" in results and results["serial"].get("returncode") == 0:
        results["packed_over_serial_wall"] = results["packed"]["wall_seconds"] / results["serial"]["wall_seconds"]
    Path(args.out).write_text(json.dumps(with_provenance(results), indent=2))
    print(f"\n{'sweep':<20} {'wall s':>7} {'busy':>6} {'util':>6} {'completed':>9} {'oom':>4} {'load fresh':>10} {'load warm':>9} {'warm/train':>10}")
    for key, r in results.items():
        if not isinstance(r, dict) or "trials" not in r:
            continue
        done = sum(1 for t in r["trials"] if t["status"] == "completed")
        oom = sum(1 for t in r["trials"] if t["status"] == "oom")
        fresh, warm = overhead(r["trials"], False), overhead(r["trials"], True)
        print(f"{r['name']:<20} {r['wall_seconds']:>7.0f} {r['gpu_busy_fraction']:>6.0%} {r['gpu_mean_utilisation']:>6.0%} {done:>9} {oom:>4} "
              f"{fresh.get('mean_load_seconds', float('nan')):>10.1f} {warm.get('mean_load_seconds', float('nan')):>9.1f} {warm.get('load_over_train', float('nan')):>10.1%}")  # fmt: skip
    if "packed_over_serial_wall" in results:
        print(f"packed / serial wall time: {results['packed_over_serial_wall']:.2f}")


if __name__ == "__main__":
    main()
