"""The docker-compose cluster, checked statically (no Docker engine needed).

Its logic lives in launch/node.sh, which the namespace cluster runs for real
(tests/test_cluster.py) and the containers run in tests/test_compose_cluster.py; here: the
compose file's structure, that it drives that script with variables the script reads, that its
training options parse and pass the checks for every method, and the script's own checks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml (a dev dependency) validates the compose file")

from dist_quant.cluster.run import NODE_SCRIPT, REPO, node_env  # noqa: E402
from dist_quant.config import TrainConfig  # noqa: E402

COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
VAR = re.compile(r"\$\{([A-Z0-9_]+)(:-([^}]*))?\}")


def substitute(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${VAR:-default} with an empty environment (or ``env``)."""
    env = env or {}
    return VAR.sub(lambda m: env.get(m.group(1)) or (m.group(3) or ""), str(value))


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def dockerfile_entrypoint() -> list[str]:
    lines = [x for x in DOCKERFILE.read_text().splitlines() if x.startswith("ENTRYPOINT")]
    assert len(lines) == 1
    return json.loads(lines[0].removeprefix("ENTRYPOINT"))


def script_variables() -> set[str]:
    return set(re.findall(r"\b(DQ_[A-Z_]+)\b", NODE_SCRIPT.read_text()))


def test_services_server_and_scalable_worker(compose):
    services = compose["services"]
    assert set(services) == {"server", "shard", "worker"}
    worker = services["worker"]
    # scalable: nothing that names or pins one container
    for scalable in (worker, services["shard"]):
        assert not {"container_name", "hostname", "ports"} & set(scalable)
    assert services["shard"]["scale"] == 0 and services["shard"]["depends_on"] == ["server"]
    for svc in services.values():
        assert "NET_ADMIN" in svc["cap_add"]               # tc inside the container
        assert svc["build"] == "."
    assert worker["depends_on"] == ["server"]


def test_every_variable_has_a_default(compose):
    text = "\n".join(x for x in COMPOSE.read_text().splitlines() if not x.lstrip().startswith("#"))
    names = VAR.findall(text)
    assert names, "the compose file is configured through environment variables"
    assert all(default for _, default, _ in names), "every ${VAR} needs a :- default"


def test_roles_and_rendezvous(compose):
    services = compose["services"]
    env = {name: {k: substitute(v) for k, v in svc["environment"].items()}
           for name, svc in services.items()}
    assert env["server"]["DQ_ROLE"] == "server" and env["worker"]["DQ_ROLE"] == "worker"
    assert env["shard"]["DQ_ROLE"] == "server"
    for e in env.values():
        assert e["DQ_RDZV_HOST"] == "server"               # the service name resolves
        assert int(e["DQ_NNODES"]) == int(substitute("${DQ_WORKERS:-4}")) + 1
    # the link through the environment, options of one method only through DQ_TRAIN_ARGS
    e = services["worker"]["environment"]
    assert {"DQ_RATE_MBIT", "DQ_LATENCY_MS", "DQ_LOSS_PCT", "DQ_TRAIN_ARGS"} <= set(e)


@pytest.mark.parametrize("env", [{}, {"DQ_METHOD": "ddp", "DQ_DDP_HOOK": "powersgd"},
                                 {"DQ_TRAIN_ARGS": "--downlink sign --bucket-size 64"}])
def test_every_method_passes_the_checks_with_the_compose_command(compose, env):
    """The fixed options of the compose command hold no option of one method, so that a DDP
    baseline is not refused for a parameter-server option it was given by default."""
    from dist_quant.runner.preflight import check_conflicts
    from dist_quant.train import config_from_options, train_command

    args = [substitute(a, env) for a in compose["services"]["server"]["command"]]
    args += substitute(compose["services"]["server"]["environment"]["DQ_TRAIN_ARGS"],
                       env).split()
    ctx = train_command.make_context("train", args)
    cfg, explicit = config_from_options(ctx, ctx.params)
    check_conflicts(cfg, explicit)
    assert cfg.method == env.get("DQ_METHOD", "ps")


def test_compose_drives_the_namespace_clusters_script(compose):
    # the entrypoint is launch/node.sh run: the same script, shape then launch
    entry = dockerfile_entrypoint()
    assert entry[1] == "run"
    assert Path(entry[0]).relative_to("/app") == NODE_SCRIPT.relative_to(REPO)
    run = re.search(r"^\s*run\) shift; (.*) ;;$", NODE_SCRIPT.read_text(), re.M).group(1)
    assert "shape; launch \"$@\"" in run and "run_logged \"$@\"" in run
    workdir = [x.split()[1] for x in DOCKERFILE.read_text().splitlines()
               if x.startswith("WORKDIR")]
    assert workdir == ["/app"]
    copied = [x.split()[1] for x in DOCKERFILE.read_text().splitlines() if x.startswith("COPY")]
    assert {"dist_quant", "launch/node.sh", "launch/wheelhouse"} <= set(copied)
    # what compose sets, the namespace cluster sets too, and the script reads all of it
    from dist_quant.analysis.linkmodel import Link
    from dist_quant.cluster.netns import Host

    ns_vars = {k for k in node_env(Host("s", "ns", "10.77.0.1"), Link(10), role="server",
                                   nnodes=3, rdzv_host="10.77.0.1", run_id="x",
                                   module="dist_quant.train") if k.startswith("DQ_")}
    for svc in compose["services"].values():
        compose_vars = {k for k in svc["environment"] if k.startswith("DQ_")}
        assert compose_vars - {"DQ_TRAIN_ARGS", "DQ_LOG_DIR"} <= ns_vars
        assert compose_vars <= script_variables()
    assert ns_vars <= script_variables()


