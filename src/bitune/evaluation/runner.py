"""Evaluate a model on benchmark tasks: `evaluate` (a loaded model) and `run_evaluation` (load, score, write).

Scores (acc and acc_norm; strict and flexible match for generation tasks) come with standard errors, per task
(MMLU: per subject, micro and macro average) and averaged over tasks. `run_evaluation` writes them as JSON,
with per-sample predictions beside it on request; `bitune eval` (`bitune.cli.eval`) is its command line.

Example (4 questions per task; `checkpoint` holds untrained adapters, so the scores are chance level):
    >>> evaluation, written = run_evaluation(["piqa", "arc_easy"], checkpoint=checkpoint, device="cpu",
    ...     data_dir="../shared/data", limit=4, output=tmp / "scores.json", progress=False)
    >>> print(evaluation.table())
    task      metric     value  stderr  n
    piqa      acc       0.5000  0.2887  4
              acc_norm  0.5000  0.2887  4
    arc_easy  acc       0.0000  0.0000  4
              acc_norm  0.2500  0.2500  4
    average   acc       0.2500  0.1443  8
              acc_norm  0.3750  0.1909  8
    >>> [path.name for path in written]
    ['scores.json']
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitune._version import __version__
from bitune.core.loading import quantization_of
from bitune.core.plain import ScoringModel
from bitune.core.pretrained import load_for_inference
from bitune.errors import BituneInputError
from bitune.evaluation.metrics import (
    Estimate,
    TaskResult,
    average_over_tasks,
    format_results_table,
    generation_scores,
    multiple_choice_scores,
    score_task,
)
from bitune.evaluation.scoring import context_window, generate_until, score_multiple_choice
from bitune.evaluation.tasks import MULTIPLE_CHOICE, Task, load_task
from bitune.files import atomic_write_json, atomic_write_text


@dataclass
class Evaluation:
    """Scores of every task, their average over tasks and, on request, every sample's prediction."""

    results: list[TaskResult]
    average: dict[str, Estimate]
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def table(self) -> str:
        """The scores as an aligned text table, with the average over tasks last when there are several."""
        rows = self.results + ([TaskResult("average", self.average)] if len(self.results) > 1 else [])
        return format_results_table(rows)

    def to_dict(self) -> dict[str, Any]:
        """The scores as JSON-ready data (a missing standard error is null)."""

        def estimates(metrics: dict[str, Estimate]) -> dict[str, dict[str, float | int | None]]:
            return {
                name: {"value": e.value, "stderr": None if math.isnan(e.stderr) else e.stderr, "n": e.n}
                for name, e in metrics.items()
            }

        tasks = {}
        for result in self.results:
            tasks[result.task] = {"metrics": estimates(result.metrics)}
            if result.groups:
                tasks[result.task]["macro"] = estimates(result.macro)
                tasks[result.task]["groups"] = {g: estimates(m) for g, m in result.groups.items()}
        return {"results": tasks, "average": estimates(self.average)}


def evaluate(
    model: ScoringModel,
    tokenizer,
    tasks: Sequence[Task],
    *,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    log_samples: bool = False,
    progress: bool = True,
) -> Evaluation:
    """Score `model` on `tasks` (from `bitune.evaluation.tasks.load_task`).

    Multiple-choice tasks compare the options' log-likelihoods (each context encoded once per question);
    generation tasks generate greedily up to the task's stop sequences (`max_new_tokens` overrides the
    task's limit). `batch_size` counts questions.

    Example:
        >>> from bitune.evaluation.tasks import load_task
        >>> from bitune.core.pretrained import load_for_inference
        >>> model, tokenizer = load_for_inference(checkpoint=checkpoint, device="cpu")
        >>> tasks = [load_task("piqa", data_dir="../shared/data", limit=10)]
        >>> print(evaluate(model, tokenizer, tasks, progress=False).table())
        task  metric     value  stderr   n
        piqa  acc       0.5000  0.1667  10
              acc_norm  0.6000  0.1633  10
    """
    max_length = context_window(model.config, tokenizer)
    results, samples = [], {}
    for task in tasks:
        if task.kind == MULTIPLE_CHOICE:
            scores = score_multiple_choice(
                model, tokenizer, task.items, batch_size=batch_size, max_length=max_length, progress=progress
            )
            predictions = [[score.logprob for score in item_scores] for item_scores in scores]
            if log_samples:
                samples[task.name] = [
                    {
                        "id": item.id,
                        "context": item.context,
                        "choices": item.choices,
                        **({"continuation": item.continuation} if item.continuation is not None else {}),
                        "gold": item.gold,
                        "loglikelihoods": lls,
                        "is_greedy": [score.is_greedy for score in item_scores],
                        **multiple_choice_scores(lls, item.choices, item.gold),
                    }
                    for item, item_scores, lls in zip(task.items, scores, predictions, strict=True)
                ]
        else:
            predictions = generate_until(
                model,
                tokenizer,
                [item.prompt for item in task.items],
                stop_sequences=task.stop_sequences,
                max_new_tokens=max_new_tokens or task.max_new_tokens,
                batch_size=batch_size,
                max_length=max_length,
                progress=progress,
            )
            if log_samples:
                samples[task.name] = [
                    {
                        "id": item.id,
                        "prompt": item.prompt,
                        "target": item.target,
                        "output": output,
                        **generation_scores(output, item.target),
                    }
                    for item, output in zip(task.items, predictions, strict=True)
                ]
        results.append(score_task(task, predictions))
    return Evaluation(results, average_over_tasks(results), samples)


