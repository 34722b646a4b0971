"""How few trials does the search need? TPE+ASHA vs random search vs exhaustive grid (issue 6).

    python bench/search_efficiency.py --out bench/results-search-efficiency.json --plot bench/search-efficiency.png
    # only the real sweeps (grid and replays taken from --out; ~4 min per seed on 2 cores):
    python bench/search_efficiency.py --out bench/results-search-efficiency.json --reuse-grid --real-seeds 0,1,2

The demo task (tiny Gemma 3, CPU), one discrete space of 48 configurations
(6 learning rates x 2 ranks x 2 target presets x 2 batch pairs), 60 steps each, eval every 10.

1. The exhaustive grid runs for real (`run_sweep`, grid, no scheduler): every configuration's
   eval-loss curve, and the grid's best final eval loss at 48 x 60 training steps.
2. TPE+ASHA and random search (and random+ASHA, for reference) at several budgets (trials) and
   seeds run through the real machinery (Ray Tune, this project's Optuna searcher and ASHA
   scheduler), with a trainable that replays the recorded curve of whatever configuration it is
   given instead of training it again. A trial's training is deterministic for its configuration
   (fixed seed, data order and init), so the replay reports what training would; step 3 checks it.
3. Real TPE+ASHA sweeps (budget 16, seeds --real-seeds, default 0,1,2), each beside a fresh replay
   of the same seed: every real trial's reported losses must equal the grid's for the same
   configuration and step (training is deterministic), and the two are compared trial by trial.

What the replay does not reproduce: with 2 trials at a time, which trial ASHA stops at a rung and what
TPE suggests next depend on the order in which the two running trials report, and that order comes
from their wall-clock durations (real training vs the replay's fixed 0.02 s per report). So a real
sweep and the replay of its seed can try different configurations and spend different steps (seed 0
on 2026-11-29: 840 real steps vs 800 replayed; the same real sweep on 2026-11-30: 800, the replay's
trials exactly), and two real runs of one seed can differ too; only single trials' curves are exact. The replays
measure the sampler and scheduler over many seeds cheaply; the real sweeps show how far the real
runs land from them.

Reported per method and budget: best completed eval loss (median over seeds), training steps
spent (sum of the steps each trial ran), and how many seeds came within 2% of the grid's best.
Target: TPE+ASHA within 2% of the grid's best with <= 30% of the grid's steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from provenance import with_provenance  # noqa: E402

SPACE = """\
name: {name}
model: {{id: tiny-gemma3}}
data: {{train: {demo}/train.jsonl, eval: {demo}/eval.jsonl, max_seq_len: 256}}
train: {{max_steps: 60, eval_every: 10, log_every: 10, warmup_ratio: 0.05}}
search: {{algorithm: grid, scheduler: {{type: none}}, seed: 0}}
space:
  learning_rate: [1.0e-4, 3.0e-4, 1.0e-3, 3.0e-3, 1.0e-2, 2.0e-2]
  lora_r: [8, 32]
  target_modules: [attention, all-linear]
  batch: {{pairs: [[2, 4], [8, 1]]}}
