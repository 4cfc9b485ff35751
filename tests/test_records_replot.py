"""Every committed record with runs re-plots as committed: ``dist-quant plot RECORD`` (its
runs read with its ``record.json``) gives the committed ``report.md``'s target, link titles,
panel settings, method names and speed-ups. The report is written into a temporary directory
without drawing the figures (the figures' titles are the same panels)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_quant.plot.report import write_report
from dist_quant.plot.runs import MANIFEST, find_runs, record_target
from dist_quant.plot.series import group_by_cap, panels

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
RECORDS = sorted(p.parent for p in BENCHMARKS.rglob(MANIFEST))


def tables(report: str) -> dict[str, dict[str, tuple[str, str]]]:
    """``{section heading: {method: (W, speed-up vs DDP fp32)}}`` for every table that has a
    speed-up column."""
    out: dict[str, dict[str, tuple[str, str]]] = {}
    for block in report.split("\n## ")[1:]:
        heading, _, body = block.partition("\n")
        lines = [ln for ln in body.splitlines() if ln.startswith("|")]
        if not lines:
            continue
        header = [c.strip() for c in lines[0].strip("|").split("|")]
        if "speed-up vs DDP fp32" not in header:
            continue
        w, speed = header.index("W"), header.index("speed-up vs DDP fp32")
        rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
        out[heading.strip()] = {r[0]: (r[w], r[speed]) for r in rows}
    return out


def target_line(report: str) -> str:
    return next(ln for ln in report.splitlines() if ln.startswith("Target test accuracy"))


def test_every_record_with_runs_has_a_manifest_and_a_report():
    with_runs = {p.parent.parent for p in BENCHMARKS.rglob("summary.json")
                 if (p.parent / "metrics.jsonl").is_file()}   # a run, not another summary
    assert with_runs, "no committed runs found"
    assert with_runs <= set(RECORDS), sorted(map(str, with_runs - set(RECORDS)))
    for record in RECORDS:
        assert (record / "report.md").is_file(), record


@pytest.mark.parametrize("record", RECORDS, ids=lambda p: str(p.relative_to(BENCHMARKS)))
def test_a_record_replots_as_committed(record: Path, tmp_path: Path):
    committed = (record / "report.md").read_text()
    target = record_target([record])
    assert target is not None, f"{record / MANIFEST} names no target"
    groups = group_by_cap(find_runs([record]))
    note = "the record's target, from its record.json"
    again = write_report(groups, target, note, [], tmp_path).read_text()

    assert target_line(again) == target_line(committed)
    want, got = tables(committed), tables(again)
    assert want, f"{record}/report.md has no speed-up table"
    assert list(got) == list(want)             # the links, in order
    for heading in want:
        assert list(got[heading]) == list(want[heading]), heading   # the methods, in order
        assert got[heading] == want[heading], heading               # W and speed-ups
    # the figures' panel titles: one per link and W, each link a section of the report
    titles = {p.title for p in panels(groups)}
    for heading, rows in want.items():
        for w, _ in rows.values():
            assert any(t.startswith(f"{heading}; W = {w}") for t in titles), (heading, titles)
