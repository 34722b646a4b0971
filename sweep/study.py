"""The Optuna study behind a sweep: its sampler, its storage, and correct feedback from Ray Tune.

Ray's OptunaSearch reports intermediate values by Tune iteration and tells Optuna that a trial the
scheduler stopped early is COMPLETE or PRUNED depending on what the last result happened to hold.
SweepSearch reports by training step and derives the state from the same `outcome()` MLflow uses:
completed -> COMPLETE, pruned/stopped -> PRUNED (with its intermediate values), oom/nan/failed -> FAIL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from core.contract import ERROR, ESTIMATED_VRAM_GB, STATUS, STEP, TrialStatus
from core.request import Allocation, TrialRequest
from core.rules import tpe_startup_trials
from sweep.config import SweepConfig
from sweep.space import Space
from sweep.trials import Ledger, finite, missing_objectives, outcome


class DefineByRun:
    """Picklable define-by-run function (Tune pickles the searcher into its experiment state)."""

    def __init__(self, space: Space, fixed: dict[str, Any]):
        self.space = space
        self.fixed = fixed

    def __call__(self, trial: Any) -> dict[str, Any]:
        return self.space.sample(trial, self.fixed)


def make_sampler(cfg: SweepConfig, trials_before: int = 0) -> Any:
    """The sweep's sampler. A seeded sampler's random stream restarts with every driver, so a
    resumed one (`trials_before` trials in the study already) takes seed + trials_before: still
    reproducible, and it does not propose again the configurations the first driver drew."""
    import optuna

    search = cfg.search
    seed = None if search.seed is None else search.seed + trials_before
    if search.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if search.algorithm == "grid":
        return optuna.samplers.GridSampler(cfg.space.grid(), seed=seed)
    if search.algorithm == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=tpe_startup_trials(search.n_startup_trials, cfg.num_trials), multivariate=True, constant_liar=True
    )


def sobol_points(define: Callable[[Any], Any], n: int, seed: int | None) -> list[dict[str, Any]]:
    """`n` start-up configurations (Optuna study params): the first `n` trials of Optuna's
    QMCSampler (scrambled Sobol; its first point is random, as the sampler's own first trial is),
    drawn on a scratch in-memory study by `define` (a define-by-run space). Enqueued in the sweep's
    study before TPE's first trial, they are its start-up trials: on the search suite
    (bench/BENCH.md) they spread over every dimension together where random start-up trials can
    leave a categorical value with only bad partners, after which TPE never returns to it.

    A point may repeat an earlier one (several Sobol points fall on one configuration of a small
    discrete space): it stays in the list, and the sweep closes it as a duplicate when it comes up
    (`twin_of`). That happened to 7-19 of 300 points on the suite's 48-point spaces, fewer than
    random draws repeat (~28 expected); drawing other points in their place shifts the sequence
    off its balanced blocks, and measured, it did no better (spelling 26 of 30 seeds within 2%
    against 27)."""
    import warnings

    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in memory" for the scratch study
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed, warn_asynchronous_seeding=False, warn_independent_sampling=False)
            study = optuna.create_study(sampler=sampler)
            points: list[dict[str, Any]] = []
            for _ in range(n):
                trial = study.ask()
                define(trial)
                study.tell(trial, 0.0)
                points.append(dict(trial.params))
    finally:
        optuna.logging.set_verbosity(verbosity)  # the caller's, even when `define` raises
    return points


def startup_points(cfg: SweepConfig) -> list[dict[str, Any]]:
    """The points a new sweep's study starts with: the user's points_to_evaluate, then (TPE with
    search.startup: sobol) Sobol start-up points up to TPE's start-up count. A warm-started sweep
    gets none: the previous sweep's trials are its start-up."""
    points = [dict(p) for p in cfg.study_points]
    search = cfg.search
    if search.algorithm == "tpe" and search.startup == "sobol" and not search.warm_start:
        wanted = tpe_startup_trials(search.n_startup_trials, cfg.num_trials) - len(points)
        if wanted > 0:
            points += sobol_points(DefineByRun(cfg.space, cfg.fixed_hyperparams), wanted, search.seed)
    return points


def enqueue_startup(study: Any, cfg: SweepConfig) -> None:
    """Queue `startup_points` in a new sweep's study, the user's points_to_evaluate marked with
    their index (USER_POINT) so that `twin_of` lets a point the user listed twice run twice;
    Sobol start-up points are not marked: one that repeats a configuration is skipped as any
    proposal is."""
    users = len(cfg.study_points)
    for i, point in enumerate(startup_points(cfg)):
        study.enqueue_trial(point, user_attrs={USER_POINT: i} if i < users else None)


def create_study(cfg: SweepConfig, storage: str) -> None:
    """The sweep's study, still without trials, made before sweep.json names it: a driver stopped
    while it sets up (Ctrl-C, SIGTERM, kill -9) leaves a folder that `resume` starts from, never
    one whose study looks deleted. SweepSearch loads it (OptunaSearch's load_if_exists); the
    same call with the same directions, so either may come first."""
    import optuna

    directions = ["minimize" if mode == "min" else "maximize" for _, mode in cfg.objectives]
    optuna.create_study(study_name=cfg.name, storage=optuna.storages.RDBStorage(storage), directions=directions, load_if_exists=True)


def name_objectives(study: Any, names: list[str]) -> None:
    """Name the study's objectives (eval_loss, peak_vram_gb) so that optuna-dashboard and the
    study's dataframes say them instead of "Objective 0". Idempotent: a resumed sweep names again."""
    import warnings

    import optuna

    if study.metric_names == names:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # experimental since Optuna 3.2
        study.set_metric_names(names)


def trials_in(storage: Any, study_name: str) -> int:
    """How many trials the study holds already (0 for a new study)."""
    try:
        return len(storage.get_all_trials(storage.get_study_id_from_name(study_name), deepcopy=False))
    except KeyError:
        return 0


def tell(study: Any, trial: Any, value: float | None = None, state: Any = None) -> None:
    """study.tell that tolerates GridSampler's end-of-grid stop.

    GridSampler calls study.stop() once every grid point was asked, which raises outside
    study.optimize(); the trial's state is stored before that, so there is nothing to undo.
    """
    try:
        study.tell(trial, value, state=state)
    except RuntimeError as exc:
        if "Study.stop" not in str(exc):
            raise


MAX_INFEASIBLE_IN_A_ROW = 200
# A sampler proposes what already ran more often than one would think (one trial in four on the
# search suite's 48-point spaces, more as a discrete space runs out): after this many repeats in a
# row, random proposals; after SPENT_AFTER_DUPLICATES (random ones included) the space is spent.
RANDOM_AFTER_DUPLICATES = 3
SPENT_AFTER_DUPLICATES = 20
NOT_RUN = (TrialStatus.INFEASIBLE, TrialStatus.LOST, TrialStatus.DUPLICATE)
# user attr of a trial enqueued from search.points_to_evaluate: its index in that list
USER_POINT = "point_to_evaluate"


def twin_of(study: Any, trial: Any) -> Any:
    """An earlier trial of this sweep (Optuna's FrozenTrial) with exactly `trial`'s parameters
    that ran or runs, whatever its outcome (the same configuration trains the same way), or None.
    Entries that never ran (infeasible, lost, duplicates) and a warm start's trials do not count.
    None for one of the user's own points_to_evaluate (USER_POINT): a point listed twice is
    meant to run twice (e.g. to see the noise between runs). It is still a twin that later
    proposals are matched against."""
    if USER_POINT in trial.user_attrs:
        return None
    params = trial.params
    for other in study.get_trials(deepcopy=False):
        if other.number == trial.number or not other.params or "warm_start_from" in other.user_attrs:
            continue
        if other.user_attrs.get(STATUS) not in NOT_RUN and other.params == params:
            return other
    return None


def close_duplicate(study: Any, trial: Any, twin: Any) -> None:
    """A proposal equal to `twin`, never launched (trial_status=duplicate, duplicate_of). A
    completed twin's result is known: told again as this trial's (COMPLETE, its values), so the
    sampler learns what a run would have taught it at no cost (on the search suite at 20% of the
    grid's steps, TPE within 2% of the best on 59, 60, 60 of 60 seeds per task, against 53, 49, 58
    when duplicates were only closed and 46, 57, 56 when they ran: bench/BENCH.md). Any other
    twin's result is unknown or no result (running, pruned, failed): FAIL, which samplers skip.
    Reports and `best` read MLflow's runs, where a duplicate has none; report.own_study and a
    warm start leave duplicates out."""
    import optuna

    trial.set_user_attr(STATUS, str(TrialStatus.DUPLICATE))
    trial.set_user_attr("duplicate_of", f"t{twin.number:03d}")
    if twin.state == optuna.trial.TrialState.COMPLETE:
        tell(study, trial, list(twin.values) if len(twin.values) > 1 else twin.values[0], optuna.trial.TrialState.COMPLETE)
    else:
        tell(study, trial, None, optuna.trial.TrialState.FAIL)


class RandomProposal:
    """`with RandomProposal(study, on):` the study's sampler is a RandomSampler inside (when `on`),
    seeded by the trial count, so a sweep with a seed stays repeatable."""

    def __init__(self, study: Any, on: bool, seed: int | None):
        self.study, self.on, self.seed = study, on, seed

    def __enter__(self) -> None:
        import optuna

        if self.on:
            self.saved = self.study.sampler
            n = len(self.study.get_trials(deepcopy=False))
            self.study.sampler = optuna.samplers.RandomSampler(seed=None if self.seed is None else self.seed * 100_003 + n)

    def __exit__(self, *exc: Any) -> None:
        if self.on:
            self.study.sampler = self.saved


def _allocation(verdict: Any) -> Allocation:
    """A feasible placement verdict as what the trial asks Ray for."""
    return Allocation(gpu_share=verdict.share, estimated_vram_gb=round(verdict.estimate_gb, 2))


@dataclass(frozen=True)
class Resumed:
    """An Optuna trial to run (again) under a new Ray trial: unfinished when a driver died, or its
    worker died. It continues from `checkpoint` when there is one."""

    number: int
    checkpoint: str | None
    attempt: int = 1


class SweepSearch(OptunaSearch):
    """OptunaSearch with step-indexed intermediate values, outcome-based final states, and the
    sweep's trial budget.

    Budget: Tune runs with an open number of samples; this searcher hands out queued trials first
    (resumed or retried ones), then new ones until `budget` new trials were launched, and says it
    is finished only once nothing is queued or running (a running trial may still need a retry).

    With `judge` (auto placement), each sampled config is checked against the GPU before Tune sees
    it: a feasible one carries its `gpu_share` (what it asks Ray for) and `estimated_vram_gb`; an
    infeasible one is closed in the study as FAIL (trial_status=infeasible), reported through
    `on_infeasible`, and another config is sampled for the same Ray trial. It costs no GPU time.

    A proposal with exactly the parameters of a trial that ran or runs (`twin_of`) is never
    launched either (`close_duplicate`: trial_status=duplicate, `duplicate_of` names the twin, a
    completed twin's values told again), reported through `on_duplicate`, and another is
    sampled: no GPU time on a configuration whose result is known.
    After RANDOM_AFTER_DUPLICATES in a row the proposals are random; after SPENT_AFTER_DUPLICATES
    the space is spent and no new trial starts (`spent`). Neither counts against the budget.

    A trial that errored is left open until the sweep decides (`requeue` if its worker died and it
    has retries left, `fail` otherwise: sweep.retries). A trial stopped by `python -m sweep stop`
    (`stop`, the sweep's sweepdir.StopFile) stays RUNNING in the study, so that `resume` continues it.
    """

    def __init__(
        self,
        cfg: SweepConfig,
        storage: str,
        ledger: Ledger,
        judge: Callable[[dict], Any] | None = None,
        on_infeasible: Callable[[str, dict, Any], None] | None = None,
        budget: int | None = None,
        resume: list[Resumed] | None = None,
        stop: Any = None,
        on_duplicate: Callable[[str, dict, int, bool], None] | None = None,
    ):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.ledger = ledger
        self.judge = judge
        self.on_infeasible = on_infeasible
        self.on_duplicate = on_duplicate
        self.seed = cfg.search.seed
        self.spent = False  # the sampler proposes nothing that has not run (the space is spent)
        self.budget = cfg.num_trials if budget is None else budget
        self.launched = 0
        self.queue: list[Resumed] = list(resume or [])
        self.stop = stop  # a sweepdir.StopFile, or None
        self.attempts: dict[str, int] = {}  # Ray trial id -> attempt number of its Optuna trial
        self.errored: dict[str, dict | None] = {}  # Ray trial id -> last result, awaiting requeue() or fail()
        self._steps: dict[str, set[int]] = {}  # Ray trial id -> steps already reported
        self._last: dict[str, dict] = {}  # Ray trial id -> its last result (Tune may end a paused trial without one)
        self._space_def = DefineByRun(cfg.space, cfg.fixed_hyperparams)
        self.objectives = cfg.objectives
        self.primary = cfg.search.metric
        multi = len(self.objectives) > 1
        rdb = optuna.storages.RDBStorage(storage)
        before = trials_in(rdb, cfg.name)  # > 0: a resumed sweep
        super().__init__(
            space=self._space_def,
            metric=[m for m, _ in self.objectives] if multi else cfg.search.metric,
            mode=[d for _, d in self.objectives] if multi else cfg.search.mode,
            sampler=make_sampler(cfg, before),
            study_name=cfg.name,
            storage=rdb,
        )
        if self._ot_study is not None:  # created (or loaded) by OptunaSearch just above
            name_objectives(self._ot_study, [m for m, _ in self.objectives])
            if not before:  # a resumed sweep's were queued by the first driver (those not yet run wait there): not again
                enqueue_startup(self._ot_study, cfg)

    # Tune writes the searcher into its experiment folder (searcher-state-*.pkl, tuner.pkl) for
    # its own Tuner.restore, which lora-sweep never uses: `resume` rebuilds everything from the
    # study. Those files would carry the study's storage URL (a password, maybe) and the hooks'
    # MLflow client, so what gets pickled is only a note.
    _NOTE = {"lora_sweep": "resume continues from the Optuna study and MLflow, not from this file"}

    def save(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "wb") as f:
            pickle.dump(self._NOTE, f)

    def __getstate__(self) -> dict:
        return dict(self._NOTE)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    # -- handing out trials -------------------------------------------------------------------

    def _running(self) -> bool:
        return any(t not in self._completed_trials for t in self._ot_trials)

    def _stop_requested(self) -> bool:
        return self.stop is not None and self.stop.requested()

    def suggest(self, trial_id: str) -> dict | None:
        if self._stop_requested():
            return Searcher.FINISHED
        if self.queue:
            return self._suggest_queued(trial_id, self.queue.pop(0))
        if self.launched >= self.budget or self.spent:
            return None if self._running() else Searcher.FINISHED
        return self._suggest_new(trial_id)

    def _suggest_queued(self, trial_id: str, item: Resumed) -> dict | None:
        import optuna

        study = self._ot_study
        storage_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, item.number)
        ot_trial = optuna.trial.Trial(study, storage_id)
        frozen = study._storage.get_trial(storage_id)
        hyper = self._space_def.space.decode(frozen.params, self._space_def.fixed)
        verdict = self.judge(hyper) if self.judge else None
        request = TrialRequest(hyper, _allocation(verdict) if verdict is not None and verdict.feasible else Allocation(), item.checkpoint or None)
        self._ot_trials[trial_id] = ot_trial
        self._steps[trial_id] = set(frozen.intermediate_values)  # reported before: not again
        self.attempts[trial_id] = item.attempt
        ot_trial.set_user_attr("ray_trial_id", trial_id)
        ot_trial.set_user_attr("attempt", item.attempt)
        self.ledger.labels[trial_id] = f"t{item.number:03d}"
        return request.to_config()

    def _suggest_new(self, trial_id: str) -> dict | None:
        import optuna

        duplicates = 0
        for _ in range(MAX_INFEASIBLE_IN_A_ROW):
            with RandomProposal(self._ot_study, duplicates >= RANDOM_AFTER_DUPLICATES, self.seed):
                hyper = super().suggest(trial_id)
            ot_trial = self._ot_trials[trial_id]
            label = f"t{ot_trial.number:03d}"
            twin = twin_of(self._ot_study, ot_trial)
            if twin is not None:  # it would train what trial `twin` trained: not again
                del self._ot_trials[trial_id]
                close_duplicate(self._ot_study, ot_trial, twin)
                duplicates += 1
                self.spent = duplicates >= SPENT_AFTER_DUPLICATES
                if self.on_duplicate:
                    self.on_duplicate(label, hyper, twin.number, self.spent)
                if self.spent:
                    break
                continue
            verdict = self.judge(hyper) if self.judge else None
            if verdict is None or verdict.feasible:
                ot_trial.set_user_attr("ray_trial_id", trial_id)
                allocation = Allocation()
                if verdict is not None:
                    allocation = _allocation(verdict)
                    ot_trial.set_user_attr(ESTIMATED_VRAM_GB, allocation.estimated_vram_gb)
                self.ledger.labels[trial_id] = label
                self.attempts[trial_id] = 1
                self.launched += 1
                return TrialRequest(hyper, allocation).to_config()
            del self._ot_trials[trial_id]
            ot_trial.set_user_attr(STATUS, str(TrialStatus.INFEASIBLE))
            ot_trial.set_user_attr(ERROR, verdict.reason)
            tell(self._ot_study, ot_trial, None, optuna.trial.TrialState.FAIL)
            if self.on_infeasible:
                self.on_infeasible(label, hyper, verdict)
        # Everything sampled lately needs more than a GPU, or ran already (the space is spent): stop
        # asking rather than spin.
        return None if self._running() else Searcher.FINISHED

    # -- feedback -----------------------------------------------------------------------------

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        keep = (STEP, STATUS, ERROR, *(m for m, _ in self.objectives))
        self._last[trial_id] = {k: v for k, v in result.items() if k in keep}
        if len(self.objectives) > 1:
            return  # Optuna keeps no intermediate values for multi-objective studies
        for record in result.get("evals_replay") or []:  # a resumed trial's evaluations the study may lack
            if finite(record.get(self.primary)):
                self._report(trial_id, float(record[self.primary]), int(record[STEP]))
        value = result.get(self.primary)
        if finite(value):
            self._report(trial_id, float(value), int(result[STEP]))

    def _report(self, trial_id: str, value: float, step: int) -> None:
        steps = self._steps.setdefault(trial_id, set())
        if step not in steps:
            steps.add(step)
            self._ot_trials[trial_id].report(value, step=step)

    def close_open_trials(self, last_results: dict[str, dict]) -> None:
        """Trials still open when Tune returns (ended by the time budget, or errored without a
        decision) get their outcome too."""
        for trial_id in list(self._ot_trials):
            if trial_id in self.errored:
                self.fail(trial_id, "the trial failed")
            elif trial_id not in self._completed_trials:
                self.on_trial_complete(trial_id, last_results.get(trial_id))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        import optuna

        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        result = result or self._last.get(trial_id)
        if error:
            self.errored[trial_id] = result  # the sweep decides: requeue() or fail()
            return
        ot_trial = self._ot_trials[trial_id]
        names = tuple(m for m, _ in self.objectives)
        status = outcome(result, False, self.ledger.pruned(trial_id), names)
        values = [(result or {}).get(m) for m in names]
        if len(values) == 1 and finite(values[0]):
            # A result that makes the scheduler say STOP (a pruning decision, or reaching max_t)
            # reaches on_trial_complete only, never on_trial_result: record it here.
            self._report(trial_id, float(values[0]), int(result[STEP]))
        self._completed_trials.add(trial_id)
        if status == TrialStatus.STOPPED and self._stop_requested():
            return  # stopped by the user: stays RUNNING in the study, for `resume`
        if (result or {}).get(STATUS) == TrialStatus.COMPLETED and status == TrialStatus.FAILED:
            result = {**result, ERROR: missing_objectives(result, names)}
        ot_trial.set_user_attr(STATUS, str(status))
        if result and result.get(ERROR):
            ot_trial.set_user_attr(ERROR, str(result[ERROR])[:1000])
        if status == TrialStatus.COMPLETED:
            tell(self._ot_study, ot_trial, [float(v) for v in values] if len(values) > 1 else float(values[0]), optuna.trial.TrialState.COMPLETE)
        elif status in (TrialStatus.PRUNED, TrialStatus.STOPPED):
            tell(self._ot_study, ot_trial, None, optuna.trial.TrialState.PRUNED)
        else:
            tell(self._ot_study, ot_trial, None, optuna.trial.TrialState.FAIL)

    def requeue(self, trial_id: str, checkpoint: str | None) -> int:
        """Run this trial's Optuna trial again (its worker died): returns the new attempt number."""
        ot_trial = self._ot_trials[trial_id]
        attempt = self.attempts.get(trial_id, 1) + 1
        self.errored.pop(trial_id, None)
        self._completed_trials.add(trial_id)
        self.queue.append(Resumed(ot_trial.number, checkpoint, attempt))
        return attempt

    def fail(self, trial_id: str, error: str) -> None:
        import optuna

        self.errored.pop(trial_id, None)
        if trial_id in self._completed_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        ot_trial.set_user_attr(STATUS, str(TrialStatus.FAILED))
        ot_trial.set_user_attr(ERROR, error[-1000:])
        tell(self._ot_study, ot_trial, None, optuna.trial.TrialState.FAIL)
        self._completed_trials.add(trial_id)
