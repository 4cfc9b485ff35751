"""``dist-quant plot --time model``: runs drawn against their modelled clock.

A run of ``--clock dedicated`` records, beside each line's measured ``wall``, its
``model_time``: the time of the same steps on dedicated hosts and modelled links
(:mod:`dist_quant.runtime.clock`). :func:`use_model_time` puts ``model_time`` in place of
``wall`` in every step and evaluation line (``summary.json``'s ``wall_seconds`` becomes
``model_seconds``) and groups the runs by their modelled link, whose name says "modelled", so
every time figure and table of ``plot`` reads the modelled clock, labelled as such. The phase
times (``time`` of the step lines) stay the measured ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_quant.errors import ConfigError
from dist_quant.plot.runs import Link, Run


@dataclass(frozen=True)
class ModelledLink(Link):
    """A run's modelled link (config ``rate``, ``latency``, ``worker_rate``)."""

    own: str = ""

    @property
    def name(self) -> str:
        rate = "uncapped" if self.rate_mbit is None else f"{self.rate_mbit:g} Mbit/s"
        own = f", worker {self.own.replace('=', ' at ')}" if self.own else ""
        return f"modelled: {rate}, {self.latency_ms:g} ms{own}, dedicated hosts"


def use_model_time(runs: list[Run]) -> list[Run]:
    """``runs`` with ``model_time`` as their clock (ConfigError naming a run without one);
    the caller names the figures' time axis (``draw_all``'s ``time_axis``)."""
    for run in runs:
        lines = [*run.steps, *run.evals]
        if run.config.get("clock") != "dedicated" or any("model_time" not in r for r in lines):
            raise ConfigError("--time", f"{run.path} has no modelled clock: run it with "
                              "--clock dedicated (or re-time it with dist-quant retime)")
        for r in lines:
            r["wall_measured"], r["wall"] = r["wall"], r["model_time"]
        run.summary["wall_seconds"] = run.summary.get("model_seconds", run.summary.get(
            "wall_seconds"))
        speed = float(run.config.get("host_speed", 1.0))
        rate = float(run.config.get("rate", 0.0)) or None
        run.link = ModelledLink(rate, float(run.config.get("latency", 0.0)), 0.0,
                                own=str(run.config.get("worker_rate", ""))
                                + (f", hosts {speed:g}x" if speed != 1 else ""))
    return runs
