"""bench/hf_serial.py and bench/packing.py's hf mode (issue 30) on the CPU: the same configurations one
at a time with HF Trainer + PEFT, on the rows our pipeline prepared, tokens counted."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

CONFIGS = [
    {"lora_r": 4, "lora_alpha_ratio": 2, "target_modules": "attention", "learning_rate": 5e-4, "batch": [1, 2]},
    {"lora_r": 8, "lora_alpha_ratio": 1, "target_modules": "all-linear", "learning_rate": 1e-4, "batch": [2, 1]},
]


def expected_tokens(data_dir: str, rows: int) -> int:
    """Tokens of the first `rows` rows in our trainer's order: what a trial that trained them counted."""
    from trainable.data import load_split, row_order

    ds = load_split(data_dir, "train")
    order = row_order(len(ds), 0, 0)
    return sum(len(ds[next(order)]["input_ids"]) for _ in range(rows))


def test_run_trials_trains_each_configuration_on_our_rows_and_counts_its_tokens(tmp_path: Path) -> None:
    import hf_serial
    from sweepbench import config_key, point_key

    from trainable.model import resolve_model_path

    model = resolve_model_path("tiny-gemma3")
    data_dir, stats = hf_serial.prepare_demo(model, 128, tmp_path / "cache")
    seen: list[int] = []
    records = hf_serial.run_trials(model, data_dir, CONFIGS, steps=2, seq=128, on_trial=lambda rs: seen.append(len(rs)))
    assert seen == [1, 2]
    assert [r["status"] for r in records] == ["completed", "completed"], records
    for config, r in zip(CONFIGS, records):
        assert r["config"] == point_key(config) == config_key(r)  # compare_losses matches it to the sweep's trial
        assert r["steps"] == 2 and r["micro_batches"] == 2 * config["batch"][1]  # the look-ahead batch is not counted
        assert r["tokens"] == expected_tokens(data_dir, 2 * config["batch"][0] * config["batch"][1])
        assert 0 < r["loss_tokens"] < r["tokens"]  # only reply tokens carry loss
        assert math.isfinite(r["eval_loss"]) and math.isfinite(r["train_loss"])
        assert r["liger"] is False and r["optim"] == "adamw_torch" and r["lora_dropout"] == 0.05  # CPU: no liger; the train section's dropout
        assert r["wall_seconds"] >= r["load_seconds"] + r["train_seconds"] + r["eval_seconds"] - 0.01
    late = hf_serial.run_trials(model, data_dir, CONFIGS[:1], steps=2, seq=128, deadline=time.time())
    assert late[0]["status"] == "not_started" and "tokens" not in late[0]


def test_packing_hf_mode_records_a_makespan_and_the_trials(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "packing.py"), "--dry-run", "--modes", "hf", "--trials", "2", "--steps", "2",
                    "--workdir", str(tmp_path / "work"), "--out", str(out)], check=True, timeout=300, capture_output=True, text=True)  # fmt: skip
    written = json.loads(out.read_text())
    hf = written["modes"]["hf"]
    assert hf["returncode"] == 0 and hf["by_status"] == {"completed": 2}, hf["driver_log_tail"]
    assert 0 < hf["makespan"]["seconds"] <= hf["wall_seconds"] and hf["makespan"]["completed"] == 2
    assert hf["versions"]["transformers"] and hf["versions"]["peft"]
    assert hf["workers"]["tokens"] == sum(r["tokens"] for r in hf["trials"]) > 0 and hf["workers"]["tokens_exact"]
    assert {r["config"] for r in hf["trials"]} == {__import__("sweepbench").point_key(c) for c in written["configs"]}
    assert written["summary"]["makespan_default_vs_hf"] is None  # no default mode in this call: no ratio


def test_a_trial_out_of_memory_is_retried_once_with_checkpointing_and_an_error_is_its_record(monkeypatch) -> None:
    import hf_serial
    import torch

    calls: list[bool] = []

    def fake(model_path, data_dir, config, steps, method, dropout, log_every, checkpointing, liger_from):  # noqa: ANN001, ANN202
        calls.append(checkpointing)
        assert liger_from == 2  # run_trials' setting reaches every trial
        if config["lora_r"] == 8:
            raise ValueError("broken")
        if not checkpointing:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"status": "completed", "gradient_checkpointing": checkpointing}

    monkeypatch.setattr(hf_serial, "run_trial", fake)
    monkeypatch.setattr(hf_serial, "free_memory", lambda: None)
    records = hf_serial.run_trials("m", "d", CONFIGS, steps=2, seq=128, liger_from=2)
    assert calls == [False, True, False]  # the second configuration's error is not retried
    assert records[0]["status"] == "completed" and records[0]["gradient_checkpointing"] and "error" not in records[0]
    assert records[1]["status"] == "error" and "broken" in records[1]["error"] and records[1]["end"] >= records[1]["start"]


def test_liger_runs_from_its_micro_batch_up_and_only_on_cuda() -> None:
    """HF Trainer tuned at its own best switch: liger off below LIGER_FROM (slower there, measured),
    on from it; never without CUDA."""
    from hf_serial import LIGER_FROM, liger_on

    assert [liger_on(m, LIGER_FROM, True) for m in (1, 2, 4, 8, 32)] == [False, False, False, True, True]
    assert all(liger_on(m, 1, True) for m in (1, 2)) and not liger_on(32, 1, False)
