"""What every benchmark shares: the model, the data, the training step, the timer and the output.

Each benchmark compares Bitune with its baselines in one process, on copies of one random base model and one
batch of random tokens, and interleaves the configurations inside every repetition (A B C, A B C, ...) so
that a busy machine slows them alike; ratios are medians of per-repetition ratios.

The defaults are the issue's CPU setting (a ~20M-parameter Llama in fp32, 2 threads); the same scripts run
on a GPU with `--device cuda --dtype bfloat16 --model-size 1b`.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

import bitune
from bitune import BituneConfig, BituneModel
from bitune.files import atomic_write_json

T = TypeVar("T")

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Random-init Llama architectures. "20m" is the CPU model; "1b" has Llama-3.2-1B's shape.
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    ),
    "20m": dict(
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=6,
        vocab_size=8000,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
}

# Peak dense bf16 FLOP/s (no sparsity) by the vendors' datasheets, keyed by a substring of the device name, for
# model FLOPs utilisation (MFU). Other devices: pass --peak-flops.
PEAK_BF16_FLOPS: dict[str, float] = {"H200": 989e12, "H100": 989e12, "A100": 312e12}

# LoRA r=8 on every projection of every layer, as in the paper.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# The configurations a benchmark can compare.
#   stock:     a PEFT model's ordinary forward with labels (logits at every position, as TRL's SFT does)
#   baseline:  plain PEFT fine-tuning with logits only where the loss needs them (Bitune's "baseline" mode)
#   bitune:    the full method
KINDS = ("stock", "baseline", "bitune")


def add_common_arguments(parser: argparse.ArgumentParser, *, repeats: int | None) -> None:
    """The flags every benchmark takes; `repeats`: default number of timed repetitions (None: not timed)."""
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--model-size", default="20m", choices=sorted(MODEL_SIZES))
    parser.add_argument(
        "--attention",
        default="sdpa",
        choices=["sdpa", "eager", "flash_attention_2"],
        help="attention implementation (flash_attention_2 needs the flash_attn package and a GPU)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    if repeats is not None:
        parser.add_argument(
            "--repeats", type=int, default=repeats, help=f"timed repetitions (default: {repeats})"
        )
        parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (default: 1)")
    parser.add_argument(
        "--quick", action="store_true", help="a ~1-minute smoke run: fewer repetitions and shapes"
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="JSON results file (default: results/<name>.json)"
    )
    parser.add_argument("--seed", type=int, default=0)


def parse_shape(text: str) -> tuple[int, int]:
    """Parse "192x64" into (P, T) = (192, 64)."""
    prompt_length, separator, answer_length = text.partition("x")
    if not separator:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not PxT, e.g. 192x64")
    return int(prompt_length), int(answer_length)


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The training shapes: the issue's (P, T) = (192, 64) and (64, 192) at batch 8."""
    parser.add_argument(
        "--shapes",
        nargs="+",
        type=parse_shape,
        default=[(192, 64), (64, 192)],
        metavar="PxT",
        help="prompt x answer lengths (default: 192x64 64x192)",
    )
    parser.add_argument("--batch-size", type=int, default=8)


def training_parser(doc: str, repeats: int | None) -> argparse.ArgumentParser:
    """The parser of a training benchmark (described by the first paragraph of `doc`): common flags + shapes."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add_common_arguments(parser, repeats=repeats)
    add_training_arguments(parser)
    return parser


def parse_training_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse; `--quick` keeps the first shape and one repetition."""
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes = args.shapes[:1]
        if hasattr(args, "repeats"):
            args.repeats = 1
    return args


def setup(args: argparse.Namespace) -> None:
    # transformers' notices (deprecations hit by peft, use_cache under checkpointing) would bury the tables.
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)


def prepare(args: argparse.Namespace) -> PreTrainedModel:
    """Set up torch as `args` say, warn if the machine is busy, and build and announce the base model."""
    setup(args)
    warn_if_busy(args)
    base = build_base(args)
    announce(args, base)
    return base


def warn_if_busy(args: argparse.Namespace) -> None:
    """Timings on a CPU that other processes keep busy are unreliable: say so before measuring."""
    load = os.getloadavg()[0]
    if torch.device(args.device).type == "cpu" and load > os.cpu_count():
        print(
            f"warning: the machine is busy (load {load:.1f} on {os.cpu_count()} cores); torch threads that wait "
            "for each other make the timings unreliable: re-run when it is quieter, or with --threads 1"
        )


# ---------------------------------------------------------------------------------------------- models


def build_base(args: argparse.Namespace, attention: str | None = None) -> PreTrainedModel:
    """A randomly initialised Llama of `args.model_size`, in `args.dtype` on `args.device`, in train mode."""
    config = LlamaConfig(
        **MODEL_SIZES[args.model_size],
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=attention or args.attention, dtype=getattr(torch, args.dtype)
        )
    return model.train()


def announce(args: argparse.Namespace, model: torch.nn.Module) -> None:
    print(
        f"{args.model_size} Llama: {parameter_count(model) / 1e6:.1f}M parameters, {args.dtype} on {args.device}"
    )


def lora_config() -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS)


