"""Inference latency of Bitune against the plain PEFT model: prefill and per-token decoding.

Bitune reads the prompt twice at prefill (2(P−1)+1 tokens against P, so the bound is ≈ 2×) and decodes
exactly like the plain model from then on (bound 1×). Both go through their `generate` (greedy, a fixed
number of new tokens); a logits processor timestamps every step, so one call yields both numbers: prefill =
call start to the first token's logits, decode = mean time per later token.

    python benchmarks/inference_speed.py            # ~3 minutes on 2 cores
    python benchmarks/inference_speed.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import common
import torch
from transformers import LogitsProcessor, LogitsProcessorList


class StepClock(LogitsProcessor):
    """Records the time at which each generation step's logits are ready; changes nothing."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        common.synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, repeats=7)
    parser.add_argument("--prompt-length", type=int, default=192)
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per call (default: 32)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 2)
    return args


def latency(model: torch.nn.Module, prompts: dict[str, torch.Tensor], new_tokens: int, device: str):
    """A callable that runs one greedy generation and returns (prefill seconds, decode seconds per token)."""

    @torch.no_grad()
    def run() -> dict[str, float]:
        clock = StepClock(device)
        common.synchronize(device)
        start = time.perf_counter()
        model.generate(
            **prompts,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
        )
        first, last = clock.times[0], clock.times[-1]
        return {"prefill": first - start, "decode": (last - first) / max(len(clock.times) - 1, 1)}

    return run


def measure(args: argparse.Namespace, models: dict[str, torch.nn.Module], batch_size: int) -> dict[str, Any]:
    batch = common.random_batch(
        batch_size, args.prompt_length, 1, models["plain"].config.vocab_size, args.device
    )
    prompts = {"input_ids": batch["prompt_ids"], "attention_mask": batch["prompt_mask"]}
    candidates: dict[str, Callable[[], dict[str, float]]] = {
        name: latency(model, prompts, args.new_tokens, args.device) for name, model in models.items()
    }
    results = common.interleaved(candidates, args.repeats, args.warmup)
    row: dict[str, Any] = {"batch_size": batch_size, "P": args.prompt_length, "new_tokens": args.new_tokens}
    for phase in ("prefill", "decode"):
        series = {name: [r[phase] for r in runs] for name, runs in results.items()}
        for name, seconds in series.items():
            row[f"{name}_{phase}_ms"] = 1000 * statistics.median(seconds)
        row[f"{phase}_ratio"] = common.median_ratio(series["bitune"], series["plain"])
    row["prefill_bound"] = (2 * (args.prompt_length - 1) + 1) / args.prompt_length
    row["raw"] = results
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    base = common.prepare(args)
    models = {"plain": common.wrap("stock", base).eval(), "bitune": common.wrap("bitune", base).eval()}
    rows = []
    for batch_size in args.batch_sizes:
        rows.append(measure(args, models, batch_size))
        print(
            f"  batch {batch_size}: prefill x{rows[-1]['prefill_ratio']:.3f}, decode x{rows[-1]['decode_ratio']:.3f}",
            flush=True,
        )
    common.print_table(
        f"Inference latency, Bitune against the plain PEFT model (P={args.prompt_length}, {args.new_tokens} new "
        f"tokens, greedy; ratio = median of {args.repeats} paired repetitions)",
        rows,
        [
            "batch_size",
            "plain_prefill_ms",
            "bitune_prefill_ms",
            "prefill_ratio",
            "prefill_bound",
            "plain_decode_ms",
            "bitune_decode_ms",
            "decode_ratio",
        ],
    )
    return common.save_results(args, "inference_speed", rows, common.parameter_count(base))


if __name__ == "__main__":
    main(sys.argv[1:])
