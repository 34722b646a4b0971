"""The sweep's Optuna study across driver runs: a resumed sweep never re-proposes what ran."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sweep.config import load_config
from sweep.study import SPENT_AFTER_DUPLICATES, SweepSearch, twin_of
from sweep.trials import Ledger
from tests.conftest import MINIMAL, write_space

SPACE = MINIMAL.replace("search: {num_trials: 2}", "search: {num_trials: 6, seed: 0, algorithm: ALGO, n_startup_trials: 5}") + "  learning_rate: {loguniform: [1.0e-5, 1.0e-2]}\n"


def run_trials(search: SweepSearch, ids: list[str]) -> list[dict]:
    """What the searcher proposes for these Ray trials, each then completed."""
    configs = []
    for i, trial_id in enumerate(ids):
        configs.append(search.suggest(trial_id))
        search.on_trial_complete(trial_id, {"step": 4, "trial_status": "completed", "eval_loss": 1.0 + i})
    return configs


@pytest.mark.parametrize("algorithm", ["random", "tpe"])
def test_a_resumed_seeded_sweep_proposes_new_configurations(tmp_path: Path, algorithm: str) -> None:
    cfg = load_config(write_space(tmp_path, SPACE.replace("ALGO", algorithm)))
    storage = f"sqlite:///{tmp_path}/optuna.db"
    first = run_trials(SweepSearch(cfg, storage, Ledger()), ["a", "b"])
    # the driver died; `resume` builds a new searcher on the same study, with the same seed
    again = run_trials(SweepSearch(cfg, storage, Ledger()), ["c", "d"])
    rates = [c["learning_rate"] for c in first + again]
    assert len(set(rates)) == 4, rates

    # ... and it is still reproducible: the same history gives the same proposals
    storage2 = f"sqlite:///{tmp_path}/optuna2.db"
    first2 = run_trials(SweepSearch(cfg, storage2, Ledger()), ["a", "b"])
    again2 = run_trials(SweepSearch(cfg, storage2, Ledger()), ["c", "d"])
    assert [c["learning_rate"] for c in first2 + again2] == rates


def test_points_to_evaluate_run_once_across_resumes(tmp_path: Path) -> None:
    body = SPACE.replace("ALGO", "random").replace("seed: 0,", "seed: 0, points_to_evaluate: [{lora_r: 8, learning_rate: 0.001}],")
    cfg = load_config(write_space(tmp_path, body))
    storage = f"sqlite:///{tmp_path}/optuna.db"
    first = run_trials(SweepSearch(cfg, storage, Ledger()), ["a"])
    assert first[0]["learning_rate"] == 0.001
    again = run_trials(SweepSearch(cfg, storage, Ledger()), ["b", "c"])
    assert 0.001 not in [c["learning_rate"] for c in again], again


SOBOL = MINIMAL.replace("search: {num_trials: 2}", "search: {num_trials: 24, seed: SEED, algorithm: tpe, STARTUP}") + """\
  target_modules: [attention, mlp, all-linear]
  lora_dropout: [0.0, 0.1]
  learning_rate: {loguniform: [1.0e-5, 1.0e-2]}
"""


def test_tpe_starts_from_sobol_points_that_cover_every_choice(tmp_path: Path) -> None:
    """search.startup: sobol (the default): TPE's 10 start-up trials are scrambled Sobol points,
    queued in the study before the first trial, so that every value of every choice meets the
    others early. Random start-up draws leave a value out on some seeds; Sobol's never do here."""
    from sweep.study import startup_points

    uncovered = {"sobol": 0, "random": 0}
    for seed in range(8):
        for startup in ("sobol", "random"):
            folder = tmp_path / f"{startup}{seed}"
            folder.mkdir()
            cfg = load_config(write_space(folder, SOBOL.replace("SEED", str(seed)).replace("STARTUP", f"startup: {startup}")))
            search = SweepSearch(cfg, f"sqlite:///{folder}/optuna.db", Ledger())
            configs = run_trials(search, [f"t{i}" for i in range(10)])
            if startup == "sobol":
                assert len(startup_points(cfg)) == 10 and [c["learning_rate"] for c in configs] == [p["learning_rate"] for p in startup_points(cfg)]
                assert all(1e-5 <= c["learning_rate"] <= 1e-2 for c in configs)
            else:
                assert startup_points(cfg) == []  # Optuna's own random start-up: nothing queued
            seen = {(name, str(c[name])) for c in configs for name in ("lora_r", "target_modules", "lora_dropout")}
            uncovered[startup] += 7 - len(seen)  # 2 + 3 + 2 values
    assert uncovered["sobol"] == 0 and uncovered["random"] > 0, uncovered


