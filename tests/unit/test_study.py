"""The sweep's Optuna study (sweep.engine.study): what it proposes, across driver runs and workers,
and how a trial's end reaches it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from core.contract import TrialStatus
from sweep.config import load_config
from sweep.engine.study import SPENT_AFTER_DUPLICATES, Spent, Study, create_study, twin_of
from tests.conftest import MINIMAL, write_space

SPACE = MINIMAL.replace("search: {num_trials: 2}", "search: {num_trials: 6, seed: 0, algorithm: ALGO, n_startup_trials: 5}") + "  learning_rate: {loguniform: [1.0e-5, 1.0e-2]}\n"


def opened(cfg, storage: str, stream: str = "") -> Study:
    """The sweep's study as a driver (or a worker named `stream`) opens it; made first if new."""
    import optuna

    try:
        optuna.load_study(study_name=cfg.name, storage=storage)
    except KeyError:
        create_study(cfg, storage, cfg.name)
    return Study(cfg, storage, cfg.name, stream)


def run_trials(study: Study, n: int) -> list[dict]:
    """What the study proposes for `n` trials, each then completed."""
    configs = []
    for i in range(n):
        proposal = study.propose()
        configs.append(proposal.hyper)
        study.end(proposal.number, TrialStatus.COMPLETED, [1.0 + i])
    return configs


@pytest.mark.parametrize("algorithm", ["random", "tpe"])
def test_a_resumed_seeded_sweep_proposes_new_configurations(tmp_path: Path, algorithm: str) -> None:
    cfg = load_config(write_space(tmp_path, SPACE.replace("ALGO", algorithm)))
    storage = f"sqlite:///{tmp_path}/optuna.db"
    first = run_trials(opened(cfg, storage), 2)
    # the driver died; `resume` opens the same study again, with the same seed
    again = run_trials(opened(cfg, storage), 2)
    rates = [c["learning_rate"] for c in first + again]
    assert len(set(rates)) == 4, rates

    # ... and it is still reproducible: the same history gives the same proposals
    storage2 = f"sqlite:///{tmp_path}/optuna2.db"
    first2 = run_trials(opened(cfg, storage2), 2)
    again2 = run_trials(opened(cfg, storage2), 2)
    assert [c["learning_rate"] for c in first2 + again2] == rates


def test_points_to_evaluate_run_once_across_resumes(tmp_path: Path) -> None:
    body = SPACE.replace("ALGO", "random").replace("seed: 0,", "seed: 0, points_to_evaluate: [{lora_r: 8, learning_rate: 0.001}],")
    cfg = load_config(write_space(tmp_path, body))
    storage = f"sqlite:///{tmp_path}/optuna.db"
    first = run_trials(opened(cfg, storage), 1)
    assert first[0]["learning_rate"] == 0.001
    again = run_trials(opened(cfg, storage), 2)
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
    from sweep.engine.study import startup_points

    uncovered = {"sobol": 0, "random": 0}
    for seed in range(8):
        for startup in ("sobol", "random"):
            folder = tmp_path / f"{startup}{seed}"
            folder.mkdir()
            cfg = load_config(write_space(folder, SOBOL.replace("SEED", str(seed)).replace("STARTUP", f"startup: {startup}")))
            configs = run_trials(opened(cfg, f"sqlite:///{folder}/optuna.db"), 10)
            if startup == "sobol":
                assert len(startup_points(cfg)) == 10 and [c["learning_rate"] for c in configs] == [p["learning_rate"] for p in startup_points(cfg)]
                assert all(1e-5 <= c["learning_rate"] <= 1e-2 for c in configs)
            else:
                assert startup_points(cfg) == []  # Optuna's own random start-up: nothing queued
            seen = {(name, str(c[name])) for c in configs for name in ("lora_r", "target_modules", "lora_dropout")}
            uncovered[startup] += 7 - len(seen)  # 2 + 3 + 2 values
    assert uncovered["sobol"] == 0 and uncovered["random"] > 0, uncovered


