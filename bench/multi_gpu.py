"""A real sweep across the GPUs of one host, then the same sweep on one GPU: placement, scaling and
where each GPU's time goes (issues 10 and 17).

    python3 bench/multi_gpu.py --budget 540 --out results.json                  # all GPUs of the host, then GPU 0 alone
    python3 bench/multi_gpu.py --cohort auto --budget 540 --out results.json    # the same with cohort workers
    python3 bench/multi_gpu.py --logical 4 --out results.json                   # one GPU shown to Ray as 4 logical GPUs
    python3 bench/multi_gpu.py --dry-run --out /tmp/m.json                      # CPU: tiny models, 2 logical GPUs, cohorts of 2

The mixed sweep: Gemma 3 1B LoRA and 12B QLoRA (random weights, real architectures,
bench/realsize.py), as two sweeps driven at once on one Ray cluster (a sweep has one base model),
`--trials` each (default 16 + 16 = 32), both with `gpus_per_trial: auto` and `resources.cohort:
--cohort`. The trials are the same configurations in both runs, whatever order workers ask for them
(bench/sweepbench.py: seeded `points_to_evaluate`); no early stopping; `--steps` steps at `--seq`.

Each run starts its own Ray (in this process; the drivers attach to it), samples every GPU with
nvidia-smi every 0.5 s, and reads the trials back from MLflow: trials per hour, training tokens per
hour (the completed trials' counted tokens over the run's wall time), how trials were spread over the GPUs (the `gpu_ids` param), and a timeline per GPU
(bench/timeline.py: trial bars with base-model loads, utilisation, idle gaps; a PNG per run and,
in the result file, each GPU's busy fraction and idle gaps). Each trial's eval loss on N GPUs is
compared with the same configuration's on one GPU.

Targets (issue 17): >= 1.9x trials per hour on 2 GPUs vs 1 (0.95 N on N), each GPU busy >= 85% of
the sweep's time, no trial lost to OOM, each trial's eval loss equal to its one-GPU result
within noise (reported against 1%).

--budget (seconds, whole call) is shared out: building the checkpoints first, then the N-GPU run
two fifths and the one-GPU run three fifths of what is left (both pay the same start-up); each
sweep gets its share as `search.time_budget`. The result file is written after each run.

`--logical N` maps N logical Ray GPUs onto the one device (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES,
so every trial uses device 0) with `resources.gpu_memory_gb` = device memory / N, so placement and
the per-trial memory caps treat each logical GPU as 1/N of the device: it exercises multi-GPU
placement where only one GPU exists; its "scaling" measures packing, not more hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from provenance import with_provenance  # noqa: E402
from sweepbench import GpuSampler, compare_losses, keep_log, log_tail, makespan, seeded_configs, start_driver, start_ray, stop_ray, wait_drivers  # noqa: E402
from timeline import read_rows, timeline  # noqa: E402

SPACE = """\
name: {name}
model: {{id: {model}, embeddings: frozen}}
data: {{train: {demo}/train.jsonl, eval: {demo}/eval.jsonl, max_seq_len: {seq}, packing: true}}
train: {{method: {method}, max_steps: {steps}, eval_every: {steps}, log_every: {log_every}, lora_dtype: bfloat16}}
search: {{algorithm: random, seed: 0, num_trials: {trials}, scheduler: {{type: none}}, time_budget: {time_budget}s, points_to_evaluate: {points}}}
space:
  lora_r: {ranks}
  lora_alpha: {{ratio_of: lora_r, choices: [1, 2]}}
  learning_rate: {{loguniform: [5.0e-5, 5.0e-4]}}
  target_modules: [attention, all-linear]
  batch: {{pairs: {pairs}}}
