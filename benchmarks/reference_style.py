"""Bitune's batched training step against the code path of the authors' reference implementation.

The reference code trains one sample at a time and runs three full forwards per sample: both prompt passes
go through the whole causal LM (final norm, lm_head and float32 logits over every prompt token, thrown away)
with eager attention. Its models are forks of transformers 4.38's, whose attention masks are full size: every
forward builds a float mask of max_position_embeddings² entries from a causal buffer and each attention
slices its rows out of it; the bidirectional pass allocates a zeroed copy of that full mask for every layer.
The "reference-style" step here does all of that for each of the batch's samples, accumulating gradients,
then takes one AdamW step, so both sides see the same effective batch and the same math (checked before
timing). The speed-up is Bitune's samples/s over reference-style samples/s. Three more steps split it:
the reference's passes with masks sized to the sequence (the mask cost), Bitune's own step one sample at a
time (what the fast path gains at equal batching), and Bitune's batch (what batching gains).

    python benchmarks/reference_style.py            # ~2 minutes on 2 cores
    python benchmarks/reference_style.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
from collections.abc import Callable, Iterator
from typing import Any

import common
import torch

from bitune import BituneModel
from bitune.core.caches import KVRecorder
from bitune.core.compat import cache_argument
from bitune.core.model import answer_loss
from bitune.core.passes import PromptState, num_layers

# One sample's training loss under some way of computing Bitune's forward.
SampleLoss = Callable[[BituneModel, dict[str, torch.Tensor]], torch.Tensor]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.training_parser(__doc__, repeats=3)
    parser.add_argument(
        "--reference-attention",
        default="eager",
        choices=["eager", "sdpa"],
        help="attention of the reference-style model (the authors' code: eager)",
    )
    return common.parse_training_args(parser, argv)


@functools.cache
def causal_buffer(size: int, device: torch.device) -> torch.Tensor:
    """The fork's `LlamaModel.causal_mask` buffer (True above the diagonal); kept for the process, per size."""
    return torch.ones(size, size, dtype=torch.bool, device=device).triu(diagonal=1)


