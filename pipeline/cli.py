"""The ``lgca`` command line. It only parses arguments into configs and calls the stages."""
from __future__ import annotations

import argparse
import logging
import sys

from pipeline.commands import bench, evaluate, explain, query, relabel, search, submit
from pipeline.config import LgcaError
from pipeline.options import add_label_arguments, job_from_args


def _label(args: argparse.Namespace) -> int:
    from pipeline.distributed.job import run_label_job

    job = job_from_args(args)
    summary = run_label_job(job)
    print(summary.describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lgca", description="Zero-shot image labelling with CLIP and LGCA on Ray")
    commands = parser.add_subparsers(dest="command", required=True)
    label = commands.add_parser("label", help="label images into Parquet (incremental, resumable)")
    add_label_arguments(label)
    label.set_defaults(handler=_label)
    for module in (submit, query, explain, evaluate, bench, relabel, search):
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lgca`` console script; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except LgcaError as exc:  # the one place an error becomes a message and an exit status
        print(f"lgca {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
