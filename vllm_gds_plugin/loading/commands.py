"""``vllm-gds shard | inspect | verify`` (filled in by the sharder work, issue 3)."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the loading subcommands on the ``vllm-gds`` parser."""
