"""A sweep, top to bottom: preflight -> workers planned -> results folder -> study and MLflow parent
run -> Ray Tune runs the workers -> summary.

    preflight   load the tokenizer, check LoRA targets against the model, tokenize the data once
    plan        the workers on this Ray cluster (sweep.engine.workers): GPUs, CPUs, memory
    folder      <results_dir>/<name>-<timestamp>/: space.yaml, resolved.yaml, sweep.json, optuna.db,
                trials/ (each trial's checkpoints and reports), work/ (the workers' queue), tune/
    run         a `Sweep` (setup / run / finish): a Tuner whose trials are the workers; each worker
                trains a cohort of trials from the study (sweep.engine.source) on one loaded base
    summary     every trial's outcome, the best trial, and how to open the MLflow UI

Config and data problems are found before anything starts (no Ray, no MLflow run, no folder). The
stores' URLs are absolute in the config (sweep.config), so every worker opens the driver's stores
whatever its own working directory is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import yaml

from core.contract import ATTR_ATTEMPT, ATTR_WARM_START, ATTR_WORKER, TRIALS_DIR, WORK_DIR, trial_label
from sweep.config import ConfigError, SweepConfig
from sweep.readback.results import SweepResult, collect, not_run
from sweep.engine.signals import Interrupt, Interrupted, Terminated, held, received_signal, signals_raise, wrap_up

Log = Callable[[str], None]
MEMBER_SHARE = "member_vram_share_gb"  # a trial's estimated share of its worker's memory (not a measurement)
HUB_PROBE_S = 5.0  # s: the one look at the hub before loading a model from it (sweep.engine.sweep.unreachable_hub)
WORKERS_STOP_S = 6.0  # s: after Ray's servers ended, how long the workers that live on get to checkpoint and stop their trials


# ----------------------------------------------------------------------------------------------
# preflight: everything that can fail before a single resource is taken


def preflight(cfg: SweepConfig, log: Log) -> Any:
    """Tokenizer, LoRA target check and the tokenized data (cached). Raises ConfigError / DataError."""
    from trainable.data import notes, prepare

    offline = unreachable_hub(cfg)
    download_model(cfg, log, offline)
    tokenizer = checked_tokenizer(cfg, log, offline)
    if offline and work_offline():
        log(f"hub unreachable ({offline}): this run and its workers read the hub's files from the HF cache only (HF_HUB_OFFLINE=1)")
    with hub_data_error(cfg, offline):
        prepared = prepare(cfg.data, tokenizer, cfg.results_dir / ".cache" / "data", cfg.train.seed, log=log)
    for note in notes(prepared.stats):  # replies cut short by max_seq_len, and where
        log(note)
    return prepared


def check_inputs(cfg: SweepConfig) -> list[str]:
    """`validate`: what preflight checks (the tokenizer, the LoRA targets, every line of the data),
    with nothing downloaded but the tokenizer and nothing written. Returns the data's notes
    (replies cut short by max_seq_len); raises ConfigError / DataError as preflight does, and
    HubUnreachable where the model's files are neither on a reachable hub nor in the HF cache."""
    from trainable.data import check, notes

    offline = unreachable_hub(cfg)
    tokenizer = checked_tokenizer(cfg, log=lambda line: None, offline=offline)
    if offline:
        work_offline()
    with hub_data_error(cfg, offline):
        return notes(check(cfg.data, tokenizer, cfg.results_dir / ".cache" / "data", cfg.train.seed))


def work_offline() -> bool:
    """From here on, read the hub's files from the HF cache only: in this process (the hub client's
    and datasets' switches, read when they were imported) and in the workers it starts (a local
    Ray inherits the environment). Without it every from_pretrained and load_dataset waits through
    the hub client's retries first (a worker's from_pretrained: 48 s instead of 2 s, bench/BENCH.md).
    Returns whether it changed anything."""
    import sys

    from huggingface_hub import constants

    if os.environ.get("HF_HUB_OFFLINE") == "1" and constants.HF_HUB_OFFLINE:
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True
    return True


@contextlib.contextmanager
def hub_data_error(cfg: SweepConfig, offline: str | None) -> Any:
    """A hub dataset that is neither reachable nor cached: HubUnreachable (validate defers the data
    check, run stops naming it), like a model in that state."""
    from trainable.data import HubDataUnreachable

    try:
        yield
    except HubDataUnreachable as exc:
        raise HubUnreachable(str(cfg.source), exc.source, f"{offline or exc.reason}, and not in the HF cache", kind="dataset") from None


class HubUnreachable(ConfigError):
    """The model's files are neither on a reachable hub nor in the local HF cache: nothing that needs
    them (its tokenizer, its LoRA targets, the tokenized data) can be checked on this machine now."""

    CHECKS = ("tokenizer", "target_modules", "data")
    TODO = ("run it where huggingface.co (or your HF_ENDPOINT) is reachable, or with the model in the HF cache "
            "(HF_HOME) and HF_HUB_OFFLINE=1, or point model.id at a local copy")  # fmt: skip
    DATASET_TODO = ("run it where huggingface.co (or your HF_ENDPOINT) is reachable, or with the dataset in the HF cache "
                    "(HF_HOME) and HF_HUB_OFFLINE=1, or point data.train / data.eval at local files")  # fmt: skip

    def __init__(self, source: str, model_id: str, reason: str, kind: str = "model"):
        self.model_id, self.reason, self.kind = model_id, reason, kind
        if kind == "dataset":  # a hub dataset (data.train / data.eval): only the data check waits for it
            self.checks, self.todo = ("data",), self.DATASET_TODO
            super().__init__(source, [f"data: cannot load the hub dataset {model_id}: {reason}; {self.todo}"])
        else:
            self.checks, self.todo = self.CHECKS, self.TODO
            super().__init__(source, [f"model: cannot load the tokenizer of {model_id}: {reason}; {self.todo}"])

    def deferred(self) -> dict[str, Any]:
        """What `validate` could not check, why, and what to do (its --json `deferred` entry: the
        model's or the dataset's id under `model` or `dataset`)."""
        return {"checks": list(self.checks), self.kind: self.model_id, "reason": self.reason, "todo": self.todo.replace("run it", "run validate")}