def test_training_options_parse_into_a_valid_config(compose):
    from dist_quant.train import config_from_options, train_command

    for svc in compose["services"].values():
        args = [substitute(a) for a in svc["command"]]
        ctx = train_command.make_context("train", list(args))
        cfg, _ = config_from_options(ctx, ctx.params)
        assert isinstance(cfg, TrainConfig)
        assert cfg.run_dir.startswith("/runs/")
        assert any(v.endswith(":/runs") for v in svc["volumes"])    # the shared volume
    # and the job's module exists
    module = re.search(r"DQ_MODULE:-([\w.]+)", NODE_SCRIPT.read_text()).group(1)
    assert module == "dist_quant.train" and importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("env, servers, colocate", [
    ({}, 1, False),
    ({"DQ_SERVERS": "2"}, 2, False),
    ({"DQ_COLOCATE": "--colocate", "DQ_SERVER_ROLE": "colocated",
      "DQ_WORKER_ROLE": "colocated"}, 1, True),
])
def test_sharded_and_colocated_settings_reach_every_container(compose, env, servers, colocate):
    """The documented variables select the topology: every container gets the same options,
    and colocated containers carry both roles."""
    from dist_quant.train import config_from_options, train_command

    for name, svc in compose["services"].items():
        args = [substitute(a, env) for a in svc["command"]]
        ctx = train_command.make_context("train", list(args))
        cfg, _ = config_from_options(ctx, ctx.params)
        assert (cfg.servers, cfg.colocate) == (servers, colocate)
        role = substitute(svc["environment"]["DQ_ROLE"], env)
        assert role == ("colocated" if colocate and name != "shard" else
                        "worker" if name == "worker" else "server")
    assert re.search(r"colocated", NODE_SCRIPT.read_text())


def test_scripts_are_executable_and_parse():
    scripts = sorted((REPO / "launch").glob("*.sh"))
    assert NODE_SCRIPT in scripts
    for script in scripts:
        assert os.access(script, os.X_OK), f"{script} is not executable"
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def _node(args, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DQ_")}
    return subprocess.run([str(NODE_SCRIPT), *args], env={**clean, **env},
                          capture_output=True, text=True)


@pytest.mark.parametrize("env, message", [
    ({"DQ_RATE_MBIT": "ten"}, "DQ_RATE_MBIT must be a number"),
    ({"DQ_LATENCY_MS": "-1"}, "DQ_LATENCY_MS must be a number"),
    ({"DQ_LOSS_PCT": "100"}, "DQ_LOSS_PCT must be < 100"),
    ({"DQ_QUEUE_FRAMES": "0"}, "DQ_QUEUE_FRAMES must be a positive integer"),
    ({"DQ_IFACE": "nosuchif0"}, "no interface nosuchif0"),
])
def test_script_rejects_bad_settings_before_touching_anything(env, message):
    out = _node(["shape"], **env)
    assert out.returncode == 2 and message in out.stderr


def test_script_launch_needs_its_settings():
    out = _node(["launch"])
    assert out.returncode == 2 and "DQ_NNODES" in out.stderr
    out = _node(["launch"], DQ_NNODES="2", DQ_RDZV_HOST="x", DQ_ROLE="boss")
    assert out.returncode == 2 and "DQ_ROLE must be server or worker" in out.stderr
    out = _node([])
    assert out.returncode == 2 and "usage" in out.stderr


def test_the_network_is_pinned_inside_10_8_with_no_route_out(compose):
    import ipaddress

    net = compose["networks"]["default"]
    assert net["internal"] is True
    subnet = ipaddress.ip_network(substitute(net["ipam"]["config"][0]["subnet"]))
    assert subnet.subnet_of(ipaddress.ip_network("10.0.0.0/8"))
    for svc in compose["services"].values():
        assert "ports" not in svc and svc.get("init") is True   # torchrun is not pid 1


def test_without_an_engine_the_compose_cluster_says_what_to_run(tmp_path):
    """No docker on PATH: one line naming the script that prepares the machine, exit 1,
    nothing written."""
    import sys

    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    res = subprocess.run([sys.executable, "-m", "dist_quant", "cluster", "--engine", "compose",
                          "--workers", "2", "--steps", "5", "--run-dir", str(tmp_path / "r")],
                         env=env, capture_output=True, text=True, timeout=120)
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.returncode == 1, res.stderr
    assert lines == [("dist-quant cluster: no container engine (docker): run "
                      "launch/docker-host.sh")]
    assert "Traceback" not in res.stderr and not (tmp_path / "r" / "config.json").exists()


def test_what_containers_cannot_do_is_refused_naming_the_option(tmp_path):
    from dist_quant.cluster.compose import check_config
    from dist_quant.config import TrainConfig
    from dist_quant.errors import ConfigError

    for changes, option in [(dict(resume=str(tmp_path)), "--resume"),
                            (dict(consistency="async", min_workers=2), "--min-workers"),
                            (dict(dataset="mnist", data_dir=str(tmp_path)), "--dataset")]:
        with pytest.raises(ConfigError, match=f"^{option}"):
            check_config(TrainConfig(workers=3, **changes))
    check_config(TrainConfig(workers=3, consistency="async"))   # every worker needed: fine
