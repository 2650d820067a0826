"""How much does a trained Bitune model use its bidirectional prompt pass? Score one experiment cell's checkpoint
with every mixing coefficient forced to fixed values and compare, item by item, with its learned α.

α = 0 keeps only the causal prompt pass (θ_c reads the whole sequence causally, like a LoRA model); α = 1 keeps
only the bidirectional one. The tasks, splits, styles and limits are the ones the cell was scored on (done.json).

    python benchmarks/mixing_probe.py runs/experiments/smollm2-arc-easy/cells/bitune-lora-seed42 --alphas 0 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from bitune.core.pretrained import load_for_inference
from bitune.evaluation.tasks import load_task
from bitune.experiments.layout import DONE_FILE, EVAL_FILE
from bitune.experiments.report import paired_permutation_test
from bitune.experiments.scoring import EvaluationTask, evaluate_model
from bitune.experiments.settings import EvaluationSettings
from bitune.files import atomic_write_json
from bitune.training.outputs import FINAL_DIR

LARGE_W = 1e6  # α = |w| / (|w| + c) with c ≤ 1: within 1e-6 of 1


def force_alphas(model, alpha: float) -> None:
    """Set every layer's α (keys and values) to `alpha`."""
    mixer = model.mixer
    w = LARGE_W if alpha >= 1 else mixer.c * alpha / (1 - alpha)
    with torch.no_grad():
        mixer.keys.fill_(w)
        mixer.values.fill_(w)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("cell", type=Path, help="a finished Bitune cell of `bitune experiment` (has final/)")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, help="score only the first N items (a quick check)")
    args = parser.parse_args(argv)

    scored_on = json.loads((args.cell / DONE_FILE).read_text())["evaluation"]
    learned = json.loads((args.cell / EVAL_FILE).read_text())["tasks"]
    settings = EvaluationSettings(
        tasks=[{**entry, "limit": args.limit or entry["limit"]} for entry in scored_on["tasks"]],
        batch_size=args.batch_size,
        max_new_tokens=scored_on["max_new_tokens"],
    )
    tasks = [
        EvaluationTask(
            load_task(t.name, data_dir=t.data_dir, path=t.path, split=t.split, style=t.style, limit=t.limit),
            learned[t.name]["metric"],
        )
        for t in settings.tasks
    ]
    model, tokenizer = load_for_inference(checkpoint=args.cell / FINAL_DIR, device="cpu")
    references = {
        task.name: np.array(learned[task.name]["items"][task.metric][: len(task.task.items)])
        for task in tasks
    }
    rows = [
        {"task": task.name, "alpha": "learned", task.metric: float(references[task.name].mean())}
        for task in tasks
    ]
    for alpha in args.alphas:
        force_alphas(model, alpha)
        scores = evaluate_model(model, tokenizer, tasks, settings)
        for task in tasks:
            items = np.array(scores[task.name]["items"][task.metric])
            differences = items - references[task.name]
            rows.append(
                {
                    "task": task.name,
                    "alpha": alpha,
                    task.metric: float(items.mean()),
                    "difference_to_learned": float(differences.mean()),
                    "p_value": paired_permutation_test(differences),
                }
            )
            print(json.dumps(rows[-1]))
    atomic_write_json(args.cell / "mixing_probe.json", rows)
    return rows


if __name__ == "__main__":
    main()