@contextlib.contextmanager
def full_size_masks(causal_lm: torch.nn.Module, bidirectional: bool) -> Iterator[None]:
    """Attention masks made the way the authors' transformers-4.38 fork makes them, for batch-1 inputs.

    Per forward, `LlamaModel._update_causal_mask` turns the N×N causal buffer (N = max_position_embeddings)
    into a float mask (0 or the dtype's minimum) of shape (batch, 1, N, N); each attention takes the rows of
    its positions and the columns of its keys. The bidirectional pass hands every layer `zeros_like` of the
    full mask instead. The result equals transformers' own masks, so the math is unchanged; only the cost is
    the reference's.
    """
    decoder = causal_lm.get_decoder()
    buffer = causal_buffer(causal_lm.config.max_position_embeddings, causal_lm.device)
    dtype = causal_lm.dtype
    full: dict[str, torch.Tensor] = {}

    def build(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        batch_size = kwargs["input_ids"].shape[0]
        full["mask"] = buffer[None, None].repeat(batch_size, 1, 1, 1).to(dtype) * torch.finfo(dtype).min

    def slice_for_layer(layer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        mask = torch.zeros_like(full["mask"]) if bidirectional else full["mask"]
        rows = kwargs["position_ids"][0]
        kwargs["attention_mask"] = mask[:, :, rows, : int(rows[-1]) + 1]
        return args, kwargs

    handles = [decoder.register_forward_pre_hook(build, with_kwargs=True)]
    handles += [
        layer.register_forward_pre_hook(slice_for_layer, with_kwargs=True)
        for layer in decoder.layers[: num_layers(causal_lm)]
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def sequence_sized_masks(
    causal_lm: torch.nn.Module, bidirectional: bool
) -> contextlib.AbstractContextManager:
    """Leave the masks to transformers, which sizes them to the sequence."""
    return contextlib.nullcontext()


def reference_style_loss(
    model: BituneModel, sample: dict[str, torch.Tensor], masks: Callable = full_size_masks
) -> torch.Tensor:
    """The authors' forward for one sample: three full passes, the prompt passes' logits computed and dropped.

    `masks(causal_lm, bidirectional)` is entered around each pass: `full_size_masks` (the reference's own) or
    `sequence_sized_masks`.
    """
    causal_lm = model.base_model
    ids, mask = sample["prompt_ids"][:, :-1], sample["prompt_mask"][:, :-1]
    encodings = []
    for prompt_pass in model.bitune_config.spec.passes:
        recorder = KVRecorder(num_layers(causal_lm))
        direction = {"is_causal": False} if prompt_pass.bidirectional else {}
        with model._adapter(prompt_pass.adapter), masks(causal_lm, prompt_pass.bidirectional):
            logits = causal_lm(
                input_ids=ids,
                attention_mask=mask,
                use_cache=True,
                **cache_argument(causal_lm, recorder),
                **direction,
            ).logits
            logits.float()  # the reference upcasts every position's logits, then ignores them
        encodings.append(recorder.recorded())
    cache = [model.mixer.mix(layer, causal, bidir) for layer, (causal, bidir) in enumerate(zip(*encodings))]
    state = PromptState(cache, sample["prompt_ids"], sample["prompt_mask"])
    with masks(causal_lm, False):
        logits = model.answer_logits(state, sample["answer_ids"], sample["answer_mask"])
    return answer_loss(logits, sample["answer_ids"], sample["answer_mask"]).loss


# The reference-style forward, with the authors' full-size masks and with masks sized to the sequence.
SAMPLE_LOSSES: dict[str, SampleLoss] = {
    "reference_style": reference_style_loss,
    "reference_sized_masks": functools.partial(reference_style_loss, masks=sequence_sized_masks),
}


def bitune_loss(model: BituneModel, sample: dict[str, torch.Tensor]) -> torch.Tensor:
    """Bitune's own forward (the fast path), for one sample."""
    return model(**sample).loss


def check_same_loss(
    models: dict[str, BituneModel],
    sample_losses: dict[str, SampleLoss],
    batch: dict[str, torch.Tensor],
) -> None:
    """Every way of computing the first sample's loss must agree: the speed-up compares equal math.

    The adapters get the same random weights in every model first (fresh LoRA adds nothing, which would
    hide a pass that uses the wrong adapter). Tolerance: 1e-5 relative in float32, two ulps in 16-bit.
    """
    for model in models.values():
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            for name, parameter in model.named_parameters():
                if "lora_" in name:
                    parameter.copy_(torch.randn_like(parameter) * 0.05)
    sample = {name: tensor[:1] for name, tensor in batch.items()}
    with torch.no_grad():
        losses = {kind: float(sample_losses[kind](models[kind], sample)) for kind in models}
    dtype = next(iter(models.values())).base_model.dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    first = next(iter(losses.values()))
    if any(abs(loss - first) > tolerance * max(1.0, abs(first)) for loss in losses.values()):
        raise AssertionError(f"the steps compute different losses: {losses}")


def one_at_a_time(
    model: BituneModel,
    batch: dict[str, torch.Tensor],
    sample_loss: SampleLoss,
) -> Callable[[], None]:
    """One optimizer step over the batch, one sample at a time with gradient accumulation."""
    batch_size = batch["prompt_ids"].shape[0]

    def backward() -> None:
        for i in range(batch_size):
            sample = {name: tensor[i : i + 1] for name, tensor in batch.items()}
            (sample_loss(model, sample) / batch_size).backward()

    return common.optimizer_step(model, backward)


# Each ratio of samples/s reported, as (slower step, faster step).
GAINS = {
    "speedup": ("reference_style", "bitune"),
    "speedup_over_sized_masks": ("reference_sized_masks", "bitune"),
    "full_size_mask_cost": ("reference_style", "reference_sized_masks"),
    "fast_path_gain": ("reference_sized_masks", "bitune_one_by_one"),
    "batching_gain": ("bitune_one_by_one", "bitune"),
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    base = common.prepare(args)
    reference_base = common.build_base(args, attention=args.reference_attention)
    rows = []
    for prompt_length, answer_length in args.shapes:
        batch = common.random_batch(
            args.batch_size, prompt_length, answer_length, base.config.vocab_size, args.device
        )
        models = {
            **{kind: common.wrap("bitune", reference_base) for kind in SAMPLE_LOSSES},
            "bitune_one_by_one": common.wrap("bitune", base),
        }
        sample_losses = {**SAMPLE_LOSSES, "bitune_one_by_one": bitune_loss}
        check_same_loss(models, sample_losses, batch)
        steps = {kind: one_at_a_time(models[kind], batch, sample_losses[kind]) for kind in models}
        steps["bitune"] = common.training_step("bitune", common.wrap("bitune", base), batch)
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
        # speed-up = mask cost × fast-path gain × batching gain (each a median of paired ratios, so ≈)
        for name, (slower, faster) in GAINS.items():
            row[name] = common.median_ratio(seconds[slower], seconds[faster])
        rows.append(row)
        print(
            f"  P={prompt_length} T={answer_length}: speed-up {row['speedup']:.2f}x (full-size masks "
            f"{row['full_size_mask_cost']:.2f}x, fast path {row['fast_path_gain']:.2f}x, batching "
            f"{row['batching_gain']:.2f}x); over the reference with sized masks "
            f"{row['speedup_over_sized_masks']:.2f}x",
            flush=True,
        )
    common.print_table(
        f"Bitune (batch {args.batch_size}) against the reference-style step ({args.batch_size} samples one at a "
        f"time, {args.reference_attention} attention); samples/s, ratios = medians of {args.repeats} paired "
        "repetitions",
        rows,
        ["P", "T", *(f"{kind}_samples_per_s" for kind in seconds), *GAINS],
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
