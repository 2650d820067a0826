"""`bitune experiment`: run a grid of Bitune, baseline and ablation trainings, then write the report."""

from __future__ import annotations

import argparse
from pathlib import Path

from bitune.cli.common import HelpFormatter

HELP = "run a grid of Bitune, baseline and ablation trainings (methods x PEFT kinds x seeds), then report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `experiment` arguments to `parser`."""
    parser.formatter_class = HelpFormatter  # keeps the examples' line breaks
    parser.description = (
        "Run a grid of Bitune, baseline and ablation trainings (methods x PEFT kinds x seeds) with the same data, "
        "steps, learning rate and evaluation, then write the report (bitune report). Finished cells are skipped, "
        "so an interrupted experiment continues where it stopped."
    )
    parser.epilog = (
        "examples:\n  bitune experiment configs/experiments/cpu_synthetic.yaml\n"
        "  bitune experiment configs/experiments/paper_instruct.yaml --only 'bitune-lora-*' --only 'baseline-lora-*'"
    )
    parser.add_argument(
        "config", type=Path, metavar="CONFIG.yaml", help="the experiment file (see configs/experiments)"
    )
    parser.add_argument("--output-dir", type=Path, help="replace the file's output_dir")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="PATTERN",
        help="run only the cells whose name matches this shell pattern (e.g. 'bitune-lora-*'); repeatable",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the cells and their state; run nothing")
    parser.add_argument("--no-report", action="store_true", help="do not write the report at the end")


def run(args: argparse.Namespace) -> int:
    """Run the `experiment` command; returns the exit code."""
    # Imported here: training and evaluation are slow to import.
    from bitune.experiments.cells import cell_state, run_experiment
    from bitune.experiments.report import write_report
    from bitune.experiments.settings import load_experiment

    experiment = load_experiment(args.config, output_dir=args.output_dir)
    if args.dry_run:
        for cell in experiment.cells():
            print(f"{cell.name:40s} {cell_state(experiment, cell)}")
        return 0
    run_experiment(experiment, only=args.only)
    if not args.no_report:
        print(f"wrote {write_report(experiment.root)}")
    return 0