resources: {{cpus_per_trial: 1}}
tracking: {{results_dir: {results}}}
"""
METHODS = {
    "tpe+asha": ["search.algorithm=tpe", "search.scheduler.type=asha", "search.scheduler.grace_period=20", "search.scheduler.reduction_factor=3"],
    "random": ["search.algorithm=random", "search.scheduler.type=none"],
    "random+asha": ["search.algorithm=random", "search.scheduler.type=asha", "search.scheduler.grace_period=20", "search.scheduler.reduction_factor=3"],
}


def key(config: dict) -> str:
    t = config["target_modules"]
    b = config["batch"]
    return f"lr={config['learning_rate']:g} r={config['lora_r']} t={t if isinstance(t, str) else '+'.join(t)} b={b[0]}x{b[1]}"


def run_grid(space_file: Path) -> dict[str, Any]:
    from mlflow import MlflowClient

    from sweep.config import load_config
    from sweep.engine.sweep import run_sweep

    cfg = load_config(space_file)
    started = time.perf_counter()
    result = run_sweep(cfg, log=lambda s: None)
    client = MlflowClient(cfg.mlflow_uri)
    curves = {}
    for row in result.trials:
        history = client.get_metric_history(row["run_id"], "eval_loss")
        curves[key(row["config"])] = sorted((m.step, m.value) for m in history)
    finals = {k: c[-1][1] for k, c in curves.items()}
    return {"curves": curves, "best": min(finals.values()), "best_config": min(finals, key=finals.get), "steps": 60 * len(curves),
            "wall_seconds": time.perf_counter() - started, "trials": len(curves)}  # fmt: skip


def replay_trial(config: dict, curves: dict) -> None:
    import time as _time

    from ray import tune

    curve = curves[key(config)]
    for step, loss in curve:
        _time.sleep(0.02)  # let concurrent trials interleave their reports as real ones do
        tune.report({"step": step, "eval_loss": loss, "trial_status": "completed" if step == curve[-1][0] else "running"})


def run_replay(space_file: Path, method: str, budget: int, seed: int, curves: dict, workdir: Path, detail: bool = False) -> dict[str, Any]:
    from ray import tune

    from sweep.config import load_config
    from sweep.schedulers import make_scheduler
    from sweep.engine.study import SweepSearch
    from sweep.trials import Ledger

    cfg = load_config(space_file, METHODS[method] + [f"search.seed={seed}", f"search.num_trials={budget}", f"name=replay-{method.replace('+', '-')}-{budget}-{seed}"])
    ledger = Ledger()
    folder = Path(tempfile.mkdtemp(dir=workdir))
    search = SweepSearch(cfg, f"sqlite:///{folder}/optuna.db", ledger)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(replay_trial, curves=curves), {"cpu": 1}),
        tune_config=tune.TuneConfig(search_alg=search, scheduler=make_scheduler(cfg, ledger), num_samples=budget, max_concurrent_trials=2),
        run_config=tune.RunConfig(name="replay", storage_path=str(folder), verbose=0),
    )
    grid = tuner.fit()
    steps, finals, trials = 0, [], []
    for r in grid:
        last = r.metrics or {}
        steps += int(last.get("step", 0))
        if last.get("trial_status") == "completed":
            finals.append(last["eval_loss"])
        if r.config:
            trials.append([key(r.config), int(last.get("step", 0))])
    row = {"method": method, "budget": budget, "seed": seed, "steps": steps, "best": min(finals) if finals else None, "completed": len(finals)}
    return {**row, "trials": sorted(trials)} if detail else row


def real_check(space_file: Path, curves: dict, seed: int = 0) -> dict[str, Any]:
    """One real TPE+ASHA sweep (16 trials, trained for real); each trial's last loss checked against the grid."""
    from sweep.config import load_config
    from sweep.engine.sweep import run_sweep

    cfg = load_config(space_file, METHODS["tpe+asha"] + [f"search.seed={seed}", "search.num_trials=16", f"name=real-tpe-asha-{seed}"])
    started = time.perf_counter()
    result = run_sweep(cfg, log=lambda s: None)
    mismatches, steps, trials = [], 0, []
    for row in result.trials:
        steps += int(row["step"] or 0)
        trials.append([key(row["config"]), int(row["step"] or 0)])
        expected = dict(curves[key(row["config"])]).get(row["step"])
        if expected is None or row["eval_loss"] is None or abs(expected - row["eval_loss"]) > 1e-6:
            mismatches.append({"config": key(row["config"]), "step": row["step"], "real": row["eval_loss"], "grid": expected})
    completed = [r["eval_loss"] for r in result.trials if r["status"] == "completed"]
    return {"seed": seed, "steps": steps, "best": min(completed) if completed else None, "trials": len(result.trials), "completed": len(completed),
            "mismatches": mismatches, "wall_seconds": round(time.perf_counter() - started, 1), "configs": sorted(trials)}  # fmt: skip


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    grid = results["grid"]
    for method, colour in (("tpe+asha", "tab:blue"), ("random", "tab:orange"), ("random+asha", "tab:green")):
        rows = [r for r in results["replays"] if r["method"] == method and r["best"] is not None]
        budgets = sorted({r["budget"] for r in rows})
        xs = [statistics.median(r["steps"] for r in rows if r["budget"] == b) for b in budgets]
        ys = [statistics.median(r["best"] for r in rows if r["budget"] == b) for b in budgets]
        lo = [min(r["best"] for r in rows if r["budget"] == b) for b in budgets]
        hi = [max(r["best"] for r in rows if r["budget"] == b) for b in budgets]
        ax.plot(xs, ys, "o-", color=colour, label=f"{method} (median of seeds; trials {budgets[0]}..{budgets[-1]})")
        ax.fill_between(xs, lo, hi, color=colour, alpha=0.15)
    ax.axhline(grid["best"], color="black", linestyle="--", label=f"grid best ({grid['trials']} trials, {grid['steps']} steps)")
    ax.axhline(grid["best"] * 1.02, color="grey", linestyle=":", label="grid best + 2%")
    ax.axvline(0.3 * grid["steps"], color="red", linestyle=":", label="30% of the grid's steps")
    ax.set_xlabel("training steps spent (all trials)")
    ax.set_ylabel("best completed eval loss")
    ax.set_title("Demo task: search efficiency (tiny Gemma 3, CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    import ray

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot", default=None, help="write the plot here (default: no plot)")
    ap.add_argument("--real-seeds", default="0,1,2", help="seeds of the real TPE+ASHA sweeps (16 trials each), each beside its replay")
    ap.add_argument("--budgets", default="6,10,16,24")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--reuse-grid", action="store_true", help="take the grid's curves and the replays done so far from --out")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="search-efficiency-"))
    work.mkdir(parents=True, exist_ok=True)
    space_file = work / "space.yaml"
    space_file.write_text(SPACE.format(name="grid", demo=ROOT / "search_spaces" / "data" / "demo", results=work / "sweeps"))
    out = Path(args.out)
    results: dict[str, Any] = json.loads(out.read_text()) if args.reuse_grid and out.exists() else {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    if "grid" not in results:
        results["grid"] = run_grid(space_file)
        out.write_text(json.dumps(with_provenance(results), indent=2))
    grid = results["grid"]
    print(f"grid: best {grid['best']:.4f} ({grid['best_config']}), {grid['steps']} steps, {grid['wall_seconds']:.0f}s", flush=True)
    results.setdefault("replays", [])
    done = {(r["method"], r["budget"], r["seed"]) for r in results["replays"]}  # --reuse-grid: an interrupted run goes on
    for method in METHODS:
        for budget in (int(b) for b in args.budgets.split(",")):
            for seed in range(args.seeds):
                if (method, budget, seed) in done:
                    continue
                row = run_replay(space_file, method, budget, seed, grid["curves"], work)
                results["replays"].append(row)
                print(json.dumps(row), flush=True)
                out.write_text(json.dumps(with_provenance(results), indent=2))
    results.setdefault("real_sweeps", [])
    real_done = {r["seed"] for r in results["real_sweeps"]}
    for seed in (int(s) for s in args.real_seeds.split(",") if s != ""):
        if seed in real_done:
            continue
        real = real_check(space_file, grid["curves"], seed)
        replay = run_replay(space_file, "tpe+asha", 16, seed, grid["curves"], work, detail=True)
        real["replay"] = replay
        real["same_configs_as_replay"] = real["configs"] == replay["trials"]
        results["real_sweeps"].append(real)
        print("real sweep:", json.dumps({k: v for k, v in real.items() if k not in ("configs", "replay")}), "replay:", replay["steps"], replay["best"], flush=True)
        out.write_text(json.dumps(with_provenance(results), indent=2))
    if args.plot:
        plot(results, Path(args.plot))
    print(f"\n{'method':<12} {'trials':>6} {'steps (median)':>14} {'% of grid':>9} {'best (median)':>13} {'within 2%':>9}")
    for method in METHODS:
        for budget in (int(b) for b in args.budgets.split(",")):
            rows = [r for r in results["replays"] if r["method"] == method and r["budget"] == budget and r["best"] is not None]
            steps = statistics.median(r["steps"] for r in rows)
            best = statistics.median(r["best"] for r in rows)
            within = sum(r["best"] <= 1.02 * grid["best"] for r in rows)
            print(f"{method:<12} {budget:>6} {steps:>14.0f} {steps / grid['steps']:>9.0%} {best:>13.4f} {within:>6}/{len(rows)}")


if __name__ == "__main__":
    main()
