"""The `bitune train`, `bitune generate` and `bitune chat` commands (registered in `bitune.cli`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch
from transformers import set_seed

from bitune.core.checkpoint import recorded_base_model
from bitune.core.generation import generate_text, stream
from bitune.core.model import BituneModel
from bitune.core.prompts import render_prompt
from bitune.errors import BituneInputError

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows the defaults that say something, and keeps the line breaks of the examples."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == []:
            return action.help or ""
        return super()._get_help_string(action)


# ----------------------------------------------------------------------------------------------------------
# bitune train

TRAIN_EPILOG = """\
examples:
  # the paper's recipe (LoRA r=8, lr 3e-4, 3,000 steps x batch 10) on your model and data
  bitune train configs/paper_lora.yaml --model google/gemma-2b --data train.jsonl --output_dir runs/bitune

  # the LoRA baseline, or an ablation: one switch
  bitune train configs/paper_lora.yaml --bitune.mode baseline --output_dir runs/lora
  bitune train configs/paper_lora.yaml --bitune.mode naive_bidir --output_dir runs/naive

  # continue an interrupted run from its newest checkpoint
  bitune train configs/paper_lora.yaml --output_dir runs/bitune --training.resume_from_checkpoint latest

  # 4 GPUs with DDP (effective batch = batch_size x gradient_accumulation_steps x 4)
  torchrun --nproc_per_node 4 -m bitune train configs/paper_lora.yaml --training.batch_size 5 ...

settings (any of them as --section.key VALUE; see configs/paper_lora.yaml for all):
  model.name_or_path (or --model), model.dtype, data.path (or --data), data.format, data.template,
  data.max_length, data.limit, validation.path, validation.size, peft.kind (lora|dora|ia3), peft.r,
  peft.alpha, bitune.mode, bitune.core.mixing, training.learning_rate, training.max_steps,
  training.batch_size, training.gradient_accumulation_steps, training.precision (bf16|fp16|fp32),
  training.activation_checkpointing, training.save_steps, training.eval_steps, output_dir, device
"""


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `train` arguments to `parser` (used by the `bitune` CLI)."""
    parser.formatter_class = _HelpFormatter
    parser.description = (
        "Fine-tune a causal language model with Bitune (a causal and a bidirectional PEFT adapter whose keys and "
        "values are mixed per layer) on instruction data, with the Hugging Face Trainer. Settings come from a "
        "YAML file plus --section.key VALUE overrides. Writes checkpoint-N folders, metrics.jsonl (loss, "
        "learning rate, grad norm, mixing coefficients), TensorBoard logs and the final model (OUTPUT_DIR/final)."
    )
    parser.epilog = TRAIN_EPILOG
    parser.add_argument("config", type=Path, metavar="CONFIG.yaml", help="the run's settings (see configs/)")
    parser.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        metavar="--section.key VALUE",
        help="settings that replace those of the file, e.g. --training.learning_rate 1e-4",
    )


def run_train(args: argparse.Namespace) -> int:
    """Run the `train` command; returns the exit code."""
    from bitune.training import load_config, train  # imported here: transformers' Trainer is slow to import

    config = load_config(args.config, args.overrides)
    _log_to_console()
    final = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"Final model: {final}")
    return 0


def _log_to_console() -> None:
    """Show bitune's own progress messages (data statistics, resuming) on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    package_logger = logging.getLogger("bitune")
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)


# ----------------------------------------------------------------------------------------------------------
# bitune generate / bitune chat


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `generate` arguments to `parser` (used by the `bitune` CLI)."""
    parser.formatter_class = _HelpFormatter
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
    _add_model_arguments(parser)
    parser.add_argument(
        "--prompt", action="append", required=True, metavar="TEXT", help="a prompt; repeat for several"
    )
    _add_sampling_arguments(parser)
    parser.add_argument(
        "--json", action="store_true", help='print [{"prompt": ..., "answer": ...}, ...] instead'
    )


def run_generate(args: argparse.Namespace) -> int:
    """Run the `generate` command; returns the exit code."""
    model, tokenizer = load_for_inference(args.checkpoint, args.base_model, args.device, args.dtype)
    prompts = [render_prompt(prompt, args.template, tokenizer) for prompt in args.prompt]
    answers = [
        answer.strip() for answer in generate_text(model, tokenizer, prompts, **_generation_kwargs(args))
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


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `chat` arguments to `parser` (used by the `bitune` CLI)."""
    parser.formatter_class = _HelpFormatter
    parser.description = (
        "Talk to a trained Bitune model in the terminal. The answer is printed as it is generated. Each "
        "message is answered on its own (the model sees no earlier turns), with the training template."
    )
    parser.epilog = """\
examples:
  bitune chat --checkpoint runs/bitune/final
  bitune chat --checkpoint runs/bitune/final --do-sample --temperature 0.7 --max-new-tokens 512
"""
    _add_model_arguments(parser)
    _add_sampling_arguments(parser)


def run_chat(args: argparse.Namespace) -> int:
    """Run the `chat` command; returns the exit code."""
    model, tokenizer = load_for_inference(args.checkpoint, args.base_model, args.device, args.dtype)
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
        for piece in stream(model, tokenizer, prompt, **_generation_kwargs(args)):
            print(piece, end="", flush=True)
        print()
    return 0


def load_for_inference(
    checkpoint: str | Path, base_model: str | None = None, device: str = "auto", dtype: str = "auto"
) -> tuple[BituneModel, object]:
    """A trained model (in eval mode, on `device`) and its tokenizer, from a Bitune checkpoint folder.

    The tokenizer saved with the checkpoint is used; without one, the base model's.

    Example:
        >>> model, tokenizer = load_for_inference("runs/bitune/final")  # doctest: +SKIP
    """
    from bitune.training import load_tokenizer

    checkpoint = Path(checkpoint)
    base = base_model or recorded_base_model(checkpoint)
    has_tokenizer = (checkpoint / "tokenizer_config.json").is_file()
    if not has_tokenizer and not base:
        raise BituneInputError(f"{checkpoint} has no tokenizer and names no base model; pass --base-model")
    tokenizer = load_tokenizer(str(checkpoint) if has_tokenizer else base)
    model = BituneModel.from_pretrained(checkpoint, base_model, dtype=DTYPES[dtype])
    return model.to(_resolve_device(device)).eval(), tokenizer


def _add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint and --base-model: the trained model to load (generate, chat, export)."""
    parser.add_argument(
        "--checkpoint", required=True, type=Path, metavar="DIR", help="a Bitune checkpoint folder"
    )
    parser.add_argument(
        "--base-model",
        metavar="NAME_OR_PATH",
        help="hub id or local folder of the base model (default: the one recorded in the checkpoint)",
    )


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    _add_checkpoint_arguments(parser)
    parser.add_argument(
        "--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:1, mps"
    )
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES), help="dtype of the base weights")
    parser.add_argument(
        "--template",
        default="plain",
        help='"plain" (Question: {prompt}\\n\\nAnswer:, as in training), "chat" (the tokenizer\'s chat '
        'template), "none", or any text containing {prompt}',
    )


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
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


def _generation_kwargs(args: argparse.Namespace) -> dict:
    kwargs: dict = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    if args.do_sample:
        set_seed(args.seed)
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
    if args.stop:
        kwargs["stop_strings"] = args.stop
    return kwargs


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise BituneInputError(
            f"--device {device!r} is not a device; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BituneInputError("--device cuda: no GPU is available; use --device cpu")
    return resolved
