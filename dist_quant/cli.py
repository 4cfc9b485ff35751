"""The ``dist-quant`` command: a thin group; each subcommand lives beside what it runs.

Subcommands are imported on first use so that ``dist-quant --help`` stays fast.
"""

from __future__ import annotations

import importlib

import click

# name -> "module:attribute" of a click.Command
COMMANDS = {
    "verify": "dist_quant.verify.command:verify",
    "train": "dist_quant.train:train_command",
    "cluster": "dist_quant.cluster.command:cluster",
    "chaos": "dist_quant.cluster.chaos:chaos",
    "sweep": "dist_quant.sweep:sweep",
    "plot": "dist_quant.plot.command:plot",
    "predict": "dist_quant.analysis.predict:predict",
    "retime": "dist_quant.analysis.retime:retime_command",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dist-quant")
def main() -> None:
    """Data-parallel training with 1-bit quantised gradients and a parameter server."""