def test_sobol_start_up_counts_the_users_points_and_skips_warm_starts_and_resumes(tmp_path: Path) -> None:
    from sweep.engine.study import startup_points

    body = SOBOL.replace("SEED", "0").replace("STARTUP", "n_startup_trials: 4, points_to_evaluate: [{lora_r: 8, learning_rate: 0.001}]")
    cfg = load_config(write_space(tmp_path, body))
    points = startup_points(cfg)
    assert len(points) == 4 and points[0] == {"lora_r": 8, "learning_rate": 0.001}  # the user's first, Sobol fills the rest
    storage = f"sqlite:///{tmp_path}/optuna.db"
    first = run_trials(opened(cfg, storage), 2)
    assert first[0]["learning_rate"] == 0.001 and first[1]["learning_rate"] == cfg.space.decode(points[1], cfg.fixed_hyperparams)["learning_rate"]
    # resumed: the two not yet run are still queued in the study, nothing is queued again
    again = run_trials(opened(cfg, storage), 3)
    assert [c["learning_rate"] for c in again[:2]] == [cfg.space.decode(p, cfg.fixed_hyperparams)["learning_rate"] for p in points[2:]]
    assert len({c["learning_rate"] for c in first + again}) == 5
    warm = dataclasses.replace(cfg, search=cfg.search.model_copy(update={"warm_start": str(tmp_path / "previous-sweep")}))
    assert startup_points(warm) == [{"lora_r": 8, "learning_rate": 0.001}]  # the previous sweep's trials are the start-up


# ------------------------------------------------------------------------------------------------
# a trial's end and evaluations reach the study


def study_of(tmp_path: Path, body: str = SPACE.replace("ALGO", "random")) -> Study:
    return opened(load_config(write_space(tmp_path, body)), f"sqlite:///{tmp_path}/optuna.db")


def states(study: Study) -> list[tuple[str, str | None]]:
    return [(t.state.name, t.user_attrs.get("trial_status")) for t in study.trials()]


def test_each_end_reaches_the_study_as_its_state(tmp_path: Path) -> None:
    study = study_of(tmp_path)
    a, b, c, d = (study.propose().number for _ in range(4))
    assert study.report(a, [(2, 3.0)], running=True) is False  # random search, asha: the first at a rung goes on
    study.report(a, [(2, 3.0), (4, 2.0)], running=False)  # a resumed trial re-sends step 2: once in the study
    study.end(a, TrialStatus.COMPLETED, [2.0])
    study.report(b, [(2, 3.5)], running=True)
    study.end(b, TrialStatus.PRUNED)
    study.end(c, TrialStatus.OOM, error="CUDA out of memory")
    study.end(d, TrialStatus.STOPPED)
    assert states(study) == [("COMPLETE", "completed"), ("PRUNED", "pruned"), ("FAIL", "oom"), ("PRUNED", "stopped")]
    ta, tb, tc, _ = study.trials()
    assert ta.value == 2.0 and ta.intermediate_values == {2: 3.0, 4: 2.0}  # by training step
    assert tb.intermediate_values == {2: 3.5} and tc.user_attrs["error"] == "CUDA out of memory"


ASHA = SPACE.replace("ALGO", "random").replace("max_steps: 4,", "max_steps: 8,").replace("n_startup_trials: 5}", "n_startup_trials: 5, scheduler: {type: asha, grace_period: 2, reduction_factor: 2}}")


def test_a_continued_trial_is_judged_at_each_step_it_re_sends(tmp_path: Path) -> None:
    """ASHA rungs at steps 2, 4, 8. Trial b passes rung 2 and is worse than a at rung 4, where the
    uninterrupted sweep prunes it. Its worker saved its step-4 checkpoint and died before reporting
    step 4; continued, it reports step 4 (re-sent) with step 6: pruned at 4, as without the fault
    (judged at step 6 alone, with its better value there, it passed rung 4 and ran to the end)."""
    study = study_of(tmp_path, ASHA)
    a, b = (study.propose().number for _ in range(2))
    assert not study.report(a, [(2, 1.0)], running=True) and not study.report(a, [(4, 0.5)], running=True)
    assert not study.report(b, [(2, 1.0)], running=True)
    assert study.report(b, [(2, 1.0), (4, 0.9), (6, 0.3)], running=True) is True
    trial = study.frozen(b)
    assert trial.state.name == "PRUNED" and trial.intermediate_values == {2: 1.0, 4: 0.9}


