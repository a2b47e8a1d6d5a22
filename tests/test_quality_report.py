"""The quality benchmark's report: the margin table that the issue's "more than the seed spread" claims rest on."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_bench", QUALITY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(row: str, seed: int, heldout: float, docs: float, ratio: float = 0.2) -> dict:
    return {"row": row, "ratio": ratio, "seed": seed, "steps": 400, "params": 1000,
            "ppl": {"builtin:heldout": heldout, "builtin:heldout-docs": docs}}


def _margin_lines(md: str) -> list[list[str]]:
    body = md.split("| ratio | steps | peer |")[1].splitlines()[2:]
    return [[c.strip() for c in line.strip("|").split("|")] for line in body if line.startswith("|")]


def test_margins_pair_seeds_and_add_the_half_ranges(quality, tmp_path: Path) -> None:
    work = tmp_path / "rows"
    work.mkdir()
    rows = [_row("lorashear", 0, 30.0, 31.0), _row("lorashear", 1, 32.0, 33.0),
            _row("peer_lora", 0, 35.0, 40.0), _row("peer_lora", 1, 36.0, 41.0), _row("peer_lora", 2, 37.0, 42.0),
            # a row with extras is never the one compared
            {**_row("lorashear", 0, 99.0, 99.0), "extra": {"x": 1}}]
    for i, r in enumerate(rows):
        (work / f"r{i}.json").write_text(json.dumps(r))
    out = tmp_path / "report.md"
    quality.write_report(work, out)
    lines = _margin_lines(out.read_text())
    assert len(lines) == 2  # one peer present, two sources
    heldout = next(line for line in lines if line[3] == "builtin:heldout")
    # means 31 and 36; half-ranges 1 and 1; paired on seeds 0 and 1 only
    assert heldout[4] == "0,1 / 0,1,2"
    assert heldout[5] == "+5.00" and heldout[6] == "2.00" and heldout[7] == "2.5x"
    assert heldout[8] == "0: +5.00; 1: +4.00"
    summary = json.loads(out.with_suffix(".json").read_text())
    ours = next(e for e in summary if e["row"] == "lorashear" and not e["extra"])
    assert ours["ppl"]["builtin:heldout"]["by_seed"] == {"0": 30.0, "1": 32.0}


def test_no_margin_table_without_a_peer(quality, tmp_path: Path) -> None:
    work = tmp_path / "rows"
    work.mkdir()
    (work / "a.json").write_text(json.dumps(_row("lorashear", 0, 30.0, 31.0)))
    out = tmp_path / "report.md"
    quality.write_report(work, out)
    assert "Margins" not in out.read_text()