def unreachable_hub(cfg: SweepConfig) -> str | None:
    """Why the hub cannot serve this config's models and datasets now; None where it can or none
    comes from it.

    One quick look (HUB_PROBE_S) before loading: an unreachable hub otherwise costs the hub client's
    retries, about 23 s per file. Any answer, an error status included, means it is reachable."""
    from sweep.config import TINY_MODELS
    from trainable.data import is_local

    models_local = all(m in TINY_MODELS or Path(m).exists() for m in (cfg.model.id, cfg.model.chat_template_from) if m)
    if models_local and all(is_local(d) for d in (cfg.data.train, cfg.data.eval) if d):
        return None
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_S)
    except Exception as exc:  # no answer at all: no network, no name resolution, refused, timed out
        return f"{constants.ENDPOINT} unreachable ({(str(exc).splitlines() or [type(exc).__name__])[0][:200]})"
    return None


def _not_on_hub_nor_cached(exc: BaseException) -> bool:
    """The hub client's own word, somewhere in the chain transformers raises: it could not reach the
    hub (or was told not to) and the file is not cached. Not: no such repo, gated, a broken local folder."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def checked_tokenizer(cfg: SweepConfig, log: Log, offline: str | None = None) -> Any:
    """The model's tokenizer, after its LoRA target choices were checked against the model.
    `offline` (why the hub is unreachable): from local folders and the HF cache only."""
    from sweep.config.space import Choice
    from trainable.model import check_targets, load_tokenizer

    log(f"model {cfg.model.id}: loading tokenizer" + (f" from the HF cache ({offline})" if offline else "") + " ...")
    local = offline is not None
    try:
        tokenizer = load_tokenizer(cfg.model.id, cfg.model.chat_template_from, cfg.model.revision, local_files_only=local)
    except (OSError, ValueError) as exc:
        if _not_on_hub_nor_cached(exc):
            raise HubUnreachable(str(cfg.source), cfg.model.id, (offline or str(exc).splitlines()[0]) + ", and not in the HF cache") from None
        raise ConfigError(str(cfg.source), [f"model: cannot load the tokenizer of {cfg.model.id}: {str(exc).splitlines()[0]}"]) from None
    dim = next((d for d in cfg.space.dims if d.name == "target_modules"), None)
    choices = list(dim.options) if isinstance(dim, Choice) else [cfg.train.target_modules]
    try:
        problems = check_targets(cfg.model.id, choices, cfg.model.revision, local_files_only=local)
    except (OSError, ValueError) as exc:
        if _not_on_hub_nor_cached(exc):
            raise HubUnreachable(str(cfg.source), cfg.model.id, (offline or str(exc).splitlines()[0]) + ", and its config is not in the HF cache") from None
        raise ConfigError(str(cfg.source), [f"model.id: cannot read the config of {cfg.model.id}: {str(exc).splitlines()[0]}"]) from None
    if problems:
        where = "space.target_modules" if dim is not None else "train.target_modules"
        raise ConfigError(str(cfg.source), [f"{where}: {p}" for p in problems])
    return tokenizer


def download_model(cfg: SweepConfig, log: Log, offline: str | None = None) -> None:
    """A hub model is fetched here, once, with a progress bar, rather than silently by the first
    worker (workers on this machine then read the local cache). Local folders and the tiny models
    need nothing; without network (`offline` says why), loading the tokenizer from the HF cache
    reports what is missing."""
    from sweep.config import TINY_MODELS

    if cfg.model.id in TINY_MODELS or Path(cfg.model.id).exists():
        return
    if offline:
        log(f"model {cfg.model.id}: not downloaded ({offline}); the HF cache must hold it")
        return
    try:
        from huggingface_hub import snapshot_download

        log(f"model {cfg.model.id}: downloading (or checking the local cache) ...")
        snapshot_download(cfg.model.id, revision=cfg.model.revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"])
    except Exception as exc:  # gated, no such repo, the network gone since: the tokenizer load says so clearly
        log(f"model {cfg.model.id}: not downloaded ({str(exc).splitlines()[0][:200]})")


def new_sweep_dir(cfg: SweepConfig, wanted: Path | None = None) -> Path:
    """A fresh folder per sweep; an existing one is never reused (resume is a separate command)."""
    cfg.results_dir.mkdir(parents=True, exist_ok=True)
    if wanted is not None:  # chosen by `submit`, which tells the user where it will be
        try:
            wanted.mkdir(parents=True)
        except FileExistsError:
            raise ConfigError(str(wanted), [f"--sweep-dir {wanted}: exists already; a new sweep needs a new folder (resume is `python -m sweep resume {shlex.quote(str(wanted))}`)"]) from None
        return wanted
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        folder = cfg.results_dir / (f"{cfg.name}-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot create a new sweep folder in {cfg.results_dir}")


# ----------------------------------------------------------------------------------------------
# Ray


_reaper: Any = None  # the watcher of the local Ray this driver started (sweep.engine.reaper)
_watch: Any = None  # the driver's thread that notices that Ray's servers ended (sweep.engine.raywatch)


def connect_ray(address: str | None, log: Log) -> bool:
    """Attach to `address` / RAY_ADDRESS, or start a local Ray. True when we started it."""
    import sys

    address = address or os.environ.get("RAY_ADDRESS")
    # A local Ray serves this machine only, so every server it starts (GCS, raylet, object store,
    # agents) listens on loopback: Ray's switch for "no cluster" (what it uses on macOS and
    # Windows), an environment variable Ray reads when it is imported. The CLI imports Ray nowhere
    # before this; --address is how to use a cluster.
    loopback_by_env = not address and "ray" not in sys.modules
    if loopback_by_env:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    if ray.is_initialized():
        return False
    log(f"ray: {'attaching to ' + address if address else 'starting a local instance'} ...")
    if address:
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        except ConnectionError as exc:  # something listens there, but not a Ray head (checks.reachable ruled out silence)
            raise ConfigError(address, [f"--address {address}: no Ray cluster answers there ({str(exc).splitlines()[0][:200]}); give the head's "
                                        "GCS address (`ray start --head` prints it, port 6379 by default), or leave --address out for a local Ray"]) from None  # fmt: skip
    else:
        if not loopback_by_env:  # Ray was imported before (a caller of this function, not the CLI): it read its switch then
            log("ray: imported before the sweep started it: the local instance listens where Ray decides (the CLI keeps it on loopback)")
        try:
            with SignalsSeen() as seen:
                ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
                signals_raise()  # at once, over Ray's SIGTERM handler, which would exit with status 15
        except SystemExit as exc:
            # SIGTERM while Ray starts: ray.init's own handler exits with status 15. Stop what
            # it started, and end as SIGTERM does elsewhere outside the trials (exit 143).
            if exc.code != signal.SIGTERM:
                raise
            ray.shutdown()
            raise Terminated() from None
        if seen.signals & {signal.SIGINT, signal.SIGTERM}:
            # the signal's exception was raised where ray.init caught it (the sweep went on with a
            # half-started Ray, whose first worker died): it is acted on all the same
            ray.shutdown()
            raise Terminated() if signal.SIGTERM in seen.signals else KeyboardInterrupt()
        # If this driver is killed (kill -9, a second Ctrl-C), its Ray's agents and idle workers
        # would outlive it by a minute or more: a small watcher ends them at once.
        from sweep.engine import reaper
        from sweep.engine.raywatch import RayWatch

        global _reaper, _watch
        _reaper = reaper.start()
        # Its GCS and raylet share this driver's process group: a signal to the group (`timeout`,
        # a scheduler) ends them with it, and Ray's driver would wait a minute, then exit 1 with
        # nothing recorded. The watch notices within a second (sweep.engine.raywatch).
        _watch = RayWatch.start()
    signals_raise()  # over Ray's SIGTERM handler, which would exit with status 15
    return True


class SignalsSeen:
    """`with SignalsSeen() as seen:` the signals that reached this process inside, in
    `seen.signals`, whatever became of them (a handler's exception caught by the library it landed
    in). Python's wakeup fd: the C-level handler writes each signal's number to it. Main thread only;
    elsewhere nothing is seen."""

    def __enter__(self) -> "SignalsSeen":
        import threading

        self.signals: set[int] = set()
        self._fds: tuple[int, int] | None = None
        if threading.current_thread() is threading.main_thread():
            read, write = os.pipe()
            os.set_blocking(read, False)
            os.set_blocking(write, False)
            self._previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
            self._fds = (read, write)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fds is None:
            return
        read, write = self._fds
        signal.set_wakeup_fd(self._previous)
        try:
            self.signals = set(os.read(read, 256))
        except BlockingIOError:  # none came
            pass
        os.close(read)
        os.close(write)


def on_ray_lost(handler: Callable[[list[str]], None] | None) -> None:
    """What the driver does if its local Ray's servers end, from now on: `handler(names)` records
    the sweep's state, says so and ends the process (sweep.engine.raywatch.lost); None while
    wrapping up (the driver no longer needs Ray). Nothing to do for an attached cluster."""
    if _watch is not None:
        _watch.set(handler)


def before_trials(what: Callable[[], str]) -> Callable[[list[str]], None]:
    """The handler while the sweep starts: `what()` records what there is to record and returns
    what to tell the user; the exit code is the signal's that came with Ray's end, if any."""
    from sweep.engine import raywatch

    def handler(names: list[str]) -> None:
        raywatch.lost(names, raywatch.signal_with(received_signal), what())

    return handler


def shutdown_ray() -> None:
    """Stop the local Ray this driver started, and its watchers."""
    import ray

    global _reaper, _watch
    if _watch is not None:
        _watch.set(None)  # (a handler already running ends the process first)
        _watch.stop()
        _watch = None
    ray.shutdown()
    if _reaper is not None:
        _reaper.done()
        _reaper = None


def probe_gpu_bytes() -> int:
    """Memory of one of the cluster's GPUs, read by a tiny task on a GPU node."""
    import ray

    @ray.remote(num_gpus=0.01)
    def total_memory() -> int:
        import torch

        return torch.cuda.get_device_properties(0).total_memory

    return ray.get(total_memory.remote(), timeout=300)


