"""``lgca relabel SOURCE --output NEW --classes ...``: a labelled output's image states, scored with
other classes (or descriptions, templates, method, aggregation, lambda_t, top-k, fewer steps),
without encoding any image again. Flags or a YAML job file (``kind: relabel``); the run itself
is :func:`pipeline.distributed.relabel.run_relabel_job`."""
from __future__ import annotations

import argparse

from pipeline.options import add_label_arguments, job_from_args


def _relabel(args: argparse.Namespace) -> int:
    from pipeline.distributed.relabel import run_relabel_job  # Ray only when a relabel runs

    summary = run_relabel_job(job_from_args(args, "relabel"))
    print(summary.describe())
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``relabel`` subcommand to the ``lgca`` command line."""
    parser = commands.add_parser(
        "relabel", help="score a labelled output's kept image states with other classes (no image encoded again)",
        description="Score the image states an lgca label run kept (k_0, p_0..p_T) against another text side "
                    "into a new output, in the schema of lgca label; incremental like lgca label. See "
                    "docs/output-schema.md for what can change without encoding the images again.")
    parser.add_argument("source", nargs="?", metavar="SOURCE",
                        help="the lgca label output whose states are scored (or 'source:' in the job file)")
    add_label_arguments(parser, "relabel", skip=("source",))
    parser.set_defaults(handler=_relabel)