resources: {{gpus_per_trial: auto, gpu_memory_gb: {gpu_gb}, cpus_per_trial: {cpus}, cohort: {cohort}}}
tracking: {{results_dir: {results}}}
"""
# per model: (method, LoRA ranks, micro-batch x accumulation pairs, seed of its configurations)
MODELS = {"1b": ("lora", [8, 16, 32], [[1, 4], [2, 2], [4, 1]], 1), "12b": ("qlora", [8, 16, 32], [[1, 4], [2, 2], [4, 1]], 12)}
READBACK_S = 30


def one_run(label: str, gpus: int, logical: bool, device_gb: float, models: dict[str, str], points: dict[str, list], args: argparse.Namespace,
            work: Path, share: float, out: Path) -> dict[str, Any]:  # fmt: skip
    env_before = dict(os.environ)
    if not logical and not args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
    gpu_gb = round(device_gb / (args.logical if logical else 1), 2)
    address = start_ray(gpus, args.cpus, logical)
    time_budget = max(30, int(share - READBACK_S))
    sampler = GpuSampler()
    sampler.start()
    demo = ROOT / "search_spaces" / "data" / "demo"
    drivers, names = [], []
    started = time.time()
    for size, model in models.items():
        method, ranks, pairs, _ = MODELS[size]
        name = f"{label}-{size}"
        results = work / label / size
        results.mkdir(parents=True, exist_ok=True)
        space = results / "space.yaml"
        space.write_text(SPACE.format(name=name, model=model, method=method, demo=demo, seq=args.seq, steps=args.steps, log_every=max(1, args.steps // 2),
                                      trials=len(points[size]), time_budget=time_budget, points=json.dumps(points[size]), ranks=ranks, pairs=pairs,
                                      gpu_gb=gpu_gb, cpus=args.cpus_per_trial, cohort=args.cohort, results=results))  # fmt: skip
        drivers.append(start_driver(space, address, results / "driver.log"))
        names.append((name, results))
    codes = wait_drivers(drivers, deadline=started + time_budget + 30, grace=45)
    wall = time.time() - started
    samples = sampler.finish()
    stop_ray()
    os.environ.clear()
    os.environ.update(env_before)
    for (name, results), code in zip(names, codes):
        if code != 0:
            print(f"{name}: driver exited {code}:\n" + log_tail(results / "driver.log", 3000), flush=True)
    rows = [row for name, results in names for row in read_rows(f"sqlite:///{results}/mlflow.db", name)]
    completed = [r for r in rows if r["status"] == "completed"]
    lanes = [f"gpu{i}" for i in range(gpus)]
    png = out.with_name(f"{out.stem}-timeline-{label}.png")
    tl = timeline(rows, samples, started, started + wall, png, title=f"{label}: {gpus} {'logical ' if logical else ''}GPU(s), cohort {args.cohort}", lanes=lanes)
    return {
        "label": label, "ray_gpus": gpus, "logical": logical, "gpu_memory_gb": gpu_gb, "cohort": args.cohort, "driver_exit_codes": codes,
        "time_budget_s": time_budget, "wall_seconds": round(wall, 1), "trials": len(rows), "by_status": dict(Counter(r["status"] for r in rows)),
        "trials_per_hour": round(len(completed) / wall * 3600, 1), "tokens_per_hour": tokens_per_hour(completed, wall),
        "makespan": {name: makespan([r for r in rows if r["sweep"] == name], len(points[name.rsplit("-", 1)[1]]), wall) for name, _ in names},
        "spread": {name: dict(Counter(r["gpu_ids"] for r in rows if r["sweep"] == name)) for name, _ in names},
        "oom": sum(1 for r in rows if r["status"] == "oom"),
        "gpu": tl["per_gpu"], "timeline": tl, "rows": rows,
        "driver_log_tails": {name: log_tail(results / "driver.log", 1500) for name, results in names},
        "driver_logs": {name: keep_log(results / "driver.log", out, name) for name, results in names},
    }  # fmt: skip


def tokens_per_hour(completed: list[dict[str, Any]], wall: float) -> int | None:
    """The completed trials' tokens as counted (timeline.counted_tokens) per hour of the run's wall
    time; None when a completed trial's count is missing (never tokens_per_sec x train_seconds)."""
    if not wall or any(r.get("tokens") is None for r in completed):
        return None
    return round(sum(r["tokens"] for r in completed) / wall * 3600)


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    many, one = runs[0], runs[1]
    n = many["ray_gpus"]
    out: dict[str, Any] = {
        "n": n, "trials_per_hour": round(many["trials_per_hour"] / one["trials_per_hour"], 3) if one["trials_per_hour"] else None,
        "tokens_per_hour": round(many["tokens_per_hour"] / one["tokens_per_hour"], 3) if many["tokens_per_hour"] and one["tokens_per_hour"] else None,
        "busy_per_gpu": {g: v["busy_fraction"] for g, v in many["gpu"].items()},
        "util_busy_per_gpu": {g: v.get("util_busy_fraction") for g, v in many["gpu"].items()},
        "oom": many["oom"] + one["oom"],
        "targets": {"trials_per_hour": f">= {0.95 * n:.2f}", "busy_per_gpu": ">= 0.85 each", "oom": "0", "eval_loss": "each trial equal to its 1-GPU result within noise (1% reported)"},
    }  # fmt: skip
    by_model = {}
    for size in MODELS:
        mine = [r for r in many["rows"] if r["sweep"].endswith(f"-{size}")]
        ref = [r for r in one["rows"] if r["sweep"].endswith(f"-{size}")]
        by_model[size] = compare_losses(ref, mine, 0.01)
    out["eval_loss_vs_one_gpu"] = by_model
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all the host has)")
    ap.add_argument("--logical", type=int, default=0, help="show Ray one GPU as this many logical GPUs")
    ap.add_argument("--trials", type=int, default=16, help="trials per model (two models)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--cohort", default="off", help="resources.cohort of both sweeps: off, auto or N")
    ap.add_argument("--budget", type=float, default=540, help="seconds for the whole call")
    ap.add_argument("--cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    ap.add_argument("--cpus-per-trial", type=float, default=2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--skip-single", action="store_true", help="only the N-GPU run")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny models, 2 logical GPUs: exercise the code paths")
    args = ap.parse_args()
    t0 = time.time()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="multi-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    args.cpus = args.cpus or os.cpu_count()
    if args.dry_run:
        models = {size: "tiny-gemma3" for size in MODELS}
        device_gb, host_gpus = 2.6, 1
        args.logical = args.logical or 2
        args.trials, args.steps, args.seq, args.cpus_per_trial = min(args.trials, 3), min(args.steps, 3), min(args.seq, 128), 1
        args.cohort = 2 if args.cohort == "off" else args.cohort  # the cohort path (the lone one is bench/packing.py's dry run too)
    else:
        import torch

        from realsize import build_checkpoint

        host_gpus = args.gpus or torch.cuda.device_count()
        device_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
        models = {}
        for size in MODELS:
            folder = work / f"gemma3-{size}"
            if not (folder / "config.json").exists():
                print(f"building {size}: {build_checkpoint(size, folder):.0f}s", flush=True)
            models[size] = str(folder)
    points = {size: seeded_configs(args.trials, seed=MODELS[size][3], ranks=MODELS[size][1], ratios=[1, 2], targets=["attention", "all-linear"],
                                   lr=(5e-5, 5e-4), pairs=MODELS[size][2]) for size in MODELS}  # fmt: skip
    if args.logical:
        plan = [(f"logical{args.logical}", args.logical, True)] + ([] if args.skip_single else [("logical1", 1, True)])
    else:
        plan = [(f"gpus{host_gpus}", host_gpus, False)] + ([("gpus1", 1, False)] if host_gpus > 1 and not args.skip_single else [])
    # the N-GPU run pays the same ~60 s of start-up (driver, Ray, base loads) as the 1-GPU run, so it is
    # not N times shorter: with cohorts on 2 H200s it took ~0.8x the 1-GPU run's time (2026-11-30, fifth
    # session), and a 40% share (weights 1 : 1.5) cut it 8 trials short; what it leaves unused goes on
    weights = [1.0, 1.25][: len(plan)]
    result: dict[str, Any] = {"args": {k: v for k, v in vars(args).items()}, "configs": points, "runs": []}
    for i, (label, gpus, logical) in enumerate(plan):
        left = args.budget - (time.time() - t0)
        share = left * weights[i] / sum(weights[i:])
        if share < 60:
            result["runs"].append({"label": label, "skipped": f"time budget: {left:.0f}s left of --budget {args.budget:.0f}"})
            continue
        print(f"{label}: up to {share:.0f}s", flush=True)
        result["runs"].append(one_run(label, gpus, logical, device_gb, models, points, args, work, share, out))
        done = [r for r in result["runs"] if "wall_seconds" in r]
        if len(done) == 2:
            result["scaling"] = summary(done)
        out.write_text(json.dumps(with_provenance(result), indent=2))  # a timeout later keeps what finished
    print(f"\n{'run':<10} {'GPUs':>4} {'wall s':>7} {'trials':>6} {'done':>5} {'oom':>4} {'trials/h':>8} {'Mtok/h':>7}  per GPU: busy (trial bars) / util>0 / idle s; spread")
    for r in result["runs"]:
        if "wall_seconds" not in r:
            print(f"{r['label']:<10} {r['skipped']}")
            continue
        util = {g: f"{v['util_busy_fraction']:.0%}" if "util_busy_fraction" in v else "-" for g, v in r["gpu"].items()}
        busy = " ".join(f"{g}:{v['busy_fraction']:.0%}/{util[g]}/{v['idle_seconds']:.0f}s" for g, v in r["gpu"].items())
        spread = "; ".join(f"{k}: {dict(sorted((str(a), b) for a, b in v.items()))}" for k, v in r["spread"].items())
        done = r["by_status"].get("completed", 0)
        mtok = "-" if r["tokens_per_hour"] is None else f"{r['tokens_per_hour'] / 1e6:.2f}"
        print(f"{r['label']:<10} {r['ray_gpus']:>4} {r['wall_seconds']:>7.0f} {r['trials']:>6} {done:>5} {r['oom']:>4} {r['trials_per_hour']:>8.1f} {mtok:>7}  {busy} | {spread}")
    if "scaling" in result:
        s = result["scaling"]
        print(f"scaling {s['n']} vs 1: trials/h x{s['trials_per_hour']} (target {s['targets']['trials_per_hour']}), tokens/h x{s['tokens_per_hour']}; "
              f"busy per GPU {s['busy_per_gpu']} (target >= 0.85); OOM {s['oom']}")  # fmt: skip
        for size, c in s["eval_loss_vs_one_gpu"].items():
            print(f"  eval loss {size}: {c['within']}/{c['pairs']} configurations within 1% of the 1-GPU run, max |diff| {c['max_abs_rel_diff']}")


if __name__ == "__main__":
    main()
