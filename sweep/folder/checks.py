"""Checks that can fail, made before anything starts, and checks of the stores a command reads.

    before_start   the results folder (and MLflow's sqlite file) can be written, a new --sweep-dir
                   does not exist yet, the Ray cluster at --address answers: all before Ray,
                   MLflow or the study start, so a problem costs seconds, not a started sweep
    check_stores   the sweep's Optuna study and MLflow store are there and readable, checked
                   without creating or changing them (a missing sqlite file is not made anew)
    read_only_study  the study opened for a command that only reads it: nothing can be written

Every problem is a ConfigError naming the path or address and what to do (exit code 2).
"""

from __future__ import annotations

import os
import socket
import sqlite3
import sys
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

from sweep.config import ConfigError, SweepConfig

CONNECT_TIMEOUT_S = 5.0


# ----------------------------------------------------------------------------------------------
# before a sweep starts


def before_start(cfg: SweepConfig, address: str | None = None, sweep_dir: Path | None = None, new: bool = True) -> None:
    """Everything `run` (new=True) or `resume` (new=False) can check before taking a resource."""
    problems = []
    where = "tracking.results_dir" if cfg.tracking.results_dir else "tracking.results_dir (default ./sweeps)"
    problems += writable(cfg.results_dir, where)
    # sqlite stores outside the results folder (the default study, in the new sweep's folder inside
    # it, is covered by the check above)
    new_folder = cfg.results_dir / "a-new-sweep"
    for key, url in (("tracking.mlflow_uri", cfg.mlflow_uri), ("tracking.optuna_storage", cfg.optuna_storage(new_folder))):
        db = sqlite_file(url)
        if db is None or db.parent in (cfg.results_dir, new_folder):
            continue
        problems += writable(db.parent, key)
        if db.is_file() and not os.access(db, os.R_OK | os.W_OK):
            problems.append(f"{key}: {db} cannot be written by this user; fix its permissions or use another store")
    if new and sweep_dir is not None:
        if sweep_dir.exists():
            problems.append(f"--sweep-dir {sweep_dir}: exists already; a new sweep needs a new folder (resume is `python -m sweep resume {quote(sweep_dir)}`)")
        else:
            problems += writable(sweep_dir.parent, "--sweep-dir")
    ray = sys.modules.get("ray")
    if not (ray is not None and ray.is_initialized()):  # connect_ray attaches to nothing then
        problems += ray_address_problems(address or os.environ.get("RAY_ADDRESS"), "--address" if address else "RAY_ADDRESS")
    if problems:
        raise ConfigError(str(cfg.source), problems)


def before_resume(cfg: SweepConfig, sweep_dir: Path, study_name: str, address: str | None = None, moved_from: Path | None = None) -> None:
    """`resume`: the checks of `run`, the sweep folder writable, and both stores there (a missing
    study is reported, not recreated empty; `moved_from`: see check_stores)."""
    check_stores(sweep_dir, cfg.mlflow_uri, cfg.optuna_storage(sweep_dir), study_name, moved_from)
    problems = writable(sweep_dir, "the sweep folder")
    if problems:
        raise ConfigError(str(sweep_dir), problems)
    before_start(cfg, address, new=False)


