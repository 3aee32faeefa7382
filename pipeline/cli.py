"""The ``lgca`` command line. It only parses arguments into configs and calls the stages."""
from __future__ import annotations

import argparse
import logging
import sys

from pipeline.commands import bench, evaluate, explain, export, query, relabel, report, search, submit
from pipeline.config import LgcaError
from pipeline.options import add_label_arguments, job_from_args
from pipeline.storage import redact

INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells report it
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def _label(args: argparse.Namespace) -> int:
    from pipeline.distributed.console import Display
    from pipeline.distributed.job import run_label_job

    job = job_from_args(args)
    display = Display(verbosity=args.verbosity, ray_progress=args.ray_progress)
    summary = run_label_job(job, display)
    print(summary.describe())
    return 0


def add_display_arguments(parser: argparse.ArgumentParser) -> None:
    """How much ``lgca label`` prints: these change no result, so they are flags only, not job keys."""
    level = parser.add_mutually_exclusive_group()
    level.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, default=0,
                       help="print only warnings, errors and the closing summary (no progress line)")
    level.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1,
                       help="also print Ray's and Ray Data's own messages (execution plan, start-up)")
    parser.add_argument("--ray-progress", action="store_true",
                        help="show Ray Data's own progress bars (per stage, counting blocks) as well")


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append ``(default: X)`` to the help of every option of every subcommand that does not say
    its default yet, so ``--help`` shows them all (options without a default, flags that are off
    unless given, and help that names its default in words are left as they are)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                show_defaults(sub)
            continue
        if (not action.option_strings or not action.help or action.help == argparse.SUPPRESS
                or "default" in action.help.lower() or "(required)" in action.help
                or action.default in (None, False, argparse.SUPPRESS) or action.nargs == 0):
            continue
        action.help += " (default: %(default)r)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lgca", description="Zero-shot image labelling with CLIP and LGCA on Ray")
    commands = parser.add_subparsers(dest="command", required=True)
    label = commands.add_parser("label", help="label images into Parquet (incremental, resumable)")
    add_label_arguments(label)
    add_display_arguments(label)
    label.set_defaults(handler=_label)
    for module in (submit, query, explain, evaluate, bench, relabel, search, report, export):
        module.register(commands)
    show_defaults(parser)
    return parser


def configure_logging(verbosity: int = 0) -> None:
    """This package's messages at INFO (WARNING with ``--quiet``, DEBUG with ``--verbose``); other
    libraries' at WARNING, so that open_clip's INFO lines on the root logger stay out."""
    logging.basicConfig(format=LOG_FORMAT)
    logging.getLogger().setLevel(logging.WARNING)  # also where a handler was there before (basicConfig skips)
    logging.getLogger("pipeline").setLevel({-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lgca`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "verbosity", 0))
    try:
        return args.handler(args)
    except LgcaError as exc:  # the one place an error becomes a message and an exit status
        print(f"lgca {args.command}: error: {redact(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # Ctrl-C: one line (a label run says how far it got), no traceback
        print(f"lgca {args.command}: {str(exc) or 'interrupted'}", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
