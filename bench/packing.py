"""One base model, many trials (issues 5, 15, 29, 30): the same seeded trials as the default sweep
runs them (every worker a cohort on one loaded base), one at a time, and one at a time with HF
Trainer tuned (mode hf), on one GPU, side by side.

    python3 bench/packing.py --size 1b --budget 540 --out results.json          # 16 x Gemma 3 1B LoRA
    python3 bench/packing.py --size 12b --budget 540 --out results.json         # 8 x Gemma 3 12B QLoRA
    python3 bench/packing.py --modes default,hf --size 1b --steps 60 --out r.json   # issue 30: ours vs HF Trainer tuned
    python3 bench/packing.py --dry-run --out /tmp/p.json                        # CPU: tiny model, 1 logical GPU

The reference of issue 29 (today's packed default before one engine: lone trials sharing the GPU
by their memory estimates) is this script at commit 2a4a88a, run from a worktree of it with
`--modes packed`: bench/BENCH.md gives the commands.

Each mode is a real sweep as a user runs it (`python -m sweep run space.yaml`, attached to a local
Ray this script starts with one GPU) on a random-weight Gemma 3 (bench/realsize.py). The trials are
the same configurations in every mode (bench/sweepbench.py: seeded `points_to_evaluate`); every
mode trains them with the same fixed settings (frozen embeddings; the train section's defaults:
train.loss, lora_dtype and compile `auto`, as a user's sweep gets them; --settings old pins the
settings the pre-29 runs used: bf16 LoRA, chunked loss, not compiled).

Mode hf is not a sweep: the sweep a Ray Tune + HF Trainer user runs, the same configurations one
after the other, each a fresh Hugging Face Trainer + PEFT run tuned for speed (sdpa, bf16
adapters, adamw_torch_fused, use_liger_kernel, no per-step NaN check, no checkpoints, not
compiled), on the same rows our pipeline prepared, in our row order (bench/hf_serial.py, in its
own process; its docstring names every setting). Its makespan runs from that process's start to
the last trial's end.

nvidia-smi samples the GPU every 0.5 s. Read back from MLflow: every trial's status, start/end,
load and train seconds, GPU, cohort, eval loss.

Reported per mode: makespan (the sweep command's wall time), trials/hour, GPU mean utilisation
and busy share (samples with utilisation > 0), trials lost to OOM, a per-GPU timeline PNG and its
figures (bench/timeline.py); the workers' aggregate tokens/s (every trial's tokens as its member
counted them, over the wall time its worker trained) and MFU. Each configuration's final eval loss
in the default sweep against the same configuration one at a time.

Targets (issue 29): the default sweep's makespan <= 0.5x the packed default of commit 2a4a88a
(measured side by side, from a worktree), GPU mean utilisation >= 80%. (Issue 15: <= 0.15x one at a
time; each trial's eval loss within 1% of the same trial alone.) Issue 30: the default sweep's
makespan <= 0.15x the same trials one at a time with HF Trainer tuned (mode hf), every
configuration trained on the same counted tokens; each configuration's eval loss against HF's is
information only (HF draws its LoRA dropout masks from another RNG).

Modes run in the order --modes gives (cheapest first: default, serial, hf) and each is written to
--out as soon as it ends.
--budget (seconds, whole call) is shared out between the modes still to run, and each sweep gets
its share as `search.time_budget` (hf: no trial starts once its share is spent). A mode cut by it
has no makespan (`seconds` None, `cut_at` its wall time) and no ratio: one at a time is measured,
never projected from the trials that finished.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from provenance import with_provenance  # noqa: E402
from sweepbench import GpuSampler, compare_losses, config_key, keep_log, log_tail, makespan, ratio, seeded_configs, start_driver, start_ray, stop_ray, wait_drivers  # noqa: E402
from timeline import read_rows, sample_stats, timeline  # noqa: E402

DEMO = ROOT / "search_spaces" / "data" / "demo"

SPACE = """\
name: {name}
model: {{id: {model}, embeddings: frozen}}
data: {{train: {demo}/train.jsonl, eval: {demo}/eval.jsonl, max_seq_len: {seq}}}
train: {{method: {method}, max_steps: {steps}, eval_every: {steps}, log_every: {log_every}{train_extra}}}
search:
  algorithm: {algorithm}
  seed: 0
  num_trials: {trials}
  max_concurrent: {concurrent}
  scheduler: {{type: none}}
  time_budget: {time_budget}s
  points_to_evaluate: {points}
