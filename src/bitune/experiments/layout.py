"""The experiment folder (`output_dir` of an experiment file): what lies where. Written by
`bitune.experiments.stages` and `bitune.experiments.cells`, read by `bitune.experiments.report`.

    experiment.json                  the grid, the tasks and the settings of the run
    data/                            the training data a stage made (train.jsonl; synthetic: test.jsonl)
        stage.json                   the settings the stage was built with
    base_model/                      the base model a stage made (pretrained or converted), with stage.json
    base_eval.json                   the untuned base model's scores (optional)
    cells/<method>-<peft>-seed<seed>/
        cell.json                    written when the cell starts: the settings it trains with
        metrics.jsonl                training log (loss, eval_loss, α per layer; see bitune.training)
        final/                       the trained checkpoint
        eval.json                    scores per task, per-item scores and the final α
        done.json                    written last: the cell is complete
    report/                          `bitune report`'s tables and plots

Every name of a file or folder in it is defined here, and only here.
"""

from __future__ import annotations

from bitune.training.outputs import METRICS_FILE

EXPERIMENT_FILE = "experiment.json"
DATA_DIR = "data"
TRAIN_DATA_FILE = "train.jsonl"  # inside DATA_DIR
TEST_DATA_FILE = "test.jsonl"  # inside DATA_DIR (synthetic data only): the held-out questions
BASE_MODEL_DIR = "base_model"
PRETRAIN_LOG_FILE = "pretrain_metrics.jsonl"  # inside BASE_MODEL_DIR, when pretrained
STAGE_FILE = "stage.json"  # inside a stage's folder: the settings it was built with
BASE_EVAL_FILE = "base_eval.json"
CELLS_DIR = "cells"
CELL_FILE = "cell.json"  # written when a cell starts: the settings it trains with
EVAL_FILE = "eval.json"
DONE_FILE = "done.json"
REPORT_DIR = "report"


def cell_name(method: str, peft: str, seed: int) -> str:
    """The folder name of one cell of the grid (inside CELLS_DIR).

    Example:
        >>> cell_name("bitune", "lora", 42)
        'bitune-lora-seed42'
    """
    return f"{method}-{peft}-seed{seed}"


__all__ = [
    "BASE_EVAL_FILE",
    "BASE_MODEL_DIR",
    "CELLS_DIR",
    "CELL_FILE",
    "DATA_DIR",
    "DONE_FILE",
    "EVAL_FILE",
    "EXPERIMENT_FILE",
    "METRICS_FILE",
    "PRETRAIN_LOG_FILE",
    "REPORT_DIR",
    "STAGE_FILE",
    "TEST_DATA_FILE",
    "TRAIN_DATA_FILE",
    "cell_name",
]
