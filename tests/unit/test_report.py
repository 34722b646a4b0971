"""`python -m sweep report` says what it knows (issue 20): interactive Optuna charts that work
offline, a link from each trial to its MLflow run, categorical hyperparameters in the importance,
a warning when too few trials completed for importance to mean anything, a learning-rate axis in
real values, no legend entries for statuses that did not occur, one number format per quantity.
And the read-only commands print no third-party progress bars or FutureWarnings.

The finished sweeps are built by hand (sweep.json, an Optuna study and an MLflow store with a
parent run and its trials), as in test_morning_after: milliseconds, not minutes."""

from __future__ import annotations

import html
import json
import math
import re
import sys
from pathlib import Path

import pytest

from core.contract import ATTR_WORKER, EVAL_LOSS, PEAK_VRAM_GB, STATUS, TOKENS_PER_SEC, TRAIN_LOSS, TrialStatus
from sweep.config import load_config
from tests.conftest import MINIMAL, write_space

SPACE = MINIMAL.replace(
    "  lora_r: [4, 8]\n",
    "  method: [lora, qlora]\n  lora_r: [4, 8]\n  learning_rate: {loguniform: [1.0e-5, 1.0e-2]}\n  target_modules: [attention, all-linear]\n",
).replace("search: {num_trials: 2}", "search: {num_trials: 14}")


def build_sweep(base: Path, body: str, statuses: list[str], name: str = "r") -> tuple[Path, str]:
    """A finished sweep in `base`: one trial per status, losses that depend on the sampled
    learning rate and target modules; returns (its folder, its MLflow experiment id)."""
    import optuna
    from mlflow import MlflowClient

    from sweep.engine.study import DefineByRun

    space = write_space(base, body.replace("name: t", f"name: {name}"))
    cfg = load_config(space)
    results = base / "sweeps"
    folder = results / f"{name}-20260101-000000"
    folder.mkdir(parents=True)
    (folder / "space.yaml").write_text(space.read_text())
    storage, mlflow_uri = f"sqlite:///{folder / 'optuna.db'}", f"sqlite:///{results / 'mlflow.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize", sampler=optuna.samplers.RandomSampler(seed=1))
    client = MlflowClient(mlflow_uri)
    experiment = client.create_experiment(name, artifact_location=(results / "artifacts").as_uri())
    parent = client.create_run(experiment, run_name=folder.name).info.run_id
    define = DefineByRun(cfg.space, cfg.fixed_hyperparams)
    for number, status in enumerate(statuses):
        trial = study.ask()
        define(trial)
        p = trial.params
        loss = 1.0 + abs(math.log10(p.get("learning_rate", 1e-3)) + 3) + (0.8 if p.get("target_modules") == "attention" else 0) + 0.01 * number
        trial.set_user_attr(STATUS, status)
        if status == TrialStatus.DUPLICATE:  # a repeated proposal: no run, the previous trial's result told again
            trial.set_user_attr("duplicate_of", f"t{number - 1:03d}")
            study.tell(trial, study.trials[number - 1].value)
            continue
        trial.set_user_attr(ATTR_WORKER, "w0")  # taken by a worker, as every trial that ran
        run = client.create_run(experiment, tags={"mlflow.parentRunId": parent, "trial": f"t{number:03d}", STATUS: status, "last_step": "4"}).info.run_id
        for step in (2, 4):
            client.log_metric(run, EVAL_LOSS, loss + (4 - step) * 0.1, step=step)
            client.log_metric(run, TRAIN_LOSS, loss + 0.05, step=step)
        client.log_metric(run, PEAK_VRAM_GB, 1.0 + number / 7)
        client.log_metric(run, TOKENS_PER_SEC, 1234.5678 + number)
        client.set_terminated(run)
        if status == TrialStatus.COMPLETED:
            study.tell(trial, loss)
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    meta = {"name": name, "space_file": str(space), "overrides": [], "mlflow_uri": mlflow_uri, "experiment": name, "experiment_id": experiment,
            "parent_run_id": parent, "optuna_storage": storage, "study_name": name, "metric": EVAL_LOSS, "num_trials": len(statuses),
            "concurrency": 1, "started": "2026-01-01T00:00:00", "elapsed_seconds": 754.0, "state": "finished"}  # fmt: skip
    (folder / "sweep.json").write_text(json.dumps(meta))
    return folder, experiment


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Twelve completed trials and two pruned: enough for importance; no stopped or failed trial."""
    return build_sweep(tmp_path_factory.mktemp("many"), SPACE, [TrialStatus.COMPLETED] * 12 + [TrialStatus.PRUNED] * 2)


@pytest.fixture(scope="module")
def few(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Four completed trials: importance is noise at that size."""
    return build_sweep(tmp_path_factory.mktemp("few"), SPACE, [TrialStatus.COMPLETED] * 4, name="f")


