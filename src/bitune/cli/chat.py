"""`bitune chat`: talk to a trained model in the terminal."""

from __future__ import annotations

import argparse

from bitune.cli.common import (
    HelpFormatter,
    add_model_arguments,
    add_sampling_arguments,
    generation_kwargs,
    model_source,
    quiet_libraries,
)
from bitune.core.generation import stream
from bitune.core.pretrained import load_for_inference
from bitune.core.prompts import render_prompt

HELP = "talk to a trained model in the terminal"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `chat` arguments to `parser`."""
    parser.formatter_class = HelpFormatter
    parser.description = (
        "Talk to a trained Bitune model in the terminal. The answer is printed as it is generated. Each "
        "message is answered on its own (the model sees no earlier turns), with the training template."
    )
    parser.epilog = """\
examples:
  bitune chat --checkpoint runs/bitune/final
  bitune chat --checkpoint runs/bitune/final --do-sample --temperature 0.7 --max-new-tokens 512
"""
    add_model_arguments(parser)
    add_sampling_arguments(parser)


@quiet_libraries()  # no library warnings or progress bars between the answers
def run(args: argparse.Namespace) -> int:
    """Run the `chat` command; returns the exit code."""
    model, tokenizer = load_for_inference(**model_source(args))
    print(f"Chatting with {args.checkpoint}. An empty line or Ctrl-D ends the chat.")
    while True:
        try:
            message = input("\nyou> ").strip()
        except EOFError:
            break
        if not message:
            break
        print("model> ", end="", flush=True)
        prompt = render_prompt(message, args.template, tokenizer)
        for piece in stream(model, tokenizer, prompt, **generation_kwargs(args)):
            print(piece, end="", flush=True)
        print()
    return 0