def plan_workers_here(cfg: SweepConfig, trials: int, log: Log) -> Any:
    """The workers for this Ray cluster (sweep.engine.workers.plan)."""
    import ray

    from sweep.engine.workers import plan

    return plan(cfg, ray.cluster_resources(), trials, probe_gpu_bytes, log)


class Heartbeat:
    """The sweep's elapsed time in sweep.json every few seconds, for `status` and for the time
    budget left after a resume. Often, because a killed driver's last beat is what its resume
    counts: a crash under-counts the time budget by at most INTERVAL."""

    INTERVAL = 2.0  # s; a beat is one small atomic file write

    def __init__(self, sweep_dir: Path, elapsed_before: float):
        import threading

        self.sweep_dir, self.elapsed_before = sweep_dir, elapsed_before
        self.started = time.monotonic()
        self.last = 0.0
        self.lock = threading.Lock()  # a beat reads and writes sweep.json: one at a time (Sweep.ray_lost beats from its own thread)
        self.final = False

    def __getstate__(self) -> dict:
        """Tune pickles its callbacks (this one's beat) into the sweep folder: never the lock."""
        return {k: v for k, v in self.__dict__.items() if k != "lock"}

    def __setstate__(self, state: dict) -> None:
        import threading

        self.__dict__.update(state, lock=threading.Lock())

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started

    def beat(self, force: bool = False, final: bool = False, **changes: Any) -> None:
        """`final`: the last beat of this driver (no later one writes over its state)."""
        from sweep.folder import update_meta

        with self.lock:
            if self.final:
                return
            self.final = final
            if force or time.monotonic() - self.last >= self.INTERVAL:
                self.last = time.monotonic()
                update_meta(self.sweep_dir, elapsed_seconds=round(self.elapsed(), 1), **changes)

    def callback(self) -> Any:
        from ray.tune import Callback

        heartbeat = self

        class Beat(Callback):
            def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
                heartbeat.beat()

        return Beat()