def test_sobol_start_up_counts_the_users_points_and_skips_warm_starts_and_resumes(tmp_path: Path) -> None:
    from sweep.study import startup_points

    body = SOBOL.replace("SEED", "0").replace("STARTUP", "n_startup_trials: 4, points_to_evaluate: [{lora_r: 8, learning_rate: 0.001}]")
    cfg = load_config(write_space(tmp_path, body))
    points = startup_points(cfg)
    assert len(points) == 4 and points[0] == {"lora_r": 8, "learning_rate": 0.001}  # the user's first, Sobol fills the rest
    storage = f"sqlite:///{tmp_path}/optuna.db"
    first = run_trials(SweepSearch(cfg, storage, Ledger()), ["a", "b"])
    assert first[0]["learning_rate"] == 0.001 and first[1]["learning_rate"] == cfg.space.decode(points[1], cfg.fixed_hyperparams)["learning_rate"]
    # resumed: the two not yet run are still queued in the study, nothing is queued again
    again = run_trials(SweepSearch(cfg, storage, Ledger()), ["c", "d", "e"])
    assert [c["learning_rate"] for c in again[:2]] == [cfg.space.decode(p, cfg.fixed_hyperparams)["learning_rate"] for p in points[2:]]
    assert len({c["learning_rate"] for c in first + again}) == 5
    warm = dataclasses.replace(cfg, search=cfg.search.model_copy(update={"warm_start": str(tmp_path / "previous-sweep")}))
    assert startup_points(warm) == [{"lora_r": 8, "learning_rate": 0.001}]  # the previous sweep's trials are the start-up


# ------------------------------------------------------------------------------------------------
# feedback from Tune: the study's state comes from the same outcome() MLflow uses

import optuna  # noqa: E402
from ray.tune.search import Searcher  # noqa: E402

from core.request import TrialRequest  # noqa: E402
from sweep.folder import StopFile  # noqa: E402


def searcher(tmp_path: Path, body: str = SPACE.replace("ALGO", "random"), **kwargs) -> SweepSearch:
    cfg = load_config(write_space(tmp_path, body))
    return SweepSearch(cfg, f"sqlite:///{tmp_path}/optuna.db", kwargs.pop("ledger", Ledger()), **kwargs)


def states(search: SweepSearch) -> list[tuple[str, str | None]]:
    return [(t.state.name, t.user_attrs.get("trial_status")) for t in search._ot_study.get_trials(deepcopy=False)]


def test_each_outcome_reaches_the_study_as_its_state(tmp_path: Path) -> None:
    ledger = Ledger()
    search = searcher(tmp_path, ledger=ledger)
    for trial_id in "abcd":
        search.suggest(trial_id)
    search.on_trial_result("a", {"step": 2, "trial_status": "running", "eval_loss": 3.0})
    search.on_trial_complete("a", {"step": 4, "trial_status": "completed", "eval_loss": 2.0})
    ledger.stopped["b"] = 2  # the scheduler stopped it
    search.on_trial_complete("b", {"step": 2, "trial_status": "running", "eval_loss": 3.5})
    search.on_trial_complete("c", {"step": 3, "trial_status": "oom", "error": "CUDA out of memory"})
    search.on_trial_complete("d", {"step": 4, "trial_status": "completed"})  # completed without its metric
    assert states(search) == [("COMPLETE", "completed"), ("PRUNED", "pruned"), ("FAIL", "oom"), ("FAIL", "failed")]
    a, b, c, d = search._ot_study.get_trials(deepcopy=False)
    assert a.value == 2.0 and a.intermediate_values == {2: 3.0, 4: 2.0}  # by training step
    assert b.intermediate_values == {2: 3.5}
    assert c.user_attrs["error"] == "CUDA out of memory" and "eval_loss was not reported" in d.user_attrs["error"]


