"""What a user meets first at the command line: bad options refused before torch is imported,
and ``--help`` grouped under headings, without the testing aids (which stay accepted).

The refusal's time is measured by ``benchmarks/cli_refusal.py`` (a benchmark, not a timed
test): here only that nothing heavy is imported before the options are checked.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from click.testing import CliRunner

from dist_quant.cluster.check import main as check_main
from dist_quant.cluster.command import cluster
from dist_quant.config import GROUPS, LINKS, RUNTIME, TESTING, TrainConfig
from dist_quant.sweep import expand_grid, parse_axis, sweep
from dist_quant.train import main as train_main
from dist_quant.train import train_command

REFUSE = """
import sys
from dist_quant.train import train_command
try:
    train_command({argv!r}, standalone_mode=False)
except SystemExit as err:   # a refusal: one line on stderr, exit status 2
    print("exit", err.code, file=sys.stderr)
print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))
"""


@pytest.mark.parametrize("argv", [["--workers", "0"], ["--steps", "0"], ["--lr", "-1"],
                                  ["--servers", "2", "--method", "ddp"],
                                  ["--inject-loss", "0:1"], ["--help"]])
def test_bad_options_and_help_import_no_torch(argv):
    out = subprocess.run([sys.executable, "-c", REFUSE.format(argv=argv)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
    if argv != ["--help"]:
        assert "exit 2" in out.stderr and f"Error: {argv[0]}" in out.stderr, out.stderr


def test_package_names_are_imported_on_first_use():
    code = ("import sys, dist_quant\n"
            "assert 'torch' not in sys.modules, 'torch imported by the package itself'\n"
            "from dist_quant import fit, get_compressor, TrainConfig, onebit_hook\n"
            "assert 'torch' in sys.modules and callable(fit)\n"
            "assert set(dir(dist_quant)) >= set(dist_quant.__all__)\n"
            "try:\n"
            "    dist_quant.nope\n"
            "except AttributeError as err:\n"
            "    assert 'nope' in str(err)\n"
            "else:\n"
            "    raise SystemExit('no AttributeError')\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- grouped help --------------------------------------------------------------------------
def headings(text: str) -> list[str]:
    """The section titles of a click help text (unindented lines ending in a colon)."""
    return [line[:-1] for line in text.splitlines()
            if line.endswith(":") and not line.startswith(" ") and not line.startswith("Usage")]


def test_every_field_has_a_group():
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("group") in (*GROUPS, TESTING), f.name
    aids = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata["group"] == TESTING}
    assert aids == {"inject_nonfinite", "inject_loss"}


@pytest.mark.parametrize("command", [train_command, train_main, cluster, check_main])
def test_help_is_grouped_and_shows_no_testing_aid(command):
    result = CliRunner().invoke(command, ["--help"])
    assert result.exit_code == 0, result.output
    shown = headings(result.output)
    expected = [g for g in GROUPS if g != LINKS or command is cluster]
    assert shown[:len(expected)] == expected, shown
    assert shown[len(expected):] in ([], ["Other options"]), shown
    assert "inject" not in result.output.lower() and "testing aid" not in result.output.lower()
    assert "--lr FLOAT" in result.output.split("Optimizer:")[1].split("Compression:")[0]
    assert "--ddp-hook" in result.output.split("DDP:")[1]


def test_sweep_help_lists_the_set_fields_by_the_same_groups():
    text = CliRunner().invoke(sweep, ["--help"]).output
    fields = text.split("Fields of --set")[1]
    assert [line.split()[0] for line in fields.splitlines()[1:] if line[2:3] != " "] == [
        g.split()[0] for g in GROUPS if g != LINKS]
    assert "inject" not in text and "compressor," in fields
    for heading in ("Points:", f"{LINKS}:", f"{RUNTIME}:", "Output:"):
        assert heading in text


def test_testing_aids_are_still_accepted(tmp_path):
    runner = CliRunner()
    for aid in (["--inject-nonfinite", "0:1"], ["--inject-loss", "0:1",
                                                 "--consistency", "async"]):
        result = runner.invoke(train_command, [*aid, "--steps", "0",
                                               "--run-dir", str(tmp_path / "r")])
        assert result.exit_code == 2
        assert "Error: --steps" in result.output, result.output   # the aid itself parsed
    name, values = parse_axis("inject_nonfinite=0:3")   # and as a sweep's --set field
    (point,) = expand_grid(["ps-onebit"], {name: values})
    assert point.cfg.inject_nonfinite == "0:3"
