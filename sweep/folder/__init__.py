"""A sweep's results folder, and how to read it back (`SweepFolder`: status, report, best, resume,
estimate, warm start).

    <results_dir>/<name>-<timestamp>/
        sweep.json      what the sweep is, where it ran (sweep_dir) and where its stores are (secrets
                        redacted), its state; moved or copied, the folder reads its own stores (relocate)
        space.yaml      the space file as written (secrets redacted)
        resolved.yaml   the config as it ran
        optuna.db       the study (unless tracking.optuna_storage points elsewhere)
        trials/t003/    trial t003: its checkpoints (step-000040/: the PEFT adapter and the
                        training state) and reports.jsonl (every report, for readback)
        work/           the workers' queue: tickets of trials to continue, retry or run alone
        tune*/          Ray Tune's folders of the workers (worker_<ray trial id>), one per driver run
        driver.pid      the live driver's pid and host, while one runs
        STOP            written by `python -m sweep stop`: trials checkpoint and stop
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweep.config import ConfigError, SweepConfig, load_config, yaml_scalar

META = "sweep.json"
STOP = "STOP"
LOCK = "driver.pid"
LEGACY_CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "adapter_model.bin")  # a lone trial's, before every trial was a cohort member


class StopFile:
    """STOP in a sweep folder: `python -m sweep stop`, Ctrl-C or SIGTERM write it, and from then on
    the driver's trials checkpoint and stop, no new trial starts, and what was stopped stays open
    for `resume`. The one place the driver asks whether a stop was requested (the searcher, the
    MLflow callback, Tune's stopper, the summary); trials on the workers read the file at `path`.
    Once seen, a stop stays requested for the rest of the driver run, so they all agree."""

    def __init__(self, path: Path):
        self.path = str(path)
        self._seen = False

    def requested(self) -> bool:
        if not self._seen:
            self._seen = os.path.exists(self.path)
        return self._seen


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """Atomically: a reader (status) never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".sweep-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, folder / META)


# what every sweep.json has held since the first version (the rest is read with defaults)
META_TEXT = ("space_file", "mlflow_uri", "optuna_storage", "study_name", "parent_run_id")
META_NUMBERS = ("num_trials", "concurrency", "elapsed_seconds")


def read_meta(folder: Path) -> dict[str, Any]:
    """sweep.json, checked: every command that reads a sweep folder comes here, so a damaged file
    is one clear ConfigError (exit 2) naming it and what is wrong, never a traceback."""
    path = folder / META
    if not path.is_file():
        raise ConfigError(str(folder), [f"{folder}: not a sweep folder (no {META}); give a folder made by `python -m sweep run`"])
    problem, meta = None, None
    try:
        text = path.read_text()
        meta = json.loads(text)
    except OSError as exc:
        problem = f"cannot be read ({exc.strerror or exc})"
    except UnicodeDecodeError:
        problem = "is not UTF-8 text (damaged?)"
    except json.JSONDecodeError as exc:
        problem = "is empty (0 bytes: truncated?)" if not text.strip() else f"is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}: truncated or edited?)"
    except (ValueError, RecursionError) as exc:
        problem = f"is not usable JSON ({type(exc).__name__})"
    if problem is None:
        problem = meta_problem(meta)
    if problem:
        raise ConfigError(str(path), [f"{path} {problem}; it says what the sweep is and where its stores are: restore it from a backup "
                                      f"(the trials are still in the study and in MLflow)"])  # fmt: skip
    return meta


def meta_problem(meta: Any) -> str | None:
    """What is wrong with sweep.json's content (None if nothing)."""
    if not isinstance(meta, dict):
        kind = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true or false", type(None): "null"}.get(type(meta), type(meta).__name__)
        return f"holds {kind}, not an object ({{...}})"
    missing = [key for key in META_TEXT if key not in meta]
    if missing:
        return f"lacks {', '.join(missing)}"
    wrong = [f"{key} is {meta[key]!r}, not text" for key in META_TEXT if not isinstance(meta[key], str) or not meta[key]]
    wrong += [f"{key} is {meta[key]!r}, not a number" for key in META_NUMBERS
              if key in meta and (isinstance(meta[key], bool) or not isinstance(meta[key], int | float))]  # fmt: skip
    if not isinstance(meta.get("overrides", []), list) or not all(isinstance(o, str) for o in meta.get("overrides", [])):
        wrong.append(f"overrides is {meta['overrides']!r}, not a list of key.path=value texts")
    return "; ".join(wrong) or None


def update_meta(folder: Path, **changes: Any) -> dict[str, Any]:
    meta = read_meta(folder)
    meta.update(changes)
    write_meta(folder, meta)
    return meta


def recorded_dir(folder: Path, meta: dict[str, Any]) -> Path | None:
    """Where the sweep folder was when the sweep ran (its stores' URLs were made absolute there):
    sweep.json's `sweep_dir`; for a sweep.json of an earlier version, which lacks it, the folder of
    its default study (sqlite:///X/optuna.db with X named as `folder` is the default layout's).
    None when it cannot be told (the stores are then read as recorded)."""
    from sweep.folder.checks import sqlite_file

    if isinstance(meta.get("sweep_dir"), str) and Path(meta["sweep_dir"]).is_absolute():
        return Path(meta["sweep_dir"])
    study = sqlite_file(str(meta.get("optuna_storage", "")))
    if study is not None and study.is_absolute() and study.name == "optuna.db" and study.parent.name == Path(folder).name:
        return study.parent
    return None


def relocate(url: str, folder: Path, recorded: Path | None) -> str:
    """`url` for the sweep folder where it is now (`folder`), when it ran at `recorded` and has been
    moved or copied since: a sqlite file inside the old folder (optuna.db) or directly in the old
    results folder beside it (mlflow.db) is the same file at the new place; the copy reads and
    writes its own stores, never the original's. Any other store (a server, s3, a sqlite file
    elsewhere) is as recorded."""
    prefix = "sqlite:///"
    if recorded is None or not url.startswith(prefix):
        return url
    raw = url[len(prefix) :].split("?", 1)[0]
    moved = relocate_path(Path(raw), folder, recorded)
    return url if moved is None else prefix + str(moved) + url[len(prefix) + len(raw) :]


def relocate_path(path: Path, folder: Path, recorded: Path | None, in_results: bool = False) -> Path | None:
    """`path` at the sweep folder's new place (relocate), or None where it does not move: it is not
    inside the old folder, nor directly in the old results folder (`in_results`: anywhere under
    it, as MLflow's artifact folder mlartifacts/ is)."""
    folder = Path(folder)
    if recorded is None or recorded == folder or not path.is_absolute():
        return None
    if path.is_relative_to(recorded):
        return folder / path.relative_to(recorded)
    if path.parent == recorded.parent or (in_results and path.is_relative_to(recorded.parent)):
        return folder.parent / path.relative_to(recorded.parent)
    return None


def load_sweep_config(folder: Path) -> SweepConfig:
    """The sweep's config: the original space file if it is still where it was (it may hold
    secrets the redacted copy lacks), else the copy, with paths relative to the original's folder."""
    from sweep.config.secrets import redact

    meta = read_meta(folder)
    original = Path(meta["space_file"])
    # The results folder is where this sweep folder lies, whatever the current directory is now
    # (the default, ./sweeps, depends on where `run` was started).
    overrides = [*meta.get("overrides", []), f"tracking.results_dir={yaml_scalar(str(folder.resolve().parent))}"]
    # a store given as a relative sqlite path was made absolute against the directory `run` started
    # in (sweep.config): the recorded URL, not one resolved against today's directory. A sqlite file
    # in the folder or beside it (the default stores, or given there) follows the folder: read where
    # the folder is now if it was moved or copied (relocate), never at its old place.
    here, was = folder.resolve(), recorded_dir(folder, meta)
    defaults = {f"sqlite:///{here.parent / 'mlflow.db'}", f"sqlite:///{here / 'optuna.db'}"}
    pinned = {key: relocate(str(meta[key]), here, was) for key in ("mlflow_uri", "optuna_storage") if str(meta.get(key, "")).startswith("sqlite:////")}
    overrides += [f"tracking.{key}={yaml_scalar(url)}" for key, url in pinned.items() if url not in defaults]
    # The recorded overrides hold absolute paths (sweep.config.anchor_overrides); a sweep made before
    # they did recorded relative ones, which were read against the space file's folder then.
    if original.is_file() and redact(original.read_text()) == (folder / "space.yaml").read_text():
        return load_config(original, overrides, overrides_dir=original.parent)
    return load_config(folder / "space.yaml", overrides, base_dir=original.parent, overrides_dir=original.parent)


class SweepFolder:
    """One sweep's folder, read back: the one reader of sweep.json, of the sweep's config, of where
    its stores are, and of its MLflow child runs (status, report, best, estimate, warm start and
    resume all come here).

    Store URLs are the ones to connect with: from the sweep's config, whose `${VAR}` references
    are expanded from the environment now. sweep.json's copies are redacted (a password reads
    ***), so they serve only when the config no longer loads and they hold no masked secret.
    """

    def __init__(self, path: Path):
        self.path = Path(path).resolve()
        self.meta = read_meta(self.path)
        self._cfg: SweepConfig | None = None
        self._stores: tuple[str, str] | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def study_name(self) -> str:
        return self.meta["study_name"]

    @property
    def parent_run_id(self) -> str:
        return self.meta["parent_run_id"]

    @property
    def config(self) -> SweepConfig:
        """The sweep's config (ConfigError if it no longer loads: a data file moved, say)."""
        if self._cfg is None:
            self._cfg = load_sweep_config(self.path)
        return self._cfg

    def stores(self) -> tuple[str, str]:
        """(MLflow URI, Optuna storage) to connect with."""
        if self._stores is None:
            self._stores = self._resolve_stores()
        return self._stores

    def _resolve_stores(self) -> tuple[str, str]:
        from sweep.config.secrets import expand_env, masked, password_variable, redact, unmasked

        try:
            urls, given = [self.config.mlflow_uri, self.config.optuna_storage(self.path)], "on the command line"
        except ConfigError:  # the space file no longer loads (moved data, an unset ${VAR}): sweep.json's copies
            urls, given = [], f"in {self.meta['space_file']}, which no longer loads"
            for key in ("mlflow_uri", "optuna_storage"):
                try:
                    urls.append(expand_env(self.meta[key]))
                except KeyError as exc:
                    raise ConfigError(str(self.path), [f"{META}: {key} refers to ${{{exc.args[0]}}}, which is not set in the environment; export it"]) from None
        # A password given literally on the command line (or in a space file since moved) is
        # recorded only as ***: never connect with that, but without it where the store's client
        # finds the password itself (PGPASSWORD, ~/.pgpass, MLFLOW_TRACKING_PASSWORD).
        for i, key in enumerate(("mlflow_uri", "optuna_storage")):
            if masked(urls[i]):
                url, variable = unmasked(urls[i]), password_variable(urls[i])
                if url is None:
                    export = f"export {variable} (the store's client reads it)" if variable else f"make {self.meta['space_file']} load again"
                    raise ConfigError(str(self.path), [
                        f"tracking.{key}: {redact(urls[i])} is recorded without its password: it was given literally ({given}) and the sweep "
                        f"folder keeps only ***; {export}, then run this again (write passwords as ${{VAR}} to avoid this)"])  # fmt: skip
                urls[i] = url
        here, was = self.path, recorded_dir(self.path, self.meta)
        return relocate(urls[0], here, was), relocate(urls[1], here, was)

    def recorded_uri(self, key: str) -> str:
        """sweep.json's `key` (mlflow_uri, optuna_storage; redacted, to show) at the folder's place now (relocate)."""
        return relocate(str(self.meta.get(key, "")), self.path, recorded_dir(self.path, self.meta))

    @property
    def mlflow_uri(self) -> str:
        return self.stores()[0]

    @property
    def optuna_storage(self) -> str:
        return self.stores()[1]

    def check_stores(self) -> None:
        """Both stores there and readable (ConfigError otherwise); nothing created."""
        from sweep.folder.checks import check_stores

        check_stores(self.path, *self.stores(), self.study_name, recorded_dir(self.path, self.meta))

    def study(self) -> Any:
        """The sweep's Optuna study, after check_stores (a missing store is never created)."""
        from sweep.folder.checks import load_study

        return load_study(self.path, *self.stores(), self.study_name, recorded_dir(self.path, self.meta))

    def mlflow(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(self.mlflow_uri)

    def log_artifacts(self, client: Any, run_id: str, local: Path, artifact_path: str) -> None:
        """`local` (a file or a folder) as artifacts of the MLflow run `run_id`, under `artifact_path`.
        A local MLflow store keeps each run's artifact folder as an absolute path: in a moved or
        copied results folder that is the old place, so they go to the same place under the new
        one (the copy's own artifacts), never to the original's."""
        from urllib.parse import unquote, urlparse

        uri = client.get_run(run_id).info.artifact_uri
        parsed = urlparse(uri)
        moved = None
        if self.mlflow_uri.startswith("sqlite:") and parsed.scheme in ("", "file") and not parsed.netloc:
            moved = relocate_path(Path(unquote(parsed.path)), self.path, recorded_dir(self.path, self.meta), in_results=True)
        if moved is None:
            log = client.log_artifacts if Path(local).is_dir() else client.log_artifact
            log(run_id, str(local), artifact_path)
            return
        from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

        repo = LocalArtifactRepository(moved.as_uri())
        (repo.log_artifacts if Path(local).is_dir() else repo.log_artifact)(str(local), artifact_path)

    def experiment_id(self, client: Any = None) -> str:
        """The sweep's MLflow experiment id: from sweep.json (recorded since the sweep started),
        else looked up from its parent run."""
        if self.meta.get("experiment_id"):
            return str(self.meta["experiment_id"])
        return (client or self.mlflow()).get_run(self.parent_run_id).info.experiment_id

    def runs_view(self, ascending: bool) -> RunsView:
        """The sweep's trials in MLflow's runs table, sorted by its objective (`ascending`: minimised)."""
        return RunsView(self.parent_run_id, self.meta.get("metric", "eval_loss"), ascending, shared=bool(self.meta.get("mlflow_view")))

    def links(self, ascending: bool, client: Any = None) -> dict[str, str | None]:
        """mlflow_links of this sweep: the command, the UI, its runs table."""
        return mlflow_links(self.mlflow_uri, self.experiment_id(client), self.runs_view(ascending))

    def children(self, client: Any = None) -> list[Any]:
        """The sweep's trial runs in MLflow (every driver run's): from a sqlite store's file without
        MLflow (sweep.folder.runsfile: seconds faster) unless a `client` is given or the store is elsewhere."""
        if client is None:
            from sweep.folder.runsfile import child_runs as read_children

            runs = read_children(self.mlflow_uri, self.parent_run_id)
            if runs is not None:
                return runs
        client = client or self.mlflow()
        return child_runs(client, client.get_run(self.parent_run_id).info.experiment_id, self.parent_run_id)

    def trials(self) -> Any:
        """The study's trials, read as `status` reads them (sweep.folder.studyfile: no Optuna for a
        sqlite study), after check_stores; `study()` is the Optuna study itself."""
        from sweep.folder.studyfile import read_study

        self.check_stores()
        try:
            return read_study(self.optuna_storage, self.study_name, self.path)
        except KeyError:
            return self.study()  # no such study: load_study says so, naming what still holds the trials


MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui --port 5000` serves (the command printed names the port)
ML_WORKFLOW = "workflowType=machine_learning"  # MLflow 3's runs table and run pages of model training, not its GenAI views
VIEW_TAG = "mlflow.sharedViewState."  # + key: an experiment tag holding a runs-table view; the UI opens it for ?viewStateShareKey=key
# 20 colours far apart (Kelly's, less the near-white ones): MLflow's own, hashed from the run id, gave
# the two best trials of the demo the same one
RUN_COLORS = (
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#469990", "#9a6324",
    "#800000", "#808000", "#000075", "#dcbeff", "#ffe119", "#aaffc3", "#fabed4", "#a9a9a9", "#ffd8b1", "#000000",
)  # fmt: skip


@dataclass(frozen=True)
class RunsView:
    """What the runs-table link opens: one sweep's trials (its parent run's children), sorted by its
    objective. `shared`: the experiment holds the view as a tag (runs_view_state: its columns too),
    written when the sweep started; without it (a sweep of an earlier version) the link carries the
    sort and the filter, which MLflow 3's URL honours (orderByKey, orderByAsc, searchFilter), but
    no columns."""

    parent_run_id: str
    metric: str
    ascending: bool
    shared: bool = False

    def query(self) -> str:
        from urllib.parse import quote as url_quote

        if self.shared:
            return f"{ML_WORKFLOW}&viewStateShareKey={self.parent_run_id}"
        facets = {"searchFilter": self.search_filter(), "orderByKey": f"metrics.`{self.metric}`", "orderByAsc": str(self.ascending).lower()}
        return ML_WORKFLOW + "".join(f"&{k}={url_quote(v, safe='')}" for k, v in facets.items())

    def search_filter(self) -> str:
        return f"tags.mlflow.parentRunId = '{self.parent_run_id}'"


def runs_view_state(view: RunsView, metrics: list[str], params: list[str]) -> dict[str, Any]:
    """The runs table of a sweep as MLflow 3.17's UI reads a shared view (an experiment tag, see
    VIEW_TAG): the sweep's trials only and flat (a sort by a metric lists child runs without their
    parent), best first, and as columns the objectives, trial_status and the searched
    hyperparameters, wide enough to read. The UI does not take the expanded rows or its assistant
    panel from a view (nor from the URL): the assistant opens once per browser on a local server."""
    from core.contract import STATUS

    columns = [*(f"metrics.`{m}`" for m in metrics), f"tags.`{STATUS}`", *(f"params.`{p}`" for p in params)]
    return {
        "searchFilter": view.search_filter(),
        "orderByKey": f"metrics.`{view.metric}`",
        "orderByAsc": view.ascending,
        "selectedColumns": columns,
        "columnOrder": ["attributes.`Run Name`", *columns, "runDateAndNestInfo", "duration"],  # the UI applies widths to these only
        "columnWidths": {"attributes.`Run Name`": 330, **{c: 130 for c in columns}},
        "runsHiddenMode": "SHOW_ALL",  # every trial's curve in the charts, not the first 10
    }


def mlflow_links(mlflow_uri: str, experiment_id: str | None, view: RunsView | None = None) -> dict[str, str | None]:
    """Where to look at a sweep in MLflow: the command that serves a local store (None for a
    tracking server), the UI's address and the experiment's runs table (None without an id), as
    `view` shows it."""
    from sweep.folder.checks import quote
    from sweep.config.secrets import redact

    server = mlflow_uri.startswith(("http://", "https://"))
    ui = redact(mlflow_uri).rstrip("/") if server else MLFLOW_UI
    query = view.query() if view is not None else ML_WORKFLOW
    return {
        "command": None if server else f"mlflow ui --backend-store-uri {quote(redact(mlflow_uri))} --port {MLFLOW_UI.rsplit(':', 1)[1]}",
        "ui": ui,
        "runs": f"{ui}/#/experiments/{experiment_id}/runs?{query}" if experiment_id else None,
    }


def run_link(links: dict[str, str | None], run_id: str) -> str | None:
    """One run's page in the MLflow UI, beside the runs table of `mlflow_links` (None without an
    experiment id): `UI/#/experiments/ID/runs/RUN_ID?workflowType=machine_learning`."""
    runs = links.get("runs")
    return runs.split("?", 1)[0] + f"/{run_id}?{ML_WORKFLOW}" if runs else None


def say_mlflow(links: dict[str, str | None], write: Any) -> None:
    """The lines `run`, `status` and `best` print to open the sweep's runs in MLflow."""
    if links["command"]:
        write(f"open the MLflow UI:  {links['command']}")
    if links["runs"]:
        write(f"its runs:  {links['runs']}")


def child_runs(client: Any, experiment_id: str, parent_run_id: str, label: str | None = None) -> list[Any]:
    """The MLflow child runs of a sweep's parent run; with `label` (t007), that trial's only."""
    where = f"tags.mlflow.parentRunId = '{parent_run_id}'" + (f" and tags.trial = '{label}'" if label else "")
    return client.search_runs([experiment_id], filter_string=where, max_results=1 if label else 50000)


_HELD: dict[str, int] = {}  # sweep folder -> the open, flock-ed driver.pid of this process


def claim(folder: Path) -> None:
    """Mark this process as the sweep's driver; refuse if a live one holds it.

    Atomic: the lock is an exclusive flock on driver.pid, held open while this process drives the
    sweep; the kernel drops it when the process dies (kill -9 included), so a dead driver's lock is
    never in the way, and of two claims at the same moment exactly one wins. The file's content
    (pid, host) is for `status` and `stop`, and for drivers on other machines, which a flock on a
    shared filesystem may not see."""
    import fcntl

    key = str(Path(folder).resolve())
    if key in _HELD:
        return
    path = folder / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            _refuse(folder, driver(folder) or {"pid": "?", "host": "?"})
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the file was released (unlinked) between our open and our lock: again
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"null")
    except ValueError:
        holder = None
    if isinstance(holder, dict) and holder.get("host") not in (None, socket.gethostname()):
        os.close(fd)
        _refuse(folder, holder)  # another machine's driver: assume alive, it cannot be checked from here
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
    _HELD[key] = fd


def _refuse(folder: Path, holder: dict[str, Any]) -> None:
    raise ConfigError(str(folder), [f"{folder.name}: a driver is running it already (pid {holder['pid']} on {holder['host']}); stop it first (`python -m sweep stop {folder}`)"])


def release(folder: Path) -> None:
    fd = _HELD.pop(str(Path(folder).resolve()), None)
    if fd is None:
        return
    try:
        (folder / LOCK).unlink()  # while still locked, so nobody locks a file about to vanish
    except OSError:
        pass
    os.close(fd)


def driver(folder: Path) -> dict[str, Any] | None:
    """The live driver of this sweep ({pid, host}), or None. A lock left by a killed driver is stale."""
    try:
        holder = json.loads((folder / LOCK).read_text())
    except (OSError, ValueError):
        return None
    if holder.get("host") != socket.gethostname():
        return holder  # another machine's driver: assume alive, it cannot be checked from here
    try:
        os.kill(int(holder["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return holder


def trial_checkpoint(folder: Path, label: str, ray_trial_id: str | None = None, write: Any = None) -> str | None:
    """A trial's newest complete checkpoint (PEFT adapter + training state): trials/t007/step-N/.
    Sweep folders of earlier versions kept it elsewhere and are read too: a cohort member's in
    cohorts/members/t007/, a lone trial's in its Ray Tune folder (tune*/t007_<ray id>/checkpoint_N/).
    Those a later version cannot continue (`resume`) still export. `write` says why one is skipped."""
    from core.contract import TRIALS_DIR
    from trainable.cohort_worker import latest_checkpoint as member_checkpoint

    for place in (folder / TRIALS_DIR / label, folder / "cohorts" / "members" / label):
        checkpoint = member_checkpoint(place)
        if checkpoint is not None and (Path(checkpoint) / "adapter_config.json").is_file():
            return checkpoint
        if checkpoint is not None and write is not None:
            write(f"{label}'s checkpoint {checkpoint} predates PEFT-format member checkpoints: retrain it with python -m sweep train")
    if not ray_trial_id:
        return None
    candidates = []
    for trial_dir in folder.glob(f"tune*/*{ray_trial_id}*"):
        for ckpt in trial_dir.glob("checkpoint_*"):
            if all((ckpt / name).is_file() for name in LEGACY_CHECKPOINT_FILES):
                candidates.append(ckpt)
    if not candidates:
        return None
    return str(max(candidates, key=lambda p: json.loads((p / "trainer_state.json").read_text()).get("step", 0)))


def next_tune_name(folder: Path) -> str:
    """tune, then tune-resume-1, -2, ...: each driver run keeps its own Tune folder."""
    if not (folder / "tune").exists():
        return "tune"
    n = 1
    while (folder / f"tune-resume-{n}").exists():
        n += 1
    return f"tune-resume-{n}"
