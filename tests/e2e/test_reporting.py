"""The morning after: a multi-objective sweep's Pareto set, the HTML report (generated here, never
committed), the best trial under constraints with its adapter exported (and merged), the live
status lines, and the MLflow UI in a real browser."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from sweep.config import load_config
from sweep.engine.sweep import run_sweep
from tests.conftest import DEMO_DATA, MINIMAL, ROOT, write_space
from tests.e2e.conftest import mlflow_runs, study_trials

pytestmark = pytest.mark.e2e
OUTPUT = ROOT / "tests" / "output"  # screenshots and reports kept for whoever reads the test run

BODY = MINIMAL.replace("train: {max_steps: 4, eval_every: 2, log_every: 1}", "train: {max_steps: 6, eval_every: 3, log_every: 1, batch: [2, 1]}").replace(
    "search: {num_trials: 2}",
    "search: {algorithm: nsga2, seed: 0, num_trials: 5, scheduler: {type: none}, objectives: [{eval_loss: min}, {tokens_per_sec: max}]}",
).replace("  lora_r: [4, 8]\n", "  lora_r: [4, 8]\n  learning_rate: {loguniform: [1.0e-4, 3.0e-2]}\n  target_modules: [attention, all-linear]\n")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, ray_cluster: None) -> tuple:
    folder = tmp_path_factory.mktemp("reporting")
    cfg = load_config(write_space(folder, BODY + f"tracking: {{results_dir: {folder / 'out'}}}\n"))
    lines: list[str] = []
    result = run_sweep(cfg, log=lines.append)
    return cfg, result, "\n".join(lines), folder


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "sweep", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_multi_objective_sweep_reports_its_pareto_set(sweep: tuple) -> None:
    cfg, result, out, _ = sweep
    assert result.counts == {"completed": 5}, out
    trials = study_trials(result.sweep_dir)
    assert all(len(t.values) == 2 for t in trials)
    front = {r["label"] for r in result.pareto}
    assert front and "Pareto set (eval_loss min / tokens_per_sec max): " in out
    for r in result.trials:  # nothing outside the front beats a front member on both objectives
        if r["label"] not in front:
            assert any(p["eval_loss"] <= r["eval_loss"] and p["tokens_per_sec"] >= r["tokens_per_sec"] for p in result.pareto)
    parent, _ = mlflow_runs(cfg.mlflow_uri, cfg.experiment)
    assert set(parent.data.tags["pareto_trials"].split(",")) == front
    assert re.search(r"status: running \d+, completed \d+ \| best t\d{3} eval_loss [0-9.]+ \| GPU memory -", out), out
    assert re.search(r"\] progress: 5/5 trials finished, 0 running \| elapsed \S+ \| ETA 0s \(trials left at the pace so far\)$", out, re.M), out


def test_report(sweep: tuple) -> None:
    cfg, result, _, folder = sweep
    done = cli("report", str(result.sweep_dir), cwd=folder)
    assert done.returncode == 0, done.stderr[-2000:]
    report = result.sweep_dir / "report"
    for name in ("history", "parallel", "importance", "pareto", "curves"):
        png = (report / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, name  # a real, non-empty plot
    html = (report / "report.html").read_text()
    assert html.count("<tr class=") == len(result.trials) == 5
    page = html.split("</script>", 1)[1]  # after plotly.js (inline, first)
    assert page.count("data:image/png;base64,") == 2  # self-contained: the Pareto fronts and loss curves as PNGs ...
    assert html.count("Plotly.newPlot(") == 4 and not re.search(r"<script[^>]+src=", html)  # ... Optuna's charts, plotly.js inline
    assert "Only 5 trials completed: with fewer than 10, hyperparameter importance is noise" in html
    for row in result.trials:  # each trial's label links to its MLflow run
        assert re.search(rf"<a class='mlflow' data-path='/#/experiments/\d+/runs/{row['run_id']}\?workflowType=machine_learning' "
                         rf"href='http://127\.0\.0\.1:5000/#/experiments/\d+/runs/{row['run_id']}\?workflowType=machine_learning' target='_blank'>{row['label']}</a>", html)
    from mlflow import MlflowClient

    artifacts = {a.path for a in MlflowClient(cfg.mlflow_uri).list_artifacts(result.parent_run_id, "report")}
    assert {"report/report.html", "report/pareto.png", "report/importance.png"} <= artifacts
    OUTPUT.mkdir(exist_ok=True)
    shutil.copytree(report, OUTPUT / "report", dirs_exist_ok=True)


def test_best_with_constraints_and_export(sweep: tuple, tmp_path: Path) -> None:
    import torch

    cfg, result, _, folder = sweep
    fastest = max(r["tokens_per_sec"] for r in result.trials)
    bound = sorted(r["tokens_per_sec"] for r in result.trials)[2]
    picked = cli("best", str(result.sweep_dir), "--where", f"tokens_per_sec>={bound}", "--export", str(tmp_path / "best"), "--merge", cwd=folder)
    assert picked.returncode == 0, picked.stdout[-2000:] + picked.stderr[-2000:]
    label = re.search(r"best trial with tokens_per_sec>=\S+: (t\d{3})", picked.stdout).group(1)
    row = next(r for r in result.trials if r["label"] == label)
    eligible = [r for r in result.trials if r["tokens_per_sec"] >= bound]
    front = [r for r in eligible if not any(o["eval_loss"] <= r["eval_loss"] and o["tokens_per_sec"] >= r["tokens_per_sec"] and o is not r for o in eligible)]
    assert row["eval_loss"] == min(r["eval_loss"] for r in front) and fastest >= bound

    export = tmp_path / "best"
    assert (export / "adapter" / "adapter_config.json").exists() and list((export / "adapter").glob("adapter_model.*"))
    exported = load_config(export / "space.yaml")  # ready to run
    assert exported.train.lora_r == row["config"]["lora_r"] or exported.space.dims[0].options == (row["config"]["lora_r"],)
    assert "python -m sweep train" in (export / "README.md").read_text()

    # the merged model computes what base + adapter computes
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[2, 5, 40, 41, 6, 5, 50]])
    with torch.no_grad():
        with_adapter = AutoPeftModelForCausalLM.from_pretrained(str(export / "adapter")).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(str(export / "merged")).eval()(input_ids=ids).logits
    torch.testing.assert_close(merged, with_adapter, rtol=1e-4, atol=1e-4)

    none = cli("best", str(result.sweep_dir), "--where", "tokens_per_sec>=1e12", cwd=folder)
    assert none.returncode == 1 and "no completed trial with tokens_per_sec>=1e12" in none.stdout
    bad = cli("best", str(result.sweep_dir), "--where", "__import__('os')", cwd=folder)
    assert bad.returncode == 2 and "--where: cannot read" in bad.stderr
    again = cli("best", str(result.sweep_dir), "--export", str(export), cwd=folder)
    assert again.returncode == 2 and "not empty" in again.stderr


def test_export_is_ready_for_inference(sweep: tuple, tmp_path: Path) -> None:
    """best --export: a model card that says where the adapter came from and how it was trained, a
    generation config that stops at <end_of_turn>, load code that runs, and with --log-model the
    export among the trial's MLflow artifacts."""
    from mlflow import MlflowClient
    from transformers import AutoTokenizer, GenerationConfig

    from sweep.config import SEARCHABLE

    cfg, result, _, folder = sweep
    export = tmp_path / "export"
    done = cli("best", str(result.sweep_dir), "--where", "lora_r>=4 and target_modules!=mlp", "--export", str(export), "--log-model", cwd=folder)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    label = re.search(r"best trial with lora_r>=4 and target_modules!=mlp: (t\d{3})", done.stdout).group(1)
    row = next(r for r in result.trials if r["label"] == label)
    adapter = export / "adapter"
    for name in ("adapter_config.json", "tokenizer.json", "generation_config.json", "README.md"):
        assert (adapter / name).is_file(), name
    assert list(adapter.glob("adapter_model.*")) and (export / "space.yaml").is_file() and (export / "export.json").is_file()

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    eos = GenerationConfig.from_pretrained(adapter).eos_token_id
    assert end_of_turn != tokenizer.unk_token_id and end_of_turn in eos and tokenizer.eos_token_id in eos
    assert f"generation stops at: <eos> ({tokenizer.eos_token_id}), <end_of_turn> ({end_of_turn})" in done.stdout

    card = (export / "README.md").read_text()
    assert (adapter / "README.md").read_text() == card  # PEFT's blank template replaced in the folder one uploads
    assert card.startswith("---\nbase_model: tiny-gemma3\nlibrary_name: peft\n")
    for text in (f"Trial **{label}** of the sweep **{cfg.name}** (folder `{result.sweep_dir}`)", f"MLflow run: `{row['run_id']}`",
                 f"eval_loss **{row['eval_loss']:.4f}**", f"| train | {DEMO_DATA / 'train.jsonl'} |", f"| eval | {DEMO_DATA / 'eval.jsonl'} |",
                 "| revision | none pinned", "| lora_r *searched* |", "| learning_rate *searched* |", "| max_steps | 6 |",
                 "LoRA: the adapter was trained on an unquantised base; load it in bf16", "PeftModel.from_pretrained(base, ADAPTER)"):  # fmt: skip
        assert text in card, text
    for name in SEARCHABLE:  # every hyperparameter
        assert re.search(rf"^\| {name}( \*searched\*)? \| ", card, re.M), name
    assert "BitsAndBytesConfig" not in card  # a LoRA winner loads on an unquantised base
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(blocks) == 2 and "AutoPeftModelForCausalLM.from_pretrained" in blocks[0]
    for code in blocks:  # the card's load code runs: AutoPeft in one line; the adapter on its base as trained, one chat turn
        exec(compile(code, str(export / "README.md"), "exec"), {})
    assert "`adapter_config.json` names `base/` as its base" in card and (export / "base" / "model.safetensors").is_symlink()

    client = MlflowClient(cfg.mlflow_uri)
    logged = {a.path for a in client.list_artifacts(row["run_id"], "export")}
    assert {"export/README.md", "export/adapter", "export/space.yaml", "export/export.json"} <= logged and "export/base" not in logged  # not the base's weights
    assert client.get_run(row["run_id"]).info.status == "FINISHED"  # logged into the finished run, left as it was


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def ui(sweep: tuple, tmp_path: Path) -> Iterator[str]:
    cfg = sweep[0]
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", cfg.mlflow_uri, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(1)
    yield url
    # the server and its workers (its own session): asked to end, then made to (a loaded machine once kept it past 30 s)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_the_printed_link_opens_the_sweeps_trials_in_mlflow(sweep: tuple, ui: str) -> None:
    """MLflow 3.17 in Chromium, at the link `status` prints: the runs table of model training with
    the sweep's trials (not one folded parent row), best first by the objective, the objectives,
    trial_status and the searched hyperparameters as columns, each trial its own colour."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if chromium is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's)")
    cfg, result, _, folder = sweep
    from mlflow import MlflowClient

    experiment = MlflowClient(ui).get_experiment_by_name(cfg.experiment).experiment_id
    # the link `status` (and `best`) print, served here on a free port instead of mlflow ui's 5000
    status = cli("status", str(result.sweep_dir), cwd=folder)
    printed = re.search(r"its runs:  (http://127\.0\.0\.1:5000)(/#/experiments/(\d+)/runs\?workflowType=machine_learning&viewStateShareKey=\w+)$", status.stdout, re.M)
    assert printed and printed.group(3) == experiment, status.stdout[-2000:]
    assert "--port 5000" in status.stdout  # the command serves where the link points
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
    OUTPUT.mkdir(exist_ok=True)
    ranked = sorted(result.trials, key=lambda r: r["eval_loss"])  # the objective, minimised
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=args)
        page = browser.new_page(viewport={"width": 2400, "height": 1000})  # wide: the grid draws only the columns in view
        page.goto(ui + printed.group(2))
        page.wait_for_selector(f"text={ranked[0]['label']}", timeout=60_000)
        page.wait_for_selector(".ag-header-cell[col-id='tags.`trial_status`']", timeout=30_000)
        text = page.inner_text("body")
        # the runs table of model training, not the GenAI view (its overview, traces, sessions, judges) MLflow 3 opens by default
        assert "workflowType=machine_learning" in page.url and "Run Name" in text and "Model registry" in text, text[:2000]
        for genai in ("Sessions", "Judges", "Evaluation runs", "Token Usage"):
            assert genai not in text, (genai, text[:2000])
        # the trials themselves, flat (not folded under the sweep's run), best first by the objective
        assert result.sweep_dir.name not in text  # the sweep's own run is not a row: its trials are
        rows = page.locator(".ag-row[row-index]").evaluate_all("rows => rows.map(r => [Number(r.getAttribute('row-index')), r.innerText])")
        order = list(dict.fromkeys(re.search(r"t\d{3}", t).group(0) for _, t in sorted(rows) if re.search(r"t\d{3}", t)))  # pinned and centre parts
        assert order == [r["label"] for r in ranked], order
        # the objectives, trial_status and the searched hyperparameters as columns
        columns = page.locator(".ag-header-cell[col-id]").evaluate_all("cells => cells.map(c => c.getAttribute('col-id'))")
        for column in ("metrics.`eval_loss`", "metrics.`tokens_per_sec`", "tags.`trial_status`", "params.`lora_r`", "params.`learning_rate`", "params.`target_modules`"):
            assert column in columns, (column, columns)
        assert re.search(r"t\d{3} lora r\d+ a\d+ lr\S+ b2x1 (attention|all-linear)", text)
        assert "completed" in text  # trial_status
        # each trial its colour, the best ones distinct
        colors = {r["label"]: MlflowClient(ui).get_run(r["run_id"]).data.tags["mlflow.runColor"] for r in ranked}
        assert len(set(colors.values())) == len(colors), colors
        page.screenshot(path=str(OUTPUT / "mlflow-ui-runs.png"))
        print(f"screenshot: {OUTPUT / 'mlflow-ui-runs.png'}")
        # one trial's page: its metrics, with steps
        child = result.trials[0]
        page.goto(f"{ui}/#/experiments/{experiment}/runs/{child['run_id']}?workflowType=machine_learning")  # as the report links it
        page.wait_for_selector("text=eval_loss", timeout=60_000)
        text = page.inner_text("body")
        assert "train_loss" in text and "tokens_per_sec" in text and child["label"] in text
        page.screenshot(path=str(OUTPUT / "mlflow-ui-trial.png"))
        browser.close()
