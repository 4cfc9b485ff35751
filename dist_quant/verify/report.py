"""Rows of the ``verify`` report and how they print.

A row is one empirical check of one numbered claim of MATH.md: what the theory predicts, what was
measured, the tolerance, and whether the measurement is within it. The row builders compute
``passed`` from the numbers, so a check cannot pass with a measurement outside its tolerance.
Tolerances are derived from the statistics of the measurement (a number of standard errors of a
Monte Carlo mean or variance) or from float64 rounding for deterministic identities.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

# The numbered claims of MATH.md, in order; `verify` has at least one row for each.
CLAIM_IDS = (
    "1a", "1b", "1c", "1d", "2a", "2b", "2c", "3",
    "4a", "4b", "4c", "4d", "4e", "4f", "4g", "4h", "4i",
    "5a", "5b", "5c", "5d",
)


@dataclass(frozen=True)
class Row:
    claim: str
    statement: str
    predicted: str
    measured: str
    tolerance: str
    passed: bool
    values: dict = field(default_factory=dict)  # the numbers behind the texts, for --json


def _fmt(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _digits(value: float, tolerance: float) -> int:
    """Significant digits that resolve ``tolerance`` at ``value`` (4 at least, 12 at most)."""
    if tolerance <= 0 or value == 0 or not math.isfinite(value):
        return 4
    return max(4, min(12, math.ceil(math.log10(abs(value) / tolerance)) + 1))


def within(claim: str, statement: str, predicted: float, measured: float, tolerance: float,
           unit: str = "") -> Row:
    """Passes when ``|measured - predicted| <= tolerance`` (and the measurement is finite)."""
    passed = math.isfinite(measured) and abs(measured - predicted) <= tolerance
    digits = _digits(max(abs(predicted), abs(measured)), tolerance)
    return Row(claim, statement, _fmt(predicted, digits) + unit, _fmt(measured, digits) + unit,
               "+-" + _fmt(tolerance) + unit, bool(passed),
               {"predicted": predicted, "measured": measured, "tolerance": tolerance})


def at_most(claim: str, statement: str, predicted: str, measured: float, bound: float) -> Row:
    """Passes when ``measured <= bound``; ``predicted`` says in words what theory gives."""
    passed = math.isfinite(measured) and measured <= bound
    return Row(claim, statement, predicted, _fmt(measured), "<= " + _fmt(bound), bool(passed),
               {"measured": measured, "bound": bound})


def at_least(claim: str, statement: str, predicted: str, measured: float, bound: float) -> Row:
    """Passes when ``measured >= bound`` (an effect that theory says must be visible)."""
    passed = math.isfinite(measured) and measured >= bound
    return Row(claim, statement, predicted, _fmt(measured), ">= " + _fmt(bound), bool(passed),
               {"measured": measured, "bound": bound})


def equal(claim: str, statement: str, predicted, measured) -> Row:
    """Passes when the two are equal (exact counts, identities of objects)."""
    return Row(claim, statement, _fmt(predicted), _fmt(measured), "exact",
               bool(predicted == measured), {"predicted": predicted, "measured": measured})


def z_bound(count: int, false_alarm: float = 1e-6) -> float:
    """Bound on the largest |z| of ``count`` independent standard normals, exceeded with
    probability about ``false_alarm`` (two-sided Bonferroni, Gaussian tail)."""
    target = false_alarm / (2 * max(count, 1))
    z = 3.0
    while 0.5 * math.erfc(z / math.sqrt(2)) > target:
        z += 0.01
    return round(z, 2)


@dataclass
class Context:
    """What the checks share: the seed, an owned generator per use, printed details."""

    seed: int = 0
    details: dict[str, str] = field(default_factory=dict)
    data: dict[str, object] = field(default_factory=dict)
    _cache: dict[str, object] = field(default_factory=dict)

    def generator(self, stream: int) -> torch.Generator:
        """A fresh generator for one check: seeded from (seed, stream), never the global one."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + stream)

    def cached(self, key: str, make: Callable[[], object]) -> object:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]


COLUMNS = ("claim", "statement", "predicted", "measured", "tolerance", "ok")
WIDTHS = (5, 44, 16, 16, 14, 4)


def format_table(rows: list[Row]) -> str:
    """A plain-text table; long statements wrap inside their column."""
    def line(cells: list[list[str]]) -> list[str]:
        height = max(len(c) for c in cells)
        out = []
        for i in range(height):
            parts = [(c[i] if i < len(c) else "").ljust(w) for c, w in zip(cells, WIDTHS,
                                                                          strict=True)]
            out.append(" ".join(parts).rstrip())
        return out

    lines = line([[c] for c in COLUMNS])
    lines.append(" ".join("-" * w for w in WIDTHS))
    for r in rows:
        cells = [r.claim, r.statement, r.predicted, r.measured, r.tolerance,
                 "ok" if r.passed else "FAIL"]
        lines += line([textwrap.wrap(c, w) or [""] for c, w in zip(cells, WIDTHS, strict=True)])
    return "\n".join(lines)


def to_json(rows: list[Row], ctx: Context, seconds: float) -> str:
    return json.dumps({
        "passed": all(r.passed for r in rows),
        "seed": ctx.seed,
        "seconds": round(seconds, 3),
        "rows": [asdict(r) for r in rows],
        "data": ctx.data,
    }, indent=1)
