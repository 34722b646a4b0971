"""How few trials does the search need? TPE+ASHA vs random search vs exhaustive grid (issue 6).

    python bench/search_efficiency.py --out bench/results-search-efficiency.json --plot bench/search-efficiency.png
    # only the real sweeps (grid and replays taken from --out; a few minutes per seed on 2 cores):
    python bench/search_efficiency.py --out bench/results-search-efficiency.json --reuse-grid --real-seeds 0,1,2

The demo task (tiny Gemma 3, CPU), one discrete space of 48 configurations
(6 learning rates x 2 ranks x 2 target presets x 2 batch pairs), 60 steps each, eval every 10,
2 trials at a time (search.max_concurrent).

1. The exhaustive grid runs for real (`run_sweep`, grid, no pruner): every configuration's
   eval-loss curve, and the grid's best final eval loss at 48 x 60 training steps.
2. TPE+ASHA and random search (and random+ASHA, for reference) at several budgets (trials) and
   seeds are replayed: the sweep's own study (sweep/engine/study.py: the start-up points, sampler,
   Optuna pruner and duplicate rule a sweep builds from the same space file; asha is Optuna's
   successive halving) proposes the trials, and each reports the recorded curve of its
   configuration instead of training it again, 2 in flight, one evaluation at a time in turn. A
   trial's training is deterministic for its configuration (fixed seed, data order, init and
   dropout masks), so the replay reports what training would; step 3 checks it.
3. Real TPE+ASHA sweeps (budget 16, seeds --real-seeds, default 0,1,2), each beside a fresh replay
   of the same seed: every real trial's reported losses must equal the grid's for the same
   configuration and step (training is deterministic), and the two are compared trial by trial.

What the replay does not reproduce: with 2 trials at a time, which trial the pruner stops at a rung
and what TPE proposes next depend on the order in which the running trials report; the replay takes
them in turn, a real sweep as its workers' steps come. So a real sweep and the replay of its seed
can try different configurations and spend different steps, and two real runs of one seed can
differ too; only single trials' curves are exact. The replays measure the sampler and pruner over
many seeds cheaply; the real sweeps show how far the real runs land from them.

The results of 2026-11-30 (bench/results-search-efficiency.json) came from the Ray Tune schedulers
and lone trials before one engine: their replays are not reused (each replay row says `via`), and a
reused grid of theirs is a landscape for the replays only (its curves are the lone trials', so real
sweeps' losses differ from it: a warning says so).

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
search: {{algorithm: grid, scheduler: {{type: none}}, seed: 0, max_concurrent: {in_flight}}}
space:
  learning_rate: [1.0e-4, 3.0e-4, 1.0e-3, 3.0e-3, 1.0e-2, 2.0e-2]
  lora_r: [8, 32]
  target_modules: [attention, all-linear]
  batch: {{pairs: [[2, 4], [8, 1]]}}
resources: {{cpus_per_trial: 1}}
tracking: {{results_dir: {results}}}
"""
IN_FLIGHT = 2  # trials at a time, in the replays and the real sweeps alike
VIA = "sweep.engine.study"  # what replays a row: the Tune replays of the earlier results are not reused
GRID_TRAINER = "one engine (cohort workers)"  # what trained the grid's curves
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
            "wall_seconds": time.perf_counter() - started, "trials": len(curves), "trainer": GRID_TRAINER}  # fmt: skip


def run_replay(space_file: Path, method: str, budget: int, seed: int, curves: dict, workdir: Path, detail: bool = False) -> dict[str, Any]:
    """One replayed sweep: the sweep's own study (sweep.engine.study: its start-up points, sampler,
    pruner and duplicate rule, built from the space file as a sweep builds them) proposes `budget`
    trials, IN_FLIGHT at a time; each reports its recorded curve one evaluation at a time, in turn,
    and stops where the pruner says."""
    from core.contract import TrialStatus
    from sweep.config import load_config
    from sweep.engine.study import Spent, Study, create_study

    cfg = load_config(space_file, METHODS[method] + [f"search.seed={seed}", f"search.num_trials={budget}", f"name=replay-{method.replace('+', '-')}-{budget}-{seed}"])
    storage = f"sqlite:///{tempfile.mkdtemp(dir=workdir)}/optuna.db"
    create_study(cfg, storage, cfg.name)
    study = Study(cfg, storage, cfg.name)
    running: list[list[Any]] = []  # [proposal, curve, index of its next report]
    asked, steps, finals, trials = 0, 0, [], []
    while True:
        while asked < budget and len(running) < IN_FLIGHT:
            try:
                proposal = study.propose()
            except Spent:  # every proposal repeats a configuration that ran: the space is spent
                asked = budget
                break
            asked += 1
            running.append([proposal, curves[key(proposal.hyper)], 0])
        if not running:
            break
        for item in list(running):
            proposal, curve, i = item
            step, loss = curve[i]
            last = i == len(curve) - 1
            pruned = study.report(proposal.number, [(step, loss)], running=not last)
            if last or pruned:
                study.end(proposal.number, TrialStatus.COMPLETED if last else TrialStatus.PRUNED, [loss] if last else None)
                steps += int(step)
                finals += [loss] if last else []
                trials.append([key(proposal.hyper), int(step)])
                running.remove(item)
            else:
                item[2] = i + 1
    row = {"method": method, "budget": budget, "seed": seed, "steps": steps, "best": min(finals) if finals else None, "completed": len(finals), "via": VIA}
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
    space_file.write_text(SPACE.format(name="grid", demo=ROOT / "search_spaces" / "data" / "demo", results=work / "sweeps", in_flight=IN_FLIGHT))
    out = Path(args.out)
    results: dict[str, Any] = json.loads(out.read_text()) if args.reuse_grid and out.exists() else {}
    if "grid" not in results:
        results["grid"] = run_grid(space_file)
        out.write_text(json.dumps(with_provenance(results), indent=2))
    grid = results["grid"]
    if grid.get("trainer") != GRID_TRAINER:
        print("warning: the grid's curves were trained before one engine (lone trials): the replays use them as a landscape, "
              "but real sweeps' losses will not match them (their mismatches say so); run without --reuse-grid for a grid of today's training", flush=True)  # fmt: skip
    print(f"grid: best {grid['best']:.4f} ({grid['best_config']}), {grid['steps']} steps, {grid['wall_seconds']:.0f}s", flush=True)
    results.setdefault("replays", [])
    results["replays"] = [r for r in results["replays"] if r.get("via") == VIA]  # the Tune replays before one engine are not reused
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
    results["real_sweeps"] = [r for r in results["real_sweeps"] if r.get("replay", {}).get("via") == VIA]  # likewise
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
