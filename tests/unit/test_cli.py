"""The command line: validate output, exit codes, and that bad input starts nothing."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.conftest import MINIMAL, ROOT, write_space


def sweep(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**(os.environ if env is None else env), "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "sweep", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once closed


def hub_env(tmp_path: Path, endpoint: str, offline: bool = False) -> dict[str, str]:
    """The hub at `endpoint` and an HF cache of this test's own (empty unless the test fills it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN")}
    return {**env, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": endpoint, **({"HF_HUB_OFFLINE": "1"} if offline else {})}


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
    (tmp_path / "afile").write_text("x")
    (tmp_path / "taken").mkdir()
    port = closed_port()
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


GEMMA = ROOT / "search_spaces" / "gemma3-1b-lora.yaml"  # names google/gemma-3-1b-pt (and -it's chat template)


def test_validate_without_the_hub_checks_the_space_alone_and_says_what_was_deferred(tmp_path: Path) -> None:
    """Unreachable (refused at once) or HF_HUB_OFFLINE, the model not cached: validate checks the
    space, exits 0 and names what waits for the model's files; run cannot go on without them. No
    wait through the hub client's retries (about 23 s per file)."""
    endpoint = f"http://127.0.0.1:{closed_port()}"
    for env, reason in ((hub_env(tmp_path, endpoint), f"{endpoint} unreachable ("), (hub_env(tmp_path, endpoint, offline=True), "HF_HUB_OFFLINE is set")):
        started = time.monotonic()
        result = sweep("validate", str(GEMMA), cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr
        (line,) = [x for x in result.stdout.splitlines() if x.startswith("# deferred:")]
        assert line.startswith(f"# deferred: the tokenizer, target_modules, data checks of google/gemma-3-1b-pt ({reason}")
        assert "not in the HF cache" in line and "run validate where huggingface.co" in line and "HF_HUB_OFFLINE=1" in line
        assert result.stdout.rstrip().endswith("is valid (the space alone: checks deferred, above)")
        assert "# space: 4 x 3 x 2 x 4 = 96 discrete combinations" in result.stdout  # the space itself was checked
        as_json = json.loads(sweep("validate", "--json", str(GEMMA), cwd=tmp_path, env=env).stdout)
        assert as_json["valid"] is True and as_json["notes"] == []
        (deferred,) = as_json["deferred"]
        assert deferred["checks"] == ["tokenizer", "target_modules", "data"] and deferred["model"] == "google/gemma-3-1b-pt"
        assert deferred["reason"].startswith(reason)
        run = sweep("run", str(GEMMA), "tracking.results_dir=out", cwd=tmp_path, env=env)
        assert run.returncode == 2, run.stderr
        assert f"model: cannot load the tokenizer of google/gemma-3-1b-pt: {reason}" in run.stderr and "Traceback" not in run.stderr
        assert time.monotonic() - started < 60  # three commands
    assert not (tmp_path / "out").exists()
    # the space is still checked: a bad one is invalid, deferred checks or not
    result = sweep("validate", str(GEMMA), "search.num_trials=zero", cwd=tmp_path, env=hub_env(tmp_path, endpoint))
    assert result.returncode == 2 and "search.num_trials" in result.stderr and result.stdout == ""


def test_a_hub_dataset_without_the_hub_defers_the_data_check_and_stops_the_run(tmp_path: Path) -> None:
    """data.train a hub dataset, the hub unreachable (refused at once), the dataset not cached: the
    one quick look at the hub covers datasets too; validate checks everything else (the tiny model's
    tokenizer and targets), defers the data check and exits 0; run exits 2 naming the dataset. No
    wait through the hub client's retries (five, ~28 s, before)."""
    space = write_space(tmp_path, MINIMAL.replace("train: DEMO/train.jsonl, eval: DEMO/eval.jsonl", "train: acme/chat"))
    env = hub_env(tmp_path, f"http://127.0.0.1:{closed_port()}")
    started = time.monotonic()
    result = sweep("validate", str(space), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("# deferred:")]
    assert line.startswith("# deferred: the data checks of acme/chat (http://127.0.0.1:") and "and not in the HF cache" in line
    assert "with the dataset in the HF cache (HF_HOME) and HF_HUB_OFFLINE=1, or point data.train / data.eval at local files" in line
    assert result.stdout.rstrip().endswith("is valid (the data check deferred, above)")
    (deferred,) = json.loads(sweep("validate", "--json", str(space), cwd=tmp_path, env=env).stdout)["deferred"]
    assert deferred["checks"] == ["data"] and deferred["dataset"] == "acme/chat" and "model" not in deferred
    run = sweep("run", str(space), "tracking.results_dir=out", cwd=tmp_path, env=env)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "data: cannot load the hub dataset acme/chat: http://127.0.0.1:" in run.stderr and "and not in the HF cache" in run.stderr
    assert time.monotonic() - started < 60  # three commands
    # a bad model beside it is still found: the model's checks ran
    broken = write_space(tmp_path, MINIMAL.replace("train: DEMO/train.jsonl, eval: DEMO/eval.jsonl", "train: acme/chat").replace("tiny-gemma3", "./no-such-model"))
    result = sweep("validate", str(broken), cwd=tmp_path, env=env)
    assert result.returncode == 2 and "model.id: './no-such-model' not found" in result.stderr


def test_local_models_that_are_missing_or_broken_are_invalid_without_the_hub_too(tmp_path: Path) -> None:
    env = hub_env(tmp_path, f"http://127.0.0.1:{closed_port()}", offline=True)
    (tmp_path / "empty-model").mkdir()
    for model, message in (("./no-such-model", "model.id: './no-such-model' not found"),
                           ("./empty-model", f"model: cannot load the tokenizer of {tmp_path}/empty-model")):  # fmt: skip
        space = write_space(tmp_path, MINIMAL.replace("tiny-gemma3", model))
        result = sweep("validate", str(space), cwd=tmp_path, env=env)
        assert result.returncode == 2, result.stdout
        assert message in result.stderr and "deferred" not in result.stdout + result.stderr


def test_hub_that_answers_no_such_repo_or_gated_is_invalid_not_deferred(tmp_path: Path) -> None:
    """A hub that answers (a stand-in on loopback): its refusal is the user's problem to fix, at once."""
    class Hub(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            gated = "gated-model" in self.path
            self.send_response(401 if gated else 404)
            self.send_header("X-Error-Code", "GatedRepo" if gated else "RepoNotFound")
            self.send_header("X-Error-Message", "Access to this model is restricted" if gated else "Repository not found")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = hub_env(tmp_path, f"http://127.0.0.1:{server.server_address[1]}")
        for model, answer in (("acme/no-such-model", "acme/no-such-model is not a local folder and is not a valid model identifier"), ("acme/gated-model", "You are trying to access a gated repo")):
            space = write_space(tmp_path, MINIMAL.replace("tiny-gemma3", model))
            started = time.monotonic()
            result = sweep("validate", str(space), cwd=tmp_path, env=env)
            assert result.returncode == 2, result.stdout
            assert f"model: cannot load the tokenizer of {model}: {answer}" in result.stderr
            assert "deferred" not in result.stdout + result.stderr
            assert time.monotonic() - started < 30
    finally:
        server.shutdown()


def test_a_cached_model_is_checked_in_full_without_the_hub(tmp_path: Path) -> None:
    """The hub unreachable, the model in the HF cache: the full check, from the cache, at once."""
    from trainable.tiny import ensure_tiny

    snapshot = tmp_path / "hf" / "hub" / "models--acme--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(ensure_tiny("tiny-gemma3"), snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    space = write_space(tmp_path, MINIMAL.replace("tiny-gemma3", "acme/tiny"))
    started = time.monotonic()
    result = sweep("validate", str(space), cwd=tmp_path, env=hub_env(tmp_path, f"http://127.0.0.1:{closed_port()}"))
    assert result.returncode == 0, result.stderr
    assert "deferred" not in result.stdout and result.stdout.rstrip().endswith("space.yaml is valid")
    assert time.monotonic() - started < 30
    # and a run trains it: its workers load from the cache too, told so (HF_HUB_OFFLINE), not
    # through the hub client's retries (~23 s a file: from_pretrained took 48 s before)
    run = sweep("run", str(space), "tracking.results_dir=out", "search.num_trials=1", cwd=tmp_path, env=hub_env(tmp_path, f"http://127.0.0.1:{closed_port()}"))
    assert run.returncode == 0, run.stderr
    assert "hub unreachable (http://127.0.0.1:" in run.stdout and "this run and its workers read the hub's files from the HF cache only (HF_HUB_OFFLINE=1)" in run.stdout
    (loaded,) = re.findall(r"from_pretrained ([0-9.]+)s", run.stdout)
    assert float(loaded) < 20 and "1 completed" in run.stdout, run.stdout


def cache_hub_dataset(hf_home: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Put a hub dataset into the HF datasets cache as an earlier online `load_dataset(repo_id)`
    leaves it (HF_HOME/datasets/<namespace>___<name>/default/0.0.0/<hash>/<name>-<split>.arrow and
    its dataset_info.json), built here from local json lines: no hub is reachable in tests."""
    from datasets.packaged_modules.json.json import Json

    namespace, name = repo_id.split("/")
    cache = hf_home / "datasets"
    builder = Json(cache_dir=str(cache), dataset_name=f"{namespace}___{name}", data_files={s: str(p) for s, p in files.items()}, hash="0" * 16)
    builder.download_and_prepare()
    built = Path(builder.cache_dir)  # .../<namespace>___<name>/default-<data files' hash>/0.0.0/<hash>
    final = cache / f"{namespace}___{name}" / "default" / built.parent.name / built.name
    final.parent.mkdir(parents=True)
    built.rename(final)
    for split in files:  # a hub load names the files after the dataset, not namespace___name
        (final / f"{namespace}___{name}-{split}.arrow").rename(final / f"{name}-{split}.arrow")
    shutil.rmtree(built.parent.parent)
    return final


def test_a_cached_hub_dataset_is_checked_in_full_and_trains_without_the_hub(tmp_path: Path) -> None:
    """data.train / data.eval hub datasets, the hub unreachable, both splits in the HF cache: the
    data check runs on the cached rows (not deferred) and a run trains on them."""
    from tests.conftest import DEMO_DATA

    cache_hub_dataset(tmp_path / "hf", "acme/chat", {"train": DEMO_DATA / "train.jsonl", "eval": DEMO_DATA / "eval.jsonl"})
    rows = {s: sum(1 for line in (DEMO_DATA / f"{s}.jsonl").read_text().splitlines() if line.strip()) for s in ("train", "eval")}
    space = write_space(tmp_path, MINIMAL.replace("train: DEMO/train.jsonl, eval: DEMO/eval.jsonl", "train: acme/chat, eval: acme/chat, eval_split: eval"))
    env = hub_env(tmp_path, f"http://127.0.0.1:{closed_port()}")
    started = time.monotonic()
    result = sweep("validate", str(space), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "deferred" not in result.stdout and result.stdout.rstrip().endswith("space.yaml is valid"), result.stdout
    assert time.monotonic() - started < 30
    run = sweep("run", str(space), "tracking.results_dir=out", "search.num_trials=1", cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    assert "this run and its workers read the hub's files from the HF cache only (HF_HUB_OFFLINE=1)" in run.stdout
    assert f"tokenizing {rows['train']} train and {rows['eval']} eval examples" in run.stdout  # both splits, from the cache
    assert "1 completed" in run.stdout, run.stdout
