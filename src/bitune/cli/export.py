"""`bitune export`: write a LoRA checkpoint with θ_c merged into the base weights (`bitune.core.export`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from bitune.cli.common import HelpFormatter, add_checkpoint_arguments
from bitune.core.export import check_export_folder, export_merged
from bitune.core.loading import DTYPES, QUANTIZATIONS, load_tokenizer, tokenizer_source, torch_dtype
from bitune.core.model import BituneModel
from bitune.core.modes import BIDIR_ADAPTER
from bitune.errors import BituneError, BituneInputError

HELP = "write a LoRA checkpoint with θ_c merged into the base weights, for serving at the base model's speed"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `export` arguments to `parser`."""
    parser.formatter_class = HelpFormatter
    parser.description = (
        "Write a LoRA Bitune checkpoint as a merged model for serving: θ_c is folded into the base weights "
        "and θ_b becomes one LoRA relative to them (used only to read the prompt), so decoding runs at the "
        "base model's speed. Load the result with BituneModel.from_pretrained(OUTPUT_DIR) or `bitune "
        "generate --checkpoint OUTPUT_DIR`."
    )
    add_checkpoint_arguments(parser)
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=list(DTYPES),
        help="dtype of the exported weights (merged in float32)",
    )
    parser.add_argument(
        "--quantization",
        choices=list(QUANTIZATIONS),
        help="load the base model so (default: as the checkpoint records); a checkpoint trained on a k-bit "
        "base is exported merged into the full-precision base with 'none'",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUTPUT_DIR when it is not empty (never the checkpoint's or the base model's folder)",
    )
    parser.add_argument(
        "output_dir", type=Path, metavar="OUTPUT_DIR", help="the folder to write (new or empty)"
    )


def run(args: argparse.Namespace) -> int:
    """Run the `export` command; returns the exit code."""
    check_export_folder(args.output_dir, args.overwrite, [args.checkpoint, args.base_model])  # before loading
    loading = {} if args.quantization is None else {"quantization": args.quantization}
    model = BituneModel.from_pretrained(
        args.checkpoint, args.base_model, dtype=torch_dtype(args.dtype), **loading
    )
    source = tokenizer_source(args.checkpoint, model.config._name_or_path)
    try:
        tokenizer = load_tokenizer(source)
    except BituneInputError:
        tokenizer = None
        print(f"bitune export: note: no tokenizer found in {source}; the export has none")
    try:
        export_merged(model, args.output_dir, tokenizer, overwrite=args.overwrite, source=args.checkpoint)
    except BituneInputError:
        raise
    except BituneError as error:
        raise BituneInputError(f"{args.checkpoint}: {error}") from error
    has_bidir = BIDIR_ADAPTER in model.bitune_config.spec.adapters
    adapter = "a LoRA for the bidirectional prompt pass" if has_bidir else "no adapter"
    print(f"exported {args.checkpoint} to {args.output_dir}: merged weights and {adapter}")
    return 0