def test_a_trial_stopped_on_request_stays_open_for_resume(tmp_path: Path) -> None:
    stop = StopFile(tmp_path / "STOP")
    search = searcher(tmp_path, stop=stop)
    search.suggest("a")
    (tmp_path / "STOP").write_text("now")
    assert search.suggest("b") is Searcher.FINISHED  # nothing new starts
    search.on_trial_complete("a", {"step": 2, "trial_status": "stopped"})
    assert states(search) == [("RUNNING", None)]


def test_the_budget_counts_new_trials_and_waits_for_running_ones(tmp_path: Path) -> None:
    search = searcher(tmp_path, budget=1)
    assert search.suggest("a") is not None
    assert search.suggest("b") is None  # a runs: it may still need a retry
    search.on_trial_complete("a", {"step": 4, "trial_status": "completed", "eval_loss": 1.0})
    assert search.suggest("c") is Searcher.FINISHED


def test_a_retried_trial_continues_the_same_optuna_trial(tmp_path: Path) -> None:
    ledger = Ledger()
    search = searcher(tmp_path, ledger=ledger)
    search.suggest("a")
    search.on_trial_complete("a", error=True)  # Tune: errored; the sweep decides
    assert search.requeue("a", "/ckpt/step-2") == 2
    config = search.suggest("a2")
    request = TrialRequest.from_config(config)
    assert request.resume_checkpoint == "/ckpt/step-2" and set(request.hyper) == {"lora_r", "learning_rate"}
    assert ledger.label("a2") == "t000" and search.attempts["a2"] == 2
    search.on_trial_complete("a2", error=True)
    search.fail("a2", "worker died again")
    assert states(search) == [("FAIL", "failed")]


class Verdict:
    def __init__(self, feasible: bool):
        self.feasible, self.share, self.estimate_gb = feasible, 0.5, 30.123
        self.reason = "infeasible: too big" if not feasible else ""


def test_an_infeasible_config_is_closed_and_another_sampled(tmp_path: Path) -> None:
    seen: list[tuple[str, dict]] = []
    judged: list[dict] = []

    def judge(hyper: dict) -> Verdict:
        judged.append(hyper)
        return Verdict(len(judged) > 2)  # the first two samples do not fit

    search = searcher(tmp_path, judge=judge, on_infeasible=lambda label, config, verdict: seen.append((label, config)))
    request = TrialRequest.from_config(search.suggest("a"))
    assert request.allocation.gpu_share == 0.5 and request.allocation.estimated_vram_gb == 30.12 and dict(request.hyper) == judged[-1]
    assert states(search) == [("FAIL", "infeasible"), ("FAIL", "infeasible"), ("RUNNING", None)]
    assert [label for label, _ in seen] == ["t000", "t001"] and all("gpu_share" not in config for _, config in seen)
    assert search.launched == 1 and search._ot_study.get_trials(deepcopy=False)[2].user_attrs["estimated_vram_gb"] == 30.12


