"""Running an experiment: the stages, the untuned reference, then every cell of the grid, resumably.

A cell is `output_dir/cells/<method>-<peft>-seed<seed>/` (`bitune.experiments.layout`): the training run
(checkpoints, `final/`, `metrics.jsonl`), `eval.json` (scores, per-item scores, the final mixing coefficients)
and `done.json`, written last. Rerunning skips done cells, continues an interrupted cell from its newest
checkpoint, and re-evaluates done cells whose evaluation settings changed; a done cell whose training
settings changed is an error (delete it to retrain).
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict

from tqdm.auto import tqdm

from bitune.core.checkpoint import CONFIG_FILE as CHECKPOINT_CONFIG_FILE
from bitune.core.pretrained import load_for_inference
from bitune.errors import BituneInputError
from bitune.experiments.layout import CELL_FILE, DONE_FILE, EVAL_FILE, EXPERIMENT_FILE
from bitune.experiments.scoring import (
    EvaluationTask,
    describe_scores,
    evaluate_base_model,
    evaluate_model,
    free_accelerator_memory,
    load_evaluation_tasks,
)
from bitune.experiments.settings import Cell, Experiment
from bitune.experiments.stages import prepare_stages
from bitune.files import atomic_write_json
from bitune.settings import changed_keys
from bitune.training import train
from bitune.training.outputs import FINAL_DIR


def cell_state(experiment: Experiment, cell: Cell) -> str:
    """ "done", "started" (interrupted or being run) or "new"."""
    folder = experiment.cell_dir(cell)
    if (folder / DONE_FILE).is_file():
        return "done"
    return "started" if (folder / CELL_FILE).is_file() else "new"


def run_cell(experiment: Experiment, cell: Cell, tasks: Sequence[EvaluationTask]) -> str:
    """Train (or continue training) and evaluate one cell; returns what was done: skipped, evaluated or trained."""
    folder = experiment.cell_dir(cell)
    training = experiment.training_fingerprint(cell)
    evaluation = experiment.evaluation_fingerprint()
    if (folder / DONE_FILE).is_file():
        done = json.loads((folder / DONE_FILE).read_text(encoding="utf-8"))
        if done["training"] != training:
            raise BituneInputError(
                f"{folder} was trained with other settings ({', '.join(changed_keys(done['training'], training))} "
                "changed); delete the folder to retrain it, or choose another output_dir"
            )
        if done["evaluation"] == evaluation:
            return "skipped"
        (folder / DONE_FILE).unlink()  # the scores are out of date: evaluate again
    elif (folder / CELL_FILE).is_file():
        started = json.loads((folder / CELL_FILE).read_text(encoding="utf-8"))
        if started["training"] != training:  # an unfinished run with other settings: start it over
            tqdm.write(f"{cell.name}: unfinished, with other settings; starting it over")
            shutil.rmtree(folder)
    atomic_write_json(folder / CELL_FILE, {"training": training})

    start = time.monotonic()
    config = experiment.train_config(cell)
    final = folder / FINAL_DIR
    trained = not (final / CHECKPOINT_CONFIG_FILE).is_file()
    if trained:
        train(config)  # continues from the newest checkpoint-N of an interrupted run
    model, tokenizer = load_for_inference(
        checkpoint=final, base_model=config.model.name_or_path, device=config.device, dtype=config.base_dtype
    )
    scores = evaluate_model(model, tokenizer, tasks, experiment.evaluation)
    atomic_write_json(folder / EVAL_FILE, {"cell": asdict(cell), "tasks": scores, "alphas": model.alphas()})
    del model
    free_accelerator_memory()
    seconds = time.monotonic() - start
    atomic_write_json(
        folder / DONE_FILE, {"training": training, "evaluation": evaluation, "seconds": seconds}
    )
    tqdm.write(
        f"{cell.name}: {'trained and ' if trained else ''}evaluated in {seconds:.0f} s; {describe_scores(scores)}"
    )
    return "trained" if trained else "evaluated"


def run_experiment(experiment: Experiment, only: Sequence[str] = ()) -> dict[str, str]:
    """Run the stages, the untuned reference and every (selected) cell; returns cell name -> what was done.

    `only`: shell patterns of cell names (e.g. "bitune-lora-*"); the other cells are left as they are.

    Example:
        >>> from bitune.experiments.settings import load_experiment
        >>> run_experiment(load_experiment("configs/experiments/cpu_synthetic.yaml"))  # doctest: +SKIP
        {'baseline-lora-seed42': 'trained', ...}
    """
    cells = [c for c in experiment.cells() if not only or any(fnmatch.fnmatch(c.name, p) for p in only)]
    if not cells:
        raise BituneInputError(
            f"--only {' '.join(only)}: no cell matches; cells are named like {experiment.cells()[0].name}"
        )
    prepare_stages(experiment)
    tasks = load_evaluation_tasks(experiment)
    _write_experiment_file(experiment, tasks)
    if experiment.evaluation.base_model:
        evaluate_base_model(experiment, tasks)
    outcome = {}
    for cell in tqdm(cells, desc="cells", unit="cell"):
        outcome[cell.name] = run_cell(experiment, cell, tasks)
    return outcome


def _write_experiment_file(experiment: Experiment, tasks: Sequence[EvaluationTask]) -> None:
    """experiment.json: what the report needs to know about the grid and the tasks."""
    config = experiment.train_config(experiment.cells()[0])
    training = config.training
    peft = ", ".join(
        f"{item['kind']}"
        + (f" (r={config.peft.r}, alpha={config.peft.alpha})" if item["kind"] != "ia3" else "")
        for item in experiment.grid.peft
    )
    summary = [  # (label, value) lines for the report's header, in this order
        ("base model", config.model.name_or_path),
        ("training data", config.data.path),
        (
            "steps × batch",
            f"{training.max_steps} × {training.batch_size * training.gradient_accumulation_steps}",
        ),
        (
            "learning rate",
            f"{training.learning_rate:g} ({training.lr_scheduler_type}, warmup {training.warmup_ratio:g})",
        ),
        ("PEFT", peft),
        ("evaluation", ", ".join(f"{task.name} ({task.metric})" for task in tasks)),
    ]
    atomic_write_json(
        experiment.root / EXPERIMENT_FILE,
        {
            "source": experiment.source,
            "grid": {
                "methods": experiment.grid.methods,
                "peft": experiment.grid.kinds,
                "seeds": experiment.grid.seeds,
            },
            "cells": [asdict(cell) | {"name": cell.name} for cell in experiment.cells()],
            "tasks": [{"name": task.name, "metric": task.metric} for task in tasks],
            "summary": summary,
        },
    )


__all__ = ["cell_state", "run_cell", "run_experiment"]
