"""The sweep's Optuna study: the one place that proposes a trial and tells the study how it ended.

    study = Study(cfg, storage_url, study_name, stream="w0")   # picklable; opens lazily where it runs
    proposal = study.propose(judge, on_infeasible, note)      # a new trial to train, or None
    study.report(number, value, step) -> prune?               # Optuna's pruner (search.scheduler)
    study.end(number, status, values, error)                  # COMPLETE / PRUNED / FAIL

Only Optuna's public API: `study.ask()` / `study.tell()`, `trial.report()` / `trial.should_prune()`,
and the storage's public methods to reopen a trial by its number in another process (a worker, a
resumed driver).

Proposing, in order: the study's queue (points_to_evaluate, Sobol start-up points, a warm start's
best configs), then the sampler. A proposal with exactly the parameters of a trial that ran or runs
(`twin_of`) is never trained (`close_duplicate`); after RANDOM_AFTER_DUPLICATES repeats in a row the
proposals are random, after SPENT_AFTER_DUPLICATES the space is spent. A proposal whose memory
estimate exceeds one GPU (`judge`) is closed as infeasible and another is drawn. Neither counts
against search.num_trials.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from core.contract import ATTR_DUPLICATE_OF, ATTR_USER_POINT, ATTR_WARM_START, ERROR, ESTIMATED_VRAM_GB, STATUS, TrialStatus, trial_label
from core.rules import tpe_startup_trials

MAX_ASKS = 200  # proposals in a row that cannot be trained (infeasible) before a worker stops asking
# A sampler proposes what already ran more often than one would think (one trial in four on the
# search suite's 48-point spaces, more as a discrete space runs out): after this many repeats in a
# row, random proposals; after SPENT_AFTER_DUPLICATES (random ones included) the space is spent.
RANDOM_AFTER_DUPLICATES = 3
SPENT_AFTER_DUPLICATES = 20
NOT_RUN = (TrialStatus.INFEASIBLE, TrialStatus.LOST, TrialStatus.DUPLICATE)


# ----------------------------------------------------------------------------------------------
# the study's sampler, pruner and start-up points


class DefineByRun:
    """The space as Optuna's define-by-run function (picklable)."""

    def __init__(self, space: Any, fixed: dict[str, Any]):
        self.space = space
        self.fixed = fixed

    def __call__(self, trial: Any) -> dict[str, Any]:
        return self.space.sample(trial, self.fixed)


def make_sampler(cfg: Any, trials_before: int = 0) -> Any:
    """The sweep's sampler. A seeded sampler's random stream restarts with every process that opens
    the study, so each takes seed + `trials_before` (trials in the study already, plus a number
    drawn from the worker's name): still reproducible, and it does not propose again what the
    others drew."""
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


def make_pruner(cfg: Any) -> Any:
    """Optuna's pruner for search.scheduler, its budgets in training steps: asha -> successive
    halving (grace period, reduction factor), hyperband -> Hyperband, median -> the median rule,
    none -> nothing pruned. A multi-objective study keeps no intermediate values: nothing is pruned."""
    import optuna

    sched = cfg.search.scheduler
    if sched.type == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=cfg.grace_period, reduction_factor=sched.reduction_factor)
    if sched.type == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=cfg.train.eval_every, max_resource=cfg.max_t, reduction_factor=sched.reduction_factor)
    if sched.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=sched.min_samples, n_warmup_steps=cfg.grace_period - 1)
    return optuna.pruners.NopPruner()


def sobol_points(define: Callable[[Any], Any], n: int, seed: int | None) -> list[dict[str, Any]]:
    """`n` start-up configurations (Optuna study params): the first `n` trials of Optuna's
    QMCSampler (scrambled Sobol; its first point is random, as the sampler's own first trial is),
    drawn on a scratch in-memory study by `define` (a define-by-run space). Enqueued in the sweep's
    study before TPE's first trial, they are its start-up trials: on the search suite
    (bench/BENCH.md) they spread over every dimension together where random start-up trials can
    leave a categorical value with only bad partners, after which TPE never returns to it.

    A point may repeat an earlier one (several Sobol points fall on one configuration of a small
    discrete space): it stays in the list, and the sweep closes it as a duplicate when it comes up
    (`twin_of`). On the search suite's small spaces that happened less often than random draws
    repeat; drawing other points in their place shifts the sequence off its balanced blocks, and
    measured, it did no better (bench/BENCH.md, "Sobol start-up trials for TPE")."""
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