def describe_phases(phases: dict[str, float]) -> str:
    """'a 1.2s, b 0.3s', in the order given: where a sweep's start-up went, for its log."""
    return ", ".join(f"{name} {seconds:.1f}s" for name, seconds in phases.items())


# ----------------------------------------------------------------------------------------------
# a new sweep, a resumed one


def run_sweep(
    cfg: SweepConfig, address: str | None = None, log: Log = print, sweep_dir: Path | None = None, command: str = "run", live: bool = False,
) -> SweepResult:  # fmt: skip
    """A new sweep: preflight, the workers planned, a new results folder, study and parent run, then
    the trials. `command` (run, or train for one configuration: sweep.engine.single) is recorded in
    sweep.json. `live`: stdout is a terminal, the sweep's progress is a bar drawn in place."""
    from sweep.folder.checks import before_start

    clock = time.perf_counter()
    before_start(cfg, address, Path(sweep_dir).resolve() if sweep_dir else None)  # folders writable, cluster reachable: before anything starts
    prepared = preflight(cfg, log)  # before Ray: bad input stops here, with nothing started
    phases = {"checks, tokenizer, model check, data": time.perf_counter() - clock}
    mark = time.perf_counter()
    started_ray = connect_ray(address, log)
    phases["Ray attached" if address or os.environ.get("RAY_ADDRESS") else "Ray started"] = time.perf_counter() - mark
    try:
        on_ray_lost(before_trials(lambda: "nothing was made yet: run the command again"))
        mark = time.perf_counter()
        plan = plan_workers_here(cfg, cfg.num_trials, log)
        made: tuple[Path, Any, str] | None = None
        try:
            with held(), (_watch.hold if _watch is not None else contextlib.nullcontext()):  # a signal, or Ray's end, waits for sweep.json
                made = new_sweep(cfg, prepared, plan, Path(sweep_dir).resolve() if sweep_dir else None, command, log)
                on_ray_lost(before_trials(lambda: stopped_before_trials(cfg, *made[:2])))
            sweep = Sweep(cfg, made[0], made[2], made[1], prepared, plan, [], cfg.num_trials, 0.0, log, live=live)
            sweep.setup()
        except KeyboardInterrupt:  # Ctrl-C / SIGTERM before any trial ran: a stop that `resume` continues
            on_ray_lost(None)  # recorded here (a handler already running ends the process first)
            if made is not None:
                stopped_before_trials(cfg, *made[:2])
            raise
        phases["results folder, MLflow, study"] = time.perf_counter() - mark
        log(f"start-up: {time.perf_counter() - clock:.1f}s before Ray Tune starts the workers ({describe_phases(phases)})")
        sweep.run()
        return sweep.finish()
    finally:
        if started_ray:
            shutdown_ray()


