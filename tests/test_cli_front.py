"""What a user meets first at the command line: bad options refused before torch is imported,
and ``--help`` grouped under headings, without the testing aids (which stay accepted).

The refusal's time is measured by ``benchmarks/cli_refusal.py`` (a benchmark, not a timed
test): here only that nothing heavy is imported before the options are checked.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

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
