"""`bitune demo`: a real Bitune job from nothing, in a few minutes on a CPU.

A fresh clone has no weights and no data, so the demo makes its own: synthetic context-then-question data
(`bitune.experiments.synthetic`), a small Llama pretrained from scratch on the stories, then Bitune instruction-tuning on
the QA pairs. It reports exact-match accuracy on held-out questions against the untuned model, saves the
checkpoint and prints a sample answer (`bitune demo`: `bitune.cli.demo`). It is a one-cell experiment
(`bitune.experiments.cells`), so the same code runs the reproduction harness.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from bitune.files import atomic_write_text

DEFAULT_OUTPUT = "runs/demo"


def demo_experiment(output_dir: str, quick: bool = False) -> dict:
    """The demo as an experiment file (a plain mapping; `bitune experiment` accepts it as YAML)."""
    scale = 0.25 if quick else 1.0
    return {
        "output_dir": output_dir,
        "pretrain": {
            "stories": int(8000 * scale),
            "steps": int(600 * scale),
            "batch_size": 32,
            "learning_rate": 3.0e-3,
            "warmup_steps": 30,
            "weight_decay": 0.0,
            "seed": 0,
            "model": {"initializer_range": 0.06},
        },
        "synthetic": {
            "task_types": ["person_location", "object_holder", "object_location"],
            "n_train": int(1500 * scale),
            "n_test": 150,
            "seed": 0,
        },
        "train": {
            "data": {"template": "plain", "max_length": 256},
            "peft": {"r": 8, "alpha": 8},
            "training": {
                "learning_rate": 3.0e-3,
                "lr_scheduler_type": "linear",
                "warmup_ratio": 0.1,
                "max_steps": int(150 * scale),
                "batch_size": 16,
                "precision": "fp32",
                "logging_steps": 10,
                "save_steps": 1000,
                "report_to": [],
            },
            "device": "cpu",
        },
        "grid": {"methods": ["bitune"], "peft": ["lora"], "seeds": [42]},
        "evaluation": {"tasks": ["synthetic"], "batch_size": 64},
    }


def run_demo(output_dir: str | Path = DEFAULT_OUTPUT, quick: bool = False) -> dict:
    """Run the demo; returns {"untuned": exact match per task, "bitune": ..., "checkpoint": path}."""
    from bitune.experiments.cells import run_experiment
    from bitune.experiments.layout import BASE_EVAL_FILE, DATA_DIR, EVAL_FILE, TEST_DATA_FILE
    from bitune.experiments.scoring import EXACT_MATCH
    from bitune.experiments.settings import load_experiment
    from bitune.training.outputs import FINAL_DIR

    output_dir = Path(output_dir)
    config_file = output_dir / "demo.yaml"
    atomic_write_text(config_file, yaml.safe_dump(demo_experiment(str(output_dir), quick), sort_keys=False))
    experiment = load_experiment(config_file)
    run_experiment(experiment)
    cell = experiment.cells()[0]
    untuned = json.loads((output_dir / BASE_EVAL_FILE).read_text())["tasks"]
    tuned = json.loads((experiment.cell_dir(cell) / EVAL_FILE).read_text())["tasks"]

    def exact(scores: dict) -> dict[str, float]:
        return {task: entry["metrics"][EXACT_MATCH]["value"] for task, entry in scores.items()}

    return {
        "untuned": exact(untuned),
        "bitune": exact(tuned),
        "checkpoint": str(experiment.cell_dir(cell) / FINAL_DIR),
        "test_file": str(output_dir / DATA_DIR / TEST_DATA_FILE),
    }
