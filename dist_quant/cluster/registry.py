"""The cluster engines by name: what ``--engine`` of ``dist-quant cluster`` and ``dist-quant
sweep`` accepts.

:func:`register` adds an :class:`~dist_quant.cluster.engine.Engine` (a name taken already is
replaced), :func:`get_engine` looks one up, :func:`engines` lists them in the order they were
registered, and :class:`EngineChoice` is the click type of ``--engine``: it reads the registry
when the option is parsed, so an engine registered after the commands were built is accepted.
The help texts of ``--engine`` list the engines registered when the commands are built (the
built-in ones below).
"""

from __future__ import annotations

from collections.abc import Sequence

import click

from dist_quant.cluster.compose import ComposeEngine
from dist_quant.cluster.engine import Engine
from dist_quant.cluster.run import NetnsEngine
from dist_quant.errors import ConfigError

DEFAULT_ENGINE = "netns"
_ENGINES: dict[str, Engine] = {}


def register(engine: Engine) -> Engine:
    """Make ``engine`` available as ``--engine NAME``; returns it."""
    if not engine.name or not engine.mark:
        raise ValueError("an engine needs a name and a mark")
    _ENGINES[engine.name] = engine
    return engine


def unregister(name: str) -> None:
    """Remove the engine ``name`` (the default engine stays)."""
    if name == DEFAULT_ENGINE:
        raise ValueError(f"the default engine {name!r} cannot be removed")
    _ENGINES.pop(name, None)


def get_engine(name: str) -> Engine:
    """The engine registered as ``name``; ConfigError naming ``--engine`` otherwise."""
    try:
        return _ENGINES[name]
    except KeyError:
        raise ConfigError("--engine", f"unknown engine {name!r}; engines: "
                          f"{', '.join(_ENGINES)}") from None


def engines() -> list[Engine]:
    """Every registered engine, in the order of registration."""
    return list(_ENGINES.values())


class EngineChoice(click.Choice):
    """``click.Choice`` over the names registered at the time an option is parsed."""

    def __init__(self) -> None:
        super().__init__(())

    @property
    def choices(self) -> Sequence[str]:
        return tuple(_ENGINES)

    @choices.setter
    def choices(self, value: Sequence[str]) -> None:
        pass   # the registry is the one list of choices


register(NetnsEngine())
register(ComposeEngine())
