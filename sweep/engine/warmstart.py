"""Warm start: a previous sweep's finished trials feed this sweep's sampler, and its best configs
run first (`search.warm_start: DIR`).

Trials are compared in hyperparameter values, not in study labels: each previous trial is decoded
with the previous sweep's own space, then checked against this one. What is tolerated:

- a dimension searched in both: the previous value must be one of this space's choices or inside
  its range; otherwise the trial is left out;
- a dimension new to this space: the previous trials ran with their fixed train value, which
  counts as their value if this dimension admits it;
- a dimension no longer searched: the previous value must equal this sweep's fixed value;
- anything else that changes results (model, data, max_steps, max_seq_len, the LoRA method's
  fixed settings): tolerated, and every difference is printed, since it makes the previous losses
  less comparable;
- the metric and its direction must match: otherwise nothing carries over (an error).

COMPLETE trials carry their value, PRUNED ones their intermediate values (TPE uses both); failed
trials teach TPE nothing and are not carried.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.contract import ATTR_WARM_START, STATUS, TrialStatus
from sweep.config import HYPERPARAMS, SEARCHABLE, ConfigError, SweepConfig
from sweep.config.space import Ratio
from sweep.folder import SweepFolder

COMPARED = ("model", "data", "max_steps", "max_seq_len")


@dataclass
class WarmStart:
    source: Path
    carried: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    enqueued: list[dict[str, Any]] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)

    def describe(self) -> str:
        skipped = "; ".join(f"{n} {why}" for why, n in self.skipped.items()) or "none"
        lines = [f"warm start from {self.source.name}: {self.carried} finished trials carried over, skipped: {skipped}; "
                 f"{len(self.enqueued)} best configs run first"]  # fmt: skip
        lines += [f"  note: {d}" for d in self.differences]
        return "\n".join(lines)




def _hyperparams(cfg: SweepConfig, params: dict[str, Any]) -> dict[str, Any]:
    """Every searchable hyperparameter's value in a trial: sampled ones decoded, the rest fixed."""
    return {**{k: getattr(cfg.train, k) for k in HYPERPARAMS}, **cfg.space.decode(params, cfg.fixed_hyperparams)}


def _as_points(cfg: SweepConfig, values: dict[str, Any]) -> dict[str, Any]:
    """This space's dimensions in user terms (a ratio by its factor), for Space.encode."""
    out: dict[str, Any] = {}
    for d in cfg.space.dims:
        if isinstance(d, Ratio):
            base = values[d.of]
            out[d.factor.name] = values[d.name] / base if base else float("nan")
        else:
            value = values[d.name]
            out[d.name] = list(value) if isinstance(value, tuple) else value
    return out


def apply(study: Any, cfg: SweepConfig, folder: Path) -> WarmStart:
    """Add the previous sweep's compatible finished trials to `study`; enqueue its best configs."""
    import optuna

    previous_sweep = SweepFolder(folder)
    old = previous_sweep.config
    report = WarmStart(folder)
    if (old.search.metric, old.search.mode) != (cfg.search.metric, cfg.search.mode):
        raise ConfigError(
            str(cfg.source),
            [f"search.warm_start: {folder.name} optimised {old.search.metric} ({old.search.mode}); this sweep {cfg.search.metric} ({cfg.search.mode}): their trials cannot inform each other"],
        )
    for key in COMPARED:
        a = old.model.id if key == "model" else old.data.train if key == "data" else getattr(old.train, key, None) if key == "max_steps" else old.data.max_seq_len
        b = cfg.model.id if key == "model" else cfg.data.train if key == "data" else getattr(cfg.train, key, None) if key == "max_steps" else cfg.data.max_seq_len
        if a != b:
            report.differences.append(f"{key} was {a}, is {b}: the previous losses were measured under another setting")
    fixed_now = {k: getattr(cfg.train, k) for k in SEARCHABLE}
    distributions = cfg.space.distributions()
    # its study as its config names it, ${VAR}s expanded here (MLflow is not needed)
    previous = optuna.load_study(study_name=previous_sweep.study_name, storage=previous_sweep.optuna_storage)
    ranked: list[tuple[float, dict]] = []
    for trial in previous.trials:
        if trial.state not in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) or not trial.params:
            continue
        if trial.user_attrs.get(STATUS) == TrialStatus.DUPLICATE:  # a repeat of another trial's result (sweep.engine.study.close_duplicate)
            continue
        values = _hyperparams(old, trial.params)
        mismatch = [k for k in SEARCHABLE if k not in cfg.space.names and values[k] != fixed_now[k]]
        if mismatch:
            reason = f"ran with another fixed {mismatch[0]}"
            report.skipped[reason] = report.skipped.get(reason, 0) + 1
            continue
        errors: list[str] = []
        params = cfg.space.encode(_as_points(cfg, values), "warm", errors)
        if errors:
            reason = "outside this space (" + errors[0].split(": got", 1)[0].removeprefix("warm.") + ")"
            report.skipped[reason] = report.skipped.get(reason, 0) + 1
            continue
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=distributions,
                value=trial.value if trial.state == optuna.trial.TrialState.COMPLETE else None,
                intermediate_values=trial.intermediate_values,
                state=trial.state,
                user_attrs={ATTR_WARM_START: str(folder), "previous_trial": trial.number, STATUS: trial.user_attrs.get(STATUS, trial.state.name.lower())},
            )
        )
        report.carried += 1
        if trial.state == optuna.trial.TrialState.COMPLETE:
            ranked.append((trial.value if cfg.search.mode == "min" else -trial.value, params))
    for _, params in sorted(ranked, key=lambda x: x[0])[: cfg.search.warm_start_top]:
        study.enqueue_trial(params)
        report.enqueued.append(params)
    return report
