"""python -m sweep {validate,run,train,submit,resume,status,stop,report,best,estimate,list,schema,dashboard} ...   (argv -> subcommands; no logic)
(installed, the same CLI is the `lora-sweep` command)

Options and arguments come in any order (`validate FILE --json key=val`, `status --watch DIR`).
`-v` / `--verbose` lets the libraries underneath print their own logs and progress bars.
`--json` (validate, status, best, estimate, list): one JSON document on stdout and nothing else;
errors still go to stderr with the exit codes below.

Exit codes: 0 done; 2 the space file, its overrides or the data are invalid, or a folder, the
cluster or a sweep's store fails its check (nothing was started or changed); 1 the sweep ran but no
trial completed (it says why; train: its trial did not complete), or its local Ray's servers ended
(killed: it says so; `resume` continues); 130 / 143 interrupted by SIGINT (Ctrl-C) / SIGTERM, to
the driver or its whole process group: trials checkpointed and stopped, `resume` continues.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any

EXIT_INVALID = 2
EXIT_FAILED = 1  # the sweep ran, and no trial of it completed (it says why)
EXIT_SIGINT = 130  # 128 + SIGINT, as shells report Ctrl-C
EXIT_SIGTERM = 143  # 128 + SIGTERM
TRAINS = ("run", "train", "resume")  # the commands that start Ray and trials


class _Parser(argparse.ArgumentParser):
    """`--help` begins with what the command does (its one-line description), then its usage."""

    def format_help(self) -> str:
        summary, self.description = self.description, None
        try:
            text = super().format_help()
        finally:
            self.description = summary
        return f"{summary}\n\n{text}" if summary else text


class _Sub:
    """add_parser with the same sentence as the list's help and the command's description."""

    def __init__(self, sub: Any):
        self.sub = sub

    def add_parser(self, name: str, help: str) -> argparse.ArgumentParser:
        return self.sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lora-sweep")
    except PackageNotFoundError:
        return "unknown (not installed; pip install -e .)"


def prog() -> str:
    """How the user called the CLI: `lora-sweep` (the installed command) or `python -m sweep`."""
    return "lora-sweep" if Path(sys.argv[0]).name == "lora-sweep" else "python -m sweep"


VERBOSE_HELP = "also show the libraries' own logs and progress bars (Ray, MLflow, Optuna, datasets, transformers)"


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser, and each command's parser by name."""
    p = _Parser(prog=prog(), description="LoRA / QLoRA hyperparameter sweeps: Ray Tune + Optuna + MLflow.")
    p.add_argument("--version", action="version", version=f"lora-sweep {_version()}")
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    subparsers = p.add_subparsers(dest="command", required=True)
    sub = _Sub(subparsers)
    v = sub.add_parser("validate", help="check a space file; print the resolved config and the size of the space")
    v.add_argument("space", help="the space.yaml file")
    v.add_argument("overrides", nargs="*", metavar="key.path=value", help="override values, e.g. search.num_trials=4")
    v.add_argument("--json", action="store_true", help=JSON_HELP)
    r = sub.add_parser("run", help="run a sweep")
    r.add_argument("space", help="the space.yaml file")
    r.add_argument("overrides", nargs="*", metavar="key.path=value", help="override values, e.g. search.num_trials=4")
    r.add_argument("--address", default=None, help="Ray cluster to attach to (default: RAY_ADDRESS, else a local Ray)")
    r.add_argument("--sweep-dir", default=None, help="the new sweep's folder (must not exist; default RESULTS_DIR/NAME-TIMESTAMP)")
    t = sub.add_parser("train", help="train one configuration to completion: a one-trial sweep (searched dimensions pinned, e.g. train.lora_r=16)")
    t.add_argument("space", help="the space.yaml file (e.g. the one `best --export` writes)")
    t.add_argument("overrides", nargs="*", metavar="key.path=value", help="override values; train.K=V pins a searched K, e.g. train.lora_r=16 train.max_steps=2000")
    t.add_argument("--address", default=None, help="Ray cluster to attach to (default: RAY_ADDRESS, else a local Ray)")
    t.add_argument("--sweep-dir", default=None, help="its folder (must not exist; default RESULTS_DIR/NAME-TIMESTAMP); resume it with `resume DIR`")
    j = sub.add_parser("submit", help="send the sweep to a Ray cluster as a Ray job (it runs on without this machine)")
    j.add_argument("space", help="the space.yaml file")
    j.add_argument("overrides", nargs="*", metavar="key.path=value", help="override values, e.g. tracking.results_dir=/shared/sweeps")
    j.add_argument("--address", default=None, help="the head node's dashboard URL, http://HEAD:8265 (default: RAY_ADDRESS)")
    on_cluster = "; with --address http://HEAD:8265 (or RAY_ADDRESS): a submitted sweep's id, or its folder on the cluster"
    s = sub.add_parser("resume", help="finish a sweep whose driver died or was stopped")
    s.add_argument("sweep_dir", help="the sweep's results folder" + on_cluster)
    s.add_argument("--address", default=None, help="Ray cluster to attach to (default: RAY_ADDRESS, else a local Ray); a dashboard URL resumes a submitted sweep as a new job")
    s = sub.add_parser("status", help="a sweep's trials by status, best so far, elapsed and remaining time")
    s.add_argument("sweep_dir", help="the sweep's results folder" + on_cluster)
    s.add_argument("--address", default=None, help="for a submitted sweep: the head node's dashboard URL")
    s.add_argument("--json", action="store_true", help=JSON_HELP + " (a sweep folder on this machine)")
    s.add_argument("--watch", nargs="?", type=float, const=WATCH_EVERY, default=None, metavar="SECONDS",
                   help=f"a table of the trials (status, step, eval loss, tokens/s, memory, time left), redrawn every SECONDS (default {WATCH_EVERY:g}) until the sweep's driver ends; Ctrl-C leaves")  # fmt: skip
    s = sub.add_parser("stop", help="running trials checkpoint and stop; the sweep can be resumed")
    s.add_argument("sweep_dir", help="the sweep's results folder" + on_cluster)
    s.add_argument("--address", default=None, help="for a submitted sweep: the head node's dashboard URL")
    s.add_argument("--wait", type=float, default=600, metavar="SECONDS", help="how long to wait for the driver to stop (default 600)")
    s = sub.add_parser("report", help="an HTML report with plots of a sweep (also logged to its MLflow parent run)")
    s.add_argument("sweep_dir", help="the sweep's results folder")
    s = sub.add_parser("best", help="the best trial (under constraints); export it ready for inference (adapter, model card, generation config)")
    s.add_argument("sweep_dir", help="the sweep's results folder")
    s.add_argument("--where", default=None, metavar="CONSTRAINTS",
                   help='metrics the sweep recorded and hyperparameters, e.g. "peak_vram_gb<=20, eval_loss<2.5" or "lora_r<=16 and method==qlora"')
    s.add_argument("--export", default=None, metavar="DIR",
                   help="write an export ready for inference here: the adapter (PEFT format) with its tokenizer and a generation config "
                        "that stops at <end_of_turn>, a model card (README.md) and the ready-to-run space file")  # fmt: skip
    s.add_argument("--merge", action="store_true", help="with --export: also the base model with the adapter merged in")
    s.add_argument("--log-model", action="store_true", help=LOG_MODEL_HELP)
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    e = sub.add_parser("estimate", help="predicted peak GPU memory: the corners of a space, or each trial of a finished sweep")
    e.add_argument("space", metavar="SPACE.yaml|SWEEP_DIR", help="a space file, or a sweep's results folder")
    e.add_argument("overrides", nargs="*", metavar="key.path=value", help="override values (space files only)")
    e.add_argument("--gpu-memory", type=float, default=None, metavar="GB", help="GPU memory to check against (default: this machine's GPU)")
    e.add_argument("--json", action="store_true", help=JSON_HELP)
    s = sub.add_parser("list", help="the sweeps of a results folder: state, trials by status, best value, started, elapsed")
    s.add_argument("results_dir", nargs="?", default="sweeps", metavar="RESULTS_DIR", help="the results folder (default: ./sweeps)")
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    sub.add_parser("schema", help="print the JSON Schema of a space file (for editors; search_spaces/space.schema.json is a copy)")
    s = sub.add_parser("dashboard", help="open the sweep's Optuna study in optuna-dashboard (pip install -e \".[dashboard]\")")
    s.add_argument("sweep_dir", help="the sweep's results folder")
    s.add_argument("--port", type=int, default=8080, help="the port to serve it on (default 8080)")
    s.add_argument("--host", default="127.0.0.1", help="the address to serve it on (default 127.0.0.1: this machine only)")
    commands = dict(subparsers.choices)
    for command in commands.values():
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return p, commands


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, its options and arguments in any order (`validate FILE --json key=val`,
    `status --watch DIR`). argparse alone reads a subcommand's positionals only up to its first
    option; each command's own parser reads them intermixed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = _parser()
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    if at == len(argv) or argv[at] not in commands or any(a not in ("-v", "--verbose") for a in argv[:at]):
        return parser.parse_args(argv)  # --help, --version, a missing or unknown command: argparse says it
    command, rest = argv[at], argv[at + 1 :]
    if command == "status":
        rest = _watch_without_seconds(rest)
    args = commands[command].parse_intermixed_args(rest)
    args.command = command
    args.verbose = bool(argv[:at]) or getattr(args, "verbose", False)
    return args