def new_sweep(cfg: SweepConfig, prepared: Any, plan: Any, wanted: Path | None, command: str, log: Log) -> tuple[Path, Any, str]:
    """A new sweep's folder (the space file, the resolved config), its MLflow parent run, its own
    study, then sweep.json naming them: (folder, parent run, study name). A failure before
    sweep.json takes back what was made (the folder, which holds copies only; the parent run ends
    FAILED): no folder is left that no command can read or resume."""
    import shutil

    from sweep.config.secrets import redact
    from sweep.engine.recorder import SweepRun
    from sweep.engine.study import create_study, new_study_name
    from sweep.folder import write_meta
    from sweep.folder.checks import quote

    sweep_dir = new_sweep_dir(cfg, wanted)
    sweep_run = None
    try:
        (sweep_dir / "space.yaml").write_text(redact(cfg.source_text))
        (sweep_dir / "resolved.yaml").write_text(yaml.safe_dump(cfg.resolved(), sort_keys=False))
        mlflow_uri, storage = cfg.mlflow_uri, cfg.optuna_storage(sweep_dir)
        sweep_run = SweepRun(cfg, sweep_dir, mlflow_uri)
        study_name = new_study_name(sweep_dir)  # its own study, also on a store other sweeps of this name share
        meta = {
            "name": cfg.name,
            "sweep_dir": str(sweep_dir.resolve()),  # where the stores' URLs were made absolute: a moved or copied folder reads its own (sweep.folder.relocate)
            "space_file": str(cfg.source),
            "overrides": [redact(o) for o in cfg.overrides],
            "mlflow_uri": redact(cfg.tracking.mlflow_uri or mlflow_uri),
            "experiment": cfg.experiment,
            "parent_run_id": sweep_run.run_id,
            "experiment_id": sweep_run.experiment_id,  # for the runs-table link of status / best / list
            "mlflow_view": True,  # the experiment holds this sweep's runs-table view (SweepRun.show): the link opens it
            "optuna_storage": redact(cfg.tracking.optuna_storage or storage),
            "study_name": study_name,
            "metric": cfg.search.metric,
            "data_dir": str(prepared.folder),
            "num_trials": cfg.num_trials,
            "concurrency": plan.concurrent,
            "started": datetime.now().isoformat(timespec="seconds"),
            "elapsed_seconds": 0.0,
            "state": "running",
            "command": command,
        }
        create_study(cfg, storage, study_name)  # before sweep.json names it
        write_meta(sweep_dir, meta)
    except BaseException:
        shutil.rmtree(sweep_dir, ignore_errors=True)
        if sweep_run is not None:
            try:
                sweep_run.client.set_terminated(sweep_run.run_id, "FAILED")
            except Exception:  # the store that failed may be this one: its error is the one to show
                pass
        raise
    log(f"sweep folder: {sweep_dir}   (if the driver dies: python -m sweep resume {quote(sweep_dir)})")
    return sweep_dir, sweep_run, study_name


def stopped_before_trials(cfg: SweepConfig, sweep_dir: Path, sweep_run: Any) -> str:
    """A sweep stopped (a signal, or its Ray gone) before any trial ran: recorded as a stop that
    `resume` continues; what to tell the user."""
    from sweep.folder import release, update_meta
    from sweep.folder.checks import quote

    sweep_run.finish({}, None, cfg.search.metric, status="KILLED")
    update_meta(sweep_dir, state="stopped")
    release(sweep_dir)  # setup claims it
    return f"the sweep stopped before its trials started; continue with:  python -m sweep resume {quote(sweep_dir)}"


def resume_sweep(sweep_dir: Path, address: str | None = None, log: Log = print, live: bool = False) -> SweepResult:
    """Finish a sweep whose driver died or was stopped: the same study (its whole history), the
    same parent run; unfinished trials continue from their last checkpoint; finished ones never
    run again; new trials fill the rest of the budget."""
    from core.request import TrialRequest
    from sweep.engine.recorder import SweepRun
    from sweep.engine.study import Study
    from sweep.folder import STOP, SweepFolder, claim, recorded_dir, release
    from sweep.folder.checks import before_resume
    from trainable.cohort_worker import latest_checkpoint

    folder = SweepFolder(sweep_dir)
    sweep_dir, meta = folder.path, folder.meta
    if meta.get("state") == "finished":
        raise ConfigError(str(sweep_dir), [f"{sweep_dir.name}: finished already; nothing to resume"])
    cfg = folder.config
    before_resume(cfg, sweep_dir, folder.study_name, address, recorded_dir(sweep_dir, meta))  # stores present, folders writable, cluster reachable
    claim(sweep_dir)
    try:
        prepared = preflight(cfg, log)
        study = Study(cfg, folder.optuna_storage, folder.study_name)
        resume: list[Any] = []
        finished = 0
        for t in study.trials():
            if ATTR_WARM_START in t.user_attrs:
                continue
            if t.state.name in ("RUNNING", "WAITING") and not t.params:
                if t.state.name == "RUNNING":  # asked, never sampled: nothing ran, nothing to continue
                    study.lost(t.number)
                continue
            if t.state.name == "RUNNING":
                label = trial_label(t.number)
                checkpoint = latest_checkpoint(sweep_dir / TRIALS_DIR / label)
                resume.append(TrialRequest(label=label, number=t.number, hyper=study.hyper(t), checkpoint=checkpoint, attempt=int(t.user_attrs.get(ATTR_ATTEMPT, 1))))
            elif ATTR_WORKER in t.user_attrs:
                finished += 1
        budget = max(0, cfg.num_trials - finished - len(resume))
        (sweep_dir / STOP).unlink(missing_ok=True)
        continuing = ", ".join(f"{r.label} from {Path(r.checkpoint).name if r.checkpoint else 'the start'}" for r in resume)
        log(f"resuming {sweep_dir.name}: {finished} trials finished; continuing {len(resume)} ({continuing or 'none'}); {budget} new to run")
        started_ray = connect_ray(address, log)
        try:

            def nothing_ran() -> str:
                release(sweep_dir)
                return f"nothing ran; continue with:  python -m sweep resume {shlex.quote(str(sweep_dir))}"

            on_ray_lost(before_trials(nothing_ran))
            plan = plan_workers_here(cfg, budget + len(resume), log)
            sweep_run = SweepRun.attach(folder.mlflow_uri, folder.parent_run_id)
            on_ray_lost(before_trials(lambda: stopped_before_trials(cfg, sweep_dir, sweep_run)))
            if not meta.get("mlflow_view"):  # a sweep of an earlier version: its runs-table view now
                sweep_run.show(cfg)
                meta = update_meta(sweep_dir, mlflow_view=True)
            repaired = sweep_run.close_ended(study.optuna())
            if repaired:
                log(f"MLflow: closed {', '.join(repaired)} as the study ended them (the driver was killed before it recorded their end)")
            sweep = Sweep(cfg, sweep_dir, folder.study_name, sweep_run, prepared, plan, resume, budget, float(meta.get("elapsed_seconds", 0.0)), log, live=live)
            try:
                sweep.setup()
            except KeyboardInterrupt:  # Ctrl-C / SIGTERM before any trial ran: stopped again, as it was
                on_ray_lost(None)
                stopped_before_trials(cfg, sweep_dir, sweep_run)
                raise
            sweep.run()
            return sweep.finish()
        finally:
            if started_ray:
                shutdown_ray()
    finally:
        release(sweep_dir)


