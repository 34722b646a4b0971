"""bench/provenance.py: every raw benchmark result carries where it came from."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from provenance import estimated_vram_gb, provenance, with_provenance  # noqa: E402


def test_provenance_fields() -> None:
    p = provenance()
    for key in ("commit", "date", "command", "device_name", "driver_version", "gpus", "versions", "python"):
        assert key in p, key
    assert p["commit"] != "" and p["date"][:2] == "20"
    for package in ("torch", "transformers", "peft", "bitsandbytes", "ray"):
        assert package in p["versions"]
    assert p["versions"]["torch"]  # installed here
    assert p["command"].split()[0].startswith("python")


def test_with_provenance_wraps_lists_and_refreshes_dicts() -> None:
    assert with_provenance([1, 2])["results"] == [1, 2]
    old = {"provenance": {"commit": "old"}, "grid": 1}
    new = with_provenance(old)
    assert new["grid"] == 1 and new["provenance"]["commit"] == provenance()["commit"]


def test_estimated_vram_is_read_where_the_sweep_logs_it() -> None:
    run = lambda params, metrics: SimpleNamespace(data=SimpleNamespace(params=params, metrics=metrics))  # noqa: E731
    assert estimated_vram_gb(run({"estimated_vram_gb": "12.5"}, {})) == 12.5  # a trial's config: a param
    assert estimated_vram_gb(run({}, {"estimated_vram_gb": 80.0})) == 80.0  # an infeasible trial: a metric
    assert estimated_vram_gb(run({}, {})) is None


def test_every_bench_script_writes_provenance() -> None:
    for name in ("seed_vs_ours", "packing", "multi_gpu", "search_efficiency", "step_profile", "gemma3_policies"):
        text = (ROOT / "bench" / f"{name}.py").read_text()
        assert "with_provenance(" in text, name


def test_every_committed_result_file_carries_its_provenance() -> None:
    """Issue 16: every raw result file names its commit, date, device, driver, versions and command."""
    import json

    files = sorted((ROOT / "bench").glob("results-*.json"))
    assert files
    for path in files:
        data = json.loads(path.read_text())
        assert isinstance(data, dict) and "provenance" in data, path.name
        p = data["provenance"]
        for key in ("commit", "date", "command", "versions"):
            assert p.get(key), (path.name, key)
        if "h200" in path.name:
            assert p.get("driver_version") and (p.get("gpus") or p.get("device_name")), path.name
