"""The Optuna study behind a sweep: its sampler, its storage, and correct feedback from Ray Tune.

Ray's OptunaSearch reports intermediate values by Tune iteration and tells Optuna that a trial the
scheduler stopped early is COMPLETE or PRUNED depending on what the last result happened to hold.
SweepSearch reports by training step and derives the state from the same `outcome()` MLflow uses:
completed -> COMPLETE, pruned/stopped -> PRUNED (with its intermediate values), oom/nan/failed -> FAIL.
"""

from __future__ import annotations

from typing import Any, Callable

from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from sweep.config import SweepConfig
from sweep.space import Space
from sweep.trials import Ledger, finite, outcome


class DefineByRun:
    """Picklable define-by-run function (Tune pickles the searcher into its experiment state)."""

    def __init__(self, space: Space, fixed: dict[str, Any]):
        self.space = space
        self.fixed = fixed

    def __call__(self, trial: Any) -> dict[str, Any]:
        return self.space.sample(trial, self.fixed)


def make_sampler(cfg: SweepConfig) -> Any:
    import optuna

    search = cfg.search
    if search.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=search.seed)
    if search.algorithm == "grid":
        return optuna.samplers.GridSampler(cfg.space.grid(), seed=search.seed)
    startup = search.n_startup_trials or max(1, min(10, cfg.num_trials // 3))
    return optuna.samplers.TPESampler(
        seed=search.seed, n_startup_trials=startup, multivariate=True, constant_liar=True
    )


def storage_url(sweep_dir: Any) -> str:
    return f"sqlite:///{sweep_dir}/optuna.db"


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


class SweepSearch(OptunaSearch):
    """OptunaSearch with step-indexed intermediate values and outcome-based final states.

    With `judge` (auto placement), each sampled config is checked against the GPU before Tune sees
    it: a feasible one carries its `gpu_share` (what it asks Ray for) and `estimated_vram_gb`; an
    infeasible one is closed in the study as FAIL (trial_status=infeasible), reported through
    `on_infeasible`, and another config is sampled for the same Ray trial. It costs no GPU time.
    """

    def __init__(
        self,
        cfg: SweepConfig,
        storage: str,
        ledger: Ledger,
        judge: Callable[[dict], Any] | None = None,
        on_infeasible: Callable[[str, dict, Any], None] | None = None,
    ):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.ledger = ledger
        self.judge = judge
        self.on_infeasible = on_infeasible
        self._steps: dict[str, set[int]] = {}  # Ray trial id -> steps already reported
        self._last: dict[str, dict] = {}  # Ray trial id -> its last result (Tune may end a paused trial without one)
        super().__init__(
            space=DefineByRun(cfg.space, cfg.fixed_hyperparams),
            metric=cfg.search.metric,
            mode=cfg.search.mode,
            points_to_evaluate=[dict(p) for p in cfg.study_points] or None,
            sampler=make_sampler(cfg),
            study_name=cfg.name,
            storage=optuna.storages.RDBStorage(storage),
        )

    def save(self, checkpoint_path: str) -> None:
        """Tune pickles the searcher into its experiment state; the hooks (which hold the MLflow
        client and the terminal) are not part of the search state and stay out of it."""
        hooks = self.judge, self.on_infeasible
        self.judge = self.on_infeasible = None
        try:
            super().save(checkpoint_path)
        finally:
            self.judge, self.on_infeasible = hooks

    def suggest(self, trial_id: str) -> dict | None:
        import optuna

        for _ in range(MAX_INFEASIBLE_IN_A_ROW):
            config = super().suggest(trial_id)
            ot_trial = self._ot_trials[trial_id]
            label = f"t{ot_trial.number:03d}"
            verdict = self.judge(config) if self.judge else None
            if verdict is None or verdict.feasible:
                ot_trial.set_user_attr("ray_trial_id", trial_id)
                if verdict is not None:
                    config.update(gpu_share=verdict.share, estimated_vram_gb=round(verdict.estimate_gb, 2))
                    ot_trial.set_user_attr("estimated_vram_gb", round(verdict.estimate_gb, 2))
                self.ledger.labels[trial_id] = label
                return config
            del self._ot_trials[trial_id]
            ot_trial.set_user_attr("trial_status", "infeasible")
            ot_trial.set_user_attr("error", verdict.reason)
            tell(self._ot_study, ot_trial, None, optuna.trial.TrialState.FAIL)
            if self.on_infeasible:
                self.on_infeasible(label, config, verdict)
        # Everything sampled lately needs more than a GPU: stop asking rather than spin.
        return Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        self._last[trial_id] = {k: v for k, v in result.items() if k in ("step", "trial_status", "error", self.metric)}
        value = result.get(self.metric)
        if finite(value):
            self._report(trial_id, float(value), int(result["step"]))

    def _report(self, trial_id: str, value: float, step: int) -> None:
        steps = self._steps.setdefault(trial_id, set())
        if step not in steps:
            steps.add(step)
            self._ot_trials[trial_id].report(value, step=step)

    def close_open_trials(self, last_results: dict[str, dict]) -> None:
        """Trials still open when Tune returns (ended by the time budget) get their outcome too."""
        for trial_id in list(self._ot_trials):
            if trial_id not in self._completed_trials:
                self.on_trial_complete(trial_id, last_results.get(trial_id))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        import optuna

        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        result = result or self._last.get(trial_id)
        status = outcome(result, error, self.ledger.pruned(trial_id))
        ot_trial.set_user_attr("trial_status", status)
        if result and result.get("error"):
            ot_trial.set_user_attr("error", str(result["error"])[:1000])
        value = (result or {}).get(self.metric)
        if finite(value):
            # A result that makes the scheduler say STOP (a pruning decision, or reaching max_t)
            # reaches on_trial_complete only, never on_trial_result: record it here.
            self._report(trial_id, float(value), int(result["step"]))
        if status == "completed" and finite(value):
            tell(self._ot_study, ot_trial, float(value), optuna.trial.TrialState.COMPLETE)
        elif status in ("pruned", "stopped"):
            tell(self._ot_study, ot_trial, None, optuna.trial.TrialState.PRUNED)
        else:
            tell(self._ot_study, ot_trial, None, optuna.trial.TrialState.FAIL)
        self._completed_trials.add(trial_id)
