"""What a test module of this project may not leave behind: processes, network namespaces,
interfaces, containers and docker networks. ``tests/conftest.py`` checks after every module.

Every process the tests start carries ``DIST_QUANT_TEST_SESSION`` in its environment (set
here, inherited), so a process left running is found even after its parent died. Namespaces
(``dq<pid>-<seq>-<host>``) and compose projects (``dq<pid>x<seq>``) are the project's when they
appeared during the module and their pid is this process, one of this session's processes, or
no longer alive (a run killed before its cleanup). The container engine's daemon that
``launch/docker-host.sh up`` starts is meant to stay, and is not counted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

TOKEN_VAR = "DIST_QUANT_TEST_SESSION"
TOKEN = os.environ.setdefault(TOKEN_VAR, uuid.uuid4().hex)
DAEMONS = ("dockerd", "containerd", "docker-host.sh", "containerd-shim", "docker-proxy",
           # multiprocessing's tracker of a spawning test process: it ends with that process
           "multiprocessing.resource_tracker")
NAMESPACE = re.compile(r"^dq(\d+)-")
PROJECT = re.compile(r"^dq(\d+)x\d+$")
SETTLE_S = 5.0   # what was just stopped may take a moment to be reaped


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()
    except OSError:
        return ""


def session_processes() -> dict[int, str]:
    """Live processes of this test session but this one (pid: command line)."""
    me, found = os.getpid(), {}
    marker = f"{TOKEN_VAR}={TOKEN}".encode()
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == me:
            continue
        try:
            if marker not in (entry / "environ").read_bytes():
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        cmd = _cmdline(pid)
        if state == "Z" or any(d in cmd for d in DAEMONS):
            continue
        found[pid] = cmd
    return found


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _ours(pid: int, session: set[int]) -> bool:
    return pid == os.getpid() or pid in session or not _alive(pid)


def _run(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout if out.returncode == 0 else ""


def namespaces() -> set[str]:
    if shutil.which("ip") is None:
        return set()
    text = _run(["ip", "-j", "netns", "list"]).strip()
    return {e["name"] for e in json.loads(text)} if text else set()


def interfaces() -> set[str]:
    """Interfaces of this machine's own namespace named like the project's (``dq*``, ``ifb-dq``,
    the compose network's bridge is docker's: see ``networks``)."""
    return {p.name for p in Path("/sys/class/net").iterdir()
            if p.name.startswith(("dq", "ifb-dq"))} if Path("/sys/class/net").is_dir() else set()


def _docker_projects(kind: str) -> set[str]:
    if shutil.which("docker") is None:
        return set()
    if kind == "containers":
        text = _run(["docker", "ps", "-a", "--format",
                     '{{.Label "com.docker.compose.project"}} {{.Names}}'])
    else:
        text = _run(["docker", "network", "ls", "--format",
                     '{{.Label "com.docker.compose.project"}} {{.Name}}'])
    return {line.strip() for line in text.splitlines()
            if PROJECT.match(line.split(" ", 1)[0])}


def snapshot() -> dict[str, set[str]]:
    return {"namespaces": namespaces(), "interfaces": interfaces(),
            "containers": _docker_projects("containers"),
            "networks": _docker_projects("networks")}


def left_behind(before: dict[str, set[str]]) -> list[str]:
    """What appeared since ``before`` and is still there (after up to ``SETTLE_S``)."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        procs = session_processes()
        now = snapshot()
        session = set(procs)
        left = [f"process {pid}: {cmd[:200]}" for pid, cmd in sorted(procs.items())]
        for kind, names in now.items():
            for name in sorted(names - before[kind]):
                m = NAMESPACE.match(name) if kind == "namespaces" else PROJECT.match(
                    name.split(" ", 1)[0])
                if m is None or _ours(int(m.group(1)), session):
                    left.append(f"{kind[:-1]} {name}")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)
