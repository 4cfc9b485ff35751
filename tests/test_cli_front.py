"""What a user meets first at the command line: bad options refused before torch is imported,
``--help`` grouped under headings, without the testing aids (which stay accepted), and output
that reads the same for every method (summary line, progress bar, refusals).

The refusal's time is measured by ``benchmarks/cli_refusal.py`` (a benchmark, not a timed
test): here only that nothing heavy is imported before the options are checked.
"""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys

import pytest
from click.testing import CliRunner

from dist_quant.cluster.check import main as check_main
from dist_quant.cluster.command import cluster
from dist_quant.config import GROUPS, LINKS, RUNTIME, TESTING, TrainConfig
from dist_quant.runtime.progress import Progress, summary_line
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


# ---- one voice in the output ---------------------------------------------------------------
SUMMARY = {"test_accuracy": 0.724, "bytes_up": 710_000, "bytes_down": 89_900_000,
           "fp32_bytes_up": 21_700_000, "fp32_bytes_down": 89_900_000, "steps": 600,
           "workers": 4, "params": 47242, "wall_seconds": 12.3}


@pytest.mark.parametrize("fields, name", [
    ({"method": "ps", "compressor": "onebit", "downlink": "none"}, "ps onebit"),
    ({"method": "ps", "compressor": "sign", "downlink": "kbit"}, "ps sign, downlink kbit"),
    ({"method": "ps", "compressor": "none", "downlink": "none"}, "ps fp32"),
    ({"method": "ddp", "compressor": "none", "ddp_hook": "none"}, "ddp fp32"),
    ({"method": "ddp", "compressor": "powersgd", "ddp_hook": "powersgd"}, "ddp powersgd"),
    ({"method": "ddp", "compressor": "onebit", "ddp_hook": "onebit"}, "ddp onebit"),
])
def test_summary_lines_name_the_method_the_same_way(fields, name):
    line = summary_line({**SUMMARY, **fields})
    assert line.startswith(f"{name}: test accuracy 72.4% | up 0.71 MB, down 89.90 MB | ")


def test_progress_names_the_train_loss_and_shows_elapsed_and_eta():
    stream = io.StringIO()
    bar = Progress(100, stream=stream)
    bar.started -= 10.0   # ten seconds in, a quarter done: thirty to go
    for step in range(1, 26):
        bar.update(step, 1.25, 0.5 if step == 25 else float("nan"), 1000, 2000)
    line = stream.getvalue().splitlines()[-1]
    assert "train loss 1.250" in line and "test acc 50.0%" in line
    assert line.endswith("0:10, ETA 0:30"), line


def test_ddp_with_a_compressor_is_offered_every_hook(tmp_path):
    result = CliRunner().invoke(train_command, ["--method", "ddp", "--compressor", "onebit",
                                                "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "--ddp-hook fp16|powersgd" in result.output
    assert "--ddp-hook onebit --compressor onebit" in result.output
