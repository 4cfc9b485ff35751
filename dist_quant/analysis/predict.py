"""``dist-quant predict RUN_DIR --rate R``: what a link would do to a recorded run.

A thin command over :mod:`dist_quant.analysis.linkmodel`: from the bytes ``RUN_DIR`` recorded per
step it
predicts the communication time and the wire bytes on a link of ``--rate`` Mbit/s and
``--latency`` ms, and the run's wall time there (its own compute time, taken from the link it
ran on, plus the modelled communication). With ``--measured CAPPED_DIR`` (the same config run
on the namespace cluster) it also prints the prediction for that run's link against what that
run measured.

    dist-quant predict runs/onebit --rate 10
    dist-quant predict runs/onebit --rate 10 --latency 5 --json
    dist-quant predict runs/onebit-uncapped --measured runs/onebit-10mbit --rate 10
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from dist_quant.analysis.linkmodel import (
    Link,
    compare,
    link_of,
    predict_comm_seconds,
    predict_wall_seconds,
    predict_wire,
    read_run,
    topology_of,
)
from dist_quant.errors import ConfigError


def predict_run(run_dir: str | Path, link: Link, allreduces: int = 1) -> dict[str, Any]:
    """Predicted communication seconds, wall seconds and wire bytes of ``run_dir`` on ``link``."""
    run_dir = Path(run_dir)
    try:
        config, steps, summary = read_run(run_dir)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError("RUN_DIR", f"{run_dir} is not a finished run directory (config.json, "
                          f"metrics.jsonl, summary.json): {err}") from None
    link.validate()
    method, workers = config["method"], summary.get("workers", config["workers"])
    ran_on = link_of(run_dir)
    topology = topology_of(config, summary)
    comm = predict_comm_seconds(steps, method, workers, link, allreduces, topology)
    return {
        "run_dir": str(run_dir), "method": method, "topology": topology.kind,
        "servers": topology.servers, "workers": workers, "steps": len(steps),
        "link": {"rate_mbit": link.rate_mbit, "latency_ms": link.latency_ms, "mtu": link.mtu},
        "ran_on": {"rate_mbit": ran_on.rate_mbit, "latency_ms": ran_on.latency_ms},
        "bytes_up": summary["bytes_up"], "bytes_down": summary["bytes_down"],
        "predicted_comm_s": comm,
        "predicted_comm_per_step_s": comm / max(len(steps), 1),
        "measured_wall_s": summary["wall_seconds"],
        "predicted_wall_s": predict_wall_seconds(summary["wall_seconds"], steps, method,
                                                 workers, link, ran_on, allreduces, topology),
        **predict_wire(steps, method, workers, link.mtu, topology),
    }


@click.command("predict", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--rate", type=float, required=True, help="Link rate in Mbit/s (> 0).")
@click.option("--latency", type=float, default=0.0, show_default=True,
              help="One-way latency between two hosts in ms.")
@click.option("--mtu", type=int, default=1500, show_default=True, help="Link MTU in bytes.")
@click.option("--allreduces", type=int, default=1, show_default=True,
              help="Allreduces per step (DDP runs whose gradient spans several buckets).")
@click.option("--measured", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="A run of the same config on a capped link (namespace "
              "cluster): compare the prediction for its link with what it measured; RUN_DIR "
              "is then its uncapped baseline.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def predict(run_dir: Path, rate: float, latency: float, mtu: int, allreduces: int,
            measured: Path | None, as_json: bool) -> None:
    """Predict communication time, wire bytes and wall time of RUN_DIR on a link of --rate
    Mbit/s (the model of dist_quant.analysis.linkmodel: per phase, one latency plus the busiest
    link's
    bytes / rate; the star's server link carries all W payloads, sharded servers and colocated
    ranks their shares)."""
    try:
        out = predict_run(run_dir, Link(rate, latency, 0.0, mtu), allreduces)
        if measured is not None:
            out["measured_run"] = {"run_dir": str(measured), **compare(measured, run_dir,
                                                                       allreduces)}
    except ConfigError as err:
        raise click.BadParameter(str(err).split(": ", 1)[-1], param_hint=err.option) from None
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"{out['run_dir']}: {out['method']} ({out['topology']}), {out['workers']} "
               f"workers, {out['steps']} "
               f"steps, {out['bytes_up'] / 1e6:.2f} MB up, {out['bytes_down'] / 1e6:.2f} MB "
               f"down")
    click.echo(f"on {rate:g} Mbit/s, {latency:g} ms: communication {out['predicted_comm_s']:.2f}"
               f" s ({1e3 * out['predicted_comm_per_step_s']:.2f} ms/step), wall "
               f"{out['predicted_wall_s']:.2f} s (measured {out['measured_wall_s']:.2f} s on "
               f"{_link_text(out['ran_on'])}), wire {out['wire_bytes_up'] / 1e6:.2f} MB up, "
               f"{out['wire_bytes_down'] / 1e6:.2f} MB down")
    if measured is not None:
        m = out["measured_run"]
        click.echo(f"{measured}: predicted wall {m['predicted_wall_s']:.2f} s, measured "
                   f"{m['measured_wall_s']:.2f} s ({100 * m['relative_error']:+.1f}%)")


def _link_text(link: dict[str, Any]) -> str:
    if link["rate_mbit"] is None:
        return "an uncapped link"
    return f"{link['rate_mbit']:g} Mbit/s, {link['latency_ms']:g} ms"
