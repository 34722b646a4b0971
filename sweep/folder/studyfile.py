"""A sweep's Optuna study read back for `status` and `list`, fast.

A sqlite study (the default: optuna.db in the sweep folder) is read with the standard library's
sqlite3, read-only: importing Optuna (SQLAlchemy, alembic) and opening its storage cost a second,
more than the whole command should take. The tables read are Optuna's RDB schema (studies,
trials, trial_values, trial_params, trial_user_attributes, trial_intermediate_values,
study_directions, study_system_attributes), unchanged since Optuna 3; a study on a server
(PostgreSQL), or a file whose schema differs, is read through Optuna instead, opened read-only
(sweep.folder.checks.read_only_study): nothing is ever created or changed.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from core.contract import trial_label


@dataclass(frozen=True)
class StudyTrial:
    """One trial of the study, as much of Optuna's FrozenTrial as status and list need."""

    number: int
    state: str  # Optuna's TrialState name: RUNNING, COMPLETE, PRUNED, FAIL, WAITING
    values: tuple[float, ...] | None = None  # the objectives of a COMPLETE trial
    params: dict[str, Any] = field(default_factory=dict)  # as Optuna decodes them (a choice's label, "8x1")
    user_attrs: dict[str, Any] = field(default_factory=dict)
    intermediate: dict[int, float] = field(default_factory=dict)  # step -> the primary metric
    started: datetime | None = None  # local time, as Optuna stores it
    completed: datetime | None = None

    @property
    def label(self) -> str:
        return trial_label(self.number)


@dataclass(frozen=True)
class StudyView:
    """The study's directions ("minimize" / "maximize"), objective names and trials (by number)."""

    directions: tuple[str, ...]
    metric_names: tuple[str, ...] | None
    trials: tuple[StudyTrial, ...]

    @property
    def minimize(self) -> bool:
        return self.directions[0] == "minimize"


def read_study(storage: str, study_name: str, folder: Path) -> StudyView:
    """The study `study_name` in `storage` (KeyError if it holds none), read-only: nothing is
    created or changed, an empty or damaged file included (ConfigError naming the store, for the
    sweep folder `folder`)."""
    from sweep.folder.checks import sqlite_file

    path = sqlite_file(storage)
    if path is not None and path.is_file():
        try:
            return _read_sqlite(path, study_name)
        except sqlite3.OperationalError:  # not the schema this reader knows: Optuna knows it
            pass
    return _read_optuna(storage, study_name, folder)


def _read_sqlite(path: Path, study_name: str) -> StudyView:
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        row = db.execute("SELECT study_id FROM studies WHERE study_name = ?", (study_name,)).fetchone()
        if row is None:
            raise KeyError(study_name)
        (study_id,) = row
        directions = tuple(d.lower() for (d,) in db.execute("SELECT direction FROM study_directions WHERE study_id = ? ORDER BY objective", (study_id,)))
        names = db.execute("SELECT value_json FROM study_system_attributes WHERE study_id = ? AND key = 'study:metric_names'", (study_id,)).fetchone()
        rows = db.execute("SELECT trial_id, number, state, datetime_start, datetime_complete FROM trials WHERE study_id = ? ORDER BY number", (study_id,)).fetchall()
        per_trial = "SELECT t.trial_id, {columns} FROM {table} x JOIN trials t ON t.trial_id = x.trial_id WHERE t.study_id = ? ORDER BY x.rowid"
        values: dict[int, list[tuple[int, float]]] = {}
        for trial_id, objective, value, kind in db.execute(per_trial.format(columns="x.objective, x.value, x.value_type", table="trial_values"), (study_id,)):
            values.setdefault(trial_id, []).append((objective, _number(value, kind)))
        params: dict[int, dict[str, Any]] = {}
        for trial_id, name, value, distribution in db.execute(per_trial.format(columns="x.param_name, x.param_value, x.distribution_json", table="trial_params"), (study_id,)):
            params.setdefault(trial_id, {})[name] = _param(value, distribution)
        attrs: dict[int, dict[str, Any]] = {}
        for trial_id, key, value in db.execute(per_trial.format(columns="x.key, x.value_json", table="trial_user_attributes"), (study_id,)):
            attrs.setdefault(trial_id, {})[key] = json.loads(value)
        steps: dict[int, dict[int, float]] = {}
        columns = "x.step, x.intermediate_value, x.intermediate_value_type"
        for trial_id, step, value, kind in db.execute(per_trial.format(columns=columns, table="trial_intermediate_values"), (study_id,)):
            steps.setdefault(trial_id, {})[int(step)] = _number(value, kind)
    finally:
        db.close()
    trials = tuple(
        StudyTrial(number=number, state=state, values=tuple(v for _, v in sorted(values[tid])) if tid in values else None, params=params.get(tid, {}),
                   user_attrs=attrs.get(tid, {}), intermediate=dict(sorted(steps.get(tid, {}).items())), started=_time(start), completed=_time(end))
        for tid, number, state, start, end in rows
    )  # fmt: skip
    return StudyView(directions or ("minimize",), tuple(json.loads(names[0])) if names else None, trials)


def _number(value: float | None, kind: str) -> float:
    """Optuna stores infinities and NaN as a kind beside a NULL value."""
    return {"INF_POS": float("inf"), "INF_NEG": float("-inf"), "NAN": float("nan")}.get(kind, value if value is not None else float("nan"))


def _param(value: float, distribution_json: str) -> Any:
    """A stored parameter -> its value: a choice's index -> the choice, an int range's float -> int."""
    distribution = json.loads(distribution_json)
    name, attributes = distribution.get("name"), distribution.get("attributes", {})
    if name == "CategoricalDistribution":
        return attributes["choices"][int(value)]
    if name in ("IntDistribution", "IntUniformDistribution", "IntLogUniformDistribution"):
        return int(value)
    return float(value)


def _time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def _read_optuna(storage: str, study_name: str, folder: Path) -> StudyView:
    from sweep.folder.checks import read_only_study

    study = read_only_study(folder, storage, study_name)  # KeyError without such a study
    trials = tuple(
        StudyTrial(number=t.number, state=t.state.name, values=tuple(t.values) if t.values else None, params=dict(t.params), user_attrs=dict(t.user_attrs),
                   intermediate=dict(sorted(t.intermediate_values.items())), started=t.datetime_start, completed=t.datetime_complete)
        for t in study.get_trials(deepcopy=False)
    )  # fmt: skip
    names = tuple(study.metric_names) if study.metric_names else None
    return StudyView(tuple(d.name.lower() for d in study.directions), names, trials)
