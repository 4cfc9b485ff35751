"""Who can reach a single-machine job: every listening socket of every process it started
(the launcher's torchrun agent and each rank, restarted ones included) is on loopback.

The sockets are read from ``/proc/<pid>/net/tcp{,6}`` (state LISTEN), matched to each process
by the socket inodes among its ``/proc/<pid>/fd`` links.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_faults import TINY, finish, rank_pid, start, wait_for_steps

from dist_quant.config import TrainConfig
from dist_quant.runner.launcher import descendants
from dist_quant.runner.localrun import torchrun_argv

LISTEN = "0A"


def address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address of ``/proc/net/tcp{,6}``: 32-bit words in host (little-endian) order."""
    raw = b"".join(bytes.fromhex(hex_addr[i:i + 8])[::-1] for i in range(0, len(hex_addr), 8))
    return ipaddress.ip_address(raw)


def listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket ``pid`` holds in the LISTEN state."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == LISTEN and fields[9] in inodes:
                host, port = fields[1].split(":")
                out.append((str(address(host)), int(port, 16)))
    return out


def on_loopback(host: str) -> bool:
    addr = ipaddress.ip_address(host)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def test_proc_addresses_decode():
    assert address("0100007F") == ipaddress.ip_address("127.0.0.1")
    assert address("00000000000000000000000001000000") == ipaddress.ip_address("::1")
    assert address("0000000000000000FFFF00000100007F") == ipaddress.ip_address(
        "::ffff:127.0.0.1")
    assert on_loopback("::ffff:127.0.0.1") and on_loopback("127.0.0.5")
    assert not on_loopback("0.0.0.0") and not on_loopback("::")


def sockets_of(launcher: subprocess.Popen) -> dict[int, list[tuple[str, int]]]:
    found = {}
    for pid in [launcher.pid, *descendants(launcher.pid)]:
        try:
            found[pid] = listening(pid)
        except OSError:   # ended meanwhile
            continue
    return found


@pytest.mark.slow
@pytest.mark.parametrize("restarts", [0, 1], ids=["default", "max-restarts-1"])
def test_every_socket_of_a_local_job_listens_on_loopback(tmp_path, restarts):
    """With ``--max-restarts 1`` a worker is killed and the sockets of the restarted ranks
    are read as well."""
    cfg = TrainConfig(**TINY, steps=10**6, eval_every=10**6, timeout=10.0,
                      max_restarts=restarts, run_dir=str(tmp_path / "run"))
    launcher = start(cfg)
    pids: list[int] = []
    try:
        wait_for_steps(launcher, tmp_path / "run", 3)
        seen = [sockets_of(launcher)]
        if restarts:
            os.kill(rank_pid(launcher, 2), signal.SIGKILL)
            deadline = time.monotonic() + 120
            while rank_pid(launcher, 0, attempt=1) is None or len(
                    (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) < 3:
                assert launcher.poll() is None, launcher.communicate()
                assert time.monotonic() < deadline, "no restart"
                time.sleep(0.1)
            seen.append(sockets_of(launcher))
        pids = descendants(launcher.pid)
    finally:
        finish(launcher, pids)
    for found in seen:
        assert len(found) >= 4   # the agent and three ranks (the launcher listens nowhere)
        ports = [s for sockets in found.values() for s in sockets]
        assert ports, found   # the agent's stores and gloo's listeners are there to be seen
        outside = {pid: s for pid, sockets in found.items() for s in sockets
                   if not on_loopback(s[0])}
        assert not outside, outside


def test_localrun_refuses_to_set_the_rendezvous_itself(capsys):
    for argv in (["--rdzv-endpoint", "10.0.0.1:29400", "x.py"], ["--nnodes", "2", "x.py"],
                 ["--master-addr", "0.0.0.0", "x.py"]):
        with pytest.raises(SystemExit) as exit_info:
            torchrun_argv(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"Error: {argv[0]}:") and "\n" not in err
    args = torchrun_argv(["--standalone", "--nproc-per-node", "3", "-m", "mod", "--standalone"])
    assert args[args.index("--rdzv-endpoint") + 1] == "127.0.0.1:0"
    assert args[args.index("--local-addr") + 1] == "127.0.0.1"
    assert args[-5:] == ["--nproc-per-node", "3", "-m", "mod", "--standalone"]


def test_localrun_stores_bind_to_loopback_only():
    """A server TCPStore started in a process patched by ``bind_servers_to``."""
    code = ("import torch.distributed as dist;"
            "from dist_quant.runner.localrun import bind_servers_to;"
            "bind_servers_to('127.0.0.1'); s = dist.TCPStore('0.0.0.0', 0, is_master=True);"
            "import os, sys; sys.path.insert(0, 'tests'); from test_loopback import listening;"
            "print(listening(os.getpid()), s.port)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    sockets, port = out.rsplit(" ", 1)
    assert eval(sockets) == [("127.0.0.1", int(port))]   # noqa: S307 (a list literal we print)

