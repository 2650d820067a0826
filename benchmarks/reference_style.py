"""Bitune's batched training step against the code path of the authors' reference implementation.

The reference code trains one sample at a time and runs three full forwards per sample: both prompt passes
go through the whole causal LM (final norm, lm_head and float32 logits over every prompt token, thrown away)
with eager attention. Its "reference-style" step here does exactly that for each of the batch's samples,
accumulating gradients, then takes one AdamW step, so both sides see the same effective batch and the same
math. The speed-up is Bitune's samples/s over reference-style samples/s; Bitune's step run one sample at a
time splits it into what the fast path gains (same batching) and what batching gains (same forward).

    python benchmarks/reference_style.py            # ~5 minutes on 2 cores
    python benchmarks/reference_style.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from typing import Any

import common
import torch

from bitune import BituneModel
from bitune.caches import KVRecorder
from bitune.model import PromptState, answer_loss, num_layers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.training_parser(__doc__, repeats=3)
    parser.add_argument(
        "--reference-attention",
        default="eager",
        choices=["eager", "sdpa"],
        help="attention of the reference-style model (the authors' code: eager)",
    )
    return common.parse_training_args(parser, argv)


def reference_style_loss(model: BituneModel, sample: dict[str, torch.Tensor]) -> torch.Tensor:
    """The authors' forward for one sample: three full passes, the prompt passes' logits computed and dropped."""
    ids, mask = sample["prompt_ids"][:, :-1], sample["prompt_mask"][:, :-1]
    encodings = []
    for prompt_pass in model.bitune_config.spec.passes:
        recorder = KVRecorder(num_layers(model.base_model))
        direction = {"is_causal": False} if prompt_pass.bidirectional else {}
        with model._adapter(prompt_pass.adapter):
            logits = model.base_model(
                input_ids=ids, attention_mask=mask, past_key_values=recorder, use_cache=True, **direction
            ).logits
            logits.float()  # the reference upcasts every position's logits, then ignores them
        encodings.append(recorder.recorded())
    cache = [model.mixer.mix(layer, causal, bidir) for layer, (causal, bidir) in enumerate(zip(*encodings))]
    state = PromptState(cache, sample["prompt_ids"], sample["prompt_mask"])
    logits = model.answer_logits(state, sample["answer_ids"], sample["answer_mask"])
    return answer_loss(logits, sample["answer_ids"], sample["answer_mask"]).loss


def bitune_loss(model: BituneModel, sample: dict[str, torch.Tensor]) -> torch.Tensor:
    """Bitune's own forward (the fast path), for one sample."""
    return model(**sample).loss


def one_at_a_time(
    model: BituneModel,
    batch: dict[str, torch.Tensor],
    sample_loss: Callable[[BituneModel, dict[str, torch.Tensor]], torch.Tensor],
) -> Callable[[], None]:
    """One optimizer step over the batch, one sample at a time with gradient accumulation."""
    batch_size = batch["prompt_ids"].shape[0]

    def backward() -> None:
        for i in range(batch_size):
            sample = {name: tensor[i : i + 1] for name, tensor in batch.items()}
            (sample_loss(model, sample) / batch_size).backward()

    return common.optimizer_step(model, backward)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    base = common.prepare(args)
    reference_base = common.build_base(args, attention=args.reference_attention)
    rows = []
    for prompt_length, answer_length in args.shapes:
        batch = common.random_batch(
            args.batch_size, prompt_length, answer_length, base.config.vocab_size, args.device
        )
        steps = {
            "reference_style": one_at_a_time(
                common.wrap("bitune", reference_base), batch, reference_style_loss
            ),
            # Bitune's own step on one sample at a time: splits the speed-up into batching and the fast path.
            "bitune_one_by_one": one_at_a_time(common.wrap("bitune", base), batch, bitune_loss),
            "bitune": common.training_step("bitune", common.wrap("bitune", base), batch),
        }
        timed = {kind: common.timed(step, args.device) for kind, step in steps.items()}
        seconds = common.interleaved(timed, args.repeats, args.warmup)
        row: dict[str, Any] = {
            "P": prompt_length,
            "T": answer_length,
            "batch_size": args.batch_size,
            "seconds": seconds,
        }
        for kind, times in seconds.items():
            row[f"{kind}_samples_per_s"] = args.batch_size / statistics.median(times)
        row["speedup"] = common.median_ratio(seconds["reference_style"], seconds["bitune"])
        row["fast_path_gain"] = common.median_ratio(seconds["reference_style"], seconds["bitune_one_by_one"])
        row["batching_gain"] = common.median_ratio(seconds["bitune_one_by_one"], seconds["bitune"])
        rows.append(row)
        print(
            f"  P={prompt_length} T={answer_length}: speed-up {row['speedup']:.2f}x (fast path "
            f"{row['fast_path_gain']:.2f}x, batching {row['batching_gain']:.2f}x)",
            flush=True,
        )
    common.print_table(
        f"Bitune (batch {args.batch_size}) against the reference-style step ({args.batch_size} samples one at a "
        f"time, {args.reference_attention} attention); samples/s, speed-up = median of {args.repeats} paired repetitions",
        rows,
        [
            "P",
            "T",
            "reference_style_samples_per_s",
            "bitune_one_by_one_samples_per_s",
            "bitune_samples_per_s",
            "fast_path_gain",
            "batching_gain",
            "speedup",
        ],
    )
    return common.save_results(
        args,
        "reference_style",
        rows,
        common.parameter_count(base),
        reference_attention=args.reference_attention,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
