"""`bitune train`: fine-tune a model with Bitune from a YAML config plus --section.key VALUE overrides."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from bitune.cli.common import HelpFormatter

HELP = "fine-tune a model with Bitune from a YAML config (+ --key value overrides)"

EPILOG = """\
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

settings (any of them as --section.key VALUE; docs/config_reference.md explains every key):
  model.name_or_path (or --model), model.dtype, data.path (or --data; a list mixes several),
  data.format, data.template, data.chat_template, data.max_length, data.empty, data.limit,
  validation.path, validation.size, validation.limit, peft.kind (lora|dora|ia3), peft.r,
  peft.alpha, bitune.mode, bitune.mixing, training.learning_rate, training.max_steps,
  training.batch_size, training.gradient_accumulation_steps, training.precision (bf16|fp16|fp32),
  training.activation_checkpointing, training.save_steps, training.eval_steps, output_dir, device
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `train` arguments to `parser`."""
    parser.formatter_class = HelpFormatter
    parser.description = (
        "Fine-tune a causal language model with Bitune (a causal and a bidirectional PEFT adapter whose keys and "
        "values are mixed per layer) on instruction data, with the Hugging Face Trainer. Settings come from a "
        "YAML file plus --section.key VALUE overrides. Writes checkpoint-N folders, metrics.jsonl (loss, "
        "learning rate, grad norm, mixing coefficients), TensorBoard logs and the final model (OUTPUT_DIR/final)."
    )
    parser.epilog = EPILOG
    parser.add_argument("config", type=Path, metavar="CONFIG.yaml", help="the run's settings (see configs/)")
    parser.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        metavar="--section.key VALUE",
        help="settings that replace those of the file, e.g. --training.learning_rate 1e-4",
    )


def run(args: argparse.Namespace) -> int:
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
    handler.set_name("bitune-console")
    package_logger = logging.getLogger("bitune")
    for earlier in [h for h in package_logger.handlers if h.get_name() == "bitune-console"]:
        package_logger.removeHandler(earlier)  # one handler, on the current stderr, however often run
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
