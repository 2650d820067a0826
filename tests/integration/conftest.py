"""What the real-model tests share: a short instruction-tuning run's config, and all cores for their matmuls."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml


@pytest.fixture(autouse=True)
def every_core():
    """A 135M or 270M model is no tiny test model: its matmuls are worth all cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(threads)


def short_run_config(model: Path, data_dir: Path, output_dir: Path, **training) -> Path:
    """A 4-step LoRA Bitune run on 40 real Alpaca-GPT4 instructions, written as `output_dir`.yaml."""
    settings = {
        "model": {"name_or_path": str(model)},
        "data": {"path": str(data_dir / "instruct" / "alpaca_gpt4_999.json"), "limit": 40, "max_length": 128},
        "validation": {"size": 8},
        "peft": {"kind": "lora", "r": 4, "alpha": 8},
        "training": {
            "learning_rate": 2e-3,
            "max_steps": 4,
            "batch_size": 4,
            "precision": "fp32",
            "eval_steps": 2,
            "save_steps": 2,
            "logging_steps": 1,
            "report_to": [],
            **training,
        },
        "device": "cpu",
        "output_dir": str(output_dir),
    }
    path = output_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(settings))
    return path
