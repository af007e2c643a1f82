"""Command-line entry of the lab: ``batchnorm lab`` (and later ``batchnorm report``)."""

from __future__ import annotations

import argparse


def add_commands(commands: argparse._SubParsersAction) -> None:
    lab = commands.add_parser("lab", help="test batch norm's claims on real data")
    lab.set_defaults(handler=_lab)


def _lab(args: argparse.Namespace) -> int:
    print("batchnorm lab: the lab is not available yet in this version.")
    return 0
