"""A real sweep across the GPUs of one host, then the same sweep on one GPU: placement and scaling (issue 10).

    python3 bench/multi_gpu.py --out results.json                  # all GPUs of the host, then GPU 0 alone
    python3 bench/multi_gpu.py --logical 4 --out results.json      # one GPU shown to Ray as 4 logical GPUs
    python3 bench/multi_gpu.py --dry-run --logical 2 --out /tmp/multi-gpu.json   # CPU: tiny models, 2 fake GPUs

The mixed sweep: Gemma 3 4B LoRA and 12B QLoRA (random weights, real architectures, bench/realsize.py),
as two sweeps driven at once on one Ray cluster (a sweep has one base model), both with
`gpus_per_trial: auto`, seeded random search (the same configurations in the same order in every
run, whatever the GPU count), no early stopping, seq 1024, `--trials` trials of `--steps` steps each.

Each run starts its own Ray (in this process; the two drivers attach to it), samples GPU
utilisation with nvidia-smi every second, and reads the trials back from MLflow: trials per hour,
training tokens per hour, GPU-busy fraction per GPU (share of samples with utilisation > 0, and
mean utilisation), and how trials were spread (the `gpu_ids` param Ray gave each trial). Scaling =
trials per hour on N GPUs / on one; the target is >= 0.9 x N.

`--logical N` maps N logical Ray GPUs onto the one device (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES,
so every trial uses device 0) with `resources.gpu_memory_gb` = device memory / N, so placement and
the per-trial memory caps treat each logical GPU as 1/N of the device: it exercises multi-GPU
placement where only one GPU exists; its "scaling" measures packing, not more hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from provenance import estimated_vram_gb, with_provenance  # noqa: E402

SPACE = """\
name: {name}
model: {{id: {model}, embeddings: new_tokens}}
data: {{train: {demo}/train.jsonl, eval: {demo}/eval.jsonl, max_seq_len: {seq}, packing: true}}
train: {{method: {method}, max_steps: {steps}, eval_every: {steps}, log_every: {log_every}}}
search: {{algorithm: random, seed: 0, num_trials: {trials}, scheduler: {{type: none}}}}
space:
  lora_r: [8, 16, 32]
  lora_alpha: {{ratio_of: lora_r, choices: [1, 2]}}
  learning_rate: {{loguniform: [5.0e-5, 5.0e-4]}}
  target_modules: [attention, all-linear]
  batch: {{pairs: {pairs}}}