def test_a_pruned_trial_is_pruned_in_the_study_before_its_worker_ends_it(tmp_path: Path) -> None:
    """Pruned in the study as the pruner decides: a worker (or driver) killed before it ended the
    trial leaves it pruned, not running, so neither `resume` nor a retry continues it past its
    rung (the pruner records the rung as judged and would let it through the next time)."""
    study = study_of(tmp_path, ASHA)
    a, b = (study.propose().number for _ in range(2))
    study.report(a, [(2, 1.0), (4, 0.5)], running=True)
    assert study.report(b, [(2, 1.0), (4, 0.9)], running=True) is True
    assert [t.number for t in opened(study.cfg, study.url).trials(("RUNNING",))] == [a]  # as `resume` finds them
    study.end(b, TrialStatus.PRUNED)  # the worker's end, when it comes, changes nothing
    assert states(study)[1] == ("PRUNED", "pruned")


def test_a_trial_reopens_by_its_number_in_another_process(tmp_path: Path) -> None:
    """A worker proposes it; the driver (another Study object: another process) ends it."""
    cfg = load_config(write_space(tmp_path, SPACE.replace("ALGO", "random")))
    storage = f"sqlite:///{tmp_path}/optuna.db"
    proposal = opened(cfg, storage, "w0").propose()
    driver = opened(cfg, storage)
    assert driver.hyper(driver.frozen(proposal.number)) == proposal.hyper
    driver.end(proposal.number, TrialStatus.FAILED, error="its worker died")
    assert states(driver) == [("FAIL", "failed")]


def test_workers_draw_their_own_streams_from_one_seed(tmp_path: Path) -> None:
    """Two workers open the same seeded study: each its own sampler stream (otherwise both would
    propose the same configuration), and the same names give the same streams again."""
    rates = {}
    for run in ("a", "b"):
        folder = tmp_path / run
        folder.mkdir()
        cfg = load_config(write_space(folder, SPACE.replace("ALGO", "random")))
        storage = f"sqlite:///{folder}/optuna.db"
        rates[run] = [opened(cfg, storage, worker).propose().hyper["learning_rate"] for worker in ("w0", "w1")]
    assert rates["a"] == rates["b"] and rates["a"][0] != rates["a"][1]


class Verdict:
    def __init__(self, feasible: bool):
        self.feasible, self.share, self.estimate_gb = feasible, 0.5, 30.123
        self.reason = "infeasible: too big" if not feasible else ""