def wrap(kind: str, base: PreTrainedModel) -> torch.nn.Module:
    """A fresh PEFT wrapping of a private copy of `base` for configuration `kind` (see `KINDS`)."""
    base = copy.deepcopy(base)
    if kind == "stock":
        return get_peft_model(base, lora_config())
    return BituneModel.from_base(base, lora_config(), BituneConfig(mode=kind), check_support=False)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Activation checkpointing the way each configuration is meant to use it (always non-reentrant)."""
    if isinstance(model, PeftModel):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.activation_checkpointing_enable()


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------- data


def random_batch(
    batch_size: int, prompt_length: int, answer_length: int, vocab_size: int, device: str, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A Bitune batch of random tokens, every prompt exactly P and every answer exactly T tokens long."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab_size, (batch_size, prompt_length + answer_length), generator=generator)
    tokens[:, 0] = 1  # BOS
    lengths = [prompt_length] * batch_size
    batch = bitune.split_sequences(tokens, torch.ones_like(tokens), lengths)
    return {name: tensor.to(device) for name, tensor in batch.items()}


def stock_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same samples as one sequence with prompt labels masked out, as an SFT trainer feeds a PEFT model."""
    input_ids = torch.cat([batch["prompt_ids"], batch["answer_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["answer_mask"]], dim=1)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, : batch["prompt_ids"].shape[1]] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "use_cache": False}


def loss_fn(kind: str, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    """A closure computing the training loss of `model` on `batch` the way configuration `kind` does."""
    if kind == "stock":
        inputs = stock_inputs(batch)
        return lambda: model(**inputs).loss
    return lambda: model(**batch).loss


def training_step(kind: str, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One optimizer step (forward, backward, AdamW on the trainable parameters) as a closure."""
    loss = loss_fn(kind, model, batch)
    return optimizer_step(model, lambda: loss().backward())


def optimizer_step(model: torch.nn.Module, backward: Callable[[], None]) -> Callable[[], None]:
    """A closure that runs `backward` (which accumulates gradients) then one AdamW step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def peak_flops(device: str, given: float | None = None) -> tuple[float | None, str | None]:
    """The device's peak dense bf16 FLOP/s and where it came from: `given` (--peak-flops), else PEAK_BF16_FLOPS."""
    if given is not None:
        return given, "--peak-flops"
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name()
        for key, value in PEAK_BF16_FLOPS.items():
            if key in name:
                return value, f"datasheet peak of {key} (PEAK_BF16_FLOPS)"
    return None, None


def bound(prompt_length: int, answer_length: int) -> float:
    """The best Bitune/baseline training throughput: (P+T) tokens against (P−1)+(P−1)+(T+1)."""
    return (prompt_length + answer_length) / (2 * prompt_length + answer_length - 1)


# ---------------------------------------------------------------------------------------------- timing


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(candidates: dict[str, Callable[[], T]], repeats: int, warmup: int) -> dict[str, list[T]]:
    """Each candidate's result `repeats` times (after `warmup` discarded rounds), candidates interleaved."""
    names = list(candidates)
    results: dict[str, list[T]] = {name: [] for name in names}
    for repetition in range(warmup + repeats):
        # Rotate the order too (ABC, BCA, CAB, ...): no candidate always runs right after the same other one.
        shift = repetition % len(names)
        for name in names[shift:] + names[:shift]:
            result = candidates[name]()
            if repetition >= warmup:
                results[name].append(result)
    return results


def timed(run: Callable[[], Any], device: str) -> Callable[[], float]:
    """`run` as a callable that returns its wall-clock seconds."""

    def seconds() -> float:
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        return time.perf_counter() - start

    return seconds


def median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Median of the per-repetition ratios (pairs measured back to back cancel the machine's drift)."""
    return statistics.median(n / d for n, d in zip(numerators, denominators))


# ---------------------------------------------------------------------------------------------- output


def environment(args: argparse.Namespace, parameters: int) -> dict[str, Any]:
    """What the numbers were measured on, stored beside them."""
    return {
        "device": args.device,
        "dtype": args.dtype,
        "model_size": args.model_size,
        "model_config": MODEL_SIZES.get(args.model_size),  # None for a real model (e.g. serving's smollm2)
        "parameters": parameters,
        "attention": args.attention,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),  # at the end of the run: re-run if far above cpu_count
        "repeats": getattr(args, "repeats", None),
        "warmup": getattr(args, "warmup", None),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else None,
    }


def print_table(title: str, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    """A Markdown table of `rows` (numbers rounded), ready to paste into the README."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    print(f"\n{title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |")


def save_results(
    args: argparse.Namespace, name: str, rows: list[dict[str, Any]], parameters: int, **fields: Any
) -> dict[str, Any]:
    """Write benchmark `name`'s rows, environment and command (plus `fields`) as JSON; returns what it wrote."""
    results = {
        "benchmark": name,
        "command": " ".join(["python", *sys.argv]),
        "environment": environment(args, parameters),
        "rows": rows,
    } | fields
    path = args.output or RESULTS_DIR / f"{name}.json"
    atomic_write_json(path, results)
    print(f"\nwrote {path}")
    return results