def _watch_without_seconds(rest: list[str]) -> list[str]:
    """`--watch` takes an optional number: before a word that is none (`--watch DIR`), it has none."""
    out = list(rest)
    for i, arg in enumerate(out[:-1]):
        if arg == "--watch":
            try:
                float(out[i + 1])
            except ValueError:
                out[i] = f"--watch={WATCH_EVERY}"
    return out


JSON_HELP = "print one JSON document on stdout instead of the text"
WATCH_EVERY = 5.0  # s: `status --watch` without a number
LOG_MODEL_HELP = (
    "with --export: also log the export folder (adapter, tokenizer, generation config, model card, space file) as artifacts of the "
    "trial's MLflow run, under export/; plain artifacts, not an MLflow model (mlflow's transformers flavour did not round-trip "
    "a PEFT adapter of a local base model offline)"
)


def _quiet(line: str) -> None:
    """`write` under --json: the text is not printed; the JSON says it all."""


def print_json(data: Any) -> None:
    """One JSON document on stdout: paths as strings, NaN and infinities as null (strict JSON)."""
    import json
    import math

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple, set)):
            return [clean(v) for v in x]
        if x is None or isinstance(x, (str, int, float, bool)):
            return x
        return str(x)

    print(json.dumps(clean(data), indent=2, allow_nan=False), flush=True)


