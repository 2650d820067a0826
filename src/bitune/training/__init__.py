"""Training Bitune models with the Hugging Face `Trainer`: configs, the trainer, and the `train` entry point.

Example:
    >>> from bitune.training import load_config, train
    >>> config = load_config("configs/paper_lora.yaml", ["--model", "google/gemma-2b", "--output_dir", "runs/a"])
    >>> config.output_dir, config.peft.kind, config.training.learning_rate
    ('runs/a', 'lora', 0.0003)
    >>> final_checkpoint = train(config)  # 3000 steps on Gemma-2B  # doctest: +SKIP
"""

from bitune.training.config import (
    ModelSettings,
    PeftSettings,
    TrainConfig,
    TrainingSettings,
    ValidationSettings,
    load_config,
    parse_overrides,
)
from bitune.training.trainer import (
    BituneCollator,
    BituneTrainer,
    MetricsFileCallback,
    latest_checkpoint,
    restore_weights,
    train,
    training_arguments,
)

__all__ = [
    "BituneCollator",
    "BituneTrainer",
    "MetricsFileCallback",
    "ModelSettings",
    "PeftSettings",
    "TrainConfig",
    "TrainingSettings",
    "ValidationSettings",
    "latest_checkpoint",
    "load_config",
    "parse_overrides",
    "restore_weights",
    "train",
    "training_arguments",
]