def startup_points(cfg: Any) -> list[dict[str, Any]]:
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


def new_study_name(sweep_dir: Any) -> str:
    """A new sweep's study name: its folder's name (the sweep's name and start time) and a random
    id. A store shared by several machines (PostgreSQL) holds many sweeps, often of one name, even
    started the same second: each gets a study of its own, never another sweep's (whose start-up
    points, trials and counts it would otherwise take over)."""
    import uuid

    return f"{Path(sweep_dir).name}-{uuid.uuid4().hex[:8]}"


def create_study(cfg: Any, storage: str, study_name: str) -> None:
    """A new sweep's study, made before sweep.json names it (a driver stopped while it sets up
    leaves a folder `resume` starts from): its directions, its objectives' names, and the start-up
    points queued, the user's points_to_evaluate marked with their index (ATTR_USER_POINT) so that
    `twin_of` lets a point the user listed twice run twice. Sobol start-up points are not marked:
    one that repeats a configuration is skipped as any proposal is."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = ["minimize" if mode == "min" else "maximize" for _, mode in cfg.objectives]
    study = optuna.create_study(study_name=study_name, storage=optuna.storages.RDBStorage(storage), directions=directions)
    name_objectives(study, [m for m, _ in cfg.objectives])
    users = len(cfg.study_points)
    for i, point in enumerate(startup_points(cfg)):
        study.enqueue_trial(point, user_attrs={ATTR_USER_POINT: i} if i < users else None)


def name_objectives(study: Any, names: list[str]) -> None:
    """Name the study's objectives (eval_loss, peak_vram_gb) so that optuna-dashboard and the
    study's dataframes say them instead of "Objective 0"."""
    import warnings

    import optuna

    if study.metric_names == names:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # experimental since Optuna 3.2
        study.set_metric_names(names)


def tell(study: Any, trial: Any, value: Any = None, state: Any = None) -> None:
    """study.tell that tolerates GridSampler's end-of-grid stop: GridSampler calls study.stop() once
    every grid point was asked, which raises outside study.optimize(); the trial's state is stored
    before that, so there is nothing to undo."""
    try:
        study.tell(trial, value, state=state)
    except RuntimeError as exc:
        if "Study.stop" not in str(exc):
            raise


# ----------------------------------------------------------------------------------------------
# duplicates


def twin_of(study: Any, trial: Any) -> Any:
    """An earlier trial of this sweep (Optuna's FrozenTrial) with exactly `trial`'s parameters
    that ran or runs, whatever its outcome (the same configuration trains the same way), or None.
    Entries that never ran (infeasible, lost, duplicates) and a warm start's trials do not count.
    None for one of the user's own points_to_evaluate: a point listed twice is meant to run twice
    (e.g. to see the noise between runs). It is still a twin that later proposals are matched against."""
    if ATTR_USER_POINT in trial.user_attrs:
        return None
    params = trial.params
    for other in study.get_trials(deepcopy=False):
        if other.number == trial.number or not other.params or ATTR_WARM_START in other.user_attrs:
            continue
        if other.user_attrs.get(STATUS) not in NOT_RUN and other.params == params:
            return other
    return None


def close_duplicate(study: Any, trial: Any, twin: Any) -> None:
    """A proposal equal to `twin`, never trained (trial_status=duplicate, duplicate_of). A
    completed twin's result is known: told again as this trial's (COMPLETE, its values), so the
    sampler learns what a run would have taught it at no cost (better on the search suite than
    closing duplicates only or running them: bench/BENCH.md, "Search suite: repeated proposals
    skipped, their results told again"). Any other
    twin's result is unknown or no result (running, pruned, failed): FAIL, which samplers skip.
    Reports and `best` read MLflow's runs, where a duplicate has none."""
    import optuna

    trial.set_user_attr(STATUS, str(TrialStatus.DUPLICATE))
    trial.set_user_attr(ATTR_DUPLICATE_OF, trial_label(twin.number))
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


# ----------------------------------------------------------------------------------------------
# the study, as a worker or the driver opens it


