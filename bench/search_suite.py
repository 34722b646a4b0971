"""Search on small budgets, measured on real training (issue 18): which Optuna sampler and pruner
find the best configuration on (nearly) every seed, on tasks and spaces the search was not tuned on.

    python bench/search_suite.py --out bench/results-search-suite.json --plot bench/figures/search-suite.png
    python bench/search_suite.py --tasks demo --seeds 3 --out /tmp/s.json          # a quick look
    python bench/search_suite.py --dry-run --out /tmp/s.json                       # CPU smoke test (no training; minutes)

Tasks (tiny Gemma 3 on the CPU, 45 optimizer steps, eval every 5, sequence length 128):
- demo: the demo data; 48 configurations: learning rate (6) x rank (2) x targets (2) x batch (2)
- facts: made-up facts, one-sentence answers (bench/search_tasks.py); 48: learning rate (4) x
  rank (3) x alpha ratio (2) x dropout (2)
- spelling: longer answers (spelled words, counted lists); 48: learning rate (4) x targets (3) x
  batch (2) x rank (2)
Each discrete space is first trained exhaustively (the grid): its best final eval loss is the
reference a search is scored against, and `gap` = best found / grid best - 1.

A search is Optuna's ask/tell with the sampler and pruner under test (the objects `search.algorithm`
and `search.scheduler` build for a sweep: a sweep drives Optuna exactly so, sweep/engine/study.py).
Its trials train for real, each as a sweep's worker trains a trial (a cohort of one:
bench/cohort_of_one.py), with results memoised by configuration: training is deterministic for a
configuration (seed, data order, initialisation, dropout masks; checked by `--check`, which trains
a few configurations again), so a search that proposes a configuration trained before gets the
losses that training would give. The memo (--curves) names the trainer that filled it: the curves
of the lone-trial loop before one engine (bench/search-suite-curves.json, behind the suite's results
of 2026-11-30 and 2026-12-01) differ from a cohort of one's (dropout masks are drawn per member
now), and are never mixed with them. With N trials in flight (the diversity check: 1 and 4), N are
asked before any is told (as N parallel trials would be) and advance one eval at a time in turn. A
search spends at most its budget of training steps (a trial is cut when the budget runs out: it
counts as not completed); budgets are fractions of the grid's steps (default 20% and 30%).

Samplers (what Optuna ships): tpe (Optuna's defaults: 10 random start-up trials), tpe-mv
(group: multivariate is always on in Optuna 5, where the flag is unused), tpe-sobol (10 scrambled
Sobol start-up trials enqueued, then TPE: the sweep's default), tpe-small
(multivariate, group, start-up trials scaled to the budget, constant liar), gp (GPSampler), qmc
(Sobol), cmaes (with margin, for the discrete spaces) and random. Pruners: asha
(SuccessiveHalvingPruner: min resource 5 steps, reduction factor 3) and hyperband (HyperbandPruner,
5 to 45 steps, factor 3).

Reported per task, method (sampler+pruner) and budget, over the seeds: how many seeds came within
2% of the grid's best, the median and the worst gap, and the steps spent. Target (issue 18): >= 9 of
10 seeds within 2% at <= 20% of the grid's steps, on every task.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
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

# what trained the memo's curves: a memo filled by anything else is refused (its curves differ)
TRAINER = "cohort of one (trainable/cohort_worker.run_worker, capacity 1)"
STEPS, EVAL_EVERY, SEQ = 45, 5, 128
POINTS = STEPS // EVAL_EVERY  # evals in a full curve
TASKS: dict[str, dict[str, list[Any]]] = {
    "demo": {"learning_rate": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 2e-2], "lora_r": [8, 32], "target_modules": ["attention", "all-linear"], "batch": [[2, 4], [8, 1]]},
    "facts": {"learning_rate": [3e-4, 1e-3, 3e-3, 1e-2], "lora_r": [4, 16, 64], "lora_alpha_ratio": [1, 2], "lora_dropout": [0.0, 0.1]},
    "spelling": {"learning_rate": [3e-4, 1e-3, 3e-3, 1e-2], "target_modules": ["attention", "mlp", "all-linear"], "batch": [[2, 4], [8, 1]], "lora_r": [8, 32]},
}  # fmt: skip
# Continuous spaces (ranges as (kind, low, high)), scored against the best of --dense random points
CONTINUOUS: dict[str, dict[str, Any]] = {
    "demo-continuous": {"learning_rate": ("log", 1e-4, 3e-2), "lora_dropout": ("float", 0.0, 0.2), "warmup_ratio": ("float", 0.0, 0.3), "lora_r": [8, 32]},
}  # fmt: skip
TASK_DATA = {"demo-continuous": "demo"}  # a continuous space's data
SAMPLERS = ("tpe", "tpe-small", "gp", "qmc", "cmaes", "random")
PRUNERS = ("asha", "hyperband")
# tpe-sobol: this many Sobol start-up trials (spread evenly over every dimension together, where
# random start-up trials can leave a categorical value with only bad partners), then TPE
SOBOL_STARTUP = 10
WITHIN = 0.02


def config_key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


def train_section(config: dict[str, Any]) -> Any:
    from sweep.config import TrainSection

    values = dict(config)
    ratio = values.pop("lora_alpha_ratio", 2)
    values["lora_alpha"] = values.get("lora_r", 16) * ratio
    if "batch" in values:
        values["batch"] = tuple(values["batch"])
    return TrainSection(**{"max_steps": STEPS, "eval_every": EVAL_EVERY, "log_every": STEPS, "warmup_ratio": 0.05, **values})


class Curves:
    """Each configuration's eval-loss curve [(step, loss), ...], trained once (a cohort of one)
    and kept in a JSON file, {"trainer": TRAINER, "curves": {task: {config: curve}}}: training is
    deterministic per configuration."""

    def __init__(self, path: Path, data: dict[str, Path], workdir: Path, dry_run: bool = False):
        self.path, self.data, self.workdir, self.dry_run = path, data, workdir, dry_run
        self.cache: dict[str, dict[str, list[list[float]]]] = self.load(path)
        self.prepared: dict[str, str] = {}
        self.trained = 0
        self.trained_steps = 0
        self.prefix_mismatches = 0  # partial curves that the full run did not reproduce (should stay 0)

    @staticmethod
    def load(path: Path) -> dict[str, dict[str, list[list[float]]]]:
        if not path.exists():
            return {}
        memo = json.loads(path.read_text())
        if memo.get("trainer") != TRAINER:
            raise SystemExit(f"--curves {path}: its curves were trained by {memo.get('trainer', 'the lone-trial loop before one engine')}, "
                             f"not by a {TRAINER}; their losses differ, so they cannot stand in for training: give --curves a new file")  # fmt: skip
        return memo["curves"]

    def save(self) -> None:
        self.path.write_text(json.dumps({"trainer": TRAINER, "curves": self.cache}))

    def stats(self) -> dict[str, int]:
        return {"trained": self.trained, "trained_steps": self.trained_steps, "prefix_mismatches": self.prefix_mismatches}

    def get(self, task: str, config: dict[str, Any], points: int = POINTS) -> list[list[float]]:
        """The curve's first `points` evals at least (all POINTS by default). A configuration first
        asked for one point trains only to its first eval (most trials of a pruned search end
        there: a ninth of the steps); asked for more later, it trains in full, and the prefix must
        equal what was kept (training is deterministic; the schedule is that of the full run)."""
        key = config_key(config)
        curves = self.cache.setdefault(task, {})
        have = curves.get(key, [])
        if len(have) < points:
            curve = self.train(task, config, 1 if points == 1 else POINTS)
            if have and max(abs(a[1] - b[1]) for a, b in zip(have, curve)) > 1e-6:
                self.prefix_mismatches += 1
                print(f"warning: {task} {key}: the partial curve {have} differs from the full run's {curve[: len(have)]}", flush=True)
            curves[key] = curve
            self.trained += 1
            self.trained_steps += curve[-1][0]
            self.save()
        return curves[key]

    def train(self, task: str, config: dict[str, Any], points: int = POINTS) -> list[list[float]]:
        if self.dry_run:  # a smooth stand-in landscape: seconds, for the smoke test only
            lr = math.log10(config["learning_rate"])
            floor = 2.0 + 0.3 * (lr + 2.5) ** 2 + 0.01 * config.get("lora_r", 16) / 8
            return [[s, floor + 3.0 * math.exp(-s / 12)] for s in range(EVAL_EVERY, STEPS + 1, EVAL_EVERY)][:points]
        from cohort_of_one import train_one
        from trainable.cohort_worker import BaseSpec

        base = BaseSpec(model_id="tiny-gemma3", revision=None, data_dir=self.prepare(task), train=train_section(config), max_seq_len=SEQ, threads=1)
        run = train_one(base, self.workdir, stop_after=points)  # after `points` evals: the full run's schedule, cut short
        if run.end.get("trial_status") not in ("completed", "pruned"):
            # a curve cut short would stand in for this configuration in every later search: none is kept
            raise RuntimeError(f"{task} {config_key(config)}: the trial ended {run.end.get('trial_status')} ({run.end.get('error', 'no error given')}); "
                               "no curve is memoised for it: fix the cause, or take the configuration out of the task's space, and run again")  # fmt: skip
        return [[r["step"], r["eval_loss"]] for r in run.reports]

    def prepare(self, task: str) -> str:
        if task not in self.prepared:
            from sweep.config import DataSection
            from trainable.data import prepare
            from trainable.model import load_tokenizer

            folder = self.data[task]
            section = DataSection(train=str(folder / "train.jsonl"), eval=str(folder / "eval.jsonl"), max_seq_len=SEQ)
            out = self.workdir / f"prepared-{task}"
            self.prepared[task] = str(prepare(section, load_tokenizer("tiny-gemma3"), out, seed=0, log=lambda s: None).folder)
        return self.prepared[task]


def grid(task: str, curves: Curves) -> dict[str, Any]:
    space = TASKS[task]
    finals = {}
    for values in itertools.product(*space.values()):
        config = dict(zip(space, values))
        finals[config_key(config)] = curves.get(task, config)[-1][1]
    best = min(finals, key=finals.get)
    return {"configs": len(finals), "steps": STEPS * len(finals), "best": finals[best], "best_config": json.loads(best)}


def make_sampler(name: str, seed: int, budget_trials: int, in_flight: int) -> Any:
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name.startswith("tpe-start"):  # Optuna's TPE with N random start-up trials instead of 10 (tpe-start3, ...)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=int(name.removeprefix("tpe-start")))
    if name == "tpe-mv":  # rank and learning rate modelled together (multivariate, group), Optuna's 10 start-up trials
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=10, constant_liar=in_flight > 1)
    if name == "tpe-sobol":  # the sweep's default: search() enqueues SOBOL_STARTUP Sobol points first (sweep.engine.study.sobol_points)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=SOBOL_STARTUP, constant_liar=in_flight > 1)
    if name == "tpe-multi10":  # multivariate with Optuna's 10 start-up trials
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=10, constant_liar=in_flight > 1)
    if name == "tpe-multi":  # multivariate (today's sweep default), start-up scaled to the budget
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=max(3, budget_trials // 4), constant_liar=in_flight > 1)
    if name == "tpe-small":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=max(3, budget_trials // 4), constant_liar=in_flight > 1)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=max(3, budget_trials // 4), deterministic_objective=True)
    if name == "qmc":
        return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed, warn_independent_sampling=False)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, with_margin=True, n_startup_trials=max(3, budget_trials // 4), warn_independent_sampling=False)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(name)


def make_pruner(name: str) -> Any:
    import optuna

    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=EVAL_EVERY, reduction_factor=3)
    if name == "asha-g15":  # the first rung at a third of the training, not a ninth
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=3 * EVAL_EVERY, reduction_factor=3)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=EVAL_EVERY, max_resource=STEPS, reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=3 * EVAL_EVERY)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(name)


def suggest(trial: Any, space: dict[str, Any]) -> dict[str, Any]:
    """Each discrete dimension as a categorical over its values (lists as their JSON text), as the
    sweep's discrete dimensions are; a (kind, low, high) range as a float (log or linear), rounded
    to 4 significant digits (so that a configuration's key is stable)."""
    config = {}
    for name, values in space.items():
        if isinstance(values, tuple):
            kind, low, high = values
            config[name] = float(f"{trial.suggest_float(name, low, high, log=kind == 'log'):.4g}")
            continue
        choices = [json.dumps(v) if isinstance(v, list) else v for v in values]
        value = trial.suggest_categorical(name, choices)
        config[name] = json.loads(value) if isinstance(value, str) and value.startswith("[") else value
    return config


def dense_reference(task: str, points: int, curves: Curves) -> dict[str, Any]:
    """A continuous space's reference: the best final loss of `points` seeded random configurations."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=12345))
    finals = {}
    for _ in range(points):
        trial = study.ask()
        config = suggest(trial, CONTINUOUS[task])
        finals[config_key(config)] = curves.get(task, config)[-1][1]
        study.tell(trial, finals[config_key(config)])
    best = min(finals, key=finals.get)
    return {"configs": points, "steps": STEPS * points, "best": finals[best], "best_config": json.loads(best), "dense_random": True}


def search(task: str, sampler: str, pruner: str, budget_steps: int, seed: int, curves: Curves, in_flight: int = 1, dedupe: bool = False) -> dict[str, Any]:
    """One search: ask/tell until `budget_steps` training steps are spent. Returns its best
    completed final loss, the steps spent and the configurations it tried, in order. `dedupe`:
    as a sweep does since 2026-12-01 (sweep.engine.study.twin_of), a proposal equal to a trial that ran or
    runs is closed as a duplicate and costs no steps; random proposals after 3 in a row; after 20
    in a row the space is spent and the search ends."""
    import optuna

    from sweep.engine.study import RANDOM_AFTER_DUPLICATES, SPENT_AFTER_DUPLICATES, RandomProposal, close_duplicate, twin_of

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="minimize", sampler=make_sampler(sampler, seed, budget_steps // STEPS, in_flight), pruner=make_pruner(pruner))
    space = TASKS.get(task) or CONTINUOUS[task]
    if sampler == "tpe-sobol":  # exactly as a sweep starts its study (sweep.engine.study.startup_points)
        from sweep.engine.study import sobol_points

        for point in sobol_points(lambda trial: suggest(trial, space), SOBOL_STARTUP, seed):
            study.enqueue_trial(point)
    spent, best, tried, duplicates, in_a_row = 0, math.inf, [], 0, 0
    running: list[list[Any]] = []  # [trial, config, curve, index of its next report]
    exhausted = False
    while True:
        while not exhausted and len(running) < in_flight and spent + EVAL_EVERY * (len(running) + 1) <= budget_steps:
            with RandomProposal(study, dedupe and in_a_row >= RANDOM_AFTER_DUPLICATES, seed):
                trial = study.ask()
                config = suggest(trial, space)
            twin = twin_of(study, trial) if dedupe else None
            if twin is not None:
                close_duplicate(study, trial, twin)
                duplicates, in_a_row = duplicates + 1, in_a_row + 1
                exhausted = in_a_row >= SPENT_AFTER_DUPLICATES
                continue
            in_a_row = 0
            tried.append(config)
            running.append([trial, config, None, 0])
        if not running:
            break
        for item in list(running):
            trial, config, _, i = item
            curve = curves.get(task, config, i + 1)  # trained only as far as the search reads it
            step, loss = curve[i]
            previous = curve[i - 1][0] if i else 0
            if spent + step - previous > budget_steps:  # out of budget: cut where it is
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                running.remove(item)
                exhausted = True
                continue
            spent += step - previous
            trial.report(loss, int(step))
            if i == POINTS - 1:
                study.tell(trial, loss)
                best = min(best, loss)
                running.remove(item)
            elif trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                running.remove(item)
            else:
                item[3] = i + 1
        if spent + EVAL_EVERY > budget_steps:
            exhausted = True
    return {"best": best if math.isfinite(best) else None, "steps": spent, "trials": len(tried), "distinct": len({config_key(c) for c in tried}),
            "duplicates_skipped": duplicates, "tried": [config_key(c) for c in tried]}  # fmt: skip


def summarise(rows: list[dict[str, Any]], reference: float) -> dict[str, Any]:
    gaps = [(r["best"] / reference - 1) if r["best"] is not None else math.inf for r in rows]
    finite = [g for g in gaps if math.isfinite(g)]
    return {"seeds": len(rows), "within": sum(g <= WITHIN for g in gaps), "median_gap": statistics.median(gaps) if finite else None,
            "worst_gap": max(gaps) if finite and len(finite) == len(gaps) else None, "median_steps": statistics.median(r["steps"] for r in rows),
            "median_trials": statistics.median(r["trials"] for r in rows)}  # fmt: skip


def diversity(task: str, sampler: str, pruner: str, budget_steps: int, seeds: int, curves: Curves) -> dict[str, Any]:
    """Item 4: distinct configurations among the first 12 a search tries, 1 vs 4 trials in flight."""
    out = {}
    for flight in (1, 4):
        counts = [len(set(search(task, sampler, pruner, budget_steps, seed, curves, flight)["tried"][:12])) for seed in range(seeds)]
        out[f"in_flight_{flight}"] = {"median_distinct_of_first_12": statistics.median(counts), "min": min(counts)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot", default=None, help="a PNG of gap vs method per task")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"of {', '.join([*TASKS, *CONTINUOUS])}")
    ap.add_argument("--samplers", default=",".join(SAMPLERS))
    ap.add_argument("--pruners", default=",".join(PRUNERS))
    ap.add_argument("--budgets", default="0.2,0.3", help="fractions of the grid's training steps")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--dense", type=int, default=96, help="random configurations a continuous space's reference trains")
    ap.add_argument("--curves", default=str(ROOT / "bench" / "search-suite-curves-cohort.json"), help="the memo of trained curves (kept between runs; a new file starts one)")
    ap.add_argument("--check", type=int, default=2, help="configurations trained again to check that training is deterministic")
    ap.add_argument("--dry-run", action="store_true", help="a stand-in loss landscape instead of training (smoke test)")
    ap.add_argument("--dedupe", action="store_true", help="a proposal that ran already costs nothing and another is drawn, as in a sweep (sweep.engine.study.twin_of)")
    args = ap.parse_args()

    from search_tasks import write

    workdir = Path(tempfile.mkdtemp(prefix="search-suite-"))
    data = {"demo": ROOT / "search_spaces" / "data" / "demo", **write(workdir / "data")}
    data.update({task: data[source] for task, source in TASK_DATA.items()})
    curves = Curves(Path(args.curves) if not args.dry_run else workdir / "curves.json", data, workdir, args.dry_run)
    tasks = [t for t in args.tasks.split(",") if t]
    results: dict[str, Any] = {"args": vars(args), "tasks": {}}
    started = time.perf_counter()
    for task in tasks:
        tick = time.perf_counter()
        reference = grid(task, curves) if task in TASKS else dense_reference(task, args.dense, curves)
        reference["seconds"] = round(time.perf_counter() - tick, 1)
        print(f"{task}: grid of {reference['configs']} best {reference['best']:.4f} ({reference['best_config']}), {reference['seconds']:.0f}s", flush=True)
        checks = []
        for config_text in sorted(curves.cache[task])[: args.check if not args.dry_run else 0]:
            config = json.loads(config_text)
            again = curves.train(task, config)
            checks.append({"config": config, "max_abs_diff": max(abs(a[1] - b[1]) for a, b in zip(again, curves.cache[task][config_text]))})
        rows: dict[str, Any] = {}
        grid_steps = reference["steps"] if task in TASKS else STEPS * 48  # continuous: the discrete grids' budget
        for fraction in (float(f) for f in args.budgets.split(",")):
            budget = int(grid_steps * fraction)
            for sampler, pruner in itertools.product(args.samplers.split(","), args.pruners.split(",")):
                runs = [search(task, sampler, pruner, budget, seed, curves, dedupe=args.dedupe) for seed in range(args.seeds)]
                summary = summarise(runs, reference["best"])
                rows[f"{sampler}+{pruner}@{fraction:g}"] = {**summary, "budget_steps": budget, "runs": [{k: v for k, v in r.items() if k != "tried"} for r in runs]}
                print(f"  {sampler + '+' + pruner:<20} {fraction:>4.0%}: {summary['within']}/{summary['seeds']} within 2%, median gap "
                      f"{summary['median_gap']:.2%}, worst {summary['worst_gap'] if summary['worst_gap'] is None else format(summary['worst_gap'], '.2%')}", flush=True)  # fmt: skip
                results["tasks"][task] = {"grid": reference, "determinism": checks, "methods": rows, "partial": True}  # a run cut short keeps what finished
                Path(args.out).write_text(json.dumps(with_provenance({**results, "curves": curves.stats()}), indent=2))
        budget = int(grid_steps * 0.2)
        results["tasks"][task] = {"grid": reference, "determinism": checks, "methods": rows,
                                  "diversity": diversity(task, "tpe-sobol", "asha", budget, min(args.seeds, 10), curves) if task in TASKS else None}  # fmt: skip
        Path(args.out).write_text(json.dumps(with_provenance(results), indent=2))
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["trained"] = curves.trained
    results["curves"] = curves.stats()
    Path(args.out).write_text(json.dumps(with_provenance(results), indent=2))
    if args.plot:
        plot(results, Path(args.plot))


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = results["tasks"][task]["methods"]
        names = sorted(rows)
        gaps = [[(r["best"] / results["tasks"][task]["grid"]["best"] - 1) * 100 if r["best"] else 100 for r in rows[n]["runs"]] for n in names]
        ax.boxplot(gaps, orientation="horizontal", tick_labels=names)
        ax.axvline(WITHIN * 100, color="red", linestyle="--", label="2%")
        ax.set_title(f"{task}: gap to the grid's best (%) per seed")
        ax.set_xlabel("gap (%)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
