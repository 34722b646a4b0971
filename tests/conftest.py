"""Shared fixtures. The tiny model is built once per test session into a temporary cache."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO_DATA = ROOT / "search_spaces" / "data" / "demo"


@pytest.fixture(scope="session", autouse=True)
def _tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep the tiny model out of ~/.cache; Ray workers inherit the variable from this process."""
    folder = tmp_path_factory.mktemp("lora-sweep-cache")
    os.environ["LORA_SWEEP_CACHE"] = str(folder)
    return folder


def write_space(folder: Path, body: str, name: str = "space.yaml") -> Path:
    """A space file in `folder` whose data paths point at the shipped demo data."""
    path = folder / name
    text = textwrap.dedent(body).replace("DEMO", str(DEMO_DATA))
    path.write_text(text)
    return path


MINIMAL = """\
name: t
model: {id: tiny-gemma3}
data: {train: DEMO/train.jsonl, eval: DEMO/eval.jsonl, max_seq_len: 128}
train: {max_steps: 4, eval_every: 2, log_every: 1}
search: {num_trials: 2}
space:
  lora_r: [4, 8]
"""