def say(line: str) -> None:
    print(line, flush=True)


READ_ONLY = ("validate", "status", "list", "best", "report", "estimate", "schema", "dashboard")  # they read; `best --export` writes
LIGHT = ("validate", "status", "list", "schema", "best", "estimate")  # they read sqlite stores without Optuna or MLflow (under a second)


class _Quiet:
    """While a command runs, unless -v: nothing from the libraries underneath that the user cannot
    act on. Every command: no datasets progress bars (tokenizing the data), no MLflow INFO lines
    (creating its tables), no Optuna or alembic INFO lines (a study created, a schema migrated), no
    transformers notices, no bitsandbytes warning about CPU kernels; the environment carries it to
    local Ray workers. The commands that only
    read and `best --export` also print no progress bars at all (transformers' "Loading weights",
    "Writing model shards") and no FutureWarning / DeprecationWarning; `run` keeps a hub
    download's progress bar. An explicit variable of the environment, -W or PYTHONWARNINGS is left
    as it is."""

    ENV = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "MLFLOW_LOGGING_LEVEL": "WARNING", "TRANSFORMERS_VERBOSITY": "error"}
    BARS = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    # logger -> the least level it shows: bitsandbytes warns on import that a CPU 4-bit kernel is not installed
    LOGGERS = {"optuna": 30, "alembic": 30, "mlflow": 30, "datasets": 30, "bitsandbytes": 40}

    def __init__(self, no_bars: bool, optuna: bool = True):
        self.env = {**self.ENV, **(self.BARS if no_bars else {})}
        self.no_warnings = no_bars
        # Optuna sets its own level (INFO) when first imported: it is told after that import, which
        # `status`, `list` and `validate` skip (they answer in half a second without Optuna)
        self.optuna = optuna

    def __enter__(self) -> None:
        import logging
        import warnings

        self.saved = {k: os.environ.get(k) for k in self.env}
        for key, value in self.env.items():
            os.environ.setdefault(key, value)
        self.levels = {name: logging.getLogger(name).level for name in self.LOGGERS}
        if self.optuna:
            import optuna  # noqa: F401  (it configures its logger on import; set the level after)
        for name, level in self.LOGGERS.items():  # a library that set up its logger already (imported before) is told too
            logging.getLogger(name).setLevel(max(level, logging.getLogger(name).level))
        self.warnings = warnings.catch_warnings()
        self.warnings.__enter__()
        if self.no_warnings and not sys.warnoptions:
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)

    def __exit__(self, *exc: Any) -> None:
        import logging

        self.warnings.__exit__(*exc)
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.verbose:
        return _main(args)
    with _Quiet(no_bars=args.command in READ_ONLY or bool(getattr(args, "export", None)), optuna=args.command not in LIGHT):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    if args.command in TRAINS and threading.current_thread() is threading.main_thread():
        # SIGTERM while starting or wrapping up ends the command as Ctrl-C does (its exit 143);
        # while trials run, sweep.engine.signals.Interrupt turns either into a resumable stop.
        from sweep.engine.signals import SIGNALS, Terminated, command_ended, signals_raise

        previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
        command_ended()  # nothing noted before this command counts
        signals_raise()
        try:
            code = _command(args)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        late = command_ended()  # one that waited for the wrap-up, or whose exception was lost
        if late is not None and code == 0:
            return _outside_trials(Terminated() if late == signal.SIGTERM else KeyboardInterrupt(), "`python -m sweep status DIR` shows where the sweep stands")
        return code
    return _command(args)