space:
{space}
resources: {resources}
tracking: {{results_dir: {results}}}
"""
SPACE_DIMS = """\
  lora_r: {ranks}
  lora_alpha: {{ratio_of: lora_r, choices: [1, 2]}}
  target_modules: [attention, all-linear]
  learning_rate: {{loguniform: [5.0e-5, 1.0e-3]}}
  batch: {{pairs: {pairs}}}"""
# per size: trials, LoRA method, ranks, micro-batch x accumulation pairs (8 sequences per step)
SIZES = {
    "1b": (16, "lora", [8, 16, 32, 64], [[1, 8], [2, 4], [4, 2], [8, 1]]),
    "12b": (8, "qlora", [8, 16, 32, 64], [[1, 8], [2, 4], [4, 2]]),
    "tiny": (4, "lora", [4, 8], [[1, 2], [2, 1]]),
}
# Beside a healthy trial, one whose micro-batch cannot fit half a GPU: 64 x 1024 tokens' logits
# alone (model loss, no checkpointing) are over 200 GB.
OVERSIZED = """\
  batch: [[1, 1], [64, 1]]"""
# mode -> (resources, max_concurrent, budget weight: its expected share of the call's time)
MODES = {
    # the default runs first and gets the largest share: on 2026-11-30 a 12B cohort given a sixth of
    # the call ended before its first step (the base load alone takes ~30 s); what a mode leaves
    # unused goes to the modes after it
    "default": ("{{gpus_per_trial: auto, cohort: {cohort}, cpus_per_trial: {cpt}, gpu_memory_gb: {gpu_gb}}}", "auto", 2.5),
    "serial": ("{{gpus_per_trial: 1, cohort: 1, cpus_per_trial: {cpt}, gpu_memory_gb: {gpu_gb}}}", "1", 1.5),
    "oom": ("{{gpus_per_trial: 0.5, cohort: 1, cpus_per_trial: {cpt}, gpu_memory_gb: {gpu_gb}}}", "2", 0.7),
}
# budget weights of every mode: the sweeps' and hf (not a sweep: bench/hf_serial.py in its own
# process; a fresh Trainer and base load per trial, like serial's cohorts of one)
WEIGHTS = {**{mode: weight for mode, (_, _, weight) in MODES.items()}, "hf": 1.5}
HF_GRACE_S = 90  # past its deadline (no trial starts after it) the trial in progress may finish
# --settings: the fast step's switches in every mode ("defaults": the train section's auto ones)
SETTINGS = {"defaults": "", "old": ", lora_dtype: bfloat16, loss: chunked, compile: false"}
READBACK_S = 25  # after a sweep: stop Ray, read MLflow, draw (kept out of the next mode's share)


def run_mode(mode: str, args: argparse.Namespace, work: Path, model: str, points: list[dict], share: float, out: Path) -> dict[str, Any]:
    if mode == "hf":
        return run_hf(args, work, model, points, share, out)
    trials, method, ranks, pairs = SIZES[args.size]
    trials = args.trials or trials
    name = f"{mode}-{args.size}"
    results = work / f"sweeps-{args.size}-{args.stamp}"
    results.mkdir(parents=True, exist_ok=True)
    resources, concurrent, _ = MODES[mode]
    if mode == "oom":
        space, algorithm, n, extra, pts = OVERSIZED, "grid", 2, ", gradient_checkpointing: off, loss: model", "[]"
    else:
        space, algorithm, n, extra, pts = SPACE_DIMS.format(ranks=ranks, pairs=pairs), "random", trials, ", gradient_checkpointing: auto", json.dumps(points)
        extra += SETTINGS[args.settings] + (", compile: true" if args.compile else "")
        extra += f", lora_dropout: {args.dropout}" if args.dropout is not None else ""
    time_budget = max(30, int(share - READBACK_S))
    space_file = results / f"{name}.yaml"
    space_file.write_text(SPACE.format(name=name, model=model, demo=DEMO, seq=args.seq, method=method, steps=args.steps, log_every=max(1, args.steps // 2),
                                       train_extra=extra, algorithm=algorithm, trials=n, concurrent=concurrent, time_budget=time_budget, points=pts, space=space,
                                       resources=resources.format(cohort=args.cohort, cpt=args.cpus_per_trial, gpu_gb=args.gpu_gb), results=results))  # fmt: skip
    address = start_ray(1, args.cpus, logical=args.dry_run)
    sampler = GpuSampler()
    sampler.start()
    log = results / f"{name}.log"
    started = time.time()
    codes = wait_drivers([start_driver(space_file, address, log)], deadline=started + time_budget + 30, grace=45)
    ended = time.time()
    samples = sampler.finish()
    stop_ray()
    rows = read_rows(f"sqlite:///{results}/mlflow.db", name)
    wall = ended - started
    done = [r for r in rows if r["status"] == "completed"]
    result: dict[str, Any] = {
        "name": name, "mode": mode, "wall_seconds": round(wall, 1), "returncode": codes[0], "time_budget_s": time_budget, "trials_wanted": n,
        "by_status": {s: sum(1 for r in rows if r["status"] == s) for s in sorted({r["status"] or "?" for r in rows})},
        "makespan": makespan(rows, n, wall), "trials_per_hour": round(len(done) / wall * 3600, 1) if wall else None,
        "oom": sum(1 for r in rows if r["status"] == "oom"), "gpu": sample_stats(samples, started, ended),
        "driver_log_tail": log_tail(log, 2500 if codes[0] else 1200), "driver_log": keep_log(log, out, mode),
    }  # fmt: skip
    result["workers"] = cohort_figures(rows, args)
    result["timeline"] = timeline(rows, samples, started, ended, out.with_name(f"{out.stem}-timeline-{mode}.png"), title=f"{name}: {args.stamp}")
    result["trials"] = rows
    return result


def run_hf(args: argparse.Namespace, work: Path, model: str, points: list[dict], share: float, out: Path) -> dict[str, Any]:
    """The same configurations one at a time, each a fresh HF Trainer + PEFT run tuned for speed
    (bench/hf_serial.py, in its own process so that the GPU's memory is all given back). Its
    makespan runs from that process's start (what a user's driver pays too: imports, data
    preparation) to the last trial's end; no trial starts once its share of --budget is spent, and a
    mode cut that way has no makespan (cut_at), like a cut sweep."""
    import subprocess

    _, method, _, _ = SIZES[args.size]
    name = f"hf-{args.size}"
    results = work / f"sweeps-{args.size}-{args.stamp}"
    results.mkdir(parents=True, exist_ok=True)
    trials_json, log = results / f"{name}.json", results / f"{name}.log"
    time_budget = max(30, int(share - READBACK_S))
    sampler = GpuSampler()
    sampler.start()
    started = time.time()
    cmd = [sys.executable, str(ROOT / "bench" / "hf_serial.py"), "--model", model, "--configs", json.dumps(points), "--steps", str(args.steps),
           "--seq", str(args.seq), "--method", method, "--log-every", str(max(1, args.steps // 2)), "--deadline", str(started + time_budget),
           "--cache", str(work / "hf-data"), "--out", str(trials_json)]  # fmt: skip
    if args.dropout is not None:
        cmd += ["--dropout", str(args.dropout)]
    if args.hf_liger_from is not None:
        cmd += ["--liger-from", str(args.hf_liger_from)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    codes = wait_drivers([proc], deadline=started + time_budget + HF_GRACE_S, grace=15)
    ended = time.time()
    samples = sampler.finish()
    child = json.loads(trials_json.read_text()) if trials_json.exists() else {}
    rows = child.get("trials", [])
    for r in rows:
        r["cohort"] = r["config"]  # every trial its own worker (cohort_figures)
    done = [r for r in rows if r["status"] == "completed"]
    wall = ended - started
    # all done: from the process's start to the last trial's end; else the mode's wall time (cut_at)
    span = max(r["end"] for r in done) - started if len(done) == len(points) else wall
    result: dict[str, Any] = {
        "name": name, "mode": "hf", "wall_seconds": round(wall, 1), "returncode": codes[0], "time_budget_s": time_budget, "trials_wanted": len(points),
        "by_status": {s: sum(1 for r in rows if r["status"] == s) for s in sorted({r["status"] for r in rows})},
        "makespan": makespan(rows, len(points), span), "trials_per_hour": round(len(done) / wall * 3600, 1) if wall else None,
        "oom": sum(1 for r in rows if r["status"] == "oom"), "gpu": sample_stats(samples, started, ended),
        "driver_log_tail": log_tail(log, 2500 if codes[0] else 1200), "driver_log": keep_log(log, out, "hf"),
        "versions": child.get("versions"), "prepare_seconds": child.get("prepare_seconds"), "data_stats": child.get("data_stats"),
        "liger": sorted({r["liger"] for r in done}) if done else None,
        "liger_note": "use_liger_kernel only on CUDA: liger-kernel's kernels need it (a CPU dry run trains without)",
    }  # fmt: skip
    # HF Trainer with liger computes lm_head at every position (bench/seed_vs_ours.py's MFU note)
    result["workers"] = cohort_figures([r for r in rows if r.get("start")], args, lm_head_fraction=1.0)
    result["trials"] = rows
    return result


def cohort_figures(rows: list[dict], args: argparse.Namespace, lm_head_fraction: float | None = None) -> dict[str, Any]:
    """Workers and their sizes; the workers' aggregate tokens/s: every trial's tokens as counted
    (timeline.counted_tokens) over the wall time its worker trained (each worker's first member
    start to its last member end, compile, evaluations and checkpoints included), and its MFU by
    bench/seed_vs_ours.py's formula (dense bf16 peak). `tokens_exact` is False when a trial ended
    without a final count (not completed: it trained more than its newest checkpoint holds, or left
    none): the figures are then lower bounds. `lm_head_fraction`: the share of tokens that go
    through lm_head (default: the reply tokens' share, as our losses compute it)."""
    workers: dict[str, list[dict]] = {}
    for r in rows:
        workers.setdefault(str(r.get("cohort")), []).append(r)
    out: dict[str, Any] = {"workers": len(workers), "cohort_size": sorted({str(r.get("cohort_size")) for r in rows})}
    tokens = sum(r.get("tokens") or 0 for r in rows)
    loss_tokens = sum(r.get("loss_tokens") or 0 for r in rows)
    uncounted = [r.get("trial") for r in rows if r.get("status") != "completed" or r.get("tokens") is None]
    span = sum(max(r["end"] for r in ws) - min(r["start"] for r in ws) for ws in workers.values())
    out.update(tokens=tokens, train_wall_seconds=round(span, 1), tokens_exact=not uncounted, trials_not_fully_counted=uncounted)
    out["tokens_per_sec"] = round(tokens / span, 1) if span and tokens else None
    if out["tokens_per_sec"] and not args.dry_run:
        from seed_vs_ours import PEAK_FLOPS, flops_per_token

        fraction = loss_tokens / tokens if lm_head_fraction is None else lm_head_fraction
        out["mfu"] = round(flops_per_token(args.size, fraction, False) * out["tokens_per_sec"] / PEAK_FLOPS, 4)
    return out


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's comparisons, from whatever modes finished (the packed reference: --reference)."""
    modes = results["modes"]

    def span(mode: str) -> float | None:
        return (modes.get(mode) or {}).get("makespan", {}).get("seconds")

    reference = results.get("reference") or {}
    packed = reference.get("makespan", {}).get("seconds")
    out: dict[str, Any] = {
        "default_over_serial_makespan": ratio(span("default"), span("serial")),
        "default_over_packed_2a4a88a_makespan": ratio(span("default"), packed),
        "makespan_default_vs_hf": ratio(span("default"), span("hf")),
        "default_gpu_mean_util": (modes.get("default") or {}).get("gpu", {}).get("mean_util"),
    }
    if "default" in modes and "serial" in modes:
        out["eval_loss_default_vs_serial"] = compare_losses(modes["serial"]["trials"], modes["default"]["trials"], 0.01)
    if "default" in modes and "hf" in modes:
        out["eval_loss_default_vs_hf"] = compare_losses(modes["hf"]["trials"], modes["default"]["trials"], 0.01)
        out["tokens_default_vs_hf"] = same_tokens(modes["hf"]["trials"], modes["default"]["trials"])
    if "default" in modes and reference.get("trials"):
        out["eval_loss_default_vs_packed_2a4a88a"] = compare_losses(reference["trials"], modes["default"]["trials"], 0.01)
    out["targets"] = {"default_over_packed_2a4a88a_makespan": "<= 0.5 (issue 29)", "default_gpu_mean_util": ">= 0.80",
                      "default_over_serial_makespan": "<= 0.15 (issue 15)", "eval_loss_default_vs_serial": "every pair within 1%",
                      "makespan_default_vs_hf": "<= 0.15 (issue 30: HF Trainer tuned, one trial at a time)",
                      "eval_loss_default_vs_hf": "none, information (HF draws its dropout masks from another RNG)",
                      "tokens_default_vs_hf": "every pair the same tokens"}  # fmt: skip
    return out


def same_tokens(reference: list[dict], other: list[dict]) -> dict[str, Any]:
    """Configurations completed in both runs whose counted tokens are equal (the same rows trained)."""

    def counted(rows: list[dict]) -> dict[str, int]:
        return {config_key(r): r["tokens"] for r in rows if r.get("status") == "completed" and isinstance(r.get("tokens"), int)}

    ref, oth = counted(reference), counted(other)
    both = sorted(ref.keys() & oth.keys())
    return {"pairs": len(both), "same": sum(ref[k] == oth[k] for k in both), "differ": {k: [ref[k], oth[k]] for k in both if ref[k] != oth[k]}}


def print_table(results: dict[str, Any]) -> None:
    print(f"\n{'mode':<8} {'wall s':>7} {'makespan':>9} {'done':>5} {'trials/h':>8} {'util>0':>6} {'util':>6} {'oom':>4}  per-GPU busy (trial bars), idle s")
    for mode, r in results["modes"].items():
        g, ms = r.get("gpu", {}), r.get("makespan", {})
        span = f"cut {ms['cut_at']:.0f}" if ms.get("seconds") is None and ms.get("cut_at") else "-" if ms.get("seconds") is None else f"{ms['seconds']:.0f}"
        lanes = " ".join(f"{k}:{v['busy_fraction']:.0%},{v['idle_seconds']:.0f}s" for k, v in r.get("timeline", {}).get("per_gpu", {}).items())
        util_busy = f"{g['util_busy_fraction']:.0%}" if "util_busy_fraction" in g else "-"
        util = f"{g['mean_util']:.0%}" if "mean_util" in g else "-"
        print(f"{mode:<8} {r['wall_seconds']:>7.0f} {span:>9} {ms.get('completed', 0):>5} {r.get('trials_per_hour') or 0:>8.1f} {util_busy:>6} {util:>6} {r.get('oom', 0):>4}  {lanes}")
    s = results.get("summary", {})
    if any(r.get("makespan", {}).get("cut_at") for r in results["modes"].values()):
        print("(cut: the time budget stopped the sweep before every trial completed; no makespan, no ratio)")
    for key, target in s.get("targets", {}).items():
        value = s.get(key)
        if isinstance(value, dict) and "within" in value:
            value = f"{value['within']}/{value['pairs']} within 1%, max |diff| {value['max_abs_rel_diff']}"
        elif isinstance(value, dict) and "same" in value:
            value = f"{value['same']}/{value['pairs']} the same"
        print(f"  {key}: {value}  (target {target})")


def given_configs(text: str, ranks: list[int], pairs: list[list[int]]) -> list[dict]:
    """--configs: configurations to run instead of the seeded ones, checked against the space (Optuna
    would otherwise reject a point outside it mid-sweep)."""
    try:
        configs = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--configs: not JSON ({e}); give a list such as "
                         '\'[{"lora_r": 64, "lora_alpha_ratio": 2, "target_modules": "all-linear", "learning_rate": 9.08e-4, "batch": [2, 4]}]\'') from e  # fmt: skip
    keys = {"lora_r", "lora_alpha_ratio", "target_modules", "learning_rate", "batch"}
    if not isinstance(configs, list) or not configs or not all(isinstance(c, dict) and set(c) == keys for c in configs):
        raise SystemExit(f"--configs: a non-empty JSON list of objects with exactly the keys {sorted(keys)}")
    for c in configs:
        if c["lora_r"] not in ranks or c["lora_alpha_ratio"] not in (1, 2) or c["target_modules"] not in ("attention", "all-linear") \
                or c["batch"] not in pairs or not 5e-5 <= c["learning_rate"] <= 1e-3:  # fmt: skip
            raise SystemExit(f"--configs: {c} is outside the space (lora_r in {ranks}, lora_alpha_ratio 1 or 2, attention or all-linear, "
                             f"learning_rate in [5e-5, 1e-3], batch in {pairs})")  # fmt: skip
    return configs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", choices=("1b", "12b"), default="1b", help="1b: 16 LoRA trials; 12b: 8 QLoRA trials")
    ap.add_argument("--trials", type=int, default=None, help="default: 16 (1b), 8 (12b)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--modes", default="default,serial", help="comma list, run in this order: default, serial, oom, hf (HF Trainer tuned, one at a time)")
    ap.add_argument("--cohort", default="auto", help="resources.cohort of the default mode: auto or N")
    ap.add_argument("--settings", choices=tuple(SETTINGS), default="defaults", help="the fast step's switches: the train section's defaults, or the pre-29 runs' (old)")
    ap.add_argument("--reference", default=None, help="the JSON of commit 2a4a88a's packing.py --modes packed on this machine: its packed mode is the makespan to beat")
    ap.add_argument("--budget", type=float, default=540, help="seconds for the whole call (shared out between the modes)")
    ap.add_argument("--cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    ap.add_argument("--cpus-per-trial", type=float, default=2)
    ap.add_argument("--gpu-gb", type=float, default=None, help="resources.gpu_memory_gb (default: the device's)")
    ap.add_argument("--workdir", default="/tmp/packing")
    ap.add_argument("--configs", default=None,
                    help="a JSON list of configurations (keys as in the result's configs: lora_r, lora_alpha_ratio, target_modules, learning_rate, batch) "
                         "instead of the seeded ones; e.g. one configuration at several micro-batch splits, run alone, for the run-to-run noise floor")  # fmt: skip
    ap.add_argument("--compile", action="store_true", help="train.compile: true in every mode (the workers compile around their adapters)")
    ap.add_argument("--hf-liger-from", type=int, default=None, help="mode hf: HF Trainer's use_liger_kernel from this micro-batch up (default: bench/hf_serial.py's LIGER_FROM; 1: everywhere)")
    ap.add_argument("--dropout", type=float, default=None,
                    help="train.lora_dropout in every mode (default: the train section's 0.05). 0 compares compiled with eager step for step: "
                         "compiled layers draw dropout masks from inductor's RNG, so with dropout the two are different random draws")  # fmt: skip
    ap.add_argument("--dry-run", action="store_true", help="CPU: tiny model, few trials and steps, one logical GPU")
    args = ap.parse_args()
    t0 = time.time()
    args.stamp = time.strftime("%Y%m%d-%H%M%S")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    if args.dry_run:
        args.size, model = "tiny", "tiny-gemma3"
        args.trials, args.steps, args.seq = args.trials or 4, min(args.steps, 4), min(args.seq, 128)
        args.cpus, args.cpus_per_trial, args.gpu_gb = args.cpus or 2, 1, args.gpu_gb or 2.6
        args.cohort = 2 if args.cohort == "auto" else args.cohort  # auto on a GPU budget fills one worker; 2 makes two on CPU
    else:
        import torch

        from realsize import build_checkpoint

        args.gpu_gb = args.gpu_gb or round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        folder = work / f"gemma3-{args.size}"
        if not (folder / "config.json").exists():
            print(f"building {args.size}: {build_checkpoint(args.size, folder):.0f}s", flush=True)
        model = str(folder)
    args.cpus = args.cpus or os.cpu_count()
    trials, _, ranks, pairs = SIZES[args.size]
    if args.configs:
        points = given_configs(args.configs, ranks, pairs)
        args.trials = len(points)
    else:
        points = seeded_configs(args.trials or trials, seed=0, ranks=ranks, ratios=[1, 2], targets=["attention", "all-linear"], lr=(5e-5, 1e-3), pairs=pairs)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - set(WEIGHTS):
        ap.error(f"--modes: {args.modes!r}: give a comma list of {', '.join(WEIGHTS)}")
    results: dict[str, Any] = {"args": {k: v for k, v in vars(args).items()}, "configs": points, "modes": {}}
    if args.reference:  # the packed default of commit 2a4a88a, run just before on this machine
        results["reference"] = json.loads(Path(args.reference).read_text()).get("modes", {}).get("packed")
    for i, mode in enumerate(modes):
        left = args.budget - (time.time() - t0)
        weights = [WEIGHTS[m] for m in modes[i:]]
        share = left * weights[0] / sum(weights)
        if share < 60:
            results["modes"][mode] = {"mode": mode, "skipped": f"time budget: {left:.0f}s left of --budget {args.budget:.0f}"}
            print(f"{mode}: skipped, {left:.0f}s left", flush=True)
            continue
        print(f"{mode}: up to {share:.0f}s", flush=True)
        results["modes"][mode] = run_mode(mode, args, work, model, points, share, out)
        results["summary"] = summary(results)
        out.write_text(json.dumps(with_provenance(results), indent=2))  # a timeout later keeps what finished
        r = results["modes"][mode]
        print(json.dumps({k: r[k] for k in ("name", "wall_seconds", "returncode", "by_status", "makespan", "gpu")}), flush=True)
        if r["returncode"]:
            print(r["driver_log_tail"], flush=True)
    results["summary"] = summary(results)
    results["modes"] = {k: v for k, v in results["modes"].items()}
    out.write_text(json.dumps(with_provenance(results), indent=2))
    print_table({**results, "modes": {k: v for k, v in results["modes"].items() if "wall_seconds" in v}})


if __name__ == "__main__":
    main()
