"""Training throughput of Bitune against plain PEFT fine-tuning, next to the physical bound.

For a sample of P prompt and T answer tokens, plain fine-tuning processes P+T tokens and Bitune
(P−1)+(P−1)+(T+1), so Bitune's best throughput relative to plain fine-tuning is B = (P+T)/(2P+T−1).
This script measures R = Bitune/baseline samples per second against two baselines:

* stock:    a PEFT model's ordinary forward with labels (logits at every position, as TRL's SFT does);
* baseline: plain PEFT fine-tuning with logits only where the loss needs them (Bitune's "baseline" mode).

A step is forward + backward + AdamW on the trainable parameters, with and without activation checkpointing.

Model FLOPs utilisation (MFU, when the device's peak is known: PEAK_BF16_FLOPS in common.py, or --peak-flops) is
the usual estimate 6·N FLOPs per token for a forward + backward through the N base parameters (the PaLM/Kaplan
convention: no attention FLOPs, and the frozen weights counted as if they were trained), per second, over the
peak. The tokens are those every pass processes: P+T per sample for the baselines, (P−1)+(P−1)+(T+1) = 2P+T−1
for Bitune, whose prompt passes are trained too (the answer loss reaches θ_c and θ_b through their keys and
values), so Bitune's MFU / the baseline's = R / B.

    python benchmarks/train_throughput.py                 # the issue's CPU setting, ~5 minutes on 2 cores
    python benchmarks/train_throughput.py --quick         # ~1-minute smoke run
    python benchmarks/train_throughput.py --device cuda --dtype bfloat16 --model-size 1b
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import common

MFU_DEFINITION = (
    "model FLOPs/s over the device's peak dense bf16 FLOP/s; model FLOPs = 6 x N base parameters x tokens "
    "processed (P+T per sample for stock and baseline, 2P+T-1 for Bitune's three passes)"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.training_parser(__doc__, repeats=5)
    parser.add_argument(
        "--checkpointing",
        nargs="+",
        choices=["off", "on"],
        default=["off", "on"],
        help="activation checkpointing settings to measure (default: off on)",
    )
    parser.add_argument(
        "--peak-flops",
        type=float,
        default=None,
        help="the device's peak dense FLOP/s for MFU (default: common.PEAK_BF16_FLOPS by the GPU's name)",
    )
    return common.parse_training_args(parser, argv)


def tokens_processed(kind: str, prompt_length: int, answer_length: int) -> int:
    """Tokens one sample sends through the decoder in a step of `kind` (every pass counted)."""
    if kind == "bitune":
        return 2 * prompt_length + answer_length - 1
    return prompt_length + answer_length


def measure(
    args: argparse.Namespace, base, checkpointing: bool, shape: tuple[int, int], peak: float | None = None
) -> dict[str, Any]:
    """Time a training step of every configuration on one shape, all interleaved in every repetition."""
    prompt_length, answer_length = shape
    batch = common.random_batch(args.batch_size, *shape, base.config.vocab_size, args.device)
    steps = {}
    for kind in common.KINDS:
        model = common.wrap(kind, base)
        if checkpointing:
            common.enable_checkpointing(model)
        steps[kind] = common.timed(common.training_step(kind, model, batch), args.device)
    seconds = common.interleaved(steps, args.repeats, args.warmup)
    row: dict[str, Any] = {
        "P": prompt_length,
        "T": answer_length,
        "checkpointing": checkpointing,
        "batch_size": args.batch_size,
        "B": common.bound(prompt_length, answer_length),
        "seconds": seconds,
    }
    for kind, times in seconds.items():
        row[f"{kind}_samples_per_s"] = args.batch_size / statistics.median(times)
        row[f"{kind}_tokens_per_s"] = row[f"{kind}_samples_per_s"] * (prompt_length + answer_length)
        flops = 6 * common.parameter_count(base) * tokens_processed(kind, *shape) * args.batch_size
        row[f"{kind}_model_flops_per_step"] = flops
        row[f"{kind}_model_flops_per_s"] = flops / statistics.median(times)
        row[f"{kind}_mfu"] = row[f"{kind}_model_flops_per_s"] / peak if peak else None
    for baseline in ("baseline", "stock"):
        row[f"R_{baseline}"] = common.median_ratio(seconds[baseline], seconds["bitune"])
        row[f"R_{baseline}_over_B"] = row[f"R_{baseline}"] / row["B"]
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    base = common.prepare(args)
    peak, peak_source = common.peak_flops(args.device, args.peak_flops)
    rows = []
    for setting in args.checkpointing:
        for shape in args.shapes:
            row = measure(args, base, setting == "on", shape, peak)
            rows.append(row)
            print(
                f"  P={row['P']} T={row['T']} checkpointing={setting}: R_baseline={row['R_baseline']:.3f} "
                f"R_stock={row['R_stock']:.3f} B={row['B']:.3f}",
                flush=True,
            )
    throughput = [
        {"P": r["P"], "T": r["T"], "checkpointing": r["checkpointing"], "configuration": kind,
         "samples/s": r[f"{kind}_samples_per_s"], "tokens/s": r[f"{kind}_tokens_per_s"],
         "TFLOP/s": r[f"{kind}_model_flops_per_s"] / 1e12, "MFU": r[f"{kind}_mfu"] or "n/a"}
        for r in rows
        for kind in common.KINDS
    ]  # fmt: skip
    common.print_table(
        f"Training throughput (batch {args.batch_size}, median of {args.repeats} repetitions)",
        throughput,
        ["P", "T", "checkpointing", "configuration", "samples/s", "tokens/s", "TFLOP/s", "MFU"],
    )
    peak_text = f"{peak:.3g} FLOP/s ({peak_source})" if peak else "unknown: pass --peak-flops"
    print(f"\nMFU = {MFU_DEFINITION}; peak {peak_text}")
    common.print_table(
        "Bitune against the baselines: R = Bitune/baseline samples/s (median of per-repetition ratios), "
        "B = (P+T)/(2P+T-1)",
        rows,
        ["P", "T", "checkpointing", "B", "R_baseline", "R_baseline_over_B", "R_stock", "R_stock_over_B"],
    )
    return common.save_results(
        args,
        "train_throughput",
        rows,
        common.parameter_count(base),
        peak_flops=peak,
        peak_flops_source=peak_source,
        mfu_definition=MFU_DEFINITION,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