class Sweep:
    """One driver run of a sweep (a new sweep, or a resume), read top to bottom:

        setup()    the stop file, the heartbeat, the warm start, the study and the recorder in a
                   source the workers share (with the trials a resume continues), and the Tuner
        run()      Tuner.fit until the workers are done, the time is up or a stop is requested;
                   Ctrl-C / SIGTERM become a resumable stop (Interrupt)
        finish()   read every trial back, close the parent run, print the summary; raises
                   Interrupted after a signal
    """

    def __init__(
        self, cfg: SweepConfig, sweep_dir: Path, study_name: str, sweep_run: Any, prepared: Any, plan: Any,
        resume: list | None = None, budget: int | None = None, elapsed_before: float = 0.0, log: Log = print, live: bool = False,
    ):  # fmt: skip
        self.cfg, self.sweep_dir, self.study_name, self.sweep_run, self.prepared, self.plan = cfg, sweep_dir, study_name, sweep_run, prepared, plan
        self.resume = list(resume or [])
        self.budget = cfg.num_trials if budget is None else budget
        self.elapsed_before, self.log, self.live = elapsed_before, log, live
        self.progress: Any = None

    # -- setup --------------------------------------------------------------------------------

    def setup(self) -> None:
        from sweep.engine.source import StudySource
        from sweep.engine.study import Study
        from sweep.folder import STOP, StopFile, claim

        cfg, log = self.cfg, self.log
        claim(self.sweep_dir)  # resume holds it already (claim is idempotent); a new run takes it here
        self.stop = StopFile(self.sweep_dir / STOP)
        self.heartbeat = Heartbeat(self.sweep_dir, self.elapsed_before)
        self.heartbeat.beat(force=True, state="running")
        self._describe()
        study = Study(cfg, cfg.optuna_storage(self.sweep_dir), self.study_name)
        self._warm_start(study.optuna())
        recorder = self.sweep_run.recorder(cfg.fixed_hyperparams, extra_metrics=(MEMBER_SHARE,))
        time_left = self.time_left
        deadline = time.time() + time_left if time_left else None
        self.source = StudySource(cfg, study, recorder, self.sweep_dir, self.budget, deadline=deadline, stop_file=self.stop.path, judge=self.plan.judge)
        # the files the workers share: a fresh queue, holding the trials this driver continues
        for old in (self.sweep_dir / WORK_DIR / "queue").glob("*.json"):
            old.unlink(missing_ok=True)
        (self.sweep_dir / WORK_DIR / "spent").unlink(missing_ok=True)
        for task in self.resume:
            self.source.enqueue(task, task.hyper.get("method", cfg.train.method))
        _tune_environment()
        self.tuner = self.make_tuner()

    def _describe(self) -> None:
        cfg, stats, plan = self.cfg, self.prepared.stats, self.plan
        self.log(
            f"data: {stats['train']['examples']} train examples -> {stats['train']['rows']} sequences "
            f"({stats['train']['loss_tokens']} reply tokens), {stats['eval']['examples']} eval examples; "
            f"template tokens: {', '.join(stats['template_tokens']) or 'none'}"
        )
        self.log(f"{cfg.num_trials} trials, up to {plan.concurrent} at a time; search {cfg.search.algorithm}, scheduler {cfg.search.scheduler.type}; space {cfg.space.describe_size()}")
        if cfg.algorithm_reason != "as configured":
            self.log(f"search: {cfg.search.algorithm}: {cfg.algorithm_reason}")
        self.log(plan.describe())
        for note in plan.notes:
            self.log(note)

    def _warm_start(self, study: Any) -> None:
        """search.warm_start: the previous sweep's trials enter the study once (not again on resume)."""
        cfg = self.cfg
        if cfg.search.warm_start and not any(ATTR_WARM_START in t.user_attrs for t in study.get_trials(deepcopy=False)):
            from sweep.engine import warmstart

            self.log(warmstart.apply(study, cfg, Path(cfg.search.warm_start)).describe())

    @property
    def time_left(self) -> float | None:
        """Seconds of the time budget left to this driver run (None without a budget)."""
        cfg = self.cfg
        return max(1.0, cfg.search.time_budget - self.elapsed_before) if cfg.search.time_budget else None

    def make_trainable(self) -> Any:
        """What each worker runs and the resources it asks Ray for: the one place both are chosen."""
        from ray import tune

        from trainable.cohort_worker import BaseSpec, bound_tune_worker

        cfg, plan = self.cfg, self.plan
        base = BaseSpec(
            model_id=cfg.model.id,
            revision=cfg.model.revision,
            data_dir=str(self.prepared.folder),
            train=cfg.train.model_copy(update={"compile": plan.compile}),  # decided for the whole sweep (WorkerPlan)
            threads=max(1, int(plan.cpus)),
            embeddings=cfg.model.embeddings,
            template_ids=tuple(self.prepared.stats["template_tokens"].values()),
            max_seq_len=cfg.data.max_seq_len,
            # each worker is capped to its GPU share of the GPU size it was planned with (a fraction of a
            # GPU, or resources.gpu_memory_gb below the device's): past it, its members run out of memory
            # rather than take memory from the workers beside it
            gpu_share=plan.gpus if plan.gpus > 0 else None,
            gpu_bytes=int(plan.device_bytes) if plan.device_bytes is not None else None,
            stop_file=self.stop.path,  # the worker reads the file itself: it checkpoints its members before stopping
        )
        # bound into the trainable, not tune.with_parameters: objects the driver puts in Ray's object store end it with its raylet (bound_tune_worker)
        worker = bound_tune_worker(base, self.source, self.plan.capacity, self.plan.budget)
        return tune.with_resources(worker, {"cpu": plan.cpus, "gpu": plan.gpus})

    def make_tuner(self) -> Any:
        from ray import tune
        from ray.tune.schedulers import FIFOScheduler

        from sweep.engine.progress import Progress
        from sweep.engine.workers import orphans_callback, worker_list
        from sweep.folder import next_tune_name

        cfg = self.cfg
        workers = worker_list(self.plan.configs, self.source.halt)
        self.progress = Progress(cfg.search.metric, cfg.search.mode, self.log, total=self.budget + len(self.resume), time_budget=self.time_left, live=self.live)
        callbacks = [orphans_callback(self.source, workers, cfg.search.max_retries, self.progress), self.progress, self.heartbeat.callback()]
        return tune.Tuner(
            self.make_trainable(),
            tune_config=tune.TuneConfig(
                search_alg=workers,
                scheduler=FIFOScheduler(),  # Optuna's pruner judges the trials, inside the workers
                num_samples=-1,  # the worker list says when it is done (workers that died are replaced)
                max_concurrent_trials=self.plan.at_once,
                reuse_actors=False,
                trial_dirname_creator=_worker_dirname,
            ),
            run_config=tune.RunConfig(
                name=next_tune_name(self.sweep_dir),
                storage_path=str(self.sweep_dir),
                callbacks=callbacks,
                # the workers read the STOP file and the deadline themselves and checkpoint every
                # member before they end; a Tune stopper would end (kill) a worker while it does
                stop=None,
                verbose=0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=0),  # a dead worker's members are retried (Orphans), not the worker
            ),
        )

    # -- run ----------------------------------------------------------------------------------

    def run(self) -> None:
        from sweep.config.secrets import KeptFromTune
        from sweep.folder import release

        self.started = time.monotonic()
        self.interrupt = Interrupt(Path(self.stop.path), f"python -m sweep resume {shlex.quote(str(self.sweep_dir))}").install()
        on_ray_lost(self.ray_lost)
        try:
            with KeptFromTune():  # no credential in the runtime env of the workers (Ray logs it)
                self.tuner.fit()
        except BaseException:
            on_ray_lost(None)
            self.interrupt.restore()
            if self.progress is not None:
                self.progress.close()
            self.sweep_run.finish({}, None, self.cfg.search.metric, status="KILLED")
            self.heartbeat.beat(force=True, state="failed")
            release(self.sweep_dir)
            raise

    def ray_lost(self, names: list[str]) -> None:
        """The local Ray's servers ended while the trials ran (sweep.engine.raywatch), a signal
        to the whole process group with them, most often. Ray Tune waits on them for good, so this
        runs in the watch's thread: the workers that live on (they have process groups of their
        own) checkpoint and stop their trials as on `stop`, the sweep is recorded stopped, and the
        process ends with the resume command, within seconds."""
        from sweep.engine import raywatch
        from sweep.folder import release

        signum = raywatch.signal_with(lambda: self.interrupt.signum)
        try:
            if not os.path.exists(self.stop.path):
                Path(self.stop.path).write_text(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} Ray's servers ended ({', '.join(names)})")
            deadline = time.monotonic() + WORKERS_STOP_S
            while time.monotonic() < deadline and any(r.info.status == "RUNNING" for r in self.sweep_run.children()):
                time.sleep(0.5)
            closed = self.sweep_run.close_running()
            self.sweep_run.finish({}, None, self.cfg.search.metric, status="KILLED")
            self.heartbeat.beat(force=True, final=True, state="stopped")
            release(self.sweep_dir)
            if self.progress is not None:
                self.progress.close()
            what = (f"the trials checkpointed and stopped ({', '.join(closed)} at their last checkpoint: their workers ended with Ray)" if closed
                    else "the trials checkpointed and stopped")  # fmt: skip
        except Exception as exc:  # a store out of reach too: `resume` repairs what is left
            what = f"the sweep's end could not be recorded ({exc!r:.200}); its trials keep their checkpoints"
        raywatch.lost(names, signum, f"{what}; continue with:  {self.interrupt.resume}")

    # -- finish -------------------------------------------------------------------------------

    def finish(self) -> SweepResult:
        from sweep.folder.checks import quote
        from sweep.engine.progress import table
        from sweep.folder import RunsView, mlflow_links, release, say_mlflow

        cfg, sweep_dir, log = self.cfg, self.sweep_dir, self.log
        on_ray_lost(None)  # the trials have ended: the sweep's end is recorded without Ray
        wrap_up()  # the trials have ended: a signal from here on waits for the sweep's end to be recorded
        if self.progress is not None:
            self.progress.close()  # the bar ends above the table
        stopped = self.stop.requested()
        study = self.source.study.optuna()
        result = collect(cfg, study, self.sweep_run.children())
        result.sweep_dir, result.parent_run_id = sweep_dir, self.sweep_run.run_id
        failed = self.progress.worker_failures if self.progress is not None else []
        result.failure = None if stopped or result.best is not None else nothing_completed(result, cfg, self.source.halt() == "time", failed)
        self.sweep_run.finish(result.counts, result.best, cfg.search.metric, status="KILLED" if stopped else "FINISHED", pareto=result.pareto)
        self.sweep_run.color_by_rank(result.trials)
        self.heartbeat.beat(force=True, state="stopped" if stopped else "finished", experiment_id=self.sweep_run.experiment_id)
        release(sweep_dir)
        log("")
        table(result.trials, cfg.search.metric, log)
        for label, why in not_run(study.trials):  # the gaps between the trials' numbers
            log(f"{label} {why}")
        log("")
        counts = ", ".join(f"{n} {k}" for k, n in result.counts.items())
        log(f"{len(result.trials)} trials ({time.monotonic() - self.started:.0f}s in this run): {counts}")
        if cfg.multi_objective:
            names = [m for m, _ in cfg.objectives]
            log(f"Pareto set ({' / '.join(f'{m} {d}' for m, d in cfg.objectives)}): " + (", ".join(
                f"{r['label']} (" + ", ".join(f"{r[m]:.4g}" for m in names) + ")" for r in result.pareto) or "none"))  # fmt: skip
        if result.best:
            b = result.best
            log(f"best trial: {b['label']}  {cfg.search.metric} {b[cfg.search.metric]:.4f}  ({b['summary']})")
        else:
            log("best trial: none completed")
        log(f"report: python -m sweep report {quote(sweep_dir)}    best adapter: python -m sweep best {quote(sweep_dir)} --export DIR")
        interrupt = self.interrupt
        interrupt.restore()
        if interrupt.signum is not None:
            log(f"interrupted ({Interrupted(interrupt.signum)}): running trials checkpointed and stopped; continue with:  {interrupt.resume}")
            raise Interrupted(interrupt.signum, result)
        if stopped:
            log(f"stopped on request; continue with:  python -m sweep resume {quote(sweep_dir)}")
        elif result.failure:
            log(f"no trial completed: {result.failure}")
        view = RunsView(self.sweep_run.run_id, cfg.search.metric, cfg.search.mode == "min", shared=True)
        say_mlflow(mlflow_links(cfg.mlflow_uri, self.sweep_run.experiment_id, view), log)
        return result


