"""A sweep's results, read back from its study and MLflow: one row per trial, the Pareto set of a
multi-objective sweep, and the best trial under constraints (`--where "peak_vram_gb<=20"`)."""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.contract import PLACEMENT_KEYS, ROW_METRICS, STATUS, TrialStatus
from sweep.config import METRICS, SweepConfig
from sweep.trials import finite, summary


@dataclass
class SweepResult:
    sweep_dir: Path
    parent_run_id: str
    trials: list[dict[str, Any]] = field(default_factory=list)  # one row per trial, best first
    best: dict[str, Any] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    pareto: list[dict[str, Any]] = field(default_factory=list)  # multi-objective: the non-dominated completed trials


def rows(cfg: SweepConfig, study: Any, children: list[Any]) -> list[dict[str, Any]]:
    """One row per trial of the whole sweep (every driver run): status and metrics from MLflow,
    the exact hyperparameters from the study."""
    runs = {r.data.tags.get("trial"): r for r in children}
    fixed = cfg.fixed_hyperparams
    out = []
    for t in study.trials:
        label = f"t{t.number:03d}"
        run = runs.get(label)
        if run is None or "warm_start_from" in t.user_attrs or not t.params:
            continue
        config = cfg.space.decode(t.params, fixed)
        for key in PLACEMENT_KEYS:  # placement data: logged as params beside the hyperparameters
            if key in run.data.params:
                config[key] = float(run.data.params[key])
        row = {
            "trial_id": t.user_attrs.get("ray_trial_id", ""),
            "number": t.number,
            "label": label,
            "status": run.data.tags.get(STATUS, "?"),
            "step": int(run.data.tags["last_step"]) if run.data.tags.get("last_step", "").isdigit() else None,
            "run_id": run.info.run_id,
            "config": config,
            "params": t.params,
            "summary": summary({**fixed, **config}),
            "error": run.data.tags.get("error"),
        }
        for key in ROW_METRICS:
            row[key] = run.data.metrics.get(key)
        out.append(row)
    return out


def order(rows_: list[dict], metric: str, mode: str) -> list[dict]:
    sign = 1 if mode == "min" else -1

    def key(r: dict) -> tuple:
        v = r.get(metric)
        return (r["status"] != TrialStatus.COMPLETED, not finite(v), sign * v if finite(v) else 0.0, r["label"])

    return sorted(rows_, key=key)


def pareto(rows_: list[dict], objectives: list[tuple[str, str]]) -> list[dict]:
    """Completed trials that no other completed trial beats on every objective."""
    points = [r for r in rows_ if r["status"] == TrialStatus.COMPLETED and all(finite(r.get(m)) for m, _ in objectives)]

    def as_min(r: dict) -> list[float]:
        return [r[m] if d == "min" else -r[m] for m, d in objectives]

    front = []
    for r in points:
        a = as_min(r)
        if not any(all(x <= y for x, y in zip(as_min(o), a)) and as_min(o) != a for o in points if o is not r):
            front.append(r)
    return front


_CONSTRAINT = re.compile(r"^\s*([a-z_]+)\s*(<=|>=|==|!=|<|>)\s*(-?[0-9.]+(?:e-?[0-9]+)?)\s*$")
_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "==": operator.eq, "!=": operator.ne}


def parse_where(text: str | None) -> list[tuple[str, str, float]]:
    """'peak_vram_gb<=20, eval_loss<2.5' (or joined by 'and') -> constraints; a clear error otherwise.
    Parsed, never evaluated: only a metric, a comparison and a number."""
    if not text:
        return []
    out = []
    for part in re.split(r",|\band\b", text):
        if not part.strip():
            continue
        match = _CONSTRAINT.match(part)
        if not match or match.group(1) not in METRICS:
            raise ValueError(f"--where: cannot read {part.strip()!r}; expected METRIC OP NUMBER, e.g. peak_vram_gb<=20, with a metric among {', '.join(METRICS)}")
        out.append((match.group(1), match.group(2), float(match.group(3))))
    return out


def satisfies(row: dict, constraints: list[tuple[str, str, float]]) -> bool:
    return all(finite(row.get(m)) and _OPS[op](row[m], value) for m, op, value in constraints)


def choose(rows_: list[dict], cfg: SweepConfig, constraints: list[tuple[str, str, float]]) -> dict | None:
    """The best completed trial that meets the constraints: by the (first) objective; in a
    multi-objective sweep, among the Pareto set of the trials that meet them."""
    ok = [r for r in rows_ if r["status"] == TrialStatus.COMPLETED and satisfies(r, constraints)]
    if cfg.multi_objective:
        ok = pareto(ok, cfg.objectives)
    ranked = [r for r in order(ok, cfg.search.metric, cfg.search.mode) if finite(r.get(cfg.search.metric))]
    return ranked[0] if ranked else None


def collect(cfg: SweepConfig, study: Any, children: list[Any]) -> SweepResult:
    """Rows best first, the best trial, counts by status, and the Pareto set."""
    all_rows = order(rows(cfg, study, children), cfg.search.metric, cfg.search.mode)
    counts: dict[str, int] = {}
    for r in all_rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    front = pareto(all_rows, cfg.objectives) if cfg.multi_objective else []
    return SweepResult(sweep_dir=Path(), parent_run_id="", trials=all_rows, best=choose(all_rows, cfg, []), counts=counts, pareto=front)


@dataclass
class FinishedSweep:
    """Everything the morning-after commands (report, best) read from a sweep folder."""

    cfg: SweepConfig
    meta: dict[str, Any]
    study: Any  # optuna.Study
    client: Any  # mlflow.MlflowClient
    result: SweepResult
    mlflow_links: dict[str, Any] = field(default_factory=dict)  # sweepdir.mlflow_links: the UI, the runs table


def open_sweep(folder: Path) -> FinishedSweep:
    from sweep.sweepdir import SweepFolder, mlflow_links

    sweep = SweepFolder(folder)
    cfg = sweep.config
    study = sweep.study()  # never creates a missing store
    client = sweep.mlflow()
    result = collect(cfg, study, sweep.children(client))
    return FinishedSweep(cfg, sweep.meta, study, client, result, mlflow_links(sweep.mlflow_uri, sweep.experiment_id(client)))