@pytest.fixture(scope="module")
def report(many: tuple[Path, str]) -> str:
    from sweep.readback.report import build_report

    folder, _ = many
    build_report(folder, write=lambda _: None, log_to_mlflow=False)
    return (folder / "report" / "report.html").read_text()


def test_the_report_has_optunas_interactive_charts_working_offline(report: str, many: tuple[Path, str]) -> None:
    folder, _ = many
    for title in ("Optimization History Plot", "Parallel Coordinate Plot", "Hyperparameter Importances", "Slice Plot"):
        assert title in report, title  # Optuna's own plotly figures
    assert report.count("Plotly.newPlot(") >= 4
    import plotly

    assert plotly.offline.get_plotlyjs()[:2000] in report  # plotly.js inline: one self-contained file, no CDN
    assert not re.search(r"<script[^>]+src=", report) and "cdn.plot.ly" not in report.split("</script>", 1)[1]
    for name in ("history", "parallel", "importance", "pareto", "curves"):  # the PNGs stay (MLflow shows them)
        assert (folder / "report" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_without_plotly_the_report_falls_back_to_the_pngs(report: str, many: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from sweep.readback.report import build_report

    folder, _ = many  # `report` holds the page with plotly already; this one replaces it on disk
    monkeypatch.setitem(sys.modules, "plotly", None)  # `import plotly` raises ImportError
    said: list[str] = []
    build_report(folder, write=said.append, log_to_mlflow=False)
    assert "no interactive charts (plotly is not installed)" in said[0]
    html = (folder / "report" / "report.html").read_text()
    assert "Plotly.newPlot(" not in html and html.count("data:image/png;base64,") == 5
    notes = [line for line in html.splitlines() if "plotly" in line.lower()]
    assert len(notes) == 1 and "pip install plotly" in notes[0], notes


def test_each_trial_links_to_its_mlflow_run(report: str, many: tuple[Path, str]) -> None:
    from sweep.readback.results import open_sweep

    folder, experiment = many
    rows = open_sweep(folder).result.trials
    for r in rows:  # MLflow's page of the run in its model-training view, not GenAI's
        path = f"/#/experiments/{experiment}/runs/{r['run_id']}?workflowType=machine_learning"
        anchor = f"<a class='mlflow' data-path='{path}' href='http://127.0.0.1:5000{path}' target='_blank'>{r['label']}</a>"
        assert re.search(rf"<tr class='[a-z]+'><td>{re.escape(anchor)}", report), r["label"]
    assert f"http://127.0.0.1:5000/#/experiments/{experiment}/runs?workflowType=machine_learning&amp;searchFilter=" in report  # the runs table
    # not fixed to port 5000: a field sets the UI's address for every link, the command that serves the default beside it
    assert "MLflow UI at <input id='mlflow-ui' size='32' value='http://127.0.0.1:5000'>" in report and "--port 5000</code>" in report
    assert "document.querySelectorAll('a.mlflow')" in report


def test_a_duplicate_proposal_leaves_a_gap_every_view_explains(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """t003 repeated t002's configuration and never ran: status, the report and the charts say so,
    and the charts number the trials as their labels do (t005 is trial 5, not 4)."""
    import optuna.visualization as vis

    from sweep.cli import main
    from sweep.folder import SweepFolder
    from sweep.readback.report import build_report, own_study

    statuses = [TrialStatus.COMPLETED] * 3 + [TrialStatus.DUPLICATE] + [TrialStatus.COMPLETED] * 2
    folder, _ = build_sweep(tmp_path, SPACE, statuses, name="g")
    why = "t003 not run: the sampler proposed t002's configuration again (its result counts for it)"
    assert main(["status", str(folder)]) == 0
    assert why in capsys.readouterr().out
    assert main(["status", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["not_run"] == [{"trial": "t003", "why": why.removeprefix("t003 ")}]
    build_report(folder, write=lambda _: None, log_to_mlflow=False)
    assert f"{html.escape(why)}." in (folder / "report" / "report.html").read_text()
    history = vis.plot_optimization_history(own_study(SweepFolder(folder).study()))
    assert list(history.data[0].x) == [0, 1, 2, 4, 5]  # Optuna's numbers are the trials' labels


def test_categorical_hyperparameters_are_in_the_importance(many: tuple[Path, str]) -> None:
    from sweep.readback.report import importances
    from sweep.readback.results import open_sweep

    sweep = open_sweep(many[0])
    found = importances(sweep.study, multi=False)
    assert {"method", "target_modules", "learning_rate", "lora_r"} <= set(found), found  # categorical and numeric alike
    assert abs(sum(found.values()) - 1) < 1e-6


def test_few_completed_trials_warn_that_importance_is_noise(report: str, few: tuple[Path, str]) -> None:
    from sweep.readback.report import build_report

    assert "importance is noise" not in report  # twelve completed
    folder, _ = few
    build_report(folder, write=lambda _: None, log_to_mlflow=False)
    html = (folder / "report" / "report.html").read_text()
    assert re.search(r"Only 4 trials completed: with fewer than 10, hyperparameter importance is noise", html)


def test_learning_rate_axis_legend_and_number_formats(report: str, many: tuple[Path, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from sweep.readback.report import fmt, plot_history, plot_parallel
    from sweep.readback.results import open_sweep

    sweep = open_sweep(many[0])
    figures: list = []
    import matplotlib.pyplot as plt

    monkey_close = plt.close
    try:
        plt.close = figures.append  # keep the figures to look at them
        plot_history(sweep.result, EVAL_LOSS, "min", many[0] / "h.png")
        plot_parallel(sweep.result, EVAL_LOSS, "min", many[0] / "p.png")
    finally:
        plt.close = monkey_close
    history, parallel = (f.axes[0] for f in figures)
    legend = [t.get_text() for t in history.get_legend().get_texts()]
    assert legend == ["completed", "pruned (last value)", "best so far"]  # no 'stopped': none was
    labels = [t.get_text() for t in parallel.get_xticklabels()]
    assert "learning_rate (log scale)" in labels and not any("log10" in label for label in labels)
    texts = [t.get_text().strip() for t in parallel.texts]
    assert "1e-5" in texts or any(re.fullmatch(r"\de-\d", t) for t in texts), texts  # real rates, not exponents like -3.5
    assert not any(re.fullmatch(r"-\d(\.\d+)?", t) for t in texts), texts
    for f in figures:
        plt.close(f)
    # the interactive charts too: the slices' learning-rate axis and the parallel coordinates' ticks in the same format
    assert re.search(r'"ticktext":\["\de-\d"(,"\de-\d")*\]', report), "the slices' learning-rate ticks"
    parallel_ticks = re.findall(r'"text":"([^"]+)","x":(\d)', report)
    assert parallel_ticks and not any(re.fullmatch(r"\d\.\d+e-0\d|0\.0\d+", t) for t, _ in parallel_ticks), parallel_ticks
    # one format per quantity, everywhere in the report
    assert fmt(EVAL_LOSS, 1.23456) == "1.2346" and fmt(TOKENS_PER_SEC, 1234.5678) == "1,235" and fmt(PEAK_VRAM_GB, 1.0) == "1.00"
    assert fmt("learning_rate", 2e-4) == "2e-4"
    assert "1,235" in report and "1234.6" not in report and "1.235e+03" not in report
    best = re.search(r"best: t\d{3} eval_loss (\S+)", report).group(1)
    assert re.fullmatch(r"\d\.\d{4}", best)
    cells = re.findall(r"<td class='num'>([^<]*)</td>", report)
    assert cells and all(re.fullmatch(r"[\d,]+(\.\d+)?", c) for c in cells if c), cells


from tests.unit.test_morning_after import finished  # noqa: E402,F401 - the finished sweep fixture, reused

BAR = re.compile(r"[█▏▎▍▌▋▊▉━]|\d+%\|| \d+/\d+ \[\d\d:\d\d")  # tqdm's and rich's bars


def test_read_only_commands_print_no_progress_bars_or_future_warnings(finished: tuple[Path, str], tmp_path: Path) -> None:
    """In fresh processes, as a user runs them, with an empty model cache (estimate builds the tiny
    model: transformers drew a "Writing model shards" bar on stderr)."""
    import os
    import subprocess

    from tests.conftest import ROOT

    folder, _ = finished
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "PYTHONWARNINGS")}
    env.update(LORA_SWEEP_CACHE=str(tmp_path / "cache"), PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p))
    commands = (["estimate", str(folder)], ["validate", str(folder / "space.yaml")], ["status", str(folder)], ["list", str(folder.parent)],
                ["best", str(folder)], ["report", str(folder)], ["estimate", str(folder / "space.yaml"), "--json"])  # fmt: skip
    for args in commands:
        done = subprocess.run([sys.executable, "-m", "sweep", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (args, done.stderr[-2000:])
        for stream in (done.stderr, done.stdout):
            assert "FutureWarning" not in stream and not BAR.search(stream), (args, stream[-2000:])


def _worker(events: list[dict]) -> tuple:
    """(a worker's Tune trial, its report carrying `events`), as the Progress callback receives them."""
    from types import SimpleNamespace

    return SimpleNamespace(trial_id="w1", config={"method": "lora"}, last_result={}), {"events": events}


def _start(label: str) -> dict:
    return {"event": "start", "trial": label, "text": f"{label} start      lora r8  (worker w1, 1 of 2, from the start)"}


def _end(label: str, loss: float = 1.0) -> dict:
    return {"event": "end", "trial": label, "text": f"{label} completed", "status": "completed", "metrics": {"step": 4, "trial_status": "completed", EVAL_LOSS: loss}}


def _progress(monkeypatch: pytest.MonkeyPatch, **kw: object) -> tuple:
    from sweep.engine import progress

    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(progress, "gpu_memory_in_use", lambda: "-")
    lines: list[str] = []
    return progress.Progress(EVAL_LOSS, "min", lines.append, **kw), lines, clock


def _send(p: object, *events: dict) -> None:
    trial, result = _worker(list(events))
    p.on_trial_result(0, [], trial, result)


def test_run_prints_progress_and_an_eta_from_the_trials_left(monkeypatch: pytest.MonkeyPatch) -> None:
    p, lines, clock = _progress(monkeypatch, total=4)
    _send(p, _start("t000"), _start("t001"))
    assert lines[-1] == "[00:00] t001 start      lora r8  (worker w1, 1 of 2, from the start)"  # as the worker words it
    clock[0] += 120
    _send(p, _end("t000", 1.5))
    assert lines[-3] == "[02:00] t000 completed  eval_loss 1.5000 at step 4  (best so far)"
    assert lines[-2] == "[02:00] status: running 1, completed 1 | best t000 eval_loss 1.5000 | GPU memory -"
    assert lines[-1] == "[02:00] progress: 1/4 trials finished, 1 running | elapsed 2m00s | ETA 6m00s (trials left at the pace so far)"
    clock[0] += 61
    p.on_step_end(0, [])  # the periodic lines: status, then progress
    assert lines[-1] == "[03:01] progress: 1/4 trials finished, 1 running | elapsed 3m01s | ETA 9m03s (trials left at the pace so far)"
    _send(p, _end("t001", 2.0))
    assert lines[-3] == "[03:01] t001 completed  eval_loss 2.0000 at step 4"  # not the best


def test_the_eta_is_the_sooner_of_the_time_budget_and_the_trials_left(monkeypatch: pytest.MonkeyPatch) -> None:
    from sweep.engine.progress import eta

    p, lines, clock = _progress(monkeypatch, total=10, time_budget=600)
    _send(p, _start("t000"))
    p.on_step_end(0, [])
    assert eta(0, 0.0, 10, 600) == (600, "time budget")
    clock[0] += 100
    _send(p, _end("t000"))
    assert lines[-1].endswith("| ETA 8m20s (time budget)")  # 9 trials at 100 s each would take longer
    q, _, _ = _progress(monkeypatch)
    assert q.progress_line() == "progress: 0 trials finished, 0 running | elapsed 0s | ETA after the first trial ends"


def test_on_a_terminal_the_progress_is_a_rich_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import pickle

    import rich.console
    from rich.console import Console

    screen = io.StringIO()
    monkeypatch.setattr(rich.console, "Console", lambda: Console(file=screen, force_terminal=True, width=150))
    p, lines, clock = _progress(monkeypatch, total=2, live=True)
    _send(p, _start("t000"))
    pickle.dumps(p)  # Tune pickles its callbacks: the live bar is left out
    clock[0] += 30
    _send(p, _end("t000"))
    p.on_experiment_end([])
    assert p._bar is None
    drawn = screen.getvalue()
    assert "1/2 trials finished" in drawn and "ETA 30s (trials left at the pace so far)" in drawn and "━" in drawn
    assert not any(line.startswith("[00:30] progress:") for line in lines)  # the bar says it; the trial lines stay
    assert "[00:30] t000 completed  eval_loss 1.0000 at step 4  (best so far)" in lines