def _outside_trials(exc: KeyboardInterrupt, where: str) -> int:
    """Ctrl-C, or SIGTERM (sweep.engine.signals.Terminated), while no trial was running: before the trials
    started or after they ended. What the sweep's folder says then is its state."""
    from sweep.engine.signals import Terminated

    name, code = ("SIGTERM", EXIT_SIGTERM) if isinstance(exc, Terminated) else ("Ctrl-C", EXIT_SIGINT)
    print(f"{name} while starting or wrapping up (no trial was running); {where}", file=sys.stderr)
    return code


def _command(args: argparse.Namespace) -> int:
    from sweep.config import ConfigError, load_config

    as_json = getattr(args, "json", False)
    write = _quiet if as_json else say
    if args.command == "schema":
        from sweep.config.json_schema import schema_text

        print(schema_text(), end="", flush=True)
        return 0
    if args.command == "list":
        from sweep.readback.listing import list_sweeps

        if not Path(args.results_dir).is_dir():
            print(f"{args.results_dir}: no such folder; give the results folder of your sweeps (tracking.results_dir, default ./sweeps)", file=sys.stderr)
            return EXIT_INVALID
        entries = list_sweeps(Path(args.results_dir), write)
        if as_json:
            print_json({"results_dir": str(Path(args.results_dir).resolve()), "sweeps": entries})
        return 0
    if args.command in ("resume", "status", "stop") and not (Path(args.sweep_dir) / "sweep.json").is_file():
        from sweep.engine.submit import is_job_address

        address = args.address or os.environ.get("RAY_ADDRESS")
        if is_job_address(address):
            if as_json or getattr(args, "watch", None) is not None:
                flag = "--json" if as_json else "--watch"
                print(f"{flag}: not available for a submitted sweep; run `status` on its folder where it is (e.g. on the head node)", file=sys.stderr)
                return EXIT_INVALID
            return _submitted_command(args, address)
    if args.command in ("resume", "status", "stop", "report", "best"):
        return _folder_command(args)
    if args.command == "estimate" and Path(args.space).is_dir():
        from sweep.readback.memory import estimate_sweep, local_gpu_bytes

        if not (Path(args.space) / "sweep.json").exists():
            print(f"{args.space}: not a sweep folder (no sweep.json); give a space file or a folder made by `run`", file=sys.stderr)
            return EXIT_INVALID
        gpu = args.gpu_memory * 2**30 if args.gpu_memory else local_gpu_bytes()
        try:
            rows = estimate_sweep(Path(args.space), gpu, write)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return EXIT_INVALID
        if as_json:
            print_json({"sweep_dir": str(Path(args.space).resolve()), "gpu_memory_gb": gpu / 2**30 if gpu else None, "trials": rows})
        return 0
    if args.command == "train":
        return _train(args)
    if args.command == "dashboard":
        from sweep.readback.dashboard import MissingDashboard, dashboard

        try:
            dashboard(Path(args.sweep_dir), args.host, args.port, say)
        except (ConfigError, MissingDashboard) as exc:
            print(exc, file=sys.stderr)
            return EXIT_INVALID
        except KeyboardInterrupt:
            return 0  # Ctrl-C is how a dashboard is closed
        return 0
    try:
        cfg = load_config(args.space, args.overrides)
    except ConfigError as exc:
        unset = [re.search(r"\$\{(\w+)\}, which is not set", p) for p in exc.problems]
        if args.command != "submit" or not all(unset):
            print(exc, file=sys.stderr)
            if args.command == "validate" and as_json:  # the answer is "invalid": it is the document
                print_json({"source": str(args.space), "valid": False, "problems": exc.problems})
            return EXIT_INVALID
        # submit: the ${VAR}s are read on the cluster, where the job runs; check the rest here
        for match in unset:
            os.environ.setdefault(match.group(1), "set-on-the-cluster")
        try:
            cfg = load_config(args.space, args.overrides)
        except ConfigError as again:
            print(again, file=sys.stderr)
            return EXIT_INVALID
    if args.command == "validate":
        import yaml

        from sweep.engine.sweep import HubUnreachable, check_inputs
        from trainable.data import DataError

        deferred: list[dict[str, Any]] = []
        try:
            notes = check_inputs(cfg)  # what `run` checks before it starts: the model's tokenizer and targets, the data
        except HubUnreachable as exc:  # the space alone is checked here; what needs the model's files waits for them
            notes, deferred = [], [exc.deferred()]
        except (ConfigError, DataError) as exc:
            print(exc, file=sys.stderr)
            return EXIT_INVALID
        if as_json:
            print_json({"source": str(cfg.source), "valid": True, "config": cfg.resolved(), "space": cfg.space.describe_size(),
                        "num_trials": cfg.num_trials, "max_steps": cfg.train.max_steps,
                        "search": {"algorithm": cfg.search.algorithm, "why": cfg.algorithm_reason}, "notes": notes, "deferred": deferred})  # fmt: skip
            return 0
        print(yaml.safe_dump(cfg.resolved(), sort_keys=False), end="")
        print(f"# space: {cfg.space.describe_size()}")
        print(f"# search: {cfg.search.algorithm} ({cfg.algorithm_reason})")
        for note in notes:
            print(f"# {note}")
        for d in deferred:
            print(f"# deferred: the {', '.join(d['checks'])} checks of {d.get('model') or d.get('dataset')} ({d['reason']}); {d['todo']}")
        which = "" if not deferred else " (the space alone: checks deferred, above)" if any("model" in d for d in deferred) else " (the data check deferred, above)"
        print(f"# {cfg.num_trials} trials of {cfg.train.max_steps} steps; {cfg.source} is valid{which}")
        return 0

    if args.command == "estimate":
        from sweep.readback.memory import estimate_space, load_profile, local_gpu_bytes

        try:
            profile = load_profile(cfg)
        except OSError as exc:
            print(f"model.id: cannot read the config of {cfg.model.id}: {str(exc).splitlines()[0]}", file=sys.stderr)
            return EXIT_INVALID
        gpu = args.gpu_memory * 2**30 if args.gpu_memory else local_gpu_bytes()
        rows = estimate_space(cfg, profile, gpu, write)
        if as_json:
            print_json({"source": str(cfg.source), "model": cfg.model.id, "gpu_memory_gb": gpu / 2**30 if gpu else None, "corners": rows})
        return 0

    if args.command == "submit":
        from sweep.engine.submit import is_job_address, submit

        address = args.address or os.environ.get("RAY_ADDRESS")
        if not is_job_address(address):
            print(f"--address: got {address!r}; expected the head node's dashboard URL, e.g. http://HEAD:8265 (or set RAY_ADDRESS to it)", file=sys.stderr)
            return EXIT_INVALID
        try:
            submit(cfg, address, write=say)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return EXIT_INVALID
        return 0

    from sweep.engine.sweep import run_sweep
    from sweep.engine.signals import Interrupted
    from trainable.data import DataError

    try:
        result = run_sweep(cfg, address=args.address, log=say, sweep_dir=Path(args.sweep_dir) if args.sweep_dir else None, live=sys.stdout.isatty())
    except (ConfigError, DataError) as exc:
        print(exc, file=sys.stderr)
        return EXIT_INVALID
    except Interrupted as exc:  # Ctrl-C / SIGTERM: trials checkpointed; it said how to resume
        return exc.exit_code
    except KeyboardInterrupt as exc:  # no trial was running: nothing to resume unless a folder was printed
        return _outside_trials(exc, "a sweep folder printed above: `python -m sweep status DIR` shows where it stands, `python -m sweep resume DIR` continues it")
    return EXIT_FAILED if result.failure else 0


