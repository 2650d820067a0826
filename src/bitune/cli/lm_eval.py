"""`bitune lm-eval ARGS`: lm-evaluation-harness's command line with the `bitune` model registered.

See `bitune.evaluation.harness`.
"""

from __future__ import annotations

import argparse

from bitune.errors import BituneInputError

HELP = "run lm-evaluation-harness with the `bitune` model registered"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `lm-eval` arguments to `parser`: all of them are lm-eval's."""
    parser.description = (
        "Run lm-evaluation-harness's command line with the `bitune` model registered, e.g. "
        "`bitune lm-eval run --model bitune --model_args pretrained=BASE,bitune=CHECKPOINT --tasks piqa`. "
        "Every argument is lm-eval's; `bitune lm-eval run --help` lists them."
    )
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER, metavar="ARGS", help="lm-eval's arguments")
    # All arguments, options and -h included, belong to lm-eval: this parser must not claim any of them.
    parser.prefix_chars = "\0"


def run(args: argparse.Namespace) -> int:
    """Run the `lm-eval` command; returns lm-eval's exit code."""
    try:
        from bitune.evaluation import harness  # imported here: lm-eval is optional and slow to import
    except ImportError as error:
        raise BituneInputError(
            f"bitune lm-eval needs lm-evaluation-harness: pip install 'bitune[eval]' ({error})"
        ) from error
    return harness.main(args.lm_eval_args)
