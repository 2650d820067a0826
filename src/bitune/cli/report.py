"""`bitune report`: the tables, paired tests and plots of an experiment folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from bitune.cli.common import HelpFormatter

HELP = "write the report (tables, paired tests, plots) of an experiment folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `report` arguments to `parser`."""
    parser.formatter_class = HelpFormatter
    parser.description = (
        "Write the report of an experiment: OUT_DIR/report/report.md with the results table (mean ± std over "
        "seeds), the difference of every method to the baseline with a paired test over items, and PNG plots "
        "of the scores, the loss curves and the learned mixing coefficients."
    )
    parser.epilog = "example: bitune report runs/experiments/cpu-synthetic"
    parser.add_argument(
        "output_dir", type=Path, metavar="OUT_DIR", help="the output_dir of `bitune experiment`"
    )


def run(args: argparse.Namespace) -> int:
    """Run the `report` command; returns the exit code."""
    from bitune.experiments.report import write_report  # imported here: matplotlib is slow to import

    print(f"wrote {write_report(args.output_dir)}")
    return 0
