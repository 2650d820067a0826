"""Argument pieces shared by the `bitune` commands: the help layout, which model to load, how to generate."""

from __future__ import annotations

import argparse
import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

from transformers import set_seed

from bitune.core.loading import DTYPES, QUANTIZATIONS


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows the defaults that say something, and keeps the line breaks of the examples."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == []:
            return action.help or ""
        return super()._get_help_string(action)


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint and --base-model: the trained model to load (generate, chat, export)."""
    parser.add_argument(
        "--checkpoint", required=True, type=Path, metavar="DIR", help="a Bitune checkpoint folder"
    )
    parser.add_argument(
        "--base-model",
        metavar="NAME_OR_PATH",
        help="hub id or local folder of the base model (default: the one recorded in the checkpoint)",
    )


def add_device_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--device and --dtype: where the model runs and the dtype of its base weights."""
    parser.add_argument(
        "--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:1, mps"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=list(DTYPES),
        help="dtype of the base weights ('auto': the model's own)",
    )


def add_quantization_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--quantization: load the base model k-bit quantized (bitsandbytes), or not."""
    parser.add_argument(
        "--quantization",
        choices=list(QUANTIZATIONS),
        help="load the base model 4-bit or 8-bit quantized (bitsandbytes), or not ('none'); default: as the "
        "checkpoint records (a model trained on a k-bit base), else not",
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model to talk to (--checkpoint, --base-model, --device, --dtype) and the prompt --template."""
    add_checkpoint_arguments(parser)
    add_device_arguments(parser)
    add_quantization_argument(parser)
    parser.add_argument(
        "--template",
        default="plain",
        help='"plain" (Question: {prompt}\\n\\nAnswer:, as in training), "chat" (the tokenizer\'s chat '
        'template), "none", or any text containing {prompt}',
    )


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """How to decode: --max-new-tokens, --do-sample, --temperature, --top-p, --seed, --stop."""
    parser.add_argument("--max-new-tokens", type=int, default=256, help="the most tokens to generate")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)"
    )
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --do-sample)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    parser.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop when this text appears; repeatable"
    )


def model_source(args: argparse.Namespace) -> dict:
    """The keyword arguments of `load_for_inference` that the model arguments of a command carry."""
    names = ("checkpoint", "base_model", "peft_adapter", "tokenizer", "device", "dtype", "quantization")
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def generation_kwargs(args: argparse.Namespace) -> dict:
    """The `generate` keyword arguments of the sampling arguments (seeds the sampler with --do-sample)."""
    kwargs: dict = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    if args.do_sample:
        set_seed(args.seed)
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
    if args.stop:
        kwargs["stop_strings"] = args.stop
    return kwargs


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Keep the libraries' warnings and progress bars out of what a command prints for its user (chat answers,
    generated text), while the block runs; also a decorator (`@quiet_libraries()`).

    Python warnings (transformers' FutureWarnings, ...) go to the `bitune` log at debug level instead of
    stderr; a filter that makes them errors (as the tests' does for FutureWarnings) still raises. transformers
    logs errors only and shows no progress bars.
    """
    from transformers.utils import logging as transformers_logging

    def to_log(message, category, filename, lineno, file=None, line=None) -> None:
        logging.getLogger("bitune").debug("%s:%d: %s: %s", filename, lineno, category.__name__, message)

    verbosity = transformers_logging.get_verbosity()
    progress_bars = transformers_logging.is_progress_bar_enabled()
    shown, warnings.showwarning = warnings.showwarning, to_log
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        warnings.showwarning = shown
        transformers_logging.set_verbosity(verbosity)
        if progress_bars:
            transformers_logging.enable_progress_bar()
