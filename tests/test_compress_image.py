"""The container image runs the compiled kernels: checked statically (no Docker engine here).

The Dockerfile installs a C compiler in the same layer as the system packages, points
DIST_QUANT_CACHE into the image, and compiles the kernels after the package is installed; the
build command itself is run here as the image would run it, into a temporary cache, and the
library it leaves is the one a container then loads without compiling.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dist_quant.compress import fast

DOCKERFILE = Path(__file__).resolve().parent.parent / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_image_installs_a_compiler_and_builds_the_kernels():
    steps = instructions()
    runs = [(i, rest) for i, (word, rest) in enumerate(steps) if word == "RUN"]
    apt = [rest for _, rest in runs if "apt-get install" in rest]
    assert apt and re.search(r"\bgcc\b", apt[0]) and "libc6-dev" in apt[0]
    cache = [(i, rest) for i, (word, rest) in enumerate(steps)
             if word == "ENV" and rest.startswith("DIST_QUANT_CACHE=")]
    assert len(cache) == 1
    install = next(i for i, rest in runs if "pip install" in rest and "-e ." in rest)
    build = [(i, rest) for i, rest in runs if "fast.build" in rest]
    assert len(build) == 1 and build[0][0] > max(install, cache[0][0])
    # the container's environment keeps the cache where the build put it
    assert not any(word == "ENV" and "DIST_QUANT_KERNELS=torch" in rest for word, rest in steps)


def test_image_build_command_leaves_the_library_a_container_loads(tmp_path, monkeypatch):
    if os.environ.get("DIST_QUANT_KERNELS") == "torch":
        pytest.skip("pure-torch path forced")
    _, command = next((w, r) for w, r in instructions() if w == "RUN" and "fast.build" in r)
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-c"]
    env = dict(os.environ, DIST_QUANT_CACHE=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", argv[2]], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    built = [Path(p).name for p in proc.stdout.split()]
    assert len(built) == 1 and built[0].startswith("kernels-native-")
    # a process of the container finds the native library there: no compiler call
    monkeypatch.setenv("DIST_QUANT_CACHE", str(tmp_path))
    monkeypatch.delenv("DIST_QUANT_ISA", raising=False)
    assert fast.build().name == built[0]
