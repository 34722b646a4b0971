"""A sweep's results, read back from its study and MLflow: one row per trial, the Pareto set of a
multi-objective sweep, and the best trial under constraints (`--where "peak_vram_gb<=20, method==qlora"`)."""

from __future__ import annotations

import difflib
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.contract import PLACEMENT_KEYS, ROW_METRICS, STATUS, TrialStatus, metric_name
from sweep.config import HYPERPARAMS, SweepConfig
from core.contract import ATTR_WORKER, TAG_TRIAL, finite, is_sweep_trial, summary, trial_label


@dataclass
class SweepResult:
    sweep_dir: Path
    parent_run_id: str
    trials: list[dict[str, Any]] = field(default_factory=list)  # one row per trial, best first
    best: dict[str, Any] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    pareto: list[dict[str, Any]] = field(default_factory=list)  # multi-objective: the non-dominated completed trials
    failure: str | None = None  # why no trial completed (the command exits 1); None when one did, or the sweep was stopped


def rows(cfg: SweepConfig, study: Any, children: list[Any]) -> list[dict[str, Any]]:
    """One row per trial of the whole sweep (every driver run): status and metrics from MLflow,
    the exact hyperparameters from the study."""
    runs = {r.data.tags.get(TAG_TRIAL): r for r in children}
    fixed = cfg.fixed_hyperparams
    out = []
    for t in study.trials:
        label = trial_label(t.number)
        run = runs.get(label)
        if run is None or not is_sweep_trial(t):
            continue
        config = cfg.space.decode(t.params, fixed)
        for key in PLACEMENT_KEYS:  # placement data: logged as params beside the hyperparameters
            if key in run.data.params:
                config[key] = float(run.data.params[key])
        row = {
            "trial_id": t.user_attrs.get(ATTR_WORKER, ""),
            "number": t.number,
            "label": label,
            "status": run.data.tags.get(STATUS, "?"),
            "step": int(run.data.tags["last_step"]) if run.data.tags.get("last_step", "").isdigit() else None,
            "run_id": run.info.run_id,
            "config": config,
            "params": t.params,
            "summary": summary({**fixed, **config}),
            "error": run.data.tags.get("error"),
            "hyper": hyperparameters({**fixed, **config}),
            "metrics": {metric_name(k): v for k, v in run.data.metrics.items()},  # an old sweep's names read as today's
        }
        for key in ROW_METRICS:
            row[key] = row["metrics"].get(key)
        out.append(row)
    return out


def not_run(trials: list[Any]) -> list[tuple[str, str]]:
    """(label, why) of each number the study used for no trial of the sweep: a duplicate proposal
    (the sampler proposed a configuration that ran already; its twin's result is told again) or a
    proposal lost with a killed driver. Their labels are the gaps between the trials (t004 between
    t003 and t005); status, the sweep's end and the report say why. `trials`: Optuna's FrozenTrials
    or sweep.folder.studyfile's, anything with `number` and `user_attrs`."""
    from core.contract import ATTR_DUPLICATE_OF

    out = []
    for t in trials:
        if t.user_attrs.get(STATUS) == TrialStatus.DUPLICATE:
            twin = t.user_attrs.get(ATTR_DUPLICATE_OF)
            out.append((trial_label(t.number), f"not run: the sampler proposed {twin or 'a trial'}'s configuration again" + (" (its result counts for it)" if twin else "")))
        elif t.user_attrs.get(STATUS) == TrialStatus.LOST:
            out.append((trial_label(t.number), "not run: proposed just before its driver was killed, never launched"))
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


# the hyperparameters a trial ran with: every searchable one, and the batch's parts
DERIVED = ("micro_batch", "grad_accum", "effective_batch")
TEXT = ("method", "target_modules", "batch", "lr_scheduler", "optimizer", "gradient_checkpointing")  # compared with == / != only


def hyperparameters(values: dict[str, Any]) -> dict[str, Any]:
    """A trial's hyperparameters (fixed and sampled) as --where compares them: numbers, or text as
    trial names write it (target_modules q_proj+v_proj, batch 4x8, gradient_checkpointing on)."""
    out: dict[str, Any] = {}
    for name in HYPERPARAMS:
        if name not in values:
            continue
        value = values[name]
        if name == "batch":
            micro, accum = value
            out.update(batch=f"{micro}x{accum}", micro_batch=micro, grad_accum=accum, effective_batch=micro * accum)
        elif isinstance(value, bool):
            out[name] = "on" if value else "off"
        elif isinstance(value, tuple | list):
            out[name] = "+".join(str(v) for v in value)
        else:
            out[name] = value
    return out


