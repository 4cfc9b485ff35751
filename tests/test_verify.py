"""The ``verify`` command: every claim listed and passing, JSON output, failures reported."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

from dist_quant.verify import command
from dist_quant.verify.command import verify
from dist_quant.verify.report import (
    CLAIM_IDS,
    Context,
    Row,
    at_least,
    at_most,
    equal,
    format_table,
    within,
    z_bound,
)

torch.set_num_threads(1)


def test_verify_exits_0_and_lists_every_claim():
    result = CliRunner().invoke(verify, [])
    assert result.exit_code == 0, result.output
    listed = {line.split()[0] for line in result.output.splitlines()
              if line[:1].isdigit() and line.split()[-1] in ("ok", "FAIL")}
    assert listed == set(CLAIM_IDS)
    assert "FAIL" not in result.output
    assert "He 2/n" in result.output and "layer" in result.output  # the 1d per-layer table
    depth_rows = [line.split() for line in result.output.splitlines()]
    layers = [int(r[0]) for r in depth_rows if len(r) == 4 and r[0].isdigit()]
    assert layers == list(range(1, len(layers) + 1)) and len(layers) >= 30


def test_json_output_parses():
    result = CliRunner().invoke(verify, ["--json", "--only", "1c,4i,5b"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["passed"] is True and out["seed"] == 0
    assert {r["claim"] for r in out["rows"]} == {"1c", "4i", "5b"}
    assert all(set(r) >= {"claim", "statement", "predicted", "measured", "tolerance", "passed"}
               for r in out["rows"])


def test_unknown_only_prefix_is_refused():
    result = CliRunner().invoke(verify, ["--only", "9z"])
    assert result.exit_code == 2 and "--only" in result.output


def test_every_claim_id_has_a_check():
    assert {command.claim_id(c) for c in command.ALL_CLAIMS} == set(CLAIM_IDS)


def test_row_builders_fail_outside_tolerance():
    assert within("4a", "s", 1.0, 1.05, 0.1).passed
    assert not within("4a", "s", 1.0, 1.2, 0.1).passed
    assert not within("4a", "s", 0.0, math.nan, 1.0).passed
    assert at_most("4a", "s", "p", 3.0, 5.0).passed and not at_most("4a", "s", "p", 6.0, 5.0).passed
    assert at_least("5d", "s", "p", 1e-3, 1e-6).passed
    assert not at_least("5d", "s", "p", 1e-12, 1e-6).passed
    assert equal("4i", "s", 986, 986).passed and not equal("4i", "s", 986, 987).passed
    table = format_table([within("4a", "s", 1.0, 1.2, 0.1)])
    assert table.splitlines()[-1].split()[-1] == "FAIL"


def test_z_bound_is_the_bonferroni_quantile():
    # P(max of n |N(0,1)| > z) ~ n erfc(z / sqrt 2) = 1e-6
    for n in (1, 1000, 10_000):
        z = z_bound(n)
        assert n * math.erfc(z / math.sqrt(2)) <= 1e-6 < n * math.erfc((z - 0.02) / math.sqrt(2))


def broken_check(ctx: Context) -> list[Row]:
    """A check whose measurement is outside its tolerance."""
    return [within("4c", "deliberately broken", 149.6, 160.0, 0.1)]


def raising_check(ctx: Context) -> list[Row]:
    raise RuntimeError("boom")


def test_a_failing_or_raising_check_makes_verify_exit_1(monkeypatch):
    monkeypatch.setattr(command, "ALL_CLAIMS", [broken_check, raising_check])
    result = CliRunner().invoke(verify, [])
    assert result.exit_code == 1
    assert result.output.count("FAIL") == 2 and "raised RuntimeError: boom" in result.output
    result = CliRunner().invoke(verify, ["--json"])
    assert result.exit_code == 1 and json.loads(result.output)["passed"] is False


@pytest.mark.parametrize("check", [broken_check])
def test_run_claims_keeps_going_after_a_failure(check, monkeypatch):
    monkeypatch.setattr(command, "ALL_CLAIMS", [check, raising_check, command.ALL_CLAIMS[0]])
    rows = command.run_claims(Context())
    assert [r.passed for r in rows][:2] == [False, False] and all(r.passed for r in rows[2:])
