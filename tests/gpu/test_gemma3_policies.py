"""Real-size Gemma 3 1B (random weights, real architecture) on a CUDA GPU: the three embedding
policies train, and new_tokens costs far less memory than full. The full 1B/4B/12B table comes from
bench/gemma3_policies.py and is recorded in bench/BENCH.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.gpu


def test_gemma3_1b_policies(tmp_path: Path) -> None:
    out = tmp_path / "1b.json"
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gemma3_policies.py"), "--sizes", "1b", "--steps", "3", "--accum", "2",
         "--workdir", str(tmp_path / "work"), "--out", str(out)],  # fmt: skip
        check=True,
        timeout=900,
    )
    written = json.loads(out.read_text())
    assert written["provenance"]["device_name"], written["provenance"]  # every result file says where it ran
    rows = {r["policy"]: r for r in written["results"]}
    assert {r["trial_status"] for r in rows.values()} == {"completed"}, rows
    assert rows["frozen"]["trainable_params"] < rows["new_tokens"]["trainable_params"] < rows["full"]["trainable_params"]
    assert rows["full"]["trainable_params"] - rows["frozen"]["trainable_params"] == 262144 * 1152
    assert rows["new_tokens"]["peak_vram_gb"] < 0.9 * rows["full"]["peak_vram_gb"]
    assert rows["full"]["model_class"] == "Gemma3ForCausalLM"
