"""python -m sweep {validate,run,submit,resume,status,stop,report,best,estimate} ...   (argv -> subcommands; no logic)

Exit codes: 0 done; 2 the space file, its overrides or the data are invalid, or a folder, the
cluster or a sweep's store fails its check (nothing was started or changed); 1 the sweep itself failed; 130 / 143 interrupted by SIGINT (Ctrl-C) / SIGTERM: trials checkpointed
and stopped, `resume` continues.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys

EXIT_INVALID = 2
EXIT_SIGINT = 130  # 128 + SIGINT, as shells report Ctrl-C (SIGTERM: 143)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sweep", description="LoRA / QLoRA hyperparameter sweeps: Ray Tune + Optuna + MLflow.")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check a space file; print the resolved config and the size of the space")
    v.add_argument("space", help="the space.yaml file")
    v.add_argument("overrides", nargs="*", metavar="key.path=value", help="override values, e.g. search.num_trials=4")
    r = sub.add_parser("run", help="run a sweep")
    r.add_argument("space", help="the space.yaml file")
    r.add_argument("overrides", nargs="*", metavar="key.path=value", help="override values, e.g. search.num_trials=4")
    r.add_argument("--address", default=None, help="Ray cluster to attach to (default: RAY_ADDRESS, else a local Ray)")
    r.add_argument("--sweep-dir", default=None, help="the new sweep's folder (must not exist; default RESULTS_DIR/NAME-TIMESTAMP)")
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
    s = sub.add_parser("stop", help="running trials checkpoint and stop; the sweep can be resumed")
    s.add_argument("sweep_dir", help="the sweep's results folder" + on_cluster)
    s.add_argument("--address", default=None, help="for a submitted sweep: the head node's dashboard URL")
    s.add_argument("--wait", type=float, default=600, metavar="SECONDS", help="how long to wait for the driver to stop (default 600)")
    s = sub.add_parser("report", help="an HTML report with plots of a sweep (also logged to its MLflow parent run)")
    s.add_argument("sweep_dir", help="the sweep's results folder")
    s = sub.add_parser("best", help="the best trial (under constraints); export its config and adapter")
    s.add_argument("sweep_dir", help="the sweep's results folder")
    s.add_argument("--where", default=None, metavar="CONSTRAINTS", help='e.g. "peak_vram_gb<=20, eval_loss<2.5"')
    s.add_argument("--export", default=None, metavar="DIR", help="write the ready-to-run space file, the adapter (PEFT format) and a README here")
    s.add_argument("--merge", action="store_true", help="with --export: also the base model with the adapter merged in")
    e = sub.add_parser("estimate", help="predicted peak GPU memory: the corners of a space, or each trial of a finished sweep")
    e.add_argument("space", metavar="SPACE.yaml|SWEEP_DIR", help="a space file, or a sweep's results folder")
    e.add_argument("overrides", nargs="*", metavar="key.path=value", help="override values (space files only)")
    e.add_argument("--gpu-memory", type=float, default=None, metavar="GB", help="GPU memory to check against (default: this machine's GPU)")
    return p


def say(line: str) -> None:
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from pathlib import Path

    from sweep.config import ConfigError, load_config

    if args.command in ("resume", "status", "stop") and not (Path(args.sweep_dir) / "sweep.json").is_file():
        from sweep.submit import is_job_address

        address = args.address or os.environ.get("RAY_ADDRESS")
        if is_job_address(address):
            return _submitted_command(args, address)
    if args.command in ("resume", "status", "stop", "report", "best"):
        return _folder_command(args)
    if args.command == "estimate" and Path(args.space).is_dir():
        from sweep.memory import estimate_sweep, local_gpu_bytes

        if not (Path(args.space) / "sweep.json").exists():
            print(f"{args.space}: not a sweep folder (no sweep.json); give a space file or a folder made by `run`", file=sys.stderr)
            return EXIT_INVALID
        gpu = args.gpu_memory * 2**30 if args.gpu_memory else local_gpu_bytes()
        estimate_sweep(Path(args.space), gpu)
        return 0
    try:
        cfg = load_config(args.space, args.overrides)
    except ConfigError as exc:
        unset = [re.search(r"\$\{(\w+)\}, which is not set", p) for p in exc.problems]
        if args.command != "submit" or not all(unset):
            print(exc, file=sys.stderr)
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

        print(yaml.safe_dump(cfg.resolved(), sort_keys=False), end="")
        print(f"# space: {cfg.space.describe_size()}")
        print(f"# {cfg.num_trials} trials of {cfg.train.max_steps} steps; {cfg.source} is valid")
        return 0

    if args.command == "estimate":
        from sweep.memory import estimate_space, load_profile, local_gpu_bytes

        try:
            profile = load_profile(cfg)
        except OSError as exc:
            print(f"model.id: cannot read the config of {cfg.model.id}: {str(exc).splitlines()[0]}", file=sys.stderr)
            return EXIT_INVALID
        estimate_space(cfg, profile, args.gpu_memory * 2**30 if args.gpu_memory else local_gpu_bytes())
        return 0

    if args.command == "submit":
        from sweep.submit import is_job_address, submit

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

    from sweep.run import Interrupted, run_sweep
    from trainable.data import DataError

    try:
        run_sweep(cfg, address=args.address, log=say, sweep_dir=Path(args.sweep_dir) if args.sweep_dir else None)
    except (ConfigError, DataError) as exc:
        print(exc, file=sys.stderr)
        return EXIT_INVALID
    except Interrupted as exc:  # Ctrl-C / SIGTERM: trials checkpointed; it said how to resume
        return exc.exit_code
    except KeyboardInterrupt:  # before the trials started: nothing to resume unless a folder was printed
        print("interrupted before the trials started; a sweep folder printed above resumes with `python -m sweep resume DIR`", file=sys.stderr)
        return EXIT_SIGINT
    return 0


def _submitted_command(args: argparse.Namespace, address: str) -> int:
    """status / stop / resume of a sweep submitted as a Ray job (its folder is on the cluster)."""
    from sweep.config import ConfigError
    from sweep.submit import remote_resume, remote_status, remote_stop

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
    from pathlib import Path

    from sweep.config import ConfigError
    from trainable.data import DataError

    folder = Path(args.sweep_dir).resolve()
    try:
        if args.command == "status":
            from sweep.status import sweep_status

            sweep_status(folder)
        elif args.command == "stop":
            from sweep.status import stop_sweep

            return 0 if stop_sweep(folder, args.wait) else 1
        elif args.command == "report":
            from sweep.report import build_report

            build_report(folder)
        elif args.command == "best":
            from sweep.export import best

            try:
                return 0 if best(folder, args.where, Path(args.export) if args.export else None, args.merge) else 1
            except (ValueError, FileExistsError) as exc:
                print(exc, file=sys.stderr)
                return EXIT_INVALID
        else:
            from sweep.run import Interrupted, resume_sweep

            try:
                resume_sweep(folder, address=args.address, log=say)
            except Interrupted as exc:
                return exc.exit_code
            except KeyboardInterrupt:
                print(f"interrupted before the trials started; resume again with `python -m sweep resume {shlex.quote(str(folder))}`", file=sys.stderr)
                return EXIT_SIGINT
    except (ConfigError, DataError) as exc:
        print(exc, file=sys.stderr)
        return EXIT_INVALID
    return 0


if __name__ == "__main__":
    sys.exit(main())
