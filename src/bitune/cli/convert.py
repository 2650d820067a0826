"""`bitune convert-llama2c`: a llama2.c checkpoint + tokenizer into a Hugging Face folder (`bitune.core.convert`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from bitune.core.convert import convert_llama2c

HELP = "convert a llama2.c checkpoint + tokenizer into a Hugging Face model folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `convert-llama2c` arguments to `parser`."""
    parser.description = (
        "Convert a llama2.c model (legacy version-0 .bin, e.g. stories260K.bin) and its tokenizer.bin "
        "(e.g. tok512.bin) into a Hugging Face Llama folder that AutoModelForCausalLM and AutoTokenizer load."
    )
    parser.epilog = "example: bitune convert-llama2c stories260K.bin tok512.bin models/stories260k"
    parser.add_argument(
        "checkpoint", type=Path, metavar="MODEL.bin", help="llama2.c checkpoint (legacy format)"
    )
    parser.add_argument("tokenizer", type=Path, metavar="TOKENIZER.bin", help="llama2.c tokenizer file")
    parser.add_argument(
        "output_dir", type=Path, metavar="OUTPUT_DIR", help="folder to create (must be absent or empty)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it is not empty")


def run(args: argparse.Namespace) -> int:
    """Run the `convert-llama2c` command from parsed `args`; returns the exit code."""
    output_dir = convert_llama2c(args.checkpoint, args.tokenizer, args.output_dir, overwrite=args.overwrite)
    print(f"Wrote Hugging Face model and tokenizer to {output_dir}")
    return 0