Constraint = tuple[str, str, float | str]  # (name, comparison, number or text)
_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "==": operator.eq, "!=": operator.ne}
_CONSTRAINT = re.compile(r"^\s*([a-z_][a-z0-9_]*)\s*([<>=!~]+)\s*([A-Za-z0-9_.+\-/]+)\s*$")
_NUMBER = re.compile(r"^-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[+-]?[0-9]+)?$")
WHERE_HELP = (
    "NAME OP VALUE, joined by ',' or 'and': a metric (peak_vram_gb<=20, eval_loss<2.5) "
    "or a hyperparameter (lora_r<=16, method==qlora, target_modules==all-linear, batch==4x8)"
)


def parse_where(text: str | None) -> list[Constraint]:
    """'peak_vram_gb<=20, method==qlora' (or joined by 'and') -> constraints; a clear error otherwise.
    Parsed, never evaluated: a name, a comparison and a number or a word. Whether the name is one
    of the sweep's metrics or hyperparameters is checked against the sweep (check_where)."""
    if not text:
        return []
    out: list[Constraint] = []
    for part in re.split(r",|\band\b", text):
        if not part.strip():
            continue
        match = _CONSTRAINT.match(part)
        if not match:
            raise ValueError(f"--where: cannot read {part.strip()!r}; expected {WHERE_HELP}")
        name, op, value = match.groups()
        if op not in _OPS:
            raise ValueError(f"--where {part.strip()!r}: unknown comparison {op!r}; use one of {', '.join(_OPS)} (== for equality)")
        out.append((name, op, float(value) if _NUMBER.match(value.lower()) else value))
    return out


def check_where(constraints: list[Constraint], rows_: list[dict]) -> None:
    """Each constraint names a metric this sweep recorded or a hyperparameter, and compares it the
    way its values can be compared; otherwise a ValueError that lists what exists."""
    recorded = sorted({k for r in rows_ for k in r.get("metrics", {})})
    hyper = [*HYPERPARAMS, *DERIVED]
    for name, op, value in constraints:
        said = f"--where {name}{op}{value if isinstance(value, str) else f'{value:g}'}"
        if name in hyper:
            if name in TEXT and op not in ("==", "!="):
                raise ValueError(f"{said}: {name} is text (as in the trial names); compare it with == or !=")
            if name not in TEXT and isinstance(value, str):
                raise ValueError(f"{said}: {name} is a number; got {value!r}")
        elif name not in recorded and recorded:
            close = difflib.get_close_matches(name, [*recorded, *hyper], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"{said}: {name} is neither a metric this sweep recorded nor a hyperparameter{hint}; use one of "
                             f"its metrics: {', '.join(recorded)}; or hyperparameters: {', '.join(hyper)}")  # fmt: skip
        elif isinstance(value, str):
            raise ValueError(f"{said}: {name} is a number; got {value!r}")


def value_of(row: dict, name: str) -> Any:
    """A trial's hyperparameter or metric by name (a hyperparameter first: learning_rate is the peak)."""
    if name in row.get("hyper", {}):
        return row["hyper"][name]
    return row.get("metrics", {}).get(name, row.get(name))


def _holds(have: Any, op: str, want: float | str) -> bool:
    if isinstance(want, str) or isinstance(have, str):
        text = want if isinstance(want, str) else f"{want:g}"
        return have is not None and _OPS[op](str(have), text)
    return finite(have) and _OPS[op](have, want)


def satisfies(row: dict, constraints: list[Constraint]) -> bool:
    return all(_holds(value_of(row, name), op, value) for name, op, value in constraints)


def choose(rows_: list[dict], cfg: SweepConfig, constraints: list[Constraint]) -> dict | None:
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


class FinishedSweep:
    """Everything the morning-after commands (report, best) read from a sweep folder. The Optuna
    study and the MLflow client are opened when first asked for: `best` needs neither (its rows come
    from the study's and the MLflow store's files where they are sqlite: seconds sooner)."""

    def __init__(self, folder: Any, cfg: SweepConfig, result: SweepResult, mlflow_links: dict[str, Any], runs: list[Any] = ()):
        self.folder, self.cfg, self.result, self.mlflow_links = folder, cfg, result, mlflow_links  # mlflow_links: sweep.folder.mlflow_links
        self.runs = list(runs)  # the trials' MLflow runs the rows were read from
        self.meta: dict[str, Any] = folder.meta
        self._study: Any = None
        self._client: Any = None

    @property
    def study(self) -> Any:
        """The optuna.Study (importance and Optuna's charts need it)."""
        if self._study is None:
            self._study = self.folder.study()
        return self._study

    @property
    def client(self) -> Any:
        """An mlflow.MlflowClient of the sweep's store."""
        if self._client is None:
            self._client = self.folder.mlflow()
        return self._client


def open_sweep(folder: Path) -> FinishedSweep:
    from sweep.folder import SweepFolder

    sweep = SweepFolder(folder)
    cfg = sweep.config
    trials = sweep.trials()  # the study first: a missing or damaged one is the error to report, before MLflow opens
    runs = sweep.children()
    result = collect(cfg, trials, runs)  # never creates a missing store
    return FinishedSweep(sweep, cfg, result, sweep.links(cfg.search.mode == "min"), runs)
