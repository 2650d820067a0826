"""What the prompt passes' last decoder layer costs beyond the keys and values that Bitune keeps.

A prompt pass only needs every layer's K/V. In the last layer, everything after the K/V projections (queries,
attention, o_proj, the MLP, the final norm) is wasted. Without activation checkpointing the core stops each
prompt pass right after the last layer's K/V; under checkpointing it cannot (a replayed layer must run as
its first run did), so that tail is computed in the forward and again in the recompute. This script times a
Bitune training step as shipped (tail skipped) against the same step with the tail computed, without
checkpointing: the difference is the tail's forward cost, and about half of what checkpointing pays for it.

    python benchmarks/last_layer.py            # ~3 minutes on 2 cores
    python benchmarks/last_layer.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import common

from bitune import BituneModel
from bitune.core.caches import KVRecorder
from bitune.core.passes import num_layers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.training_parser(__doc__, repeats=5)
    return common.parse_training_args(parser, argv)


def computing_the_last_layer(model: BituneModel) -> BituneModel:
    """Make `model`'s prompt passes run their last layer to the end, as they do under checkpointing."""
    # A measurement device: the recorder the core would use under checkpointing, without checkpointing.
    model._recorder = lambda: KVRecorder(num_layers(model.base_model))
    return model


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    base = common.prepare(args)
    rows = []
    for prompt_length, answer_length in args.shapes:
        batch = common.random_batch(
            args.batch_size, prompt_length, answer_length, base.config.vocab_size, args.device
        )
        models = {
            "skipped": common.wrap("bitune", base),
            "computed": computing_the_last_layer(common.wrap("bitune", base)),
        }
        steps = {
            name: common.timed(common.training_step("bitune", model, batch), args.device)
            for name, model in models.items()
        }
        seconds = common.interleaved(steps, args.repeats, args.warmup)
        row: dict[str, Any] = {
            "P": prompt_length,
            "T": answer_length,
            "batch_size": args.batch_size,
            "seconds": seconds,
        }
        for name, times in seconds.items():
            row[f"{name}_step_s"] = statistics.median(times)
        row["computed_over_skipped"] = common.median_ratio(seconds["computed"], seconds["skipped"])
        row["tail_share_of_step"] = 1 - 1 / row["computed_over_skipped"]
        rows.append(row)
        print(f"  P={prompt_length} T={answer_length}: x{row['computed_over_skipped']:.3f}", flush=True)
    common.print_table(
        f"Bitune step with the prompt passes' last-layer tail skipped (as shipped) or computed (batch "
        f"{args.batch_size}, seconds, median of {args.repeats} paired repetitions)",
        rows,
        ["P", "T", "skipped_step_s", "computed_step_s", "computed_over_skipped", "tail_share_of_step"],
    )
    return common.save_results(args, "last_layer", rows, common.parameter_count(base))


if __name__ == "__main__":
    main(sys.argv[1:])
