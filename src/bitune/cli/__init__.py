"""The `bitune` command line: one entry point, one sub-command per job.

Each sub-command is a module of this package with `HELP` (its one-line summary), `add_arguments(parser)` and
`run(args) -> int`; argument parsing lives here only, the work in the packages below. A `BituneInputError`
becomes a one-line message and exit code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from bitune._version import __version__
from bitune.cli import (
    chat,
    convert,
    convert_gguf,
    demo,
    eval,
    experiment,
    export,
    generate,
    lm_eval,
    report,
    serve,
    train,
)
from bitune.errors import BituneInputError

# command name -> its module
COMMANDS: dict[str, ModuleType] = {
    "demo": demo,
    "convert-llama2c": convert,
    "convert-gguf": convert_gguf,
    "eval": eval,
    "lm-eval": lm_eval,
    "train": train,
    "generate": generate,
    "chat": chat,
    "serve": serve,
    "export": export,
    "experiment": experiment,
    "report": report,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitune",
        description="Bidirectional instruction-tuning (Bitune) for Hugging Face causal language models.",
        epilog="Run `bitune COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"bitune {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        sub = commands.add_parser(
            name, help=module.HELP, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        module.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except BituneInputError as error:
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())  # one line
        print(f"bitune {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bitune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
