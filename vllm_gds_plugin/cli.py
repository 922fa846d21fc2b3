"""The ``vllm-gds`` command line.

Each feature owns its subcommands in a module exposing ``add_commands(subparsers)``; a subcommand sets
``func`` (taking the parsed args, returning an exit code) with ``set_defaults``. Modules are imported only
when the CLI runs, so ``register()`` stays import-light.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vllm_gds_plugin import __version__

COMMAND_MODULES: tuple[str, ...] = (
    "vllm_gds_plugin.loading.commands",  # shard, inspect, verify
    "vllm_gds_plugin.capacity_commands",  # capacity
    "vllm_gds_plugin.kvcache.commands",  # calibrate
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-gds", description="Pre-shard checkpoints for --load-format gds-sharded and plan KV capacity."
    )
    parser.add_argument("--version", action="version", version=f"vllm-gds-plugin {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
