"""The ``vllm-gds`` command line. Each subcommand lives with its feature and is imported lazily."""

from __future__ import annotations

import argparse
import sys

from vllm_gds_plugin import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-gds", description=__doc__)
    parser.add_argument("--version", action="version", version=f"vllm-gds-plugin {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
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