def test_four_trials_at_a_time_try_as_many_configurations_as_one(tmp_path: Path) -> None:
    """Issue 18, item 4: parallel trials must not collapse the search. The sweep's sampler (Sobol
    start-up, then TPE with constant liar) asked for 4 trials before any result tries as many
    distinct configurations among its first 12 as one asked a trial at a time (a 48-point space)."""
    import json
    import math
    import statistics

    body = SOBOL.replace("STARTUP", "startup: sobol").replace("learning_rate: {loguniform: [1.0e-5, 1.0e-2]}", "learning_rate: [1.0e-4, 1.0e-3, 3.0e-3, 1.0e-2]")

    def loss(config: dict) -> float:  # a smooth stand-in landscape, best at lr 3e-3, rank 8, all-linear
        return (math.log10(config["learning_rate"]) + 2.5) ** 2 + 0.1 * (config["lora_r"] == 4) + 0.05 * (config["target_modules"] != "all-linear") + config["lora_dropout"]

    distinct: dict[int, list[int]] = {1: [], 4: []}
    for seed in range(6):
        for flight in (1, 4):
            folder = tmp_path / f"s{seed}-{flight}"
            folder.mkdir()
            search = SweepSearch(load_config(write_space(folder, body.replace("SEED", str(seed)))), f"sqlite:///{folder}/optuna.db", Ledger())
            tried: list[str] = []
            for wave in range(12 // flight):
                ids = [f"t{wave}-{i}" for i in range(flight)]
                configs = [search.suggest(trial_id) for trial_id in ids]  # all asked before any result: trials in flight
                for trial_id, config in zip(ids, configs):
                    search.on_trial_complete(trial_id, {"step": 4, "trial_status": "completed", "eval_loss": loss(config)})
                tried += [json.dumps({k: config[k] for k in ("lora_r", "target_modules", "lora_dropout", "learning_rate")}, sort_keys=True) for config in configs]
            distinct[flight].append(len(set(tried)))
    assert statistics.median(distinct[4]) >= statistics.median(distinct[1]) and min(distinct[4]) >= 9, distinct


# ------------------------------------------------------------------------------------------------
# duplicate proposals: a configuration that ran (or runs) is never launched again

TWO_POINTS = MINIMAL.replace("search: {num_trials: 2}", "search: {num_trials: 6, seed: 3, algorithm: ALGO}")


@pytest.mark.parametrize("algorithm", ["random", "tpe"])
def test_a_proposal_that_ran_already_is_closed_as_duplicate_and_another_sampled(tmp_path: Path, algorithm: str) -> None:
    """lora_r 4 or 8: two configurations. The second launch is the other one, whatever the
    sampler proposed in between; then the space is spent and nothing else starts."""
    seen: list[tuple[str, int, bool]] = []
    search = searcher(tmp_path, TWO_POINTS.replace("ALGO", algorithm), on_duplicate=lambda label, config, twin, spent: seen.append((label, twin, spent)))
    first = search.suggest("a")
    search.on_trial_complete("a", {"step": 4, "trial_status": "completed", "eval_loss": 1.0})
    second = search.suggest("b")
    assert {first["lora_r"], second["lora_r"]} == {4, 8}  # never the same one twice
    search.on_trial_complete("b", {"step": 4, "trial_status": "completed", "eval_loss": 2.0})
    assert search.suggest("c") is Searcher.FINISHED and search.spent  # both ran: the space is spent
    assert search.launched == 2
    trials = search._ot_study.get_trials(deepcopy=False)
    duplicates = [t for t in trials if t.user_attrs.get("trial_status") == "duplicate"]
    assert len(duplicates) == len(seen) >= SPENT_AFTER_DUPLICATES
    ran = {t.params["lora_r"]: t for t in trials if "ray_trial_id" in t.user_attrs}
    for t in duplicates:  # each twin had completed when it was proposed again: its result told again
        twin = ran[t.params["lora_r"]]
        assert t.user_attrs["duplicate_of"] == f"t{twin.number:03d}" and "ray_trial_id" not in t.user_attrs
        assert (t.state.name, t.value) == ("COMPLETE", twin.value)
    assert [spent for *_, spent in seen][-1] and not any(spent for *_, spent in seen[:-1])


def test_a_running_trial_has_no_twin_launched_beside_it(tmp_path: Path) -> None:
    search = searcher(tmp_path, TWO_POINTS.replace("ALGO", "random"))
    first, second = search.suggest("a"), search.suggest("b")  # both in flight, no result yet
    assert first["lora_r"] != second["lora_r"]
    assert search.suggest("c") is None  # spent while two run: wait for them (a retry may come)


def test_a_point_the_user_listed_twice_runs_twice_and_later_repeats_of_it_do_not(tmp_path: Path) -> None:
    """points_to_evaluate lists lora_r 4 twice: both run (the user asked for it, e.g. to see the
    noise between runs). They are still twins: the sampler's own proposals of 4 are duplicates."""
    body = TWO_POINTS.replace("ALGO", "random").replace("seed: 3,", "seed: 3, points_to_evaluate: [{lora_r: 4}, {lora_r: 4}],")
    seen: list[str] = []
    search = searcher(tmp_path, body, on_duplicate=lambda label, config, twin, spent: seen.append(f"t{twin:03d}"))
    configs = run_trials(search, ["a", "b", "c"])
    assert [c["lora_r"] for c in configs] == [4, 4, 8]
    assert search.suggest("d") is Searcher.FINISHED and search.spent and search.launched == 3
    trials = search._ot_study.get_trials(deepcopy=False)
    ran = [t for t in trials if "ray_trial_id" in t.user_attrs]
    assert [(t.params["lora_r"], t.user_attrs.get("point_to_evaluate")) for t in ran] == [(4, 0), (4, 1), (8, None)]
    assert len(seen) >= SPENT_AFTER_DUPLICATES and set(seen) <= {f"t{t.number:03d}" for t in ran}
    assert not any(t.user_attrs.get("trial_status") == "duplicate" for t in trials if "point_to_evaluate" in t.user_attrs)


def test_twin_of_ignores_what_never_ran(tmp_path: Path) -> None:
    import optuna

    search = searcher(tmp_path, TWO_POINTS.replace("ALGO", "random"))
    study = search._ot_study
    dist = {"lora_r": optuna.distributions.CategoricalDistribution([4, 8])}
    for status in ("infeasible", "lost", "duplicate"):
        study.add_trial(optuna.trial.create_trial(params={"lora_r": 4}, distributions=dist, state=optuna.trial.TrialState.FAIL, user_attrs={"trial_status": status}))
    study.add_trial(optuna.trial.create_trial(params={"lora_r": 4}, distributions=dist, value=1.0, user_attrs={"warm_start_from": "/old"}))
    study.enqueue_trial({"lora_r": 4})
    probe = study.ask(dist)
    assert probe.params == {"lora_r": 4} and twin_of(study, probe) is None
    study.add_trial(optuna.trial.create_trial(params={"lora_r": 4}, distributions=dist, state=optuna.trial.TrialState.FAIL, user_attrs={"trial_status": "oom"}))
    assert twin_of(study, probe).number == probe.number + 1  # it ran, and failed: it would fail again


def test_a_duplicate_of_a_completed_trial_repeats_its_values_and_of_any_other_fails(tmp_path: Path) -> None:
    import optuna

    from sweep.study import close_duplicate

    study = optuna.create_study(directions=["minimize", "minimize"])
    dist = {"lora_r": optuna.distributions.CategoricalDistribution([4, 8])}
    study.add_trial(optuna.trial.create_trial(params={"lora_r": 4}, distributions=dist, values=[1.5, 9.0]))
    done = study.trials[-1]
    study.add_trial(optuna.trial.create_trial(params={"lora_r": 8}, distributions=dist, state=optuna.trial.TrialState.PRUNED))
    pruned = study.trials[-1]
    for twin in (done, pruned):
        study.enqueue_trial(twin.params)
        close_duplicate(study, study.ask(dist), twin)
    first, second = study.trials[-2:]
    assert (first.state.name, first.values, first.user_attrs["duplicate_of"]) == ("COMPLETE", [1.5, 9.0], "t000")
    assert (second.state.name, second.user_attrs["trial_status"], second.user_attrs["duplicate_of"]) == ("FAIL", "duplicate", "t001")
