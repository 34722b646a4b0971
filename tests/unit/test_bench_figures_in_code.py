"""Benchmark figures live in bench/BENCH.md (issue 30): the code's docstrings, comments, messages
and schema descriptions keep the rule and a pointer to a BENCH.md section, not the measured
numbers (which went stale or wrong there while the code kept repeating them)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# a measured throughput, utilisation, speed-up or search-suite count, as the code used to quote them
FIGURE = re.compile(
    r"\d[\d,.]*k? ?tok(ens)?/s\b"  # 16.8k tok/s
    r"|\d+(\.\d+)?% (MFU|faster|slower)"  # 4.7% MFU, 15% faster
    r"|\d+(\.\d+)?x (faster|slower)"  # 1.8x slower
    r"|\d+ of \d+ seeds"  # 59-60 of 60 seeds
)


def figures(text: str) -> list[str]:
    return [m.group(0) for m in FIGURE.finditer(text)]


def test_the_pattern_finds_the_figures_the_code_used_to_quote() -> None:
    quoted = ("16 x 1B members ran at 4.7% MFU", "made 16.8k tok/s", "(~15% faster steps)", "59-60 of 60 seeds", "graphs were 1.8x slower")
    assert all(figures(q) for q in quoted)
    assert not figures("tokens/s: the trial's own; 0.2 = +20% margin; at most 10 start-up trials")


def test_core_and_the_space_files_schema_quote_no_benchmark_figures() -> None:
    found = {}
    for path in sorted((ROOT / "core").glob("*.py")) + sorted((ROOT / "sweep" / "config").glob("*.py")):
        hits = figures(path.read_text())
        if hits:
            found[str(path.relative_to(ROOT))] = hits
    assert not found, f"benchmark figures in code (move them to bench/BENCH.md, keep a pointer): {found}"


def test_the_json_schema_users_see_quotes_no_benchmark_figures() -> None:
    from sweep.config.json_schema import schema_text

    text = schema_text()
    assert "description" in text and not figures(text), figures(text)