def test_an_infeasible_config_is_closed_and_another_sampled(tmp_path: Path) -> None:
    seen: list[tuple[str, dict]] = []
    notes: list[str] = []
    judged: list[dict] = []

    def judge(hyper: dict) -> Verdict:
        judged.append(hyper)
        return Verdict(len(judged) > 2)  # the first two samples do not fit

    study = study_of(tmp_path)
    proposal = study.propose(judge, lambda label, hyper, verdict: seen.append((label, hyper)), lambda label, text: notes.append(f"{label} {text}"))
    assert proposal.hyper == judged[-1] and proposal.label == "t002"
    assert states(study) == [("FAIL", "infeasible"), ("FAIL", "infeasible"), ("RUNNING", None)]
    assert [label for label, _ in seen] == ["t000", "t001"] and notes[0].startswith("t000 infeasible  ") and notes[0].endswith("infeasible: too big")
    assert study.trials()[2].user_attrs["estimated_vram_gb"] == 30.12


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
            study = opened(load_config(write_space(folder, body.replace("SEED", str(seed)))), f"sqlite:///{folder}/optuna.db")
            tried: list[str] = []
            for wave in range(12 // flight):
                proposals = [study.propose() for _ in range(flight)]  # all asked before any result: trials in flight
                configs = [p.hyper for p in proposals]
                for proposal in proposals:
                    study.end(proposal.number, TrialStatus.COMPLETED, [loss(proposal.hyper)])
                tried += [json.dumps({k: config[k] for k in ("lora_r", "target_modules", "lora_dropout", "learning_rate")}, sort_keys=True) for config in configs]
            distinct[flight].append(len(set(tried)))
    assert statistics.median(distinct[4]) >= statistics.median(distinct[1]) and min(distinct[4]) >= 9, distinct


# ------------------------------------------------------------------------------------------------
# duplicate proposals: a configuration that ran (or runs) is never launched again

TWO_POINTS = MINIMAL.replace("search: {num_trials: 2}", "search: {num_trials: 6, seed: 3, algorithm: ALGO}")


@pytest.mark.parametrize("algorithm", ["random", "tpe"])
def test_a_proposal_that_ran_already_is_closed_as_duplicate_and_another_sampled(tmp_path: Path, algorithm: str) -> None:
    """lora_r 4 or 8: two configurations. The second trial is the other one, whatever the sampler
    proposed in between; then the space is spent and nothing else starts."""
    notes: list[str] = []
    study = study_of(tmp_path, TWO_POINTS.replace("ALGO", algorithm))
    note = lambda label, text: notes.append(f"{label} {text}")  # noqa: E731
    first = study.propose(note=note)
    study.end(first.number, TrialStatus.COMPLETED, [1.0])
    second = study.propose(note=note)
    assert {first.hyper["lora_r"], second.hyper["lora_r"]} == {4, 8}  # never the same one twice
    study.end(second.number, TrialStatus.COMPLETED, [2.0])
    with pytest.raises(Spent, match="the space looks spent; no new trials start"):
        study.propose(note=note)
    trials = study.trials()
    duplicates = [t for t in trials if t.user_attrs.get("trial_status") == "duplicate"]
    assert len(duplicates) == len(notes) >= SPENT_AFTER_DUPLICATES
    ran = {t.params["lora_r"]: t for t in trials if t.number in (first.number, second.number)}
    for t in duplicates:  # each twin had completed when it was proposed again: its result told again
        twin = ran[t.params["lora_r"]]
        assert t.user_attrs["duplicate_of"] == f"t{twin.number:03d}"
        assert (t.state.name, t.value) == ("COMPLETE", twin.value)
    assert all(" duplicate  " in n and "ran it; not run again" in n for n in notes)


def test_a_running_trial_has_no_twin_launched_beside_it(tmp_path: Path) -> None:
    study = study_of(tmp_path, TWO_POINTS.replace("ALGO", "random"))
    first, second = study.propose(), study.propose()  # both in flight, no result yet
    assert first.hyper["lora_r"] != second.hyper["lora_r"]
    with pytest.raises(Spent):
        study.propose()
    assert {t.state.name for t in study.trials() if t.user_attrs.get("trial_status") == "duplicate"} == {"FAIL"}  # the twins' results are unknown


def test_a_point_the_user_listed_twice_runs_twice_and_later_repeats_of_it_do_not(tmp_path: Path) -> None:
    """points_to_evaluate lists lora_r 4 twice: both run (the user asked for it, e.g. to see the
    noise between runs). They are still twins: the sampler's own proposals of 4 are duplicates."""
    body = TWO_POINTS.replace("ALGO", "random").replace("seed: 3,", "seed: 3, points_to_evaluate: [{lora_r: 4}, {lora_r: 4}],")
    study = study_of(tmp_path, body)
    configs = run_trials(study, 3)
    assert [c["lora_r"] for c in configs] == [4, 4, 8]
    with pytest.raises(Spent):
        study.propose()
    trials = study.trials()
    ran = [t for t in trials if t.user_attrs.get("trial_status") == "completed"]
    assert [(t.params["lora_r"], t.user_attrs.get("point_to_evaluate")) for t in ran] == [(4, 0), (4, 1), (8, None)]
    assert not any(t.user_attrs.get("trial_status") == "duplicate" for t in trials if "point_to_evaluate" in t.user_attrs)


def test_twin_of_ignores_what_never_ran(tmp_path: Path) -> None:
    import optuna

    study = study_of(tmp_path, TWO_POINTS.replace("ALGO", "random")).optuna()
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

    from sweep.engine.study import close_duplicate

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
