"""``dist-quant cluster``: the training job on a namespace cluster with capped links.

Examples::

    dist-quant cluster --workers 4 --rate 10 --steps 200          # 10 Mbit/s links
    dist-quant cluster --workers 4 --rate 100 --latency 5 --loss 0.1
    dist-quant cluster --method ddp --workers 4 --rate 10          # allreduce baseline
    dist-quant cluster --workers 4 --rate 10 --worker-rate 1=1     # worker 1 on a 1 Mbit/s link
    dist-quant cluster --workers 4 --rate 10 --slow-worker 1=4 --consistency async
    dist-quant cluster --cleanup                                   # remove leftovers
    dist-quant cluster --engine compose --workers 4 --rate 10      # the same, as containers
    dist-quant cluster --workers 4 --rate 10 --dilate auto         # times of dedicated cores

Needs root (network namespaces, veth, tc). ``--engine compose`` runs the same hosts as
containers of ``docker-compose.yml`` (:mod:`dist_quant.cluster.compose`; prepare the machine
with ``launch/docker-host.sh``); the records are the same. ``--engine`` takes any engine of
:mod:`dist_quant.cluster.registry`, asked in the order :mod:`dist_quant.cluster.engine` states
(root, the machine, the links, the run). The training options are those of
``dist-quant train``, one to one, checked the same way before anything is built
(:mod:`dist_quant.runner.preflight`). While the job runs it shows the training progress (steps,
loss, accuracy, MB up and down); it ends with the summary line of ``dist-quant train`` and one
line of wire figures (bytes on the wire per direction and their ratio to the payload).
``--dilate F`` (or ``auto``: training processes / cores, at least 1) runs the job in dilated
time (:mod:`dist_quant.cluster.dilation`): links at rate / F, latency and ``--timeout`` x F,
every time reported / F (the raw ones kept beside them).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import click

from dist_quant.cluster.dilation import Dilation, check_engine, parse_dilate, run_dilated
from dist_quant.cluster.engine import ClusterError, parse_worker_rates
from dist_quant.cluster.netns import cleanup_stale, require_root
from dist_quant.cluster.registry import DEFAULT_ENGINE, EngineChoice, engines, get_engine
from dist_quant.config import LINKS, MODEL_FIELDS, GroupedCommand, GroupedOption, click_options
from dist_quant.errors import ConfigError
from dist_quant.runner.options import config_error, config_from_options
from dist_quant.runner.preflight import preflight
from dist_quant.runtime.progress import summary_line

link_option = functools.partial(click.option, cls=GroupedOption, group=LINKS)


@click.command("cluster", cls=GroupedCommand,
               context_settings={"help_option_names": ["-h", "--help"]})
@link_option("--rate", type=float, default=0.0, show_default=True,
             help="Link rate cap in Mbit/s, each host and direction; 0 = uncapped.")
@link_option("--latency", type=float, default=0.0, show_default=True,
             help="One-way host-to-host latency in ms (needs the netem qdisc).")
@link_option("--loss", type=float, default=0.0, show_default=True,
             help="Packet loss in percent on each host-to-host path (needs netem).")
@link_option("--mtu", type=int, default=1500, show_default=True, help="Link MTU in bytes.")
@link_option("--worker-rate", "worker_rate", multiple=True, metavar="I=MBIT",
             help="Worker I's own link cap in Mbit/s, both directions (repeatable; 0-based, "
                  "host w{I+1}); the other hosts keep --rate.")
@link_option("--engine", type=EngineChoice(), default=DEFAULT_ENGINE, show_default=True,
             help="; ".join(f"{e.name}: {e.help}" for e in engines()) + ".")
@link_option("--dilate", default="1", show_default=True, metavar="F|auto",
             help="Time dilation F >= 1: link rates / F, latency and --timeout x F, every "
                  "time reported / F (raw ones kept as *_raw); auto = training processes / "
                  "cores of this job, at least 1.")
@click.option("--cleanup", is_flag=True,
              help="Only remove namespaces left by cluster runs whose process is gone.")
@click_options(exclude=MODEL_FIELDS)   # its links are real: --rate and the rest are its own
@click.pass_context
def cluster(ctx: click.Context, rate: float, latency: float, loss: float, mtu: int,
            worker_rate: tuple[str, ...], engine: str, dilate: str, cleanup: bool,
            **params: Any) -> None:
    """Train on a simulated cluster: one network namespace per host, links shaped with tc.

    Writes link.json and wire.json (bytes on the wire beside payload bytes) into the run
    directory, next to the training job's files.
    """
    try:
        chosen = get_engine(engine)
        if chosen.needs_root or cleanup:
            require_root()
        if cleanup:
            removed = cleanup_stale()
            click.echo("\n".join(removed) if removed else "nothing to remove")
            return
        cfg, explicit = config_from_options(ctx, params)
        if cfg.simulate:
            raise ConfigError("--simulate", "the cluster runs the distributed job; drop "
                              "--simulate")
        rates = parse_worker_rates(worker_rate, cfg.workers)
        dilation = Dilation.resolve(parse_dilate(dilate), cfg)
        check_engine(chosen, dilation)
        chosen.check()   # before anything is announced or checked: what is missing
        cfg = preflight(cfg, explicit)
        click.echo(f"dist-quant cluster: run directory {cfg.run_dir}", err=True)
        chosen.check_links(rates)
        if dilation.active:
            click.echo(f"dist-quant cluster: {dilation.line(cfg, rate or None, latency)}",
                       err=True)
        out = run_dilated(chosen, cfg, rate or None, latency, loss, mtu=mtu,
                          worker_rates=rates, dilation=dilation)
    except ConfigError as err:
        config_error(err)
    except ClusterError as err:
        click.echo(f"dist-quant cluster: {err}", err=True)
        sys.exit(getattr(err, "exit_code", 1))
    summary = json.loads((Path(out["run_dir"]) / "summary.json").read_text())
    click.echo(summary_line(summary))
    click.echo(wire_line(out["wire"]))
    if "dilate" in summary:
        click.echo(f"dilated x{summary['dilate']:g}: {summary['wall_seconds']:.1f} s of "
                   f"dilated time, {summary['wall_seconds_raw']:.1f} s raw wall time")


def wire_line(wire: dict) -> str:
    """Bytes on the wire per direction, and their ratio to the payload bytes."""
    def part(direction: str) -> str:
        ratio = wire[f"ratio_{direction}"]
        return (f"{direction} {wire[f'wire_bytes_{direction}'] / 1e6:.2f} MB"
                + (f" ({ratio:.3f}x payload)" if ratio else ""))

    steady = wire.get("steady")
    extra = ""
    if steady and steady.get("data_ratio_up"):
        extra = (f" | steps {steady['from_step']}-{steady['to_step']}: data "
                 f"{steady['data_ratio_up']:.3f}x payload up")
    return f"wire: {part('up')}, {part('down')}{extra} | wire.json, link.json"