def writable(folder: Path, key: str, fix: str = "choose a folder this user can write (tracking.results_dir=PATH)") -> list[str]:
    """[] if `folder` exists or can be made, and files can be created in it; else the problem.

    Probed by creating (and removing) a file in the folder, or in its nearest existing parent when
    it does not exist yet: permission bits say nothing for root, a read-only mount or a
    root-squashed NFS share; only a write tells."""
    folder = Path(folder)
    probe_in = folder
    while not probe_in.exists():
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        return [f"{key}: {folder} cannot be a folder: {probe_in} is a file; choose another path"]
    try:
        fd, name = tempfile.mkstemp(dir=probe_in, prefix=".lora-sweep-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        made = "write in" if probe_in == folder else f"create {folder} in"
        return [f"{key}: cannot {made} {probe_in} ({exc.strerror or exc}); {fix}"]
    return []


def reachable(address: str | None, timeout: float = CONNECT_TIMEOUT_S, flag: str = "--address") -> list[str]:
    """[] if a Ray cluster answers at `address` (as `flag` gave it: --address or RAY_ADDRESS); else
    what is wrong and what to give instead, within about 2 x `timeout` seconds. Checked in the
    order a problem shows: the form (a GCS HOST:PORT, ray://HOST:PORT, or for `submit` and a
    submitted sweep's commands a dashboard URL http://HOST:8265), a TCP connection, then a reply
    in Ray's protocol (gRPC from the GCS or the Ray client server, Ray's version answer from a
    dashboard). Without these, ray.init waits a minute for a GCS that is not there, hangs for good
    on a port that accepts and never answers, and ends in a traceback for a URL or a missing port.
    `auto` (a cluster started on this machine: ray.init says at once if there is none) and `local`
    are left to Ray."""
    if not address or address in ("auto", "local"):
        return []
    form = address_form(address, flag)
    if isinstance(form, str):
        return [form]
    kind, host, port = form
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        if kind == "dashboard":
            hint = "is the head node's dashboard (its job server, port 8265 by default) running there, and the port open?"
        else:
            hint = "is the Ray head running there (`ray start --head` prints its address) and the port open? Without --address (and RAY_ADDRESS) a local Ray starts"
        return [f"{flag} {address}: cannot reach {host}:{port} ({reason}, tried for up to {timeout:g}s); {hint}"]
    trouble = _dashboard_trouble(address, timeout) if kind == "dashboard" else _grpc_trouble(host, port, kind, timeout)
    if trouble:
        what = {"gcs": "a Ray head's GCS port (`ray start --head` prints HEAD:PORT, 6379 by default)", "client": "a Ray client server (ray://HEAD:10001)",
                "dashboard": "a Ray dashboard (http://HEAD:8265)"}[kind]  # fmt: skip
        return [f"{flag} {address}: {host}:{port} accepts connections but {trouble}: it is not {what}; check the host and port"]
    return []


# What a Ray cluster answers: a GCS and a Ray client server speak gRPC. The method asked is one each
# serves in this Ray version (a cluster must run the driver's Ray version); any reply but "no such
# method" counts, an auth refusal included (ray.init then presents the token). A unit test checks
# that this Ray still names them so.
GCS_METHOD = "/ray.rpc.NodeInfoGcsService/CheckAlive"
CLIENT_METHOD = "/ray.rpc.RayletDriver/ClusterInfo"


def address_form(address: str, flag: str = "--address") -> tuple[str, str, int] | str:
    """(kind, host, port) of an address: kind gcs (HOST:PORT), client (ray://HOST:PORT) or
    dashboard (http(s)://HOST[:PORT]); else the problem with its form."""
    scheme = address.split("://", 1)[0].lower() if "://" in address else ""
    if scheme not in ("", "ray", "http", "https"):
        return f"{flag} {address}: unknown scheme {scheme}://; give the head's GCS address HOST:PORT (`ray start --head` prints it), or ray://HOST:10001"
    host, port = host_port(address)
    if not host:
        return f"{flag} {address}: no host in it; give HOST:PORT, e.g. 10.0.0.5:6379"
    if port is None:
        return f"{flag} {address}: no port; give {host}:PORT, the port `ray start --head` prints (6379 by default), or ray://{host}:10001 for the Ray client"
    return ({"": "gcs", "ray": "client"}.get(scheme, "dashboard"), host, port)


def ray_address_problems(address: str | None, flag: str = "--address") -> list[str]:
    """`run`, `train`, `resume` attach to a cluster's GCS or Ray client: the checks of `reachable`,
    and a dashboard URL (what `submit` takes) refused, saying what to give instead."""
    if address and address.lower().startswith(("http://", "https://")):
        host, _ = host_port(address)
        return [f"{flag} {address}: a dashboard URL is for `python -m sweep submit` (a sweep sent to the cluster as a Ray job); to run the "
                f"workers on that cluster from here give its GCS address, {host}:6379 by default (`ray start --head` prints it), or ray://{host}:10001"]  # fmt: skip
    return reachable(address, flag=flag)


def _grpc_trouble(host: str, port: int, kind: str, timeout: float) -> str | None:
    """None if a Ray GCS (kind gcs) or Ray client server (client) answers at host:port; else what happened."""
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return None  # a TLS cluster: its certificates are Ray's business; the TCP check stands
    import grpc

    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as channel:
        try:
            channel.unary_unary(GCS_METHOD if kind == "gcs" else CLIENT_METHOD)(b"", timeout=timeout)  # an empty request: bytes in, bytes out
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return f"gives no reply in Ray's protocol (gRPC) within {timeout:g}s"
            if code == grpc.StatusCode.UNAVAILABLE:  # it answered, not in HTTP/2: a web server, a proxy, ...
                return "does not answer in Ray's protocol (gRPC)"
            if code == grpc.StatusCode.UNIMPLEMENTED:
                return "answers gRPC without Ray's methods (another service, or a cluster of another Ray version)"
    return None


def _dashboard_trouble(url: str, timeout: float) -> str | None:
    """None if a Ray dashboard answers at `url` (its /api/version, or an auth refusal); else what happened."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/api/version", timeout=timeout) as reply:
            body = reply.read(4096)
    except urllib.error.HTTPError as exc:
        return None if exc.code in (401, 403) else f"answers HTTP {exc.code} where a Ray dashboard answers its version"
    except (OSError, ValueError) as exc:  # a timeout, a reset, not HTTP
        return f"gives no answer a Ray dashboard gives ({getattr(exc, 'reason', exc)})"
    try:
        return None if "ray_version" in json.loads(body) else "answers without a Ray version"
    except ValueError:
        return "answers something other than a Ray dashboard (not its JSON)"


def host_port(address: str) -> tuple[str | None, int | None]:
    """('10.0.0.1', 6379) from '10.0.0.1:6379', 'ray://h:10001', 'http://h:8265/', '[::1]:6379'."""
    parsed = urllib.parse.urlsplit(address if "://" in address else "tcp://" + address)
    try:
        port = parsed.port
    except ValueError:
        return parsed.hostname, None
    if port is None and parsed.scheme in ("http", "https"):
        port = 443 if parsed.scheme == "https" else 80
    return parsed.hostname, port


def quote(path: Any) -> str:
    """A path as one shell word, for the commands printed for the user to copy."""
    import shlex

    return shlex.quote(str(path))


# ----------------------------------------------------------------------------------------------
# the stores of an existing sweep


def sqlite_file(url: str | None) -> Path | None:
    """The file of a sqlite:/// URL (None for other stores and in-memory sqlite)."""
    if not url or not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def check_stores(folder: Path, mlflow_uri: str, storage: str, study_name: str, moved_from: Path | None = None) -> None:
    """The sweep's study and MLflow store exist and are readable: ConfigError otherwise, saying
    what is lost and what can still be read. Opens sqlite files read-only, so nothing is created or
    changed (optuna and MLflow would create an empty store at a missing path). `moved_from`: where
    the sweep ran (sweep.folder.recorded_dir), to say which file to copy into a moved or copied folder."""
    from sweep.config.secrets import redact

    problems = []
    study_db, mlflow_db = sqlite_file(storage), sqlite_file(mlflow_uri)
    ui = f"mlflow ui --backend-store-uri {quote(redact(mlflow_uri))}"
    if study_db is not None:
        trouble = study_file_trouble(study_db, study_name)
        if trouble:
            problems.append(
                f"{study_db}: the sweep's Optuna study {trouble}. MLflow still holds every trial (params, metrics, status: {ui}) and "
                f"the trials' checkpoints are in {folder}/trials/; status, report, best and resume need the study: restore the file from a backup"
                + _moved_hint(folder, study_db, moved_from)
            )
    if mlflow_db is not None:
        trouble = _sqlite_trouble(mlflow_db, "SELECT 1 FROM runs LIMIT 1", (), "no runs table")
        if trouble:
            problems.append(
                f"{mlflow_db}: the sweep's MLflow store {trouble}. The Optuna study still holds every trial's params and results "
                f"({redact(storage)}, study {study_name!r}); restore the MLflow file from a backup" + _moved_hint(folder, mlflow_db, moved_from)
            )
    if problems:
        raise ConfigError(str(folder), problems)


def _moved_hint(folder: Path, store: Path, was: Path | None) -> str:
    """For a store file missing from a sweep folder that was moved or copied (sweep.folder.relocate
    reads its stores at its new place, never the old one; `was`: where it ran): where the file was,
    and where to put it."""
    here = Path(folder).resolve()
    if was is None or was == here or store.exists():
        return ""
    if store.is_relative_to(here):
        old = was / store.relative_to(here)
    elif store.parent == here.parent:
        old = was.parent / store.name
    else:
        return ""
    return (f" (the sweep ran in {was}; this folder is a move or copy of it, and reads and writes its own stores, never the old ones: "
            f"copy {old} to {store}, or move or copy the whole results folder {was.parent} with the sweep)")  # fmt: skip


def study_file_trouble(path: Path, study_name: str) -> str | None:
    """None if the sqlite file holds the study `study_name` (read read-only); else what is wrong."""
    return _sqlite_trouble(path, "SELECT 1 FROM studies WHERE study_name = ?", (study_name,), f"no study named {study_name!r}", integrity=True)


def _sqlite_trouble(path: Path, query: str, args: tuple, empty: str, integrity: bool = False) -> str | None:
    """None if `query` finds a row in the sqlite file, opened read-only; else what is wrong."""
    if not path.is_file():
        return "is missing (deleted or moved?)" if not path.exists() else "is not a file"
    if path.stat().st_size == 0:
        return "is empty (0 bytes: truncated?)"
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        return f"cannot be opened: {exc}"
    try:
        if integrity and db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            return "is damaged (sqlite's integrity check fails)"
        found = db.execute(query, args).fetchone()
    except sqlite3.Error as exc:
        return f"cannot be read: {exc} (damaged or truncated?)"
    finally:
        db.close()
    return None if found else f"holds {empty} (an empty or unrelated database)"


def load_study(folder: Path, mlflow_uri: str, storage: str, study_name: str, moved_from: Path | None = None) -> Any:
    """The sweep's Optuna study for a command that only reads it (report, best, estimate): after
    check_stores, opened read-only (read_only_study); a study missing from a server store is a
    ConfigError too."""
    check_stores(folder, mlflow_uri, storage, study_name, moved_from)
    try:
        return read_only_study(folder, storage, study_name)
    except KeyError:
        from sweep.config.secrets import redact

        raise ConfigError(str(folder), [f"{redact(storage)}: holds no study named {study_name!r}; MLflow still holds every trial "
                                        f"(mlflow ui --backend-store-uri {quote(redact(mlflow_uri))})"]) from None  # fmt: skip


READ_ONLY_POSTGRES = {"connect_args": {"options": "-c default_transaction_read_only=on"}}


def read_only_study(folder: Path, storage: str, study_name: str) -> Any:
    """optuna.load_study with the store opened read-only (KeyError without such a study). Optuna
    creates its schema in whatever database it opens, an empty file or a fresh database included;
    read-only, that fails instead: a sqlite file through a `mode=ro` URI (made by pathlib, so any
    character of the path works; SQLAlchemy's own URL parsing cuts a path at '#'), PostgreSQL in
    read-only transactions. A store that cannot be opened or read is a ConfigError naming it."""
    import sqlalchemy.exc

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = sqlite_file(storage)
    try:
        if path is not None:
            uri = f"{path.resolve().as_uri()}?mode=ro"
            store: Any = optuna.storages.RDBStorage(storage, engine_kwargs={"creator": lambda: sqlite3.connect(uri, uri=True, check_same_thread=False)})
        elif storage.split("://", 1)[0] in ("postgresql", "postgresql+psycopg", "postgresql+psycopg2"):  # libpq's `options`
            store = optuna.storages.RDBStorage(storage, engine_kwargs=READ_ONLY_POSTGRES)
        else:
            store = storage
        return optuna.load_study(study_name=study_name, storage=store)
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, RuntimeError) as exc:
        raise ConfigError(str(folder), [store_problem(storage, exc)]) from None


def store_problem(storage: str, exc: BaseException) -> str:
    """What went wrong opening a store, in a line: the database's own words (not SQLAlchemy's
    wrapper, its SQL or its doc link), passwords redacted, and what to check."""
    from sweep.config.secrets import redact

    cause = getattr(exc, "orig", None) or exc  # SQLAlchemy's DBAPIError wraps the driver's error
    text = " ".join(line.strip() for line in str(cause).splitlines() if line.strip() and not line.startswith(("[SQL:", "(Background on")))
    if "read-only transaction" in text or "readonly database" in text:  # Optuna tried to create its tables: there were none
        return f"{redact(storage)}: holds no Optuna study (an empty or unrelated database); give the store the sweep ran with, or restore it from a backup"
    return (f"{redact(storage)}: cannot read the sweep's Optuna study ({redact(text)[:300] or type(exc).__name__}); "
            "check that the database server is up and reachable and that the store's password (its ${VAR}, or PGPASSWORD for PostgreSQL) is right")  # fmt: skip
