"""Peak memory of a Bitune training step against plain PEFT fine-tuning.

Every configuration runs in its own child process, so no configuration inherits another's allocations: the
child builds the model, takes one warm-up step (the optimizer's state now exists), then measures one more.

* CPU: the child's peak resident set (VmHWM, reset before the measured step via /proc/self/clear_refs).
  glibc is told to return every large freed block to the system (MALLOC_MMAP_THRESHOLD_), so the resident
  set follows what is allocated.
* GPU: torch.cuda.max_memory_allocated, reset before the measured step.

Reported: the step's peak over the memory held before it (activations, logits, gradients: what training
adds to the model), the total peak, and Bitune's ratio to each baseline next to (2P+T)/(P+T) for the step.

    python benchmarks/memory.py            # ~2 minutes on 2 cores
    python benchmarks/memory.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import multiprocessing.forkserver
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import common
import torch

# The fork server starts with these, so every measuring child has them: large blocks are mmap-ed and returned
# to the system when freed, instead of lingering in malloc's heap and hiding the next step's allocations.
MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


@contextlib.contextmanager
def malloc_settings() -> Iterator[None]:
    """`MALLOC_SETTINGS` in the environment for the duration of the block (for processes started in it)."""
    saved = {name: os.environ.get(name) for name in MALLOC_SETTINGS}
    os.environ.update(MALLOC_SETTINGS)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.training_parser(__doc__, repeats=None)
    parser.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"])
    return common.parse_training_args(parser, argv)


# ---------------------------------------------------------------------------------------------- the child


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets the peak resident set size (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")


def measure_step(
    args: argparse.Namespace, kind: str, checkpointing: bool, shape: tuple[int, int]
) -> dict[str, float]:
    """Runs in a child process: bytes held before a training step, and the peak during it."""
    common.setup(args)
    base = common.build_base(args)
    model = common.wrap(kind, base)
    del base
    if checkpointing:
        common.enable_checkpointing(model)
    batch = common.random_batch(args.batch_size, *shape, model.config.vocab_size, args.device)
    step = common.training_step(kind, model, batch)
    step()  # warm-up: the optimizer state is allocated here
    if torch.device(args.device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return {
            "before": before,
            "peak": torch.cuda.max_memory_allocated(),
            "parameters": common.parameter_count(model),
        }
    before = _status_kib("VmRSS") * 1024
    _reset_peak_rss()
    step()
    return {
        "before": before,
        "peak": _status_kib("VmHWM") * 1024,
        "parameters": common.parameter_count(model),
    }


def in_child(context, *arguments) -> dict[str, float]:
    """`measure_step(*arguments)` in a fresh process of `context` (its exceptions are re-raised here)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(measure_step, *arguments).result()


# ---------------------------------------------------------------------------------------------- the parent


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if torch.device(args.device).type == "cpu" and not Path("/proc/self/clear_refs").exists():
        raise SystemExit("the CPU memory benchmark reads peak RSS from /proc (Linux only)")
    # A fork server imports torch once and forks a clean child per configuration (no CUDA, no thread pools).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers", "peft", "bitune", "common"])
    with malloc_settings():
        multiprocessing.forkserver.ensure_running()
    mib = 2**20
    rows = []
    for setting in args.checkpointing:
        for shape in args.shapes:
            prompt_length, answer_length = shape
            row: dict[str, Any] = {"P": prompt_length, "T": answer_length, "checkpointing": setting == "on"}
            for kind in common.KINDS:
                measured = in_child(context, args, kind, setting == "on", shape)
                row[f"{kind}_step_mib"] = (measured["peak"] - measured["before"]) / mib
                row[f"{kind}_peak_mib"] = measured["peak"] / mib
                parameters = measured["parameters"]
            for baseline in ("baseline", "stock"):
                row[f"step_ratio_{baseline}"] = row["bitune_step_mib"] / row[f"{baseline}_step_mib"]
                row[f"peak_ratio_{baseline}"] = row["bitune_peak_mib"] / row[f"{baseline}_peak_mib"]
            row["bound"] = (2 * prompt_length + answer_length) / (prompt_length + answer_length)
            rows.append(row)
            print(
                f"  P={prompt_length} T={answer_length} checkpointing={setting}: step memory "
                f"x{row['step_ratio_baseline']:.2f} of baseline (bound {row['bound']:.2f})",
                flush=True,
            )
    unit = "max allocated" if torch.device(args.device).type == "cuda" else "peak RSS"
    common.print_table(
        f"Memory of one training step (batch {args.batch_size}, MiB, {unit}; step = peak minus memory held "
        "before the step)",
        rows,
        [
            "P",
            "T",
            "checkpointing",
            "stock_step_mib",
            "baseline_step_mib",
            "bitune_step_mib",
            "step_ratio_baseline",
            "step_ratio_stock",
            "bound",
            "baseline_peak_mib",
            "bitune_peak_mib",
            "peak_ratio_baseline",
        ],
    )
    return common.save_results(args, "memory", rows, parameters)


if __name__ == "__main__":
    main(sys.argv[1:])
