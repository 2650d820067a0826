"""The `bitune` command line: one entry point, one sub-command per job.

Each sub-command lives next to the code it drives and contributes two functions: `add_arguments(parser)`
and `run(args) -> int`. A `BituneInputError` becomes a one-line message and exit code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from bitune import __version__
from bitune.errors import BituneInputError

# name -> (module, adder, runner, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "demo": (
        "bitune.experiments.demo",
        "add_arguments",
        "run",
        "the self-contained demo: synthetic data, a tiny pretrained model, Bitune tuning, accuracy",
    ),
    "convert-llama2c": (
        "bitune.core.convert",
        "add_convert_arguments",
        "run_convert",
        "convert a llama2.c checkpoint + tokenizer into a Hugging Face model folder",
    ),
    "eval": (
        "bitune.evaluation.runner",
        "add_eval_arguments",
        "run_eval",
        "score a Bitune checkpoint, PEFT adapter or base model on benchmark tasks",
    ),
    "lm-eval": (
        "bitune.evaluation.runner",
        "add_lm_eval_arguments",
        "run_lm_eval",
        "run lm-evaluation-harness with the `bitune` model registered",
    ),
    "train": (
        "bitune.cli.commands",
        "add_train_arguments",
        "run_train",
        "fine-tune a model with Bitune from a YAML config (+ --key value overrides)",
    ),
    "generate": (
        "bitune.cli.commands",
        "add_generate_arguments",
        "run_generate",
        "answer prompts with a trained model",
    ),
    "chat": (
        "bitune.cli.commands",
        "add_chat_arguments",
        "run_chat",
        "talk to a trained model in the terminal",
    ),
    "export": (
        "bitune.core.export",
        "add_arguments",
        "run",
        "write a LoRA checkpoint with θ_c merged into the base weights, for serving at the base model's speed",
    ),
    "experiment": (
        "bitune.experiments.grid",
        "add_arguments",
        "run",
        "run a grid of Bitune, baseline and ablation trainings (methods x PEFT kinds x seeds), then report",
    ),
    "report": (
        "bitune.experiments.report",
        "add_arguments",
        "run",
        "write the report (tables, paired tests, plots) of an experiment folder",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitune",
        description="Bidirectional instruction-tuning (Bitune) for Hugging Face causal language models.",
        epilog="Run `bitune COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"bitune {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, adder, _, summary) in COMMANDS.items():
        sub = commands.add_parser(name, help=summary, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        getattr(importlib.import_module(module), adder)(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, _, runner, _ = COMMANDS[args.command]
    try:
        return getattr(importlib.import_module(module), runner)(args)
    except BituneInputError as error:
        print(f"bitune {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bitune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
