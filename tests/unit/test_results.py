"""Reading a sweep's trials back (sweep.readback.results): rows from the study and MLflow, order, the Pareto
set, --where constraints and the best trial. A tiny in-memory study and stand-in MLflow runs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from core.contract import ATTR_WORKER
from sweep.config import load_config
from sweep.readback.results import check_where, choose, collect, order, pareto, parse_where, rows, satisfies, value_of
from tests.conftest import MINIMAL, write_space

optuna.logging.set_verbosity(optuna.logging.WARNING)


def run(label: str, status: str, **metrics: float) -> SimpleNamespace:
    """What rows() reads of an MLflow child run."""
    tags = {"trial": label, "trial_status": status, "last_step": "4"}
    return SimpleNamespace(info=SimpleNamespace(run_id=f"run-{label}"), data=SimpleNamespace(tags=tags, metrics=metrics, params={"gpu_share": "0.25"}))


def study_with(cfg, params: list[dict]) -> optuna.Study:
    study = optuna.create_study()
    dists = cfg.space.distributions()
    for p in params:
        study.add_trial(optuna.trial.create_trial(params=p, distributions=dists, value=1.0, user_attrs={ATTR_WORKER: "w0"}))
    return study


@pytest.fixture()
def cfg(tmp_path: Path):
    return load_config(write_space(tmp_path, MINIMAL))


def test_rows_join_the_study_and_mlflow_by_label(cfg) -> None:
    study = study_with(cfg, [{"lora_r": 4}, {"lora_r": 8}, {"lora_r": 4}])
    children = [run("t000", "completed", eval_loss=2.0, train_loss=2.1), run("t001", "pruned", eval_loss=3.0)]  # t002: no run yet
    out = rows(cfg, study, children)
    assert [r["label"] for r in out] == ["t000", "t001"]
    first = out[0]
    assert first["status"] == "completed" and first["step"] == 4 and first["eval_loss"] == 2.0 and first["run_id"] == "run-t000"
    assert first["config"] == {"lora_r": 4, "gpu_share": 0.25}  # placement data beside the hyperparameters
    assert first["tokens_per_sec"] is None


def test_order_puts_completed_finite_best_first(cfg) -> None:
    rs = [
        {"label": "t0", "status": "pruned", "eval_loss": 0.1},
        {"label": "t1", "status": "completed", "eval_loss": 2.0},
        {"label": "t2", "status": "completed", "eval_loss": float("nan")},
        {"label": "t3", "status": "completed", "eval_loss": 1.0},
    ]
    assert [r["label"] for r in order(rs, "eval_loss", "min")] == ["t3", "t1", "t2", "t0"]
    assert [r["label"] for r in order(rs, "eval_loss", "max")] == ["t1", "t3", "t2", "t0"]


def test_pareto_keeps_the_non_dominated_completed_trials() -> None:
    rs = [
        {"label": "a", "status": "completed", "eval_loss": 1.0, "peak_vram_gb": 10.0},
        {"label": "b", "status": "completed", "eval_loss": 2.0, "peak_vram_gb": 5.0},
        {"label": "c", "status": "completed", "eval_loss": 2.5, "peak_vram_gb": 11.0},  # dominated by a and b
        {"label": "d", "status": "pruned", "eval_loss": 0.5, "peak_vram_gb": 1.0},  # not completed
        {"label": "e", "status": "completed", "eval_loss": 1.0, "peak_vram_gb": 10.0},  # equal to a: both stay
    ]
    front = pareto(rs, [("eval_loss", "min"), ("peak_vram_gb", "min")])
    assert sorted(r["label"] for r in front) == ["a", "b", "e"]


def test_where_is_parsed_never_evaluated() -> None:
    assert parse_where("peak_vram_gb<=20, eval_loss < 2.5 and tokens_per_sec>1e3") == [
        ("peak_vram_gb", "<=", 20.0), ("eval_loss", "<", 2.5), ("tokens_per_sec", ">", 1000.0)
    ]  # fmt: skip
    assert parse_where(None) == [] and parse_where("") == []
    for bad in ("__import__('os')<1", "eval_loss<=", "lora_r <= 1 2", "Eval_Loss<1"):
        with pytest.raises(ValueError, match="--where: cannot read"):
            parse_where(bad)
    assert satisfies({"eval_loss": 1.0}, [("eval_loss", "<", 2.0)])
    assert not satisfies({"eval_loss": float("nan")}, [("eval_loss", "<", 2.0)])


def test_where_takes_hyperparameters_numbers_and_words() -> None:
    assert parse_where("lora_r<=16, method==qlora and target_modules==all-linear, batch!=4x8, learning_rate>=1e-4") == [
        ("lora_r", "<=", 16.0), ("method", "==", "qlora"), ("target_modules", "==", "all-linear"), ("batch", "!=", "4x8"),
        ("learning_rate", ">=", 1e-4),
    ]  # fmt: skip
    for bad, why in (("lora_r=16", "unknown comparison '='; use one of <=, >=, <, >, ==, !="), ("lora_r=>16", "unknown comparison '=>'"),
                     ("lora_r~=16", "unknown comparison '~='")):  # fmt: skip
        with pytest.raises(ValueError, match=why):
            parse_where(bad)


def test_where_is_checked_against_what_the_sweep_has(cfg) -> None:
    study = study_with(cfg, [{"lora_r": 4}, {"lora_r": 8}])
    cpu = rows(cfg, study, [run("t000", "completed", eval_loss=2.0, peak_rss_gb=1.0), run("t001", "completed", eval_loss=1.5, peak_rss_gb=3.0)])
    check_where(parse_where("peak_rss_gb<=2, lora_r<=16, method==lora, effective_batch>=8, gradient_checkpointing==auto"), cpu)
    # a CPU sweep recorded no GPU memory: the error lists the metrics it has (and the hyperparameters)
    with pytest.raises(ValueError, match=r"peak_vram_gb is neither a metric this sweep recorded nor a hyperparameter \(did you mean peak_rss_gb\?\); "
                                         r"use one of its metrics: eval_loss, peak_rss_gb; or hyperparameters: method, lora_r, "):  # fmt: skip
        check_where(parse_where("peak_vram_gb<=20"), cpu)
    with pytest.raises(ValueError, match=r"lora_rank is neither .* \(did you mean lora_r\?\)"):
        check_where(parse_where("lora_rank<=16"), cpu)
    with pytest.raises(ValueError, match="method is text .* compare it with == or !="):
        check_where(parse_where("method<qlora"), cpu)
    with pytest.raises(ValueError, match="lora_r is a number; got 'big'"):
        check_where(parse_where("lora_r<=big"), cpu)
    with pytest.raises(ValueError, match="eval_loss is a number; got 'x'"):
        check_where(parse_where("eval_loss<=x"), cpu)
    # and the comparisons choose by hyperparameter too
    assert choose(cpu, cfg, parse_where("lora_r<=4"))["label"] == "t000"
    assert choose(cpu, cfg, parse_where("lora_r>=5, method==lora, target_modules==all-linear, batch==4x8"))["label"] == "t001"
    assert choose(cpu, cfg, parse_where("method==qlora")) is None
    assert value_of(cpu[0], "micro_batch") == 4 and value_of(cpu[0], "effective_batch") == 32 and value_of(cpu[0], "gradient_checkpointing") == "auto"


def test_an_old_sweeps_learning_rate_metric_reads_as_lr(cfg) -> None:
    """Before the rename, the scheduled learning rate was the metric `learning_rate` (beside the param
    of the same name, the peak): read back, it is `lr`, and `learning_rate` stays the hyperparameter."""
    study = study_with(cfg, [{"lora_r": 4}])
    (old,) = rows(cfg, study, [run("t000", "completed", eval_loss=2.0, learning_rate=3.6e-6)])
    assert old["metrics"] == {"eval_loss": 2.0, "lr": 3.6e-6}
    assert value_of(old, "learning_rate") == cfg.train.learning_rate == 2e-4  # the peak, not the last scheduled value
    check_where(parse_where("lr<1e-5, learning_rate>=1e-4"), [old])
    assert choose([old], cfg, parse_where("lr<1e-5, learning_rate>=1e-4"))["label"] == "t000"


def test_choose_and_collect(cfg) -> None:
    study = study_with(cfg, [{"lora_r": 4}, {"lora_r": 8}, {"lora_r": 8}])
    children = [
        run("t000", "completed", eval_loss=2.0, peak_rss_gb=1.0),
        run("t001", "completed", eval_loss=1.5, peak_rss_gb=3.0),
        run("t002", "oom"),
    ]
    result = collect(cfg, study, children)
    assert [r["label"] for r in result.trials] == ["t001", "t000", "t002"]
    assert result.best["label"] == "t001" and result.counts == {"completed": 2, "oom": 1} and result.pareto == []
    assert choose(result.trials, cfg, parse_where("peak_rss_gb<=2"))["label"] == "t000"
    assert choose(result.trials, cfg, parse_where("peak_rss_gb<=0.5")) is None
