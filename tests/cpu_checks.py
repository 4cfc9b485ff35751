"""What every run directory holds about CPU time and the machine's load (checked by the tests
of each kind of run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_quant.runtime.metrics import EVAL_PHASE, PHASES, read_metrics, read_summary

# a phase's thread CPU time cannot exceed its wall time; the two clocks are read one after the
# other, so a few microseconds per reading are allowed
READING = 1e-3


def check_cpu_records(run: Path | str, cpu_le_wall: bool = True) -> None:
    """Every line with a ``time`` has a ``cpu`` with the same phases, non-negative; the summary
    holds their sums; config.json and the summary name the cores and the load average.
    ``cpu_le_wall``: each measured phase (not ``communicate``, a remainder) has cpu <= wall."""
    lines = [r for r in read_metrics(run) if "time" in r]
    assert any(r["kind"] == "step" for r in lines)
    sums = {p: 0.0 for p in (*PHASES, EVAL_PHASE)}
    walls = dict(sums)
    for r in lines:
        assert set(r["cpu"]) == set(r["time"]), r
        assert set(r["time"]) == (set(PHASES) if r["kind"] == "step" else {EVAL_PHASE})
        for phase, seconds in r["cpu"].items():
            assert seconds >= 0.0, (phase, r)
            sums[phase] += seconds
            walls[phase] += r["time"][phase]
            if cpu_le_wall and phase != "communicate":
                assert seconds <= r["time"][phase] + READING, (phase, r)
    assert any(r["kind"] == "eval" for r in lines)
    summary = read_summary(run)
    assert summary["cpu_seconds"] == pytest.approx(sums, rel=1e-9, abs=1e-12)
    assert summary["time_seconds"] == pytest.approx(walls, rel=1e-9, abs=1e-12)
    machine = json.loads((Path(run) / "config.json").read_text())["machine"]
    for where in (summary, machine):
        assert len(where["load_start"]) == 3 and len(where["load_end"]) == 3
        assert all(v >= 0 for v in where["load_start"] + where["load_end"])
        assert where["cores"]["logical"] >= 1
        assert 1 <= where["cores"]["affinity"] <= where["cores"]["logical"]
        assert where["cores"]["quota"] is None or where["cores"]["quota"] > 0
