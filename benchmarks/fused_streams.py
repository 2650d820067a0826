"""Would running both prompt streams as one batched call pay off? An upper bound, measured before building it.

The layer-synchronous forward runs, in every layer, the bidirectional prompt stream (adapter θ_b) and the causal
prompt stream (θ_c) as two calls of batch B. Fusing them into one call of batch 2B needs per-row adapter routing
inside the PEFT layers and one mask with causal and bidirectional rows, both of which cost extra. This script
times the best case of the fusion: the decoder stack (forward + backward, no lm_head) over two batches of B
prompts against one batch of 2B prompts, same adapter, same causal mask. The saving it shows is the most the
fusion could save on the prompt streams; if it is small, the fusion is not worth its complexity here.

    python benchmarks/fused_streams.py            # ~2 minutes on 2 cores
    python benchmarks/fused_streams.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from typing import Any

import common
import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.training_parser(__doc__, repeats=5)
    return common.parse_training_args(parser, argv)


def decoder_passes(decoder: torch.nn.Module, batches: list[torch.Tensor]) -> Callable[[], None]:
    """Forward and backward of the decoder stack over each batch of prompt tokens in turn."""

    def run() -> None:
        for ids in batches:
            decoder(input_ids=ids, use_cache=False).last_hidden_state.float().mean().backward()

    return run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    base = common.prepare(args)
    decoder = common.wrap("stock", base).get_base_model().model  # the decoder stack with LoRA, no lm_head
    rows = []
    for prompt_length, answer_length in args.shapes:
        batch = common.random_batch(
            2 * args.batch_size, prompt_length, answer_length, base.config.vocab_size, args.device
        )
        prompts = batch["prompt_ids"][:, :-1]  # what a prompt stream reads
        runs = {
            "two_calls": decoder_passes(decoder, [prompts[: args.batch_size], prompts[args.batch_size :]]),
            "one_call": decoder_passes(decoder, [prompts]),
        }
        seconds = common.interleaved(
            {name: common.timed(run, args.device) for name, run in runs.items()}, args.repeats, args.warmup
        )
        row: dict[str, Any] = {"P": prompt_length, "batch_size": args.batch_size, "seconds": seconds}
        for name, times in seconds.items():
            row[f"{name}_s"] = statistics.median(times)
        row["one_over_two"] = common.median_ratio(seconds["one_call"], seconds["two_calls"])
        row["best_saving_on_prompt_streams"] = 1 - row["one_over_two"]
        rows.append(row)
        print(f"  P={prompt_length}: one call / two calls = {row['one_over_two']:.3f}", flush=True)
    common.print_table(
        f"Both prompt streams (batch {args.batch_size} each) as two calls or as one call of batch "
        f"{2 * args.batch_size}: decoder forward + backward, seconds, median of {args.repeats} paired repetitions",
        rows,
        ["P", "two_calls_s", "one_call_s", "one_over_two", "best_saving_on_prompt_streams"],
    )
    return common.save_results(args, "fused_streams", rows, common.parameter_count(base))


if __name__ == "__main__":
    main(sys.argv[1:])
