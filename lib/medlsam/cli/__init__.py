"""The `medlsam` command: train MedLAM, build template banks, localise and segment organs."""

from __future__ import annotations

import argparse
import logging
import sys

from medlsam.cli import adapt, dicom, segment, templates, train
from medlsam.errors import MedLSAMError
from medlsam.learn import cli as learn


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand (each module of this package adds its own)."""
    parser = argparse.ArgumentParser(prog="medlsam", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (train, templates, segment, adapt, dicom, learn):
        module.add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the launchers (torchrun, --workers)
    logging.basicConfig(level=logging.INFO, format="medlsam: %(message)s")
    try:
        code = args.func(args)
    except MedLSAMError as exc:
        print(f"medlsam: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medlsam: interrupted (outputs are written atomically: no partial file is left)", file=sys.stderr)
        return 130
    return int(code or 0)