def _train(args: argparse.Namespace) -> int:
    """`train`: one configuration as a one-trial sweep (sweep/single.py)."""
    from sweep.config import ConfigError
    from sweep.engine.single import exit_code, load_one, train_one

    try:
        cfg = load_one(args.space, args.overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_INVALID
    from sweep.engine.signals import Interrupted
    from trainable.data import DataError

    try:
        status = train_one(cfg, address=args.address, log=say, sweep_dir=Path(args.sweep_dir) if args.sweep_dir else None)
    except (ConfigError, DataError) as exc:
        print(exc, file=sys.stderr)
        return EXIT_INVALID
    except Interrupted as exc:
        return exc.exit_code
    except KeyboardInterrupt as exc:
        return _outside_trials(exc, "a folder printed above: `python -m sweep status DIR` shows where it stands, `python -m sweep resume DIR` continues it")
    return exit_code(status)


def _submitted_command(args: argparse.Namespace, address: str) -> int:
    """status / stop / resume of a sweep submitted as a Ray job (its folder is on the cluster)."""
    from sweep.config import ConfigError
    from sweep.engine.submit import remote_resume, remote_status, remote_stop

    try:
        if args.command == "status":
            return 0 if remote_status(address, args.sweep_dir, write=say) else 1
        if args.command == "stop":
            return 0 if remote_stop(address, args.sweep_dir, args.wait, write=say) else 1
        remote_resume(address, args.sweep_dir, write=say)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_INVALID
    return 0


def _folder_command(args: argparse.Namespace) -> int:
    from sweep.config import ConfigError
    from trainable.data import DataError

    folder = Path(args.sweep_dir).resolve()
    as_json = getattr(args, "json", False)
    write = _quiet if as_json else say
    try:
        if args.command == "status" and args.watch is not None:
            from sweep.readback.watch import watch

            if as_json:
                print("--watch and --json: give one; --json prints the status once", file=sys.stderr)
                return EXIT_INVALID
            if args.watch <= 0:
                print(f"--watch {args.watch:g}: expected a number of seconds > 0 between redraws, e.g. --watch 10", file=sys.stderr)
                return EXIT_INVALID
            watch(folder, args.watch)
        elif args.command == "status":
            from sweep.readback.status import sweep_status

            info = sweep_status(folder, write)
            if as_json:
                print_json(info)
        elif args.command == "stop":
            from sweep.readback.status import stop_sweep

            return 0 if stop_sweep(folder, args.wait) else 1
        elif args.command == "report":
            from sweep.readback.report import build_report

            build_report(folder)
        elif args.command == "best":
            from sweep.readback.export import best

            info: dict[str, Any] = {}
            try:
                found = best(folder, args.where, Path(args.export) if args.export else None, args.merge, write, info, log_model=args.log_model)
            except (ValueError, FileExistsError) as exc:
                print(exc, file=sys.stderr)
                return EXIT_INVALID
            if as_json:
                print_json(info)
            return 0 if found else 1
        else:
            from sweep.engine.sweep import resume_sweep
            from sweep.engine.signals import Interrupted
            from sweep.engine.single import after_resume

            try:
                result = resume_sweep(folder, address=args.address, log=say, live=sys.stdout.isatty())
                code = after_resume(folder, result, say)  # a folder made by `train`: its adapter
                return code or (EXIT_FAILED if result.failure else 0)
            except Interrupted as exc:
                return exc.exit_code
            except KeyboardInterrupt as exc:
                folder_arg = shlex.quote(str(folder))
                return _outside_trials(exc, f"`python -m sweep status {folder_arg}` shows where it stands, `python -m sweep resume {folder_arg}` continues it")
    except (ConfigError, DataError) as exc:
        print(exc, file=sys.stderr)
        return EXIT_INVALID
    return 0


if __name__ == "__main__":
    sys.exit(main())
