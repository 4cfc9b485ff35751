"""A rank arms a parent-death signal at start (dist_quant.runner.launcher.die_with_parent)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

CHILD = ("from dist_quant.runner.launcher import die_with_parent; die_with_parent(); "
         "print('alive', flush=True)")


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0
                    or shutil.which("unshare") is None,
                    reason="a new pid namespace needs Linux, root and unshare")
def test_a_rank_whose_launcher_is_pid_1_runs():
    """In a container torchrun is pid 1 of its namespace: its ranks must not take that for
    a launcher that is gone (they used to leave at once with status 1 and no word)."""
    launcher = ("import subprocess, sys; "
                f"sys.exit(subprocess.call([sys.executable, '-c', {CHILD!r}]))")
    res = subprocess.run(["unshare", "--pid", "--fork", sys.executable, "-c", launcher],
                         capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stdout.strip()) == (0, "alive"), res.stderr


def test_a_rank_of_a_live_launcher_runs():
    res = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         timeout=60)
    assert (res.returncode, res.stdout.strip()) == (0, "alive"), res.stderr