def nothing_completed(result: SweepResult, cfg: SweepConfig, time_up: bool, worker_failures: list[str] = ()) -> str | None:
    """Why no trial of the sweep completed (the command then exits 1), or None when one did.
    `worker_failures`: the workers that failed, each with its error (one that failed before it took
    a trial, e.g. unable to reach the Optuna store, leaves no trial to tell why)."""
    from core.contract import TrialStatus

    if any(r["status"] == TrialStatus.COMPLETED for r in result.trials):
        return None
    counts = ", ".join(f"{n} {k}" for k, n in sorted(result.counts.items())) or "no trial ran"
    if time_up:
        return f"{counts}; the time budget (search.time_budget: {cfg.search.time_budget:g}s) ended every trial before it completed: give it more time, or fewer max_steps"
    errors = [f"{r['label']}: {r['error'].strip().splitlines()[-1][:300]}" for r in result.trials if r.get("error")]
    if errors:
        return f"{counts}; first error: {errors[0]} (every trial's error is in MLflow and in the lines above)"
    if worker_failures:
        return f"{counts}; {len(worker_failures)} worker(s) failed, first: {worker_failures[0]} (its traceback is in the lines above)"
    return counts


def _worker_dirname(trial: Any) -> str:
    """Tune's folder of a worker: `worker_<ray trial id>` (Tune's default name holds its config and the date)."""
    return f"worker_{trial.trial_id}"


def _tune_environment() -> None:
    """Ray Tune settings of the driver process, set before the Tuner is built."""
    # a worker's reports carry its trials' events, not the sweep's metric
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Tune's own console reporter would print a banner and tables; the Progress callback says it.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # Keeping one checkpoint per trial forces an experiment snapshot per report; that is cheap
    # here (small state) and Tune's warning about it would drown the progress lines.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    state_log = logging.getLogger("ray.tune.execution.experiment_state")
    if not any(isinstance(f, _RenamedUnderSync) for f in state_log.filters):
        state_log.addFilter(_RenamedUnderSync())


class _RenamedUnderSync(logging.Filter):
    """Drops one Ray Tune log record: a stop right as the workers start makes Tune snapshot its
    experiment while it copies the previous snapshot, and a temporary file it renamed meanwhile is
    logged as a failed save, with a traceback. Tune saves again at the end; nothing is lost."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (record.getMessage().startswith("Saving experiment state") and isinstance(exc, FileNotFoundError) and "-tmp-" in str(exc))

