"""space.yaml -> SweepConfig: the happy path, and every error path with its message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sweep.config import ConfigError, load_config, parse_duration
from sweep.config.space import Choice, Range, Ratio
from tests.conftest import DEMO_DATA, MINIMAL, ROOT, write_space


def problems(tmp_path: Path, body: str, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write_space(tmp_path, body), overrides)
    return info.value.problems


def one_problem(tmp_path: Path, body: str, overrides: tuple[str, ...] = ()) -> str:
    found = problems(tmp_path, body, overrides)
    assert len(found) == 1, found
    return found[0]


def test_minimal_file_fills_defaults(tmp_path: Path) -> None:
    cfg = load_config(write_space(tmp_path, MINIMAL))
    assert cfg.name == "t"
    assert cfg.train.learning_rate == 2e-4 and cfg.train.batch == (4, 8)
    assert cfg.search.algorithm == "tpe" and cfg.search.metric == "eval_loss"
    assert cfg.num_trials == 2
    assert cfg.grace_period == 2 and cfg.max_t == 4
    assert cfg.space.names == ("lora_r",)
    assert "lora_r" not in cfg.fixed_hyperparams and cfg.fixed_hyperparams["method"] == "lora"
    assert cfg.mlflow_uri == f"sqlite:///{Path('sweeps').resolve() / 'mlflow.db'}"


def test_relative_paths_resolve_against_the_space_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text((DEMO_DATA / "train.jsonl").read_text())
    nested = tmp_path / "spaces"
    nested.mkdir()
    body = MINIMAL.replace("DEMO/train.jsonl", "../data/train.jsonl") + "tracking: {results_dir: out}\n"
    cfg = load_config(write_space(nested, body))
    assert cfg.data.train == str((data / "train.jsonl").resolve())
    assert cfg.results_dir == (nested / "out").resolve()


def test_space_syntax(tmp_path: Path) -> None:
    cfg = load_config(
        write_space(
            tmp_path,
            MINIMAL.replace(
                "  lora_r: [4, 8]\n",
                """\
  method: [lora, qlora]
  lora_r: {uniform: [4, 64], step: 4}
  lora_alpha: {ratio_of: lora_r, choices: [0.5, 1, 2]}
  lora_dropout: {uniform: [0.0, 0.1]}
  learning_rate: {loguniform: [1e-5, 5e-4]}
  target_modules: [attention, mlp, all-linear, [q_proj, v_proj]]
  batch: {pairs: [[1, 32], [2, 16]]}
  weight_decay: {choices: [0.0, 0.01]}
""",
            ),
        )
    )
    dims = {d.name: d for d in cfg.space.dims}
    assert dims["lora_r"] == Range("lora_r", 4, 64, step=4, integer=True)
    assert isinstance(dims["lora_alpha"], Ratio) and dims["lora_alpha"].of == "lora_r"
    assert dims["learning_rate"] == Range("learning_rate", 1e-5, 5e-4, log=True)  # 1e-5 read as a float
    assert dims["target_modules"] == Choice("target_modules", ("attention", "mlp", "all-linear", ("q_proj", "v_proj")))
    assert dims["batch"].labels == ("1x32", "2x16")
    assert cfg.space.size() is None
    assert "16 x" in cfg.space.describe_size() and "continuous" in cfg.space.describe_size()


def test_every_shipped_space_file_validates() -> None:
    files = sorted((ROOT / "search_spaces").glob("*.yaml"))
    assert {f.name for f in files} >= {"demo.yaml", "gemma3-1b-lora.yaml", "gemma3-12b-qlora.yaml"}
    for f in files:
        cfg = load_config(f)
        assert cfg.num_trials > 0, f


def test_seed_settings_in_real_gpu_spaces() -> None:
    for name in ("gemma3-1b-lora.yaml", "gemma3-12b-qlora.yaml"):
        cfg = load_config(ROOT / "search_spaces" / name)
        point = cfg.search.points_to_evaluate[0]
        assert point["lora_r"] == 16 and point["lora_alpha_ratio"] == 1 and point["batch"] == [1, 32]
        # the optimizer is core.rules' auto: paged 8-bit AdamW for the QLoRA recipe, fused AdamW for 1B LoRA (memory is not its limit)
        assert cfg.fixed_hyperparams.get("optimizer") == "auto" and cfg.train.gradient_checkpointing == "auto"


# ---------------------------------------------------------------------------------------------
# errors


def test_unknown_keys_name_the_path_and_the_accepted_keys(tmp_path: Path) -> None:
    found = problems(tmp_path, MINIMAL + "extra: 1\n" + "resources: {gpu: 1}\n")
    assert any(p.startswith("extra: unknown key; the top level accepts: name, model") for p in found)
    assert any(p.startswith("resources.gpu: unknown key; resources accepts: gpus_per_trial, cpus_per_trial") for p in found)


def test_all_errors_are_reported_together(tmp_path: Path) -> None:
    body = """\
