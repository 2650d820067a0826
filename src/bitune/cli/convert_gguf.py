"""`bitune convert-gguf`: a GGUF model into a Hugging Face folder, dequantized once (`bitune.core.convert`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from bitune.core.convert import convert_gguf
from bitune.core.loading import DTYPES

HELP = "dequantize a GGUF model + tokenizer once into a Hugging Face model folder (safetensors)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `convert-gguf` arguments to `parser`."""
    parser.description = (
        "Dequantize a GGUF model (llama.cpp's format) and its tokenizer into a Hugging Face folder. A GGUF file "
        "also works directly wherever bitune takes a model (it is dequantized at every load), but large files take "
        "minutes to dequantize: convert them once."
    )
    parser.epilog = "example: bitune convert-gguf SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2-135m"
    parser.add_argument("gguf_file", type=Path, metavar="MODEL.gguf", help="the GGUF file")
    parser.add_argument(
        "output_dir", type=Path, metavar="OUTPUT_DIR", help="folder to create (must be absent or empty)"
    )
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES), help="dtype of the written weights")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it is not empty")


def run(args: argparse.Namespace) -> int:
    """Run the `convert-gguf` command from parsed `args`; returns the exit code."""
    output_dir = convert_gguf(args.gguf_file, args.output_dir, dtype=args.dtype, overwrite=args.overwrite)
    print(f"Wrote Hugging Face model and tokenizer to {output_dir}")
    return 0
