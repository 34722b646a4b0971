"""`python -m sweep dashboard SWEEP_DIR [--port 8080]`: the sweep's Optuna study in optuna-dashboard
(history, parallel coordinates, importance, each trial's params and intermediate values), for
those who know Optuna's own views. optuna-dashboard is an optional extra
(`pip install -e ".[dashboard]"`); without it the command says so and exits 2.

It serves the study where the sweep keeps it (the sqlite file in the folder, or PostgreSQL), after
the same store checks as `status` (a missing store is never created)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from sweep.folder import SweepFolder

Write = Callable[[str], None]
INSTALL = 'pip install -e ".[dashboard]"  (or: pip install optuna-dashboard)'


class MissingDashboard(Exception):
    """optuna-dashboard is not installed."""


def server() -> Callable[..., None]:
    """optuna_dashboard.run_server, or MissingDashboard saying what to install."""
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise MissingDashboard(f"dashboard: optuna-dashboard is not installed; install it with  {INSTALL}") from None
    return run_server


def dashboard(folder: Path, host: str, port: int, write: Write = print, serve: Callable[..., None] | None = None) -> None:
    """Serve the sweep's study until Ctrl-C. `serve` (optuna_dashboard.run_server by default) is
    given the storage, host and port."""
    serve = serve or server()  # before the stores: a missing extra is said first, whatever the folder
    sweep = SweepFolder(folder)
    sweep.check_stores()
    study_id = _study_id(sweep)
    where = f"http://{host}:{port}/dashboard" + (f"/studies/{study_id}" if study_id is not None else "")
    write(f"optuna-dashboard of {sweep.name} (study {sweep.study_name!r}): {where}   (Ctrl-C stops it)")
    serve(sweep.optuna_storage, host=host, port=port)


def _study_id(sweep: SweepFolder) -> int | None:
    """The study's id in its storage (the dashboard's page of it); None if it cannot be read."""
    import optuna

    try:
        return optuna.storages.get_storage(sweep.optuna_storage).get_study_id_from_name(sweep.study_name)
    except (KeyError, ValueError, RuntimeError):
        return None