name: "bad name!"
model: {id: tiny-gemma3}
data: {train: DEMO/missing.jsonl, max_seq_len: 4}
train: {max_steps: 0, learning_rate: 2}
search: {algorithm: bayes, num_trials: -1}
space:
  lora_r: [4, -8]
  learning_rate: {loguniform: [0, 1e-3]}
  nope: [1]
"""
    found = problems(tmp_path, body)
    text = "\n".join(found)
    for expected in (
        "name: got 'bad name!'",
        "data.train: 'DEMO/missing.jsonl'".replace("DEMO", str(DEMO_DATA)),
        "data.max_seq_len: Input should be greater than or equal to 16 (got 4)",
        "train.max_steps: Input should be greater than 0 (got 0)",
        "train.learning_rate: Input should be less than 1 (got 2)",
        "search.algorithm: Input should be 'auto', 'tpe', 'random', 'grid' or 'nsga2' (got 'bayes')",
        "search.num_trials: Input should be greater than 0 (got -1)",
        "space.lora_r[1]: got -8; Input should be greater than 0; expected LoRA rank",
        "space.learning_rate.loguniform: low 0 must be > 0",
        "space.nope: unknown hyperparameter; searchable: batch,",
    ):
        assert expected in text, f"missing {expected!r} in:\n{text}"
    assert len(found) >= 10


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ("lora_r: {uniform: [8, 4]}", "space.lora_r.uniform: low 8 must be below high 4"),
        ("lora_r: {uniform: [4.5, 8]}", "lora_r is an integer; bounds must be whole numbers"),
        ("lora_r: {uniform: [4, 10], step: 4}", "space.lora_r.step: (10 - 4) is not a multiple of step 4"),
        ("learning_rate: {loguniform: [1e-5, 1e-3], step: 1e-5}", "a stepped range must be uniform"),
        ("learning_rate: {normal: [0, 1]}", "space.learning_rate: got keys ['normal']; a range is {uniform: [low, high]}"),
        ("learning_rate: {uniform: [a, 1]}", "space.learning_rate.uniform: bound 'a' is not a number"),
        ("lora_alpha: {ratio_of: rank, choices: [1, 2]}", "space.lora_alpha.ratio_of: got 'rank'; expected a numeric hyperparameter"),
        ("lora_alpha: {ratio_of: lora_r, choices: [1, -2]}", "space.lora_alpha.choices[1]: got -2; expected a positive number"),
        ("method: {ratio_of: lora_r, choices: [1]}", "space.method.ratio_of: method is not numeric"),
        ("lora_r: {pairs: [[1, 2]]}", "space.lora_r.pairs: only `batch` takes pairs"),
        ("batch: {pairs: [[1, 32], [0, 4]]}", "space.batch.pairs[1]: got [0, 4]; expected [micro_batch, accumulation]"),
        ("batch: [[1, 32], [1, 32]]", "space.batch: duplicate choices ['1x32']"),
        ("target_modules: [attention, everything]", "space.target_modules[1]: got 'everything'; expected a preset (attention, mlp, all-linear)"),
        ("method: [lora, full]", "space.method[1]: got 'full'; Input should be 'lora' or 'qlora'"),
        ("lora_r: []", "space.lora_r: got []; expected a non-empty list of choices"),
        ("lora_r: 8", "space.lora_r: got 8; expected a list of choices or a mapping"),
        ("lora_dropout: [0.0, 1.5]", "space.lora_dropout[1]: got 1.5; Input should be less than 1"),
        ("gradient_checkpointing: [true, false]", "space.gradient_checkpointing: not searchable: train.gradient_checkpointing is decided once per worker"),
        ("lr_scheduler: [cosine, sometimes]", "space.lr_scheduler[1]: got 'sometimes'"),
    ],
)
def test_space_errors(tmp_path: Path, space: str, message: str) -> None:
    found = problems(tmp_path, MINIMAL.replace("  lora_r: [4, 8]\n", f"  {space}\n"))
    assert any(message in p for p in found), found


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "true", "many"])
def test_max_concurrent_is_auto_or_a_positive_number(tmp_path: Path, value: str) -> None:
    problem = one_problem(tmp_path, MINIMAL, (f"search.max_concurrent={value}",))
    assert problem.startswith("search.max_concurrent: expected auto or a positive number of trials at once (got ")


def test_grid_needs_discrete_dimensions_and_caps_trials(tmp_path: Path) -> None:
    body = MINIMAL.replace("search: {num_trials: 2}", "search: {algorithm: grid}").replace(
        "  lora_r: [4, 8]\n", "  lora_r: [4, 8]\n  learning_rate: {loguniform: [1e-5, 1e-3]}\n"
    )
    assert "space.learning_rate: grid search needs discrete dimensions" in one_problem(tmp_path, body)
    body = MINIMAL.replace("search: {num_trials: 2}", "search: {algorithm: grid, num_trials: 3}")
    assert "search.num_trials: 3 exceeds the grid's 2 points" in one_problem(tmp_path, body)
    cfg = load_config(write_space(tmp_path, MINIMAL.replace("search: {num_trials: 2}", "search: {algorithm: grid}")))
    assert cfg.num_trials == 2 and cfg.space.grid() == {"lora_r": [4, 8]}


def test_cross_section_errors(tmp_path: Path) -> None:
    body = MINIMAL.replace("train: {max_steps: 4", "train: {lora_r: 8, max_steps: 4").replace(
        "search: {num_trials: 2}", "search: {algorithm: tpe, scheduler: {grace_period: 10}}"
    )
    found = problems(tmp_path, body)
    assert "train.lora_r and space.lora_r: search it in space or fix it in train, not both" in found
    assert "search.num_trials: required for tpe and random search; expected a positive integer" in found
    assert "search.scheduler.grace_period: 10 steps is beyond train.max_steps 4" in found
    body = MINIMAL.replace("eval: DEMO/eval.jsonl", "eval: DEMO/eval.jsonl, eval_fraction: 0.1")
    assert one_problem(tmp_path, body) == "data.eval and data.eval_fraction: give one, not both"
    body = MINIMAL.replace("search: {num_trials: 2}", "search: {num_trials: 2, metric: accuracy}")
    assert one_problem(tmp_path, body).startswith("search.metric: got 'accuracy'; expected one of eval_loss")


def test_objectives(tmp_path: Path) -> None:
    body = MINIMAL.replace("search: {num_trials: 2}", "search: {algorithm: nsga2, num_trials: 4, objectives: [{eval_loss: min}, {tokens_per_sec: max}]}")
    cfg = load_config(write_space(tmp_path, body))
    assert cfg.name == "t" and cfg.experiment == "t"
    assert cfg.objectives == [("eval_loss", "min"), ("tokens_per_sec", "max")] and cfg.multi_objective
    assert (cfg.search.metric, cfg.search.mode) == ("eval_loss", "min")
    bad = body.replace("{tokens_per_sec: max}", "{accuracy: max}")
    assert one_problem(tmp_path, bad).startswith("search.objectives[1]: got 'accuracy'; expected one of eval_loss")
    bad = body.replace("{tokens_per_sec: max}", "{eval_loss: max}")
    assert one_problem(tmp_path, bad) == "search.objectives: ['eval_loss', 'eval_loss'] repeats a metric"
    bad = body.replace(", {tokens_per_sec: max}", "")
    assert one_problem(tmp_path, bad).startswith("search.objectives: give two or more")
    bad = body.replace("nsga2, ", "nsga2, metric: train_loss, ")
    assert "drop metric and mode" in one_problem(tmp_path, bad)


def test_sources_that_do_not_exist(tmp_path: Path) -> None:
    body = MINIMAL.replace("id: tiny-gemma3", "id: ./models/mine").replace("DEMO/train.jsonl", "train.csv")
    found = problems(tmp_path, body)
    assert any(p.startswith("model.id: './models/mine' not found (looked for") for p in found)
    assert any(p.startswith("data.train: 'train.csv' not found") for p in found)
    (tmp_path / "rows.csv").write_text("a,b\n")
    found = problems(tmp_path, MINIMAL.replace("DEMO/train.jsonl", "rows.csv"))
    assert any("has suffix '.csv'; expected one of .jsonl, .json, .parquet" in p for p in found)
    cfg = load_config(write_space(tmp_path, MINIMAL.replace("id: tiny-gemma3", "id: google/gemma-3-1b-pt")))
    assert cfg.model.id == "google/gemma-3-1b-pt"  # a hub id is kept as is


def test_python_tags_are_refused_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    body = MINIMAL.replace("name: t", f"name: !!python/object/apply:os.system ['touch {marker}']")
    message = one_problem(tmp_path, body)
    assert message.startswith("line 1: YAML tag") and "refused" in message
    assert not marker.exists()


def test_yaml_problems(tmp_path: Path) -> None:
    assert "duplicate key 'name'" in one_problem(tmp_path, MINIMAL + "name: again\n")
    assert "not valid YAML" in one_problem(tmp_path, "name: [unclosed\n")
    assert "expected a mapping" in one_problem(tmp_path, "- just\n- a list\n")
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.yaml")


def test_missing_sections(tmp_path: Path) -> None:
    found = problems(tmp_path, "name: x\n")
    assert {p.split(":")[0] for p in found} == {"model", "data", "search", "space"}


def test_overrides(tmp_path: Path) -> None:
    path = write_space(tmp_path, MINIMAL)
    cfg = load_config(path, ["search.num_trials=5", "train.learning_rate=1e-3", "space.lora_r=[2, 4, 6]", "tracking.experiment=x"])
    assert cfg.num_trials == 5 and cfg.train.learning_rate == 1e-3 and cfg.space.dims[0].options == (2, 4, 6)
    assert cfg.experiment == "x" and cfg.overrides[0] == "search.num_trials=5"
    with pytest.raises(ConfigError) as info:
        load_config(path, ["search.num_trials", "name.sub=1", "train.bogus=1", "search.num_trials=0"])
    text = "\n".join(info.value.problems)
    assert "override 'search.num_trials': expected key.path=value" in text
    assert "override 'name.sub=1': name is 't', not a mapping" in text
    assert "train.bogus: unknown key" in text
    assert "search.num_trials: Input should be greater than 0 (got 0)" in text


def test_points_to_evaluate_are_checked_against_the_space(tmp_path: Path) -> None:
    body = MINIMAL.replace(
        "search: {num_trials: 2}",
        "search: {num_trials: 2, points_to_evaluate: [{lora_r: 8}, {lora_r: 5}, {lora_alpha: 3}]}",
    )
    found = problems(tmp_path, body)
    assert "search.points_to_evaluate[1].lora_r: got 5; expected one of [4, 8]" in found
    assert any(p.startswith("search.points_to_evaluate[2].lora_alpha: not a searched parameter") for p in found)


@pytest.mark.parametrize(("text", "seconds"), [("8h", 28800), ("1h30m", 5400), ("45m", 2700), ("90s", 90), (120, 120), ("1d", 86400)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "0s", -5, "h"])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError, match="expected a duration|positive duration"):
        parse_duration(text)


def test_readme_documents_every_key() -> None:
    from sweep.config import SECTIONS, SchedulerSection

    readme = (ROOT / "README.md").read_text()
    for section, cls in {**SECTIONS, "search.scheduler": SchedulerSection}.items():
        for key in cls.model_fields:
            assert f"`{key}`" in readme, f"README lacks {section}.{key}"


def test_pathological_overrides_are_problems_not_tracebacks(tmp_path: Path) -> None:
    deep, digits = "search.num_trials=" + "[" * 50_000, "search.num_trials=" + "9" * 5000
    found = problems(tmp_path, MINIMAL, (deep, digits, "search.num_trials=[1"))
    assert found[0] == f"override {deep[:60]!r}... ({len(deep)} characters): " + \
        "not usable YAML: nested too deeply (hundreds of levels of [ or {); a space file holds plain, shallow data"  # fmt: skip
    assert found[1].startswith("override 'search.num_trials=999") and "not usable YAML: Exceeds the limit (4300 digits)" in found[1]
    assert found[2] == "override 'search.num_trials=[1': line 1, column 3: not valid YAML: expected ',' or ']', but got '<stream end>'"
    assert "nested too deeply" in one_problem(tmp_path, MINIMAL + "extra: " + "[" * 5000 + "\n")


def test_search_algorithm_auto_says_what_it_picked(tmp_path: Path) -> None:
    """search.algorithm: auto (the default): grid when the trials cover a discrete space, else TPE
    (the search suite's winner); validate and the sweep say which and why."""
    from core import rules

    assert rules.search_algorithm("random", 1, 48, 10) == ("random", "as configured")
    assert rules.search_algorithm("auto", 1, 48, None)[0] == "grid" and "algorithm: grid tries each once" in rules.search_algorithm("auto", 1, 48, 48)[1]
    algorithm, why = rules.search_algorithm("auto", 1, 48, 20)
    assert algorithm == "tpe" and "search suite" in why and "after 10 Sobol start-up trials (half the trials, at most 10)" in why
    assert "after 3 random start-up trials (search.n_startup_trials)" in rules.search_algorithm("auto", 1, None, 20, startup="random", n_startup_trials=3)[1]
    assert rules.search_algorithm("auto", 1, None, 20)[0] == "tpe" and "several objectives" in rules.search_algorithm("auto", 2, None, 20)[1]
    assert [rules.tpe_startup_trials(None, n) for n in (1, 8, 20, 64)] == [1, 4, 10, 10] and rules.tpe_startup_trials(3, 64) == 3

    cfg = load_config(ROOT / "search_spaces" / "demo.yaml")
    assert cfg.search.algorithm == "tpe" and cfg.algorithm_reason.startswith("auto: TPE")
    # the demo's own n_startup_trials, in one short line (it said "up to 10" in ~300 characters)
    assert f"after {cfg.search.n_startup_trials} Sobol start-up trials (search.n_startup_trials)" in cfg.algorithm_reason and len(cfg.algorithm_reason) < 120
    out = subprocess.run([sys.executable, "-m", "sweep", "validate", str(cfg.source)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "# search: tpe (auto: TPE" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


def test_submit_needs_an_absolute_results_dir_as_written(tmp_path: Path) -> None:
    """Loading makes every results folder absolute (the default too, ./sweeps here): submit still
    knows whether the file or an override named one, and refuses the default and relative ones."""
    from sweep.engine.submit import _check_results_dir

    cfg = load_config(write_space(tmp_path, MINIMAL))
    assert Path(cfg.tracking.results_dir).is_absolute() and cfg.results_dir_given is None
    with pytest.raises(ConfigError, match="tracking.results_dir: required to submit"):
        _check_results_dir(cfg)
    with pytest.raises(ConfigError, match="tracking.results_dir: 'sweeps' is relative"):
        _check_results_dir(load_config(write_space(tmp_path, MINIMAL), ["tracking.results_dir=sweeps"]))
    _check_results_dir(load_config(write_space(tmp_path, MINIMAL), ["tracking.results_dir=/shared/sweeps"]))


def test_paths_on_the_command_line_resolve_where_the_command_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """key=value paths resolve against the current directory (as the shell completes them); the
    file's own paths against the file's folder; the config keeps the overrides with absolute paths."""
    import shutil

    project, here = tmp_path / "project", tmp_path / "here"
    (project / "data").mkdir(parents=True)
    (here / "data").mkdir(parents=True)
    shutil.copy(DEMO_DATA / "train.jsonl", here / "data" / "mine.jsonl")
    shutil.copy(DEMO_DATA / "train.jsonl", project / "data" / "theirs.jsonl")
    space = write_space(project, MINIMAL.replace("train: DEMO/train.jsonl", "train: data/theirs.jsonl"))
    monkeypatch.chdir(here)
    cfg = load_config(space, ["tracking.results_dir=out", "data.eval=data/mine.jsonl", "model.id=tiny-gemma3", "search.num_trials=3"])
    assert cfg.tracking.results_dir == str(here / "out")
    assert cfg.data.eval == str(here / "data" / "mine.jsonl")
    assert cfg.data.train == str(project / "data" / "theirs.jsonl")  # in the file: the file's folder
    assert cfg.model.id == "tiny-gemma3" and cfg.num_trials == 3
    assert cfg.overrides == (f"tracking.results_dir={here / 'out'}", f"data.eval={here / 'data' / 'mine.jsonl'}", "model.id=tiny-gemma3", "search.num_trials=3")
    assert cfg.results_dir_given == "out"  # as written: submit refuses a relative one
    # a path of the file's folder given on the command line is looked for here, and the error says where
    with pytest.raises(ConfigError) as info:
        load_config(space, ["data.train=data/theirs.jsonl"])
    assert info.value.problems == [f"data.train: {str(here / 'data' / 'theirs.jsonl')!r} not found; expected a .jsonl/.json/.parquet file or a hub dataset id (org/name)"]
    # a hub id stays a hub id; an odd directory name is quoted so that YAML reads it back
    odd = tmp_path / "a: b #c"
    odd.mkdir()
    monkeypatch.chdir(odd)
    cfg = load_config(space, ["model.id=google/gemma-3-1b-pt", "tracking.results_dir=out"])
    assert cfg.model.id == "google/gemma-3-1b-pt" and cfg.tracking.results_dir == str(odd / "out")


def test_a_resumed_sweep_reads_its_overrides_paths_from_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sweep.json records the overrides with absolute paths; one recorded before that (relative,
    read against the space file's folder then) is still read so."""
    import json
    import shutil

    from sweep.folder import load_sweep_config

    project, there, elsewhere = tmp_path / "project", tmp_path / "there", tmp_path / "elsewhere"
    for folder in (project, there, elsewhere):
        folder.mkdir()
    shutil.copy(DEMO_DATA / "eval.jsonl", there / "e.jsonl")
    shutil.copy(DEMO_DATA / "eval.jsonl", project / "e.jsonl")
    space = write_space(project, MINIMAL)
    monkeypatch.chdir(there)
    cfg = load_config(space, ["data.eval=e.jsonl"])
    for recorded, expected in ((list(cfg.overrides), there / "e.jsonl"), (["data.eval=e.jsonl"], project / "e.jsonl")):
        folder = tmp_path / "results" / "t-1"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        shutil.copy(space, folder / "space.yaml")
        stores = {"mlflow_uri": f"sqlite:///{folder.parent / 'mlflow.db'}", "optuna_storage": f"sqlite:///{folder / 'optuna.db'}", "study_name": "t", "parent_run_id": "p"}
        (folder / "sweep.json").write_text(json.dumps({"space_file": str(space), "overrides": recorded, **stores}))
        monkeypatch.chdir(elsewhere)
        assert load_sweep_config(folder).data.eval == str(expected)