@dataclass(frozen=True)
class Proposal:
    """A new trial to train: its Optuna number and its sampled hyperparameters (decoded)."""

    number: int
    hyper: dict[str, Any]

    @property
    def label(self) -> str:
        return trial_label(self.number)


class Spent(Exception):
    """The sampler proposes nothing that has not run: no new trial can start."""


class Study:
    """The sweep's study, opened lazily where it is used (picklable: a URL and names travel)."""

    def __init__(self, cfg: Any, storage: str, name: str, stream: str = ""):
        self.cfg, self.url, self.name = cfg, storage, name
        self.stream = stream  # the worker's name: each opener draws its own sampler stream
        self._study: Any = None
        self._rdb: Any = None
        self._sid: int | None = None
        self._trials: dict[int, Any] = {}  # number -> optuna.trial.Trial reopened here

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_study": None, "_rdb": None, "_sid": None, "_trials": {}}

    @property
    def objectives(self) -> tuple[str, ...]:
        return tuple(m for m, _ in self.cfg.objectives)

    def optuna(self) -> Any:
        """The optuna.Study, with the sweep's sampler and pruner."""
        if self._study is None:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            kwargs = {"connect_args": {"timeout": 60}} if self.url.startswith("sqlite") else {}
            storage = optuna.storages.RDBStorage(self.url, engine_kwargs=kwargs)
            study_id = storage.get_study_id_from_name(self.name)
            before = len(storage.get_all_trials(study_id, deepcopy=False)) + (zlib.crc32(self.stream.encode()) % 100_003 if self.stream else 0)
            self._study = optuna.load_study(study_name=self.name, storage=storage, sampler=make_sampler(self.cfg, before), pruner=make_pruner(self.cfg))
            self._rdb, self._sid = storage, study_id
        return self._study

    def trial(self, number: int) -> Any:
        """The trial with this number, reopened for report / tell (a public constructor, and the
        storage's public lookup of a trial by study and number)."""
        import optuna

        if number not in self._trials:
            study = self.optuna()
            self._trials[number] = optuna.trial.Trial(study, self._rdb.get_trial_id_from_study_id_trial_number(self._sid, number))
        return self._trials[number]

    def frozen(self, number: int) -> Any:
        """The trial as stored now (params, user attributes, intermediate values)."""
        self.optuna()
        return self._rdb.get_trial(self._rdb.get_trial_id_from_study_id_trial_number(self._sid, number))

    def trials(self, states: tuple[str, ...] | None = None) -> list[Any]:
        import optuna

        wanted = None if states is None else tuple(getattr(optuna.trial.TrialState, s) for s in states)
        return self.optuna().get_trials(deepcopy=False, states=wanted)

    def hyper(self, frozen: Any) -> dict[str, Any]:
        """A trial's hyperparameters, decoded from its study params."""
        return self.cfg.space.decode(frozen.params, self.cfg.fixed_hyperparams)

    # -- proposing --------------------------------------------------------------------------------

    def propose(self, judge: Callable[[dict], Any] | None = None, on_infeasible: Callable[[str, dict, Any], None] | None = None,
                note: Callable[[str, str], None] | None = None) -> Proposal | None:  # fmt: skip
        """The next trial to train: queued points first, then the sampler's. Duplicates and
        infeasible proposals are closed in the study and another is drawn; `on_infeasible(label,
        hyper, verdict)` records an infeasible one (its MLflow run), `note(label, text)` says what
        happened in the terminal. Raises Spent once the sampler proposes only what ran; None after
        MAX_ASKS proposals in a row that do not fit a GPU."""
        import optuna

        from core.contract import summary

        study = self.optuna()
        fixed = self.cfg.fixed_hyperparams
        duplicates = 0
        for _ in range(MAX_ASKS):
            with RandomProposal(study, duplicates >= RANDOM_AFTER_DUPLICATES, self.cfg.search.seed):
                trial = study.ask()
                hyper = self.cfg.space.sample(trial, fixed)
            label = trial_label(trial.number)
            twin = twin_of(study, trial)
            if twin is not None:  # it would train what trial `twin` trained: not again
                close_duplicate(study, trial, twin)
                duplicates += 1
                spent = duplicates >= SPENT_AFTER_DUPLICATES
                if note:
                    note(label, f"duplicate  {summary({**fixed, **hyper})}: {trial_label(twin.number)} ran it; not run again" + ("" if spent else ", another is sampled"))
                if spent:
                    raise Spent(f"the last {SPENT_AFTER_DUPLICATES} proposals (random ones too) were all configurations already run: the space looks spent; no new trials start")
                continue
            verdict = judge(hyper) if judge else None
            if verdict is not None and not verdict.feasible:  # does not fit one GPU even alone: never launched
                trial.set_user_attr(STATUS, str(TrialStatus.INFEASIBLE))
                trial.set_user_attr(ERROR, verdict.reason)
                tell(study, trial, None, optuna.trial.TrialState.FAIL)
                if on_infeasible:
                    on_infeasible(label, hyper, verdict)
                if note:
                    note(label, f"infeasible  {summary({**fixed, **hyper})}: {verdict.reason}")
                continue
            if verdict is not None:
                trial.set_user_attr(ESTIMATED_VRAM_GB, round(verdict.estimate_gb, 2))
            self._trials[trial.number] = trial
            return Proposal(trial.number, hyper)
        return None

    # -- feedback ---------------------------------------------------------------------------------

    def set_attrs(self, number: int, **attrs: Any) -> None:
        trial = self.trial(number)
        for key, value in attrs.items():
            trial.set_user_attr(key, value)

    def report(self, number: int, evaluations: list[tuple[int, float]], running: bool) -> bool:
        """The primary metric at these steps into the trial's intermediate values (each step once: a
        resumed trial re-sends what it reported before); True when the pruner stops it. A multi-objective
        study keeps no intermediate values, and prunes nothing."""
        if len(self.objectives) > 1:
            return False
        import optuna

        trial = self.trial(number)
        have = set(self.frozen(number).intermediate_values)
        new = sorted({int(step): float(value) for step, value in evaluations if int(step) not in have}.items())
        last = max((int(step) for step, _ in evaluations), default=None)
        for step, value in new:
            trial.report(value, step=step)
            # Each new step is judged as it was reached: a continued trial re-sends evaluations the
            # study never got (its worker saved the checkpoint and died before reporting), and
            # judged only at its latest step, with its latest value, it passed a rung the
            # uninterrupted sweep pruned it at. The last one is judged while the trial runs on.
            if (running or step != last) and trial.should_prune():
                # Told at once, not when the worker ends it: a worker or driver killed in between
                # leaves a pruned trial, never one that `resume` or a retry continues past its rung
                # (the pruner has recorded the rung as passed and would not stop it there again).
                trial.set_user_attr(STATUS, str(TrialStatus.PRUNED))
                tell(self.optuna(), trial, None, optuna.trial.TrialState.PRUNED)
                self._trials.pop(number, None)
                return True
        return False

    def end(self, number: int, status: TrialStatus, values: list[float] | None = None, error: str | None = None) -> None:
        """Tell the study how the trial ended: completed -> COMPLETE (its objective values), pruned or
        stopped -> PRUNED (its intermediate values stay), anything else -> FAIL."""
        import optuna

        if self.frozen(number).state.is_finished():  # pruned already: the study was told as the pruner decided (report)
            self._trials.pop(number, None)
            return
        trial = self.trial(number)
        trial.set_user_attr(STATUS, str(status))
        if error:
            trial.set_user_attr(ERROR, str(error)[:1000])
        study = self.optuna()
        if status == TrialStatus.COMPLETED and values is not None:
            tell(study, trial, values if len(values) > 1 else values[0], optuna.trial.TrialState.COMPLETE)
        elif status in (TrialStatus.PRUNED, TrialStatus.STOPPED):
            tell(study, trial, None, optuna.trial.TrialState.PRUNED)
        else:
            tell(study, trial, None, optuna.trial.TrialState.FAIL)
        self._trials.pop(number, None)

    def lost(self, number: int) -> None:
        """A trial asked but never sampled (its driver or worker died in between): nothing ran."""
        import optuna

        trial = self.trial(number)
        trial.set_user_attr(STATUS, str(TrialStatus.LOST))
        tell(self.optuna(), trial, None, optuna.trial.TrialState.FAIL)
