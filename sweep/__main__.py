"""python -m sweep {validate,run} SPACE.yaml [key.path=value ...]   (argv -> subcommands; no logic)

Exit codes: 0 done; 2 the space file, its overrides or the data are invalid (nothing was started);
1 the sweep itself failed.
"""

from __future__ import annotations

import argparse
import sys

EXIT_INVALID = 2


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
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from sweep.config import ConfigError, load_config

    try:
        cfg = load_config(args.space, args.overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_INVALID
    if args.command == "validate":
        import yaml

        print(yaml.safe_dump(cfg.resolved(), sort_keys=False), end="")
        print(f"# space: {cfg.space.describe_size()}")
        print(f"# {cfg.num_trials} trials of {cfg.train.max_steps} steps; {cfg.source} is valid")
        return 0

    from sweep.run import run_sweep
    from trainable.data import DataError

    try:
        run_sweep(cfg, address=args.address, log=lambda line: print(line, flush=True))
    except (ConfigError, DataError) as exc:
        print(exc, file=sys.stderr)
        return EXIT_INVALID
    return 0


if __name__ == "__main__":
    sys.exit(main())
