"""``dist-quant cluster``: the training job on a namespace cluster with capped links.

Examples::

    dist-quant cluster --workers 4 --rate 10 --steps 200          # 10 Mbit/s links
    dist-quant cluster --workers 4 --rate 100 --latency 5 --loss 0.1
    dist-quant cluster --method ddp --workers 4 --rate 10          # allreduce baseline
    dist-quant cluster --cleanup                                   # remove leftovers

Needs root (network namespaces, veth, tc). The training options are those of
``dist-quant train``, one to one.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from dist_quant.config import click_options


@click.command("cluster", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--rate", type=float, default=0.0, show_default=True,
              help="Link rate cap in Mbit/s, each host and direction; 0 = uncapped.")
@click.option("--latency", type=float, default=0.0, show_default=True,
              help="One-way host-to-host latency in ms (needs the netem qdisc).")
@click.option("--loss", type=float, default=0.0, show_default=True,
              help="Packet loss in percent on each host-to-host path (needs netem).")
@click.option("--mtu", type=int, default=1500, show_default=True, help="Link MTU in bytes.")
@click.option("--cleanup", is_flag=True,
              help="Only remove namespaces left by cluster runs whose process is gone.")
@click_options()
@click.pass_context
def cluster(ctx: click.Context, rate: float, latency: float, loss: float, mtu: int,
            cleanup: bool, **params: Any) -> None:
    """Train on a simulated cluster: one network namespace per host, links shaped with tc.

    Writes link.json and wire.json (bytes on the wire beside payload bytes) into the run
    directory, next to the training job's files.
    """
    from dist_quant.cluster.netns import ClusterError, cleanup_stale, require_root
    from dist_quant.cluster.run import run_cluster
    from dist_quant.errors import ConfigError
    from dist_quant.train import config_from_options

    try:
        require_root()
        if cleanup:
            removed = cleanup_stale()
            click.echo("\n".join(removed) if removed else "nothing to remove")
            return
        cfg, _ = config_from_options(ctx, params)
        out = run_cluster(cfg, rate or None, latency, loss, mtu=mtu)
    except ConfigError as err:
        raise click.BadParameter(str(err).split(": ", 1)[-1], param_hint=err.option) from None
    except ClusterError as err:
        click.echo(f"dist-quant cluster: {err}", err=True)
        sys.exit(1)
    wire = out["wire"]
    keys = ("wire_bytes_up", "wire_bytes_down", "payload_bytes_up", "payload_bytes_down",
            "ratio_up", "ratio_down", "data_ratio_up", "data_ratio_down")
    shown = {k: wire[k] for k in keys}
    if wire["steady"]:
        shown["steady"] = {k: wire["steady"][k] for k in ("from_step", "to_step", *keys)}
    click.echo(f"run directory: {out['run_dir']} (link.json, wire.json)")
    click.echo(json.dumps(shown, indent=2))
