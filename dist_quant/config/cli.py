"""The configuration as click options: one option per field, listed under its group's heading
(:class:`GroupedCommand`), the testing aids hidden; ``--set FIELD=VALUE`` fields listed by group
(:class:`SetFieldsCommand`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import click

from dist_quant.config.choices import GROUPS, OTHER, TESTING
from dist_quant.config.fields import TrainConfig


class GroupedOption(click.Option):
    """A click option listed under the heading ``group`` by :class:`GroupedCommand`."""

    def __init__(self, *args: Any, group: str = OTHER, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.group = group


class GroupedCommand(click.Command):
    """A command whose ``--help`` lists its options under headings: its own (in order of
    appearance), those of ``GROUPS``, then ``Other options``; hidden options (the testing aids)
    are left out."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None and isinstance(param, click.Option):  # arguments: in Usage
                rows.setdefault(getattr(param, "group", OTHER), []).append(record)
        own = [heading for heading in rows if heading not in (*GROUPS, OTHER)]  # first
        for heading in (*own, *GROUPS, OTHER):
            if rows.get(heading):
                with formatter.section(heading):
                    formatter.write_dl(rows[heading])


class SetFieldsCommand(GroupedCommand):
    """A command that takes config fields as ``--set FIELD=VALUE``: its ``--help`` ends with
    the fields under the same headings as ``train --help`` (testing aids left out)."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_options(ctx, formatter)
        with formatter.section("Fields of --set (the options of train, by group)"):
            formatter.write_dl([(heading, ", ".join(names))
                                for heading, names in field_groups().items()])


def field_groups(cls: type = TrainConfig) -> dict[str, list[str]]:
    """``{heading: [field, ...]}`` in the order of ``GROUPS``, testing aids left out."""
    out: dict[str, list[str]] = {heading: [] for heading in GROUPS}
    for f in dataclasses.fields(cls):
        if f.metadata["group"] != TESTING:
            out[f.metadata["group"]].append(f.name)
    return {heading: names for heading, names in out.items() if names}


def click_options(cls: type = TrainConfig, exclude: tuple[str, ...] = ()):
    """Decorator adding one click option per config field (the CLI stays a thin mapping),
    each under its field's ``group`` (use with ``cls=GroupedCommand``); testing aids hidden;
    ``exclude``: fields a command leaves out (it has options of its own by those names)."""

    def decorate(fn):
        for f in reversed(dataclasses.fields(cls)):
            if f.name in exclude:
                continue
            dashed = f.name.replace("_", "-")
            group = f.metadata["group"]
            kwargs: dict[str, Any] = {"default": f.default, "show_default": True,
                                      "help": f.metadata.get("help", ""), "cls": GroupedOption,
                                      "group": group, "hidden": group == TESTING}
            if isinstance(f.default, bool):
                fn = click.option(f"--{dashed}/--no-{dashed}", f.name, **kwargs)(fn)
                continue
            if f.metadata.get("repeatable"):  # given several times: joined with commas
                fn = click.option(f"--{dashed}", f.name, multiple=True, default=(),
                                  help=kwargs["help"], callback=_joined, cls=GroupedOption,
                                  group=group, hidden=group == TESTING)(fn)
                continue
            if f.metadata.get("choices"):
                kwargs["type"] = click.Choice(f.metadata["choices"])
            else:
                kwargs["type"] = type(f.default)
            fn = click.option(f"--{dashed}", f.name, **kwargs)(fn)
        return fn

    return decorate


def _joined(ctx: Any, param: Any, values: tuple[str, ...]) -> str:
    """A repeatable option's values as one comma-separated string (the config's form)."""
    return ",".join(v for v in values if v)
