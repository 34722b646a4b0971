"""The command line: validate output, exit codes, and that bad input starts nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import MINIMAL, ROOT, write_space


def sweep(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "sweep", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_validate_prints_the_resolved_config_and_space_size(tmp_path: Path) -> None:
    result = sweep("validate", str(ROOT / "search_spaces" / "demo.yaml"), "search.num_trials=3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "learning_rate: loguniform [1e-05, 0.02]" in result.stdout
    assert "# space: 2 x 4 x 3 x 3 x 3 = 216 discrete combinations x 2 continuous dimensions" in result.stdout
    assert "# 3 trials of 60 steps" in result.stdout
    assert not (tmp_path / "sweeps").exists()


def test_bad_file_exits_2_with_every_problem_and_starts_nothing(tmp_path: Path) -> None:
    space = write_space(tmp_path, MINIMAL.replace("num_trials: 2", "num_trials: zero") + "extra: 1\n")
    for command in ("validate", "run"):
        started = time.monotonic()
        result = sweep(command, str(space), cwd=tmp_path)
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        assert "2 problems" in result.stderr
        assert "search.num_trials: Input should be a valid integer" in result.stderr
        assert "extra: unknown key" in result.stderr
        assert result.stdout == ""  # no Ray, no tokenizer, no MLflow: nothing was started
        assert time.monotonic() - started < 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]


def test_bad_data_exits_2_naming_file_and_line_before_anything_starts(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"question": "?"}) + "\n")
    space = write_space(tmp_path, MINIMAL.replace("DEMO/train.jsonl", "rows.jsonl").replace("DEMO/eval.jsonl", "rows.jsonl") + "tracking: {results_dir: out}\n")
    result = sweep("run", str(space), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"{rows} line 2: expected {{'messages': [...]}} or {{'prompt': ..., 'completion': ...}}; got keys ['question']" in result.stderr
    assert "Traceback" not in result.stderr and "ray:" not in result.stdout
    assert not (tmp_path / "out").exists() or not [p for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")]


def test_unknown_lora_targets_are_caught_before_trials_start(tmp_path: Path) -> None:
    space = write_space(tmp_path, MINIMAL.replace("  lora_r: [4, 8]\n", "  target_modules: [attention, [q_proj, qkv_proj]]\n") + "tracking: {results_dir: out}\n")
    result = sweep("run", str(space), cwd=tmp_path)
    assert result.returncode == 2
    assert "space.target_modules: target_modules [q_proj, qkv_proj]: no linear layer named qkv_proj in tiny-gemma3's language model" in result.stderr
    assert "ray:" not in result.stdout


def test_bytes_that_are_not_utf8_exit_2_naming_file_and_line(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(json.dumps({"prompt": "a", "completion": "b"}).encode() + b'\n{"prompt": "caf\xe9", "completion": "b"}\n')
    space = write_space(tmp_path, MINIMAL.replace("DEMO/train.jsonl", "rows.jsonl").replace("DEMO/eval.jsonl", "rows.jsonl") + "tracking: {results_dir: out}\n")
    result = sweep("run", str(space), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"{rows} line 2: byte 0xe9 at column 16 is not UTF-8; data files must be UTF-8 text" in result.stderr
    assert "Traceback" not in result.stderr and "ray:" not in result.stdout


def test_unusable_folders_and_an_unreachable_cluster_fail_before_anything_starts(tmp_path: Path) -> None:
    """Root-proof: a results folder below a regular file cannot be made whatever the permissions."""
    import socket

    (tmp_path / "afile").write_text("x")
    (tmp_path / "taken").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    space = write_space(tmp_path, MINIMAL)
    silent = socket.socket()  # accepts (the kernel does), never answers: ray.init waited on it for good
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    cases = {
        ("tracking.results_dir=afile/sweeps",): f"tracking.results_dir: {tmp_path}/afile/sweeps cannot be a folder: {tmp_path}/afile is a file",
        ("--sweep-dir", str(tmp_path / "taken")): f"--sweep-dir {tmp_path}/taken: exists already",
        ("--address", f"127.0.0.1:{port}"): f"--address 127.0.0.1:{port}: cannot reach 127.0.0.1:{port} (Connection refused",
        ("--address", f"127.0.0.1:{silent.getsockname()[1]}"): "accepts connections but gives no reply in Ray's protocol (gRPC)",
        ("--address", "http://127.0.0.1:8265"): "--address http://127.0.0.1:8265: a dashboard URL is for `python -m sweep submit`",
        ("--address", "127.0.0.1"): "--address 127.0.0.1: no port; give 127.0.0.1:PORT",
    }
    for args, message in cases.items():
        started = time.monotonic()
        result = sweep("run", str(space), *args, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr
        assert result.stdout == ""  # no tokenizer, no Ray, no MLflow
        assert time.monotonic() - started < 30
    silent.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "space.yaml", "taken"]


def test_pathological_overrides_exit_2(tmp_path: Path) -> None:
    space = write_space(tmp_path, MINIMAL)
    result = sweep("validate", str(space), "search.num_trials=" + "[" * 50_000, "search.num_trials=" + "9" * 5000, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "2 problems" in result.stderr and "nested too deeply" in result.stderr and "Exceeds the limit (4300 digits)" in result.stderr
