"""CLI flags built from `node.config.SETTINGS`, and the `NodeConfig` they describe.

Flags default to None ("not given") so that `NodeConfig.from_settings` can fall back to the
`NODE_*` environment variable and then to the field's default: one rule for every command.
"""

from __future__ import annotations

import argparse

from node.config import SETTINGS, NodeConfig


def add_setting_flags(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """Add the flags of the settings named (all when None), each saying its variable."""
    for setting in SETTINGS:
        if names is not None and setting.name not in names:
            continue
        kw: dict = {"dest": setting.name, "default": None, "help": f"{setting.help} [${setting.env}]"}
        if setting.kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif setting.flag in ("--peer", "--peer-key", "--mcp-server"):
            kw.update(action="append", metavar="URL")
        parser.add_argument(setting.flag, **kw)


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    """The settings given as flags (absent ones are None) over the environment over defaults."""
    return NodeConfig.from_settings({s.name: getattr(args, s.name, None) for s in SETTINGS})


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    add_setting_flags(parser, ("model", "cache_dir", "threads"))