resources: {{gpus_per_trial: auto, gpu_memory_gb: {gpu_gb}, cpus_per_trial: {cpus}}}
tracking: {{results_dir: {results}}}
"""


def gpu_sampler(stop: threading.Event, samples: list[dict]) -> None:
    """nvidia-smi once a second: utilisation and memory of every GPU."""
    query = ["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
    while not stop.is_set():
        try:
            out = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return  # no NVIDIA GPU here (dry run)
        now = time.time()
        for line in out.strip().splitlines():
            index, util, mem = (x.strip() for x in line.split(","))
            samples.append({"t": now, "gpu": int(index), "util": float(util), "mem_mib": float(mem)})
        stop.wait(1.0)


def sweep_rows(results: Path, name: str) -> list[dict[str, Any]]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{results}/mlflow.db")
    experiment = client.get_experiment_by_name(name)
    if experiment is None:  # the driver failed before it started the sweep (its log says why)
        return []
    runs = client.search_runs([experiment.experiment_id], max_results=10_000)
    rows = []
    for r in runs:
        if "mlflow.parentRunId" not in r.data.tags:
            continue
        m, p = r.data.metrics, r.data.params
        rows.append({"sweep": name, "trial": r.data.tags.get("trial"), "status": r.data.tags.get("trial_status"), "gpu_ids": p.get("gpu_ids"),
                     "gpu_share": p.get("gpu_share"), "estimated_vram_gb": estimated_vram_gb(r), "peak_vram_gb": m.get("peak_vram_gb"),
                     "tokens_per_sec": m.get("tokens_per_sec"), "train_seconds": m.get("train_seconds"), "load_seconds": m.get("load_seconds"),
                     "tokens": (m.get("tokens_per_sec") or 0) * (m.get("train_seconds") or 0), "start": r.info.start_time / 1000,
                     "end": (r.info.end_time or 0) / 1000, "batch": p.get("batch"), "lora_r": p.get("lora_r")})  # fmt: skip
    return rows


def one_run(label: str, gpus: int, logical: bool, device_gb: float, models: dict[str, str], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import ray

    env_before = dict(os.environ)
    if logical:
        os.environ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"  # every trial on device 0
    elif not args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
    gpu_gb = round(device_gb / (args.logical if logical else 1), 2)
    ctx = ray.init(num_gpus=gpus, num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    address = ctx.address_info["gcs_address"]
    samples: list[dict] = []
    stop = threading.Event()
    sampler = threading.Thread(target=gpu_sampler, args=(stop, samples), daemon=True)
    sampler.start()
    demo = ROOT / "search_spaces" / "data" / "demo"
    drivers, names = [], []
    started = time.time()
    for size, (model, method, pairs) in models.items():
        name = f"{label}-{size}"
        results = work / label / size
        results.mkdir(parents=True, exist_ok=True)
        space = results / "space.yaml"
        space.write_text(SPACE.format(name=name, model=model, method=method, demo=demo, seq=args.seq, steps=args.steps, log_every=max(1, args.steps // 4),
                                      trials=args.trials, pairs=pairs, gpu_gb=gpu_gb, cpus=args.cpus_per_trial, results=results))  # fmt: skip
        log = open(results / "driver.log", "w")
        drivers.append(subprocess.Popen([sys.executable, "-m", "sweep", "run", str(space), "--address", address], stdout=log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}))  # fmt: skip
        names.append((name, results))
    codes = [d.wait() for d in drivers]
    for (name, results), code in zip(names, codes):
        if code != 0:
            print(f"{name}: driver exited {code}:\n" + (results / "driver.log").read_text()[-3000:], flush=True)
    wall = time.time() - started
    stop.set()
    sampler.join(timeout=15)
    ray.shutdown()
    os.environ.clear()
    os.environ.update(env_before)
    rows = [row for name, results in names for row in sweep_rows(results, name)]
    completed = [r for r in rows if r["status"] == "completed"]
    per_gpu: dict[int, dict[str, float]] = {}
    for gpu in sorted({s["gpu"] for s in samples}):
        mine = [s for s in samples if s["gpu"] == gpu and started <= s["t"] <= started + wall]
        per_gpu[gpu] = {"busy_fraction": sum(s["util"] > 0 for s in mine) / max(1, len(mine)), "mean_util": sum(s["util"] for s in mine) / max(1, len(mine)),
                        "peak_mem_gib": max((s["mem_mib"] for s in mine), default=0) / 1024}  # fmt: skip
    return {
        "label": label, "ray_gpus": gpus, "logical": logical, "gpu_memory_gb": gpu_gb, "driver_exit_codes": codes, "wall_seconds": wall,
        "trials": len(rows), "by_status": dict(Counter(r["status"] for r in rows)),
        "trials_per_hour": len(completed) / wall * 3600, "tokens_per_hour": sum(r["tokens"] for r in completed) / wall * 3600,
        "spread": {name: dict(Counter(r["gpu_ids"] for r in rows if r["sweep"] == name)) for name, _ in names},
        "gpu": per_gpu, "rows": rows,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all the host has)")
    ap.add_argument("--logical", type=int, default=0, help="show Ray one GPU as this many logical GPUs")
    ap.add_argument("--trials", type=int, default=8, help="trials per model")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    ap.add_argument("--cpus-per-trial", type=float, default=2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--skip-single", action="store_true", help="only the N-GPU run")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny models: exercise the code paths")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="multi-gpu-"))
    args.cpus = args.cpus or os.cpu_count()
    if args.dry_run:
        models = {"4b": ("tiny-gemma3", "lora", "[[2, 1], [4, 1]]"), "12b": ("tiny-gemma3", "qlora", "[[2, 1]]")}
        device_gb, host_gpus = 2.6, args.gpus or 1
        args.seq = min(args.seq, 128)
    else:
        import torch

        from realsize import build_checkpoint

        host_gpus = args.gpus or torch.cuda.device_count()
        device_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
        models = {}
        for size, method, pairs in (("4b", "lora", "[[1, 8], [2, 4], [4, 2]]"), ("12b", "qlora", "[[1, 8], [2, 4]]")):
            folder = work / f"gemma3-{size}"
            if not (folder / "config.json").exists():
                print(f"building {size}: {build_checkpoint(size, folder):.0f}s", flush=True)
            models[size] = (str(folder), method, pairs)
    runs = []
    if args.logical:
        runs.append(one_run(f"logical{args.logical}", args.logical, True, device_gb, models, args, work))
        if not args.skip_single:
            runs.append(one_run("logical1", 1, True, device_gb, models, args, work))  # one logical GPU: 1/N of the device
    else:
        runs.append(one_run(f"gpus{host_gpus}", host_gpus, False, device_gb, models, args, work))
        if host_gpus > 1 and not args.skip_single:
            runs.append(one_run("gpus1", 1, False, device_gb, models, args, work))
    result: dict[str, Any] = {"runs": runs, "args": {k: v for k, v in vars(args).items()}, "date": time.strftime("%Y-%m-%d")}
    if len(runs) == 2 and runs[1]["trials_per_hour"]:
        n = runs[0]["ray_gpus"]
        result["scaling"] = {"trials_per_hour": runs[0]["trials_per_hour"] / runs[1]["trials_per_hour"],
                             "tokens_per_hour": runs[0]["tokens_per_hour"] / max(1e-9, runs[1]["tokens_per_hour"]), "n": n, "target": 0.9 * n}  # fmt: skip
    Path(args.out).write_text(json.dumps(with_provenance(result), indent=2))
    print(f"\n{'run':<10} {'GPUs':>4} {'wall s':>7} {'trials':>6} {'trials/h':>8} {'Mtok/h':>7}  spread / GPU busy")
    for r in runs:
        busy = " ".join(f"gpu{g}:{v['busy_fraction']:.0%}" for g, v in r["gpu"].items()) or "-"
        spread = "; ".join(f"{k}: {dict(sorted(v.items()))}" for k, v in r["spread"].items())
        print(f"{r['label']:<10} {r['ray_gpus']:>4} {r['wall_seconds']:>7.0f} {r['trials']:>6} {r['trials_per_hour']:>8.1f} {r['tokens_per_hour'] / 1e6:>7.2f}  {spread} | {busy}")
    if "scaling" in result:
        s = result["scaling"]
        print(f"scaling {s['n']} vs 1: trials/h x{s['trials_per_hour']:.2f}, tokens/h x{s['tokens_per_hour']:.2f} (target >= {s['target']:.1f})")


if __name__ == "__main__":
    main()
