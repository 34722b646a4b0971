"""The README's demo command, run as a user runs it: real Ray, Optuna, MLflow on the tiny model."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT
from tests.e2e.conftest import mlflow_runs, study_trials

pytestmark = pytest.mark.e2e
STATE_OF = {"completed": "COMPLETE", "pruned": "PRUNED", "stopped": "PRUNED", "oom": "FAIL", "nan": "FAIL", "failed": "FAIL"}


def test_demo_sweep_end_to_end(tmp_path: Path) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "sweep", "run", str(ROOT / "search_spaces" / "demo.yaml"), f"tracking.results_dir={tmp_path}"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert elapsed < 300, f"the demo took {elapsed:.0f}s"
    # quiet: none of the libraries' own progress bars and INFO lines, and a one-line search rationale
    for noise in ("Saving the dataset", "INFO mlflow", "A new study created", "Creating initial MLflow database tables"):
        assert noise not in result.stderr + out, (noise, result.stderr[-2000:])
    assert "search: tpe: auto: TPE after 4 Sobol start-up trials (search.n_startup_trials)" in out

    best = re.search(r"best trial: (t\d{3})\s+eval_loss ([0-9.]+)", out)
    assert best, out[-2000:]
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db" in out

    parent, children = mlflow_runs(f"sqlite:///{tmp_path}/mlflow.db", "demo")
    assert len(children) == 8
    assert parent.data.params["space_sha256"] and parent.data.params["num_trials"] == "8"
    assert parent.data.tags["best_trial"] == best.group(1)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    finals, first_rung = {}, {}
    for run in children:
        status = run.data.tags["trial_status"]
        assert status in ("completed", "pruned"), (run.info.run_name, status, run.data.tags.get("error"))
        assert run.info.status == ("FINISHED" if status == "completed" else "KILLED")  # MLflow's green tick for completed trials only
        assert re.match(r"t\d{3} (lora|qlora) r\d+ a[0-9.]+ lr\S+ b\dx\d \S+", run.info.run_name)
        for key in ("eval_loss", "train_loss", "tokens_per_sec", "peak_rss_gb", "lr"):
            assert math.isfinite(run.data.metrics[key]), (run.info.run_name, key)
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) >= 4
        assert "learning_rate" not in run.data.metrics  # the param (the peak) keeps its name alone
        for key in ("lora_r", "lora_alpha", "learning_rate", "batch", "trainable_params", "effective_batch", "quantization", "embeddings", "embeddings_reason", "optimizer", "gradient_checkpointing"):
            assert key in run.data.params, key
        first_rung[run.data.tags["trial"]] = next(m.value for m in client.get_metric_history(run.info.run_id, "eval_loss") if m.step == 20)  # ASHA's first rung: every trial gets there
        if status == "completed":
            finals[run.data.tags["trial"]] = run.data.metrics["eval_loss"]
            assert run.data.metrics["train_seconds"] > 0 and run.data.metrics["load_seconds"] > 0
    # ASHA promotes by the order trials reach a rung, which the workers' timing decides: t002 (the
    # best) completes in every run, a second trial in some
    assert len(finals) >= 1
    assert finals[best.group(1)] == pytest.approx(float(best.group(2)), abs=1e-4) == pytest.approx(min(finals.values()), abs=1e-4)
    # settings matter on this task: at the first rung, where every trial has an eval (the trials that
    # complete are the good ones, and may all be close)
    assert min(first_rung.values()) < 0.8 * max(first_rung.values()), first_rung

    # the study agrees with MLflow, trial by trial
    (sweep_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith("demo-")]
    # TPE's first proposal after its start-up repeats the one completed trial exactly (seen on this
    # space): that entry is a duplicate, never run (sweep.engine.study.close_duplicate)
    trials = [t for t in study_trials(sweep_dir) if t.user_attrs.get("trial_status") != "duplicate"]
    assert len(trials) == 8
    by_label = {r.data.tags["trial"]: r.data.tags["trial_status"] for r in children}
    for t in trials:
        assert STATE_OF[by_label[f"t{t.number:03d}"]] == t.state.name
        assert t.user_attrs["trial_status"] == by_label[f"t{t.number:03d}"]
    assert (sweep_dir / "space.yaml").read_text() == (ROOT / "search_spaces" / "demo.yaml").read_text()
    # the estimate command reads a finished sweep back: every trial, its estimate (no GPU here: no measured VRAM)
    estimate = subprocess.run(
        [sys.executable, "-m", "sweep", "estimate", str(sweep_dir), "--gpu-memory", "80"],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert estimate.returncode == 0, estimate.stderr[-2000:]
    lines = estimate.stdout.splitlines()
    assert lines[0].startswith(f"{sweep_dir.name}: 8 trials") and len(lines) == 3 + 8
    assert sorted(line.split()[0] for line in lines[3:]) == sorted(t.data.tags["trial"] for t in children)  # each row names its trial
    # the morning-after report of the demo sweep: generated here, never committed
    report = subprocess.run(
        [sys.executable, "-m", "sweep", "report", str(sweep_dir)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr[-2000:]
    for name in ("history", "parallel", "importance", "pareto", "curves"):
        png = (sweep_dir / "report" / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, name
    html = (sweep_dir / "report" / "report.html").read_text()
    assert html.count("<tr class=") == 8 and all(label in html for label in by_label)
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} >= {"report/report.html", "report/history.png"}


def test_a_sweep_from_a_plain_folder_with_the_defaults(tmp_path: Path) -> None:
    """A folder holding only a space file (no `tracking:` section) and its data, the command run from
    it as a user would: the results go to ./sweeps, every worker (each trains a cohort: the default)
    opens that folder's stores whatever Ray's own working directory is, every trial completes, one
    MLflow child run each. (A relative results folder once sent the workers to a mlflow.db of their
    own: every trial failed and the sweep said "0 trials" and exited 0.)"""
    import shutil

    shutil.copytree(ROOT / "search_spaces" / "data" / "demo", tmp_path / "data" / "demo")
    text = (ROOT / "search_spaces" / "demo.yaml").read_text()
    assert "tracking" not in text and "results_dir" not in text
    (tmp_path / "space.yaml").write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "sweep", "run", "space.yaml", "search.num_trials=4", "train.max_steps=10", "search.scheduler={type: none}", "search.time_budget=null"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"workers: \d+ of 1 CPU, each training up to \d+ trials on one loaded base model", result.stdout), result.stdout[-3000:]
    parent, children = mlflow_runs(f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}", "demo")
    assert len(children) == len({r.data.tags["trial"] for r in children}) == 4  # one child run per trial
    assert {r.data.tags["trial_status"] for r in children} == {"completed"} and {r.info.status for r in children} == {"FINISHED"}
    assert max(int(r.data.params["cohort_size"]) for r in children) > 1  # cohorts, not one trial per worker
    assert not [p for p in tmp_path.rglob("mlflow.db") if p != tmp_path / "sweeps" / "mlflow.db"]  # no store of the workers' own
