"""`bitune generate`: answer prompts with a trained model."""

from __future__ import annotations

import argparse
import json

from bitune.cli.common import (
    HelpFormatter,
    add_model_arguments,
    add_sampling_arguments,
    generation_kwargs,
    model_source,
    quiet_libraries,
)
from bitune.core.generation import generate_text
from bitune.core.pretrained import load_for_inference
from bitune.core.prompts import render_prompt

HELP = "answer prompts with a trained model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `generate` arguments to `parser`."""
    parser.formatter_class = HelpFormatter
    parser.description = (
        "Answer prompts with a trained Bitune model: each prompt is put into the template, read twice "
        "(causally and bidirectionally) and answered; the answers are printed, one per prompt."
    )
    parser.epilog = """\
examples:
  bitune generate --checkpoint runs/bitune/final --prompt "Name three primary colours."
  bitune generate --checkpoint runs/bitune/final --prompt "Write a haiku." --do-sample --temperature 0.7
  bitune generate --checkpoint ckpt --base-model ./local-base --prompt "2+2?" --prompt "3+5?" --stop "Question:"
"""
    add_model_arguments(parser)
    parser.add_argument(
        "--prompt", action="append", required=True, metavar="TEXT", help="a prompt; repeat for several"
    )
    add_sampling_arguments(parser)
    parser.add_argument(
        "--json", action="store_true", help='print [{"prompt": ..., "answer": ...}, ...] instead'
    )


@quiet_libraries()  # no library warnings or progress bars between the answers
def run(args: argparse.Namespace) -> int:
    """Run the `generate` command; returns the exit code."""
    model, tokenizer = load_for_inference(**model_source(args))
    prompts = [render_prompt(prompt, args.template, tokenizer) for prompt in args.prompt]
    answers = [
        answer.strip() for answer in generate_text(model, tokenizer, prompts, **generation_kwargs(args))
    ]
    if args.json:
        print(json.dumps([{"prompt": p, "answer": a} for p, a in zip(args.prompt, answers)], indent=2))
    elif len(answers) == 1:
        print(answers[0])
    else:
        print(
            "\n\n".join(
                f"[{i}] {prompt}\n{answer}" for i, (prompt, answer) in enumerate(zip(args.prompt, answers), 1)
            )
        )
    return 0
