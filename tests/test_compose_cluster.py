"""The compose cluster for real: containers of docker-compose.yml on this machine.

Run only when asked: preparing the host installs a container engine and starts its daemon,
which running the test suite should not do unasked. Ask with the environment variable::

    DIST_QUANT_CONTAINER_TESTS=1 python -m pytest -q tests/test_compose_cluster.py

(``.ci/run`` sets it, so CI runs these tests end to end.) Without it every test here skips with
one line saying so. When asked, the machine is prepared with launch/docker-host.sh (engine,
daemon, image), as a user would; what it fetches is cached between runs and the image is
rebuilt only when the sources change. Needs root and apt (or a ready Docker); skips, saying
why, where the machine cannot run containers at all.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from run_states import assert_equal, final

from dist_quant.analysis.linkmodel import Link
from dist_quant.cluster.compose import COMPOSE_FILE, HOST_SCRIPT, compose_command, run_compose
from dist_quant.compress import get_compressor
from dist_quant.config import TrainConfig
from dist_quant.runtime.metrics import read_metrics, read_summary
from dist_quant.train import run_in_process

CONTAINER_TESTS = "DIST_QUANT_CONTAINER_TESTS"   # =1: prepare a container host and run these
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get(CONTAINER_TESTS) != "1",
                       reason=f"container tests install an engine and start its daemon: run "
                              f"them with {CONTAINER_TESTS}=1 (as .ci/run does)"),
]
PREPARE_TIMEOUT_S = 1500


def why_no_containers() -> str | None:
    if not sys.platform.startswith("linux"):
        return "containers need Linux"
    if os.geteuid() != 0:
        return "preparing a container host (engine, daemon) needs root"
    if shutil.which("docker") is None and shutil.which("apt-get") is None:
        return "no Docker, and no apt-get to install it"
    return None


def daemon_answers() -> bool:
    return shutil.which("docker") is not None and subprocess.run(
        ["docker", "info"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def engine():
    why = why_no_containers()
    if why:
        pytest.skip(why)
    started_here = not daemon_answers()
    res = subprocess.run(["bash", str(HOST_SCRIPT), "up"], capture_output=True, text=True,
                         timeout=PREPARE_TIMEOUT_S)
    assert res.returncode == 0, res.stderr[-3000:]
    yield compose_command()
    if started_here:
        subprocess.run(["bash", str(HOST_SCRIPT), "stop"], capture_output=True)


def project_leftovers(prefix: str) -> list[str]:
    out = subprocess.run(["docker", "ps", "-a", "--format", "{{.Names}}"], capture_output=True,
                         text=True).stdout.split()
    nets = subprocess.run(["docker", "network", "ls", "--format", "{{.Name}}"],
                          capture_output=True, text=True).stdout.split()
    return [n for n in out + nets if n.startswith(prefix)]


def test_compose_job_equals_simulate_and_its_links_are_capped(engine, tmp_path):
    """W = 2, 20 steps over 10 Mbit/s links in containers: the same parameters as --simulate
    bit for bit, exact payload bytes, and the cap acted on the wire."""
    cfg = TrainConfig(workers=2, steps=20, eval_every=10, progress=False,
                      run_dir=str(tmp_path / "compose"))
    out = run_compose(cfg, rate_mbit=10, latency_ms=0)
    assert project_leftovers(f"dq{os.getpid()}x") == []
    run = Path(out["run_dir"])
    sim = tmp_path / "sim"
    assert run_in_process(cfg.replace(simulate=True, run_dir=str(sim))) == 0
    assert_equal(final(run), final(sim))
    summary = read_summary(run)
    assert summary["test_loss"] == read_summary(sim)["test_loss"]
    assert summary["steps"] == 20 and summary["workers"] == 2

    # exact payload bytes: W x payload_nbytes(n) per step (+ BN statistics at evaluations)
    n = summary["params"]
    up = get_compressor("onebit", bucket_size=128).payload_nbytes(n)
    fp32 = get_compressor("none").payload_nbytes(n)
    steps = [r for r in read_metrics(run) if r["kind"] == "step"]
    assert len(steps) == 20
    for r in steps:
        if r["step"] % 10:
            assert r["bytes_up"] == 2 * up and r["bytes_down"] == 2 * fp32

    link = json.loads((run / "link.json").read_text())
    wire = json.loads((run / "wire.json").read_text())
    assert link["engine"] == "compose" and link["rate_mbit"] == 10 and link["hosts"] == 3
    assert ipaddress.ip_network(link["subnet"]).subnet_of(ipaddress.ip_network("10.0.0.0/8"))
    assert any("tbf rate 10mbit" in c for c in link["tc_commands"])
    assert sorted(wire["per_host"]) == ["s", "w1", "w2"]
    assert wire["payload_bytes_up"] == summary["bytes_up"]
    assert wire["payload_bytes_down"] == summary["bytes_down"]
    assert wire["wire_bytes_up"] > wire["payload_bytes_up"]
    assert wire["wire_bytes_down"] > wire["payload_bytes_down"]
    # the cap acted: the server's 10 Mbit/s egress held packets back, and its bytes took at
    # least as long as the token bucket allows (a burst of 4 ms at the rate, or 2 frames)
    server = wire["per_host"]["s"]
    assert server["egress_overlimits"] > 0
    rate = Link(rate_mbit=10).bytes_per_second
    burst = max(rate * 0.004, 2 * 1514)
    assert wire["seconds"] >= (server["tx_bytes"] - burst) / rate


def compose_up(engine: list[str], tmp_path: Path, project: str, **env: str):
    """``docker compose up`` as the README writes it (2 workers), then ``down``."""
    env = {**os.environ, "DQ_RUNS_DIR": str(tmp_path), "DQ_WORKERS": "2", "DQ_NNODES": "3",
           "DQ_STEPS": "5", "DQ_RATE_MBIT": "0", "DQ_SUBNET": "10.78.250.0/24", **env}
    base = [*engine, "-p", project, "-f", str(COMPOSE_FILE)]
    try:
        return subprocess.run([*base, "up", "--no-build", "--no-color", "--scale", "worker=2",
                               "--exit-code-from", "server"], env=env, capture_output=True,
                              text=True, timeout=600)
    finally:
        subprocess.run([*base, "down", "--remove-orphans", "-t", "5"], env=env,
                       capture_output=True)


def dist_quant_lines(output: str) -> list[str]:
    return [x.split("|", 1)[1].strip() for x in output.splitlines()
            if "|" in x and x.split("|", 1)[1].strip().startswith("dist_quant")]


def first_to_exit(output: str) -> str:
    """The service of the first container compose saw leave (it ends compose's output)."""
    return next(x.split()[0] for x in output.splitlines() if " exited with code " in x)


def test_a_bad_option_is_one_line_and_status_2(engine, tmp_path):
    """Every host refuses the option, the rendezvous host alone says so and leaves first, so
    its line is never cut off by another container's exit."""
    res = compose_up(engine, tmp_path, f"dq{os.getpid()}bad", DQ_TRAIN_ARGS="--lr -1")
    assert res.returncode == 2, res.stdout[-3000:]
    assert "server" in first_to_exit(res.stdout), res.stdout[-3000:]
    assert dist_quant_lines(res.stdout + res.stderr) == ["dist_quant: --lr: must be > 0; got -1.0"]
    assert "Traceback" not in res.stdout and not (tmp_path / "compose" / "config.json").exists()


def test_a_failing_rank_says_why_through_compose(engine, tmp_path):
    """A rank that fails during the run names its reason in one line, and the job's status is
    1 (before, a rank that started under a pid-1 torchrun ended at once, saying nothing)."""
    res = compose_up(engine, tmp_path, f"dq{os.getpid()}fail",
                     DQ_TRAIN_ARGS="--inject-nonfinite 1:2 --on-nonfinite abort")
    assert res.returncode == 1, res.stdout[-3000:]
    assert "server" in first_to_exit(res.stdout), res.stdout[-3000:]
    lines = dist_quant_lines(res.stdout + res.stderr)
    assert lines and all("non-finite" in x or "aborted" in x for x in lines), lines
    assert "ChildFailedError" not in res.stdout + res.stderr
    log = (tmp_path / "compose" / "hosts" / "server.log").read_text()
    assert "ChildFailedError" in log   # torchrun's own report stays in the host's log


def test_ctrl_c_removes_containers_and_network(engine, tmp_path):
    """Ctrl-C while the containers train: every container and the network go."""
    run = tmp_path / "run"
    code = textwrap.dedent(f"""
        from dist_quant.cluster.compose import run_compose
        from dist_quant.config import TrainConfig
        run_compose(TrainConfig(workers=2, steps=2000, progress=False, run_dir={str(run)!r}),
                    rate_mbit=10, latency_ms=0)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    prefix = f"dq{proc.pid}x"
    deadline = time.monotonic() + 300
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text()):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.2)
    assert project_leftovers(prefix) != []
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert project_leftovers(prefix) == []
    assert not (run / "summary.json").exists()
