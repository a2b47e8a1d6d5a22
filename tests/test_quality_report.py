"""The quality benchmark's report: the margin table that the issue's "more than the seed spread" claims rest on."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_bench", QUALITY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _row(row: str, seed: int, heldout: float, docs: float, ratio: float = 0.2) -> dict:
    def ppl(v: float) -> dict:
        return {"ppl": v, "ci": [v - 1, v + 1]}

    # the validation split gets other values: the margins must come from the test split
    return {"row": row, "ratio": ratio, "seed": seed, "steps": 400, "params": 1000, "wall_s": 60.0,
            "compute": {"flops": 2e15},
            "ppl": {"builtin:heldout-test": ppl(heldout), "builtin:heldout-docs-test": ppl(docs),
                    "builtin:heldout-validation": ppl(heldout + 100),
                    "builtin:heldout-docs-validation": ppl(docs + 100)}}


def _margin_lines(md: str) -> list[list[str]]:
    body = md.split("| ratio | steps | peer |")[1].splitlines()[2:]
    return [[c.strip() for c in line.strip("|").split("|")] for line in body if line.startswith("|")]


def test_margins_pair_seeds_and_add_the_half_ranges(quality, tmp_path: Path) -> None:
    work = tmp_path / "rows"
    work.mkdir()
    rows = [_row("lorashear", 0, 30.0, 31.0), _row("lorashear", 1, 32.0, 33.0),
            _row("flap+lora", 0, 35.0, 40.0), _row("flap+lora", 1, 36.0, 41.0), _row("flap+lora", 2, 37.0, 42.0),
            # a one-shot peer (no training) is never compared at equal tokens
            _row("flap", 0, 90.0, 90.0),
            # a row with extras is never the one compared
            {**_row("lorashear", 0, 99.0, 99.0), "extra": {"x": 1}}]
    for i, r in enumerate(rows):
        (work / f"r{i}.json").write_text(json.dumps(r))
    out = tmp_path / "report.md"
    quality.write_report(work, out)
    lines = _margin_lines(out.read_text())
    assert len(lines) == 2  # one peer present, two sources
    heldout = next(line for line in lines if line[3] == "builtin:heldout-test")
    # means 31 and 36; half-ranges 1 and 1; paired on seeds 0 and 1 only
    assert heldout[4] == "0,1 / 0,1,2"
    assert heldout[5] == "+5.00" and heldout[6] == "2.00" and heldout[7] == "2.5x"
    assert heldout[8] == "0: +5.00; 1: +4.00"
    summary = json.loads(out.with_suffix(".json").read_text())
    ours = next(e for e in summary if e["row"] == "lorashear" and not e["extra"])
    assert ours["ppl"]["builtin:heldout-test"]["by_seed"] == {"0": 30.0, "1": 32.0}
    assert ours["ppl"]["builtin:heldout-test"]["ci_by_seed"]["0"] == [29.0, 31.0]
    md = out.read_text()
    assert "30.00 [29.00, 31.00]" in md  # every seed with its interval
    assert "| 2.00 | 1.00 |" in md  # PFLOPs and wall minutes


def test_no_margin_table_without_a_peer(quality, tmp_path: Path) -> None:
    work = tmp_path / "rows"
    work.mkdir()
    (work / "a.json").write_text(json.dumps(_row("lorashear", 0, 30.0, 31.0)))
    out = tmp_path / "report.md"
    quality.write_report(work, out)
    assert "Margins" not in out.read_text()


def test_paired_interval_over_the_same_windows(quality, tmp_path: Path) -> None:
    """With per-window NLLs, each paired seed gets a bootstrap interval of (peer - ours) over the same windows:
    a peer worse on every window has an interval above zero; rows scored on other windows get none."""
    import math

    work = tmp_path / "rows"
    work.mkdir()
    ours_nll = [100.0 + (i % 7) for i in range(32)]

    def with_windows(row: dict, nll: list[float]) -> dict:
        p = row["ppl"]["builtin:heldout-test"]
        p.update(window_nll=nll, tokens=25 * len(nll), windows=len(nll), ppl=math.exp(sum(nll) / (25 * len(nll))))
        return row

    rows = [with_windows(_row("lorashear", 0, 0, 31.0), ours_nll),
            with_windows(_row("flap+lora", 0, 0, 40.0), [x + 1.0 for x in ours_nll])]
    for i, r in enumerate(rows):
        (work / f"r{i}.json").write_text(json.dumps(r))
    out = tmp_path / "report.md"
    quality.write_report(work, out)
    heldout = next(line for line in _margin_lines(out.read_text()) if line[3] == "builtin:heldout-test")
    diff, interval = heldout[8].split(": ")[1].split(" [")
    lo, hi = (float(x) for x in interval.rstrip("]").split(", "))
    assert 0 < lo <= float(diff) <= hi
    docs = next(line for line in _margin_lines(out.read_text()) if line[3] == "builtin:heldout-docs-test")
    assert "[" not in docs[8]
    assert "_windows" not in out.with_suffix(".json").read_text()


def test_variants_compare_on_validation_over_common_seeds(quality, tmp_path: Path) -> None:
    """A recipe variant is set against the recipe on the validation split, over the seeds both rows ran
    (a third seed of the recipe does not move it); peers are not variants."""
    work = tmp_path / "rows"
    work.mkdir()
    rows = [_row("lorashear", 0, 30.0, 31.0), _row("lorashear", 1, 32.0, 33.0), _row("lorashear", 2, 50.0, 50.0),
            _row("lorashear-round32", 0, 30.5, 31.0), _row("lorashear-round32", 1, 32.5, 36.0),
            _row("flap+lora", 0, 35.0, 40.0)]
    for i, r in enumerate(rows):
        (work / f"r{i}.json").write_text(json.dumps(r))
    out = tmp_path / "report.md"
    quality.write_report(work, out)
    body = out.read_text().split("| ratio | steps | variant |")[1].splitlines()[2:]
    lines = [[c.strip() for c in line.strip("|").split("|")] for line in body if line.startswith("|")]
    assert [line[2] for line in lines] == ["lorashear-round32", "lorashear-round32"]
    heldout = next(line for line in lines if line[3] == "builtin:heldout-validation")
    # validation = test + 100: means 131.5 vs 131 over seeds 0,1; half-ranges 1 and 1
    assert heldout[4] == "0,1" and heldout[5] == "131.50" and heldout[6] == "131.00"
    assert heldout[7] == "+0.50" and heldout[8] == "2.00" and heldout[9] == "yes"
    assert heldout[10] == "0: +0.50; 1: +0.50"
    docs = next(line for line in lines if line[3] == "builtin:heldout-docs-validation")
    assert docs[7] == "+1.50" and docs[8] == "3.50" and docs[9] == "yes"  # half-ranges 1 and 2.5


def _variant_tables(quality, rows: list[dict], tmp_path: Path) -> list[str]:
    """The variants tables of the report written from ``rows``."""
    work = tmp_path / "rows"
    work.mkdir()
    for i, r in enumerate(rows):
        (work / f"r{i}.json").write_text(json.dumps(r))
    out = tmp_path / "report.md"
    quality.write_report(work, out)
    return out.read_text().split("| ratio | steps | variant |")[1:]


def _variant_lines(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:] if line.startswith("|")]


def test_a_variant_of_the_1205_recipe_is_set_against_it(quality, tmp_path: Path) -> None:
    """``lorashear-1205-*`` rows are candidates on top of the 2026-12-05 recipe: their table compares them with that
    row (whose own line stays in the table of ``lorashear``'s variants), never with ``lorashear``."""
    head = quality.VARIANT_BASE
    assert f"{head}-kdafter" in quality.LORASHEAR_ROWS
    assert quality.LORASHEAR_ROWS[f"{head}-kdafter"]["lr"] == quality.LORASHEAR_ROWS[head]["lr"]
    rows = [_row("lorashear", 0, 40.0, 41.0), _row(head, 0, 30.0, 31.0), _row(f"{head}-kdafter", 0, 29.0, 33.0)]
    tables = _variant_tables(quality, rows, tmp_path)
    assert len(tables) == 2

    assert {line[2] for line in _variant_lines(tables[0])} == {head}
    kd = _variant_lines(tables[1])
    assert {line[2] for line in kd} == {f"{head}-kdafter"}
    heldout = next(line for line in kd if line[3] == "builtin:heldout-validation")
    assert heldout[5] == "129.00" and heldout[6] == "130.00" and heldout[7] == "-1.00"


def test_a_candidate_on_top_of_the_headline_is_set_against_the_headline(quality, tmp_path: Path) -> None:
    """``lorashear-1205-long-*`` rows change one thing of the headline recipe: their table compares them with the
    headline (whose own line stays in the table of ``lorashear-1205``'s variants)."""
    head, base = quality.HEADLINE, quality.VARIANT_BASE
    full = quality.LORASHEAR_ROWS[f"{head}-fullkd"]
    assert full["post_pruning"] == "full" and full["distill_after_pruning"] == 1.0
    assert {k: v for k, v in full.items() if k not in quality.HEADLINE_CANDIDATES["fullkd"]} == \
        quality.LORASHEAR_ROWS[head]
    rows = [_row(base, 0, 31.0, 32.0), _row(head, 0, 30.0, 31.0), _row(f"{head}-fullkd", 0, 30.5, 29.0)]
    tables = _variant_tables(quality, rows, tmp_path)
    assert len(tables) == 2  # lorashear-1205's variants (the headline), the headline's (no lorashear row here)

    assert {line[2] for line in _variant_lines(tables[0])} == {head}
    cand = _variant_lines(tables[1])
    assert {line[2] for line in cand} == {f"{head}-fullkd"}
    docs = next(line for line in cand if line[3] == "builtin:heldout-docs-validation")
    assert docs[5] == "129.00" and docs[6] == "131.00" and docs[7] == "-2.00"


def test_the_headline_row_is_the_recipe_lorashear_run_ships(quality) -> None:
    """The headline row pins every option of the recipe's defaults: if the recipe changes, the headline must be
    remade (and this test says so) rather than silently report another recipe's rows."""
    from lorashear.recipes import RECIPES

    row = quality.LORASHEAR_ROWS[quality.HEADLINE]
    assert row["recipe"] == "lorashear" and row["knowledge"] == str(quality.KNOWLEDGE_FISHER)
    differing = {k: (row[k], v) for k, v in RECIPES["lorashear"].items() if k in row and row[k] != v}
    assert differing == {}
    assert quality.HEADLINE.startswith(f"{quality.VARIANT_BASE}-")  # chosen against it on validation


def test_compute_matched_peers_get_their_own_margin_table(quality, tmp_path: Path) -> None:
    """A peer row given more steps (its FLOPs matched to ours) is compared in a table of its own, with both rows'
    FLOPs; never in the equal-tokens table."""
    head = quality.HEADLINE
    work = tmp_path / "rows"
    work.mkdir()
    rows = [_row(head, 0, 30.0, 31.0), _row(head, 1, 32.0, 33.0),
            _row("flap+lora_lr8e-4", 0, 35.0, 40.0), _row("flap+lora_lr8e-4", 1, 36.0, 41.0),
            {**_row("flap+lora_lr8e-4", 0, 31.0, 30.0), "steps": 565, "compute": {"flops": 2.5e15}},
            {**_row("flap+lora_lr8e-4", 1, 33.0, 32.0), "steps": 565, "compute": {"flops": 2.5e15}}]
    for i, r in enumerate(rows):
        (work / f"r{i}.json").write_text(json.dumps(r))
    out = tmp_path / "report.md"
    quality.write_report(work, out)
    md = out.read_text()
    equal, matched = md.split(f"Margins of `{head}` on the test split")[1].split("against the peers given more steps")
    equal_lines = [line for line in equal.split("\n\n")[1].splitlines() if line.startswith("| 20%")]
    assert len(equal_lines) == 2 and all("| 400 |" in line for line in equal_lines)
    matched_lines = [[c.strip() for c in line.strip("|").split("|")]
                     for line in matched.split("\n\n")[1].splitlines() if line.startswith("| 20%")]
    assert [line[1] for line in matched_lines] == ["400 / 565 (PF 2.000 / 2.500)"] * 2
    heldout = next(line for line in matched_lines if line[3] == "builtin:heldout-test")
    assert heldout[5] == "+1.00" and heldout[8] == "0: +1.00; 1: +1.00"
    docs = next(line for line in matched_lines if line[3] == "builtin:heldout-docs-test")
    assert docs[5] == "-1.00"  # the matched peer is ahead here: the table says so with a negative margin


def test_the_matrix_counts_the_seeds_run_against_those_asked(quality, tmp_path: Path) -> None:
    """Each asked line counts the seeds of its own row at its own step count (a compute-matched row's seeds are not
    the 400-step row's); rows with extras never count."""
    matrix = (quality.Asked("ours", {0.2: ("lorashear", 400), 0.5: ("lorashear", 400)}, {0.2: 3, 0.5: 2}),
              quality.Asked("peer, matched", {0.2: ("flap+lora", 490), 0.5: ("flap+lora", 600)}, {0.2: 2, 0.5: 2}))
    work = tmp_path / "rows"
    work.mkdir()
    rows = [_row("lorashear", 0, 30.0, 31.0), _row("lorashear", 1, 32.0, 33.0), _row("lorashear", 2, 31.0, 32.0),
            _row("lorashear", 0, 80.0, 81.0, ratio=0.5),
            {**_row("lorashear", 1, 80.0, 81.0, ratio=0.5), "extra": {"x": 1}},
            _row("flap+lora", 0, 35.0, 40.0), {**_row("flap+lora", 0, 34.0, 39.0), "steps": 490}]
    for i, r in enumerate(rows):
        (work / f"r{i}.json").write_text(json.dumps(r))
    md = quality.matrix_table(quality.summarise(work), matrix, "Test matrix")
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
             for line in md.splitlines() if line.startswith("| ours") or line.startswith("| peer")}
    assert lines["ours"][2] == "3 / 3" and lines["ours"][4] == "1 / 2 (missing)"
    assert lines["peer, matched"][1] == "`flap+lora` (490)" and lines["peer, matched"][2] == "1 / 2 (missing)"
    assert lines["peer, matched"][4] == "0 / 2 (missing)"
    assert "Seeds still missing: 4." in md


def test_the_matrices_name_rows_the_benchmark_can_run(quality) -> None:
    """Every row a matrix asks for is one ``quality.py --rows`` accepts (a typo would count as never run)."""
    for matrix in (quality.STRONG_PEERS_MATRIX, quality.COMPACTION_MATRIX):
        for asked in matrix:
            for row, steps in asked.rows.values():
                retrained_peer = quality.is_peer_row(row) and quality.split_row(row)[1] is not None
                assert row in quality.LORASHEAR_ROWS or retrained_peer
                assert steps >= 400
