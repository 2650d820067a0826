"""The names inside a training run's output folder (`bitune train`'s `output_dir`).

output_dir/
  train_config.yaml     the resolved settings of the run
  metrics.jsonl         one JSON object per logging step (loss, learning rate, grad norm, α per layer)
  checkpoint-N/         Bitune checkpoints with the Trainer's state, for resuming
    bitune_run.json     what defines the run (settings, data fingerprint), checked when it is resumed
  final/                the trained model (a Bitune checkpoint)
  .bitune.lock          held by the run while it writes here (a second run into the folder is refused)
"""

METRICS_FILE = "metrics.jsonl"
TRAIN_CONFIG_FILE = "train_config.yaml"
FINAL_DIR = "final"
TRAINER_STATE_FILE = "trainer_state.json"
RUN_FILE = "bitune_run.json"
LOCK_FILE = ".bitune.lock"