def load_tasks(
    names: Sequence[str],
    *,
    data_dir: str | Path | None = None,
    files: Mapping[str, str | Path] | None = None,
    style: str = "full",
    limit: int | None = None,
) -> list[Task]:
    """The tasks called `names` (built-in names or task spec files); `files` maps a task to its data file.

    Example:
        >>> tasks = load_tasks(["piqa", "gsm8k"], data_dir="../shared/data", limit=100)
        >>> [(task.name, task.kind, len(task.items)) for task in tasks]
        [('piqa', 'multiple_choice', 100), ('gsm8k', 'generation', 100)]
    """
    files = dict(files or {})
    return [
        load_task(
            name,
            data_dir=None if name in files else data_dir,
            path=Path(files[name]) if name in files else None,
            style=style,
            limit=limit,
        )
        for name in names
    ]


def samples_path(output: str | Path) -> Path:
    """Where `run_evaluation` writes the per-sample predictions beside the scores file `output`."""
    return Path(output).with_suffix(".samples.jsonl")


def run_evaluation(
    task_names: Sequence[str],
    *,
    checkpoint: str | Path | None = None,
    base_model: str | None = None,
    peft_adapter: str | Path | None = None,
    tokenizer: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    quantization: str | None = None,
    data_dir: str | Path | None = None,
    task_files: Mapping[str, str | Path] | None = None,
    style: str = "full",
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    output: str | Path = "eval_results.json",
    log_samples: bool = False,
    progress: bool = True,
) -> tuple[Evaluation, list[Path]]:
    """Load the tasks and the model, score it, and write the scores (and, on request, every sample's prediction).

    The model is a Bitune checkpoint, a base model with an optional plain PEFT adapter, or a bare base model
    (`bitune.core.pretrained.load_for_inference`). Returns the evaluation and the files written: the scores as
    JSON at `output` (with the model, tasks and settings), then `samples_path(output)` with `log_samples`.
    """
    if batch_size < 1:
        raise BituneInputError(f"batch_size must be at least 1, got {batch_size}")
    # First: a typo in a task name should not wait for a model to load.
    tasks = load_tasks(task_names, data_dir=data_dir, files=task_files, style=style, limit=limit)
    model, tokenizer = load_for_inference(
        checkpoint=checkpoint,
        base_model=base_model,
        peft_adapter=peft_adapter,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        quantization=quantization,
    )
    evaluation = evaluate(
        model,
        tokenizer,
        tasks,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        log_samples=log_samples,
        progress=progress,
    )
    report = {
        "model": {
            "checkpoint": _text(checkpoint),
            "base_model": base_model,
            "peft_adapter": _text(peft_adapter),
            "mode": getattr(getattr(model, "bitune_config", None), "mode", "plain"),
            "dtype": dtype,
            "quantization": quantization_of(model.base_model),
        },
        "tasks": {
            task.name: {"source": task.source, "split": task.split, "items": len(task.items)}
            for task in tasks
        },
        "settings": {"style": style, "limit": limit, "batch_size": batch_size},
        "bitune_version": __version__,
        **evaluation.to_dict(),
    }
    output = Path(output)
    atomic_write_json(output, report)
    written = [output]
    if log_samples:
        lines = [
            json.dumps({"task": task, **sample}, ensure_ascii=False) + "\n"
            for task, samples in evaluation.samples.items()
            for sample in samples
        ]
        atomic_write_text(samples_path(output), "".join(lines))
        written.append(samples_path(output))
    return evaluation, written


def _text(path: str | Path | None) -> str | None:
    return None if path is None else str(path)


__all__ = ["Evaluation", "evaluate", "load_tasks", "run_evaluation", "samples_path"]
