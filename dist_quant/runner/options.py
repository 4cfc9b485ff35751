"""A command line's training options as a validated config: what every command that takes the
options of ``dist-quant train`` shares (``train``, ``cluster``, the host check of a container).

:func:`config_from_options` turns click's parameters (from
:func:`dist_quant.config.click_options`) into a :class:`~dist_quant.config.TrainConfig` and the
names given explicitly, reading a resumed or replayed run's saved config as the base (a new
run takes its ``--task``'s own defaults for the options not given:
:meth:`~dist_quant.config.TrainConfig.with_task_defaults`);
:func:`config_error` is how a command refuses a bad option: one line, exit status 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from dist_quant.config import TrainConfig
from dist_quant.errors import ConfigError


def config_from_options(ctx: click.Context, params: dict[str, Any]) -> tuple[TrainConfig, set]:
    """The validated config of a command line, and the names of the options given explicitly.

    With ``--resume RUN_DIR`` the run's saved config is the base and only the options given on
    this command line change it (the checkpoint check refuses changes that alter the run); so
    with ``--replay RUN_DIR`` (a new run directory unless given).
    """
    explicit = {name for name in params
                if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)}
    values = dict(params)
    if params["replay"] and not params["resume"]:
        # the replayed run's options, but those given here (a new run directory by default)
        try:
            base = read_saved_config(params["replay"])
        except ConfigError as err:
            raise ConfigError("--replay", str(err).split(": ", 1)[-1]) from None
        values = {**{k: v for k, v in base.items() if k in params and k != "run_dir"},
                  **{k: params[k] for k in explicit}, "replay": params["replay"],
                  "run_dir": params["run_dir"]}
    if params["resume"]:
        base = read_saved_config(params["resume"])
        known = set(params)
        values = {**{k: v for k, v in base.items() if k in known},
                  **{k: params[k] for k in explicit}, "resume": params["resume"]}
        if "run_dir" not in explicit:
            values["run_dir"] = params["resume"]
    cfg = TrainConfig.from_dict(values)
    if not (params["resume"] or params["replay"]):   # a saved config holds its task's values
        cfg = cfg.with_task_defaults(explicit)
    cfg = cfg.validate()
    if cfg.resume:
        # torch loads with the checkpoint: only a resumed run, after its options are checked
        from dist_quant.runtime.checkpoint import load_for_resume

        load_for_resume(cfg)  # refuses an incompatible continuation before anything starts
    return cfg, explicit


def config_error(err: ConfigError) -> None:
    """One line on stderr naming the option, then exit 2 (click's usage block left out)."""
    click.echo(f"Error: {err}", err=True)
    sys.exit(2)


def read_saved_config(run_dir: str | Path) -> dict:
    """The ``config`` of a run directory's config.json; ConfigError(--resume) when unreadable."""
    saved = Path(run_dir) / "config.json"
    if not saved.is_file():
        raise ConfigError("--resume", f"{saved} not found: not a run directory")
    try:
        saved_json = json.loads(saved.read_text())
        config = saved_json["config"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise ConfigError("--resume", f"{saved} is corrupt ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(config, dict):
        raise ConfigError("--resume", f"{saved} is corrupt: 'config' is not an object")
    if saved_json.get("model", "mlp") == "custom":
        raise ConfigError("--resume", f"{run_dir} was trained with a model of its own through "
                          "dist_quant.fit; continue it with dist_quant.fit(..., resume=RUN_DIR)")
    return config
