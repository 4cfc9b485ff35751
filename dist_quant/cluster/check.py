"""``python -m dist_quant.cluster.check ARGS``: the checks of ``dist-quant train`` on a host.

A container of the compose cluster runs this before its torchrun agent starts
(``launch/node.sh``), with the training options it will pass to ``dist_quant.train``: every
option, the data and the run directory are checked as ``dist-quant train`` checks them
(:func:`dist_quant.runner.preflight.preflight`), and a problem ends the host with one line and exit
status 2 before any process of the job starts. Nothing is written.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from dist_quant.config import GroupedCommand, click_options
from dist_quant.errors import ConfigError
from dist_quant.runner.options import config_from_options
from dist_quant.runner.preflight import preflight


@click.command("dist_quant.cluster.check", cls=GroupedCommand,
               context_settings={"help_option_names": ["-h", "--help"]})
@click_options()
@click.pass_context
def main(ctx: click.Context, **params: Any) -> None:
    """Exit 0 when the options would start a job, else 2 with one line naming the problem."""
    try:
        cfg, explicit = config_from_options(ctx, params)
        preflight(cfg, explicit)
    except ConfigError as err:
        click.echo(f"dist_quant: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
