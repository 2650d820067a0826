"""Scoring the models of an experiment: every cell's, and the untuned base model's once, on the same tasks.

Benchmarks and task spec files are scored by `bitune.evaluation` (as lm-eval scores them). The held-out
synthetic questions (evaluation task "synthetic", one task per question type) are scored here from the
training tokenisation: `exact_match` of the greedy answer, and `acc`/`acc_norm` of the answer's
log-likelihood among all answers of its type.
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from bitune.core.batch import pad_left
from bitune.core.generation import generate_new_text
from bitune.core.loading import pad_token_id
from bitune.core.pretrained import load_for_inference
from bitune.data.records import Record
from bitune.data.samples import DataConfig, build_samples
from bitune.errors import BituneInputError
from bitune.evaluation.metrics import TaskResult, multiple_choice_scores, summarize
from bitune.evaluation.runner import evaluate
from bitune.evaluation.scoring import context_window, loglikelihoods
from bitune.evaluation.tasks import GENERATION, MULTIPLE_CHOICE, TASK_NAMES, Task, load_task
from bitune.experiments import synthetic
from bitune.experiments.layout import BASE_EVAL_FILE, DATA_DIR, TEST_DATA_FILE, TRAIN_DATA_FILE
from bitune.experiments.settings import SYNTHETIC, EvaluationSettings, Experiment, TaskSettings
from bitune.files import atomic_write_json
from bitune.settings import plain

EXACT_MATCH = "exact_match"
METRICS = {MULTIPLE_CHOICE: ("acc", "acc_norm"), GENERATION: ("flexible_match", "strict_match")}
SYNTHETIC_METRICS = (EXACT_MATCH, "acc", "acc_norm")
SYNTHETIC_MAX_NEW_TOKENS = 8  # one-word answers


@dataclass
class SyntheticTask:
    """Held-out synthetic questions of one type, scored two ways from the training tokenisation.

    * `exact_match`: the first word of the greedy answer is the answer (`bitune.experiments.synthetic.exact_match`);
    * `acc` / `acc_norm`: the answer (with its EOS, as trained) is the most likely of all answers this type of
      question has (a multiple-choice reading over the closed answer set, as the benchmarks are scored).
    """

    name: str
    rows: list[dict[str, str]]  # prompt, completion
    answers: list[str]  # every answer of this type in the training and test rows
    data: DataConfig  # the training data settings: prompts and answers are tokenised exactly as in training


@dataclass
class EvaluationTask:
    """A task and the metric the report shows for it."""

    task: Task | SyntheticTask
    metric: str

    @property
    def name(self) -> str:
        return self.task.name


def load_evaluation_tasks(experiment: Experiment) -> list[EvaluationTask]:
    """The tasks of `experiment.evaluation`, read once (the synthetic test set must exist: `prepare_stages`)."""
    tasks: list[EvaluationTask] = []
    for index, entry in enumerate(experiment.evaluation.tasks):
        key = f"{experiment.source}: evaluation.tasks[{index}]"
        if entry.name == SYNTHETIC:
            tasks += [
                EvaluationTask(task, _metric(entry, SYNTHETIC_METRICS, key))
                for task in _synthetic_tasks(experiment)
            ]
            continue
        if entry.name not in TASK_NAMES and not entry.name.endswith((".yaml", ".yml", ".json")):
            raise BituneInputError(
                f"{key}: unknown task {entry.name!r}; use {', '.join(TASK_NAMES)}, {SYNTHETIC}, or a task spec file"
            )
        task = load_task(
            entry.name,
            data_dir=entry.data_dir if entry.path is None else None,
            path=entry.path,
            split=entry.split,
            style=entry.style,
            limit=entry.limit,
        )
        tasks.append(EvaluationTask(task, _metric(entry, METRICS[task.kind], key)))
    names = [task.name for task in tasks]
    if len(set(names)) < len(names):
        raise BituneInputError(f"{experiment.source}: evaluation.tasks: a task name occurs twice ({names})")
    return tasks


def _synthetic_tasks(experiment: Experiment) -> list[SyntheticTask]:
    """One task per question type of the held-out synthetic rows."""
    data = experiment.train_config(experiment.cells()[0]).data
    rows = {
        split: [json.loads(line) for line in (experiment.root / DATA_DIR / name).read_text().splitlines()]
        for split, name in (("train", TRAIN_DATA_FILE), ("test", TEST_DATA_FILE))
    }
    tasks = []
    for task_type in experiment.synthetic.task_types:
        answers = sorted(
            {row["completion"] for split in rows.values() for row in split if row["task"] == task_type}
        )
        test = [row for row in rows["test"] if row["task"] == task_type]
        tasks.append(SyntheticTask(task_type, test, answers, data))
    return tasks


def _metric(entry: TaskSettings, available: Sequence[str], key: str) -> str:
    if entry.metric is None:
        return available[0]
    if entry.metric not in available:
        raise BituneInputError(
            f"{key}.metric: {entry.metric!r} is not a metric of {entry.name}; use {', '.join(available)}"
        )
    return entry.metric


def evaluate_model(
    model, tokenizer, tasks: Sequence[EvaluationTask], settings: EvaluationSettings
) -> dict[str, Any]:
    """Scores of `model` on `tasks`: per task its metrics (value, stderr, n) and every item's scores.

    Example:
        >>> from bitune.experiments.settings import EvaluationSettings
        >>> settings = EvaluationSettings(tasks=["arc_challenge"], batch_size=4)  # the tasks: below
        >>> tasks = [EvaluationTask(load_task("arc_challenge", data_dir="../shared/data", limit=4), "acc")]
        >>> scores = evaluate_model(model, tokenizer, tasks, settings)
        >>> scores["arc_challenge"]["metrics"]["acc"]
        {'value': 0.25, 'stderr': 0.25, 'n': 4}
        >>> scores["arc_challenge"]["items"]["acc"]  # per question, for the paired test of the report
        [1.0, 0.0, 0.0, 0.0]
    """
    benchmarks = [task.task for task in tasks if isinstance(task.task, Task)]
    results: dict[str, tuple[TaskResult, list[dict[str, Any]]]] = {}
    if benchmarks:
        evaluation = evaluate(
            model,
            tokenizer,
            benchmarks,
            batch_size=settings.batch_size,
            max_new_tokens=settings.max_new_tokens,
            log_samples=True,
            progress=False,
        )
        for result in evaluation.results:
            results[result.task] = (result, evaluation.samples[result.task])
    for task in (task.task for task in tasks if isinstance(task.task, SyntheticTask)):
        results[task.name] = score_synthetic_task(
            model,
            tokenizer,
            task,
            batch_size=settings.batch_size,
            max_new_tokens=settings.max_new_tokens or SYNTHETIC_MAX_NEW_TOKENS,
        )
    scores = {}
    for task in tasks:
        result, samples = results[task.name]
        scores[task.name] = {
            "metric": task.metric,
            "metrics": {
                name: {"value": e.value, "stderr": None if math.isnan(e.stderr) else e.stderr, "n": e.n}
                for name, e in result.metrics.items()
            },
            "items": {
                "id": [s["id"] for s in samples],
                **{name: [s[name] for s in samples] for name in result.metrics},
            },
        }
    return scores


def score_synthetic_task(
    model, tokenizer, task: SyntheticTask, *, batch_size: int, max_new_tokens: int
) -> tuple[TaskResult, list[dict[str, Any]]]:
    """`exact_match` of the greedy answers and `acc`/`acc_norm` over the answer set; with per-item scores."""
    records = [
        Record(f"{task.name} test question {index}", {"prompt": row["prompt"], "completion": answer})
        for index, row in enumerate(task.rows)
        for answer in task.answers
    ]
    # Truncated rather than dropped when too long, so that every question keeps all its options.
    samples, _ = build_samples(records, tokenizer, replace(task.data, overlong="truncate"))
    per_question = len(task.answers)
    likelihoods = loglikelihoods(
        model,
        [(sample.prompt_ids, sample.answer_ids) for sample in samples],
        batch_size=batch_size,
        pad_token_id=pad_token_id(tokenizer),
        max_length=context_window(model.config, tokenizer),
        progress=False,
    )
    outputs = greedy_answers(
        model,
        tokenizer,
        [samples[index * per_question].prompt_ids for index in range(len(task.rows))],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    items = []
    for index, (row, output) in enumerate(zip(task.rows, outputs, strict=True)):
        options = likelihoods[index * per_question : (index + 1) * per_question]
        items.append(
            {
                "id": f"{task.name}-{index}",
                EXACT_MATCH: float(synthetic.exact_match(output, row["completion"])),
                **multiple_choice_scores(
                    [option.logprob for option in options],
                    task.answers,
                    task.answers.index(row["completion"]),
                ),
            }
        )
    scores = [{name: item[name] for name in SYNTHETIC_METRICS} for item in items]
    return summarize(task.name, scores), items


@torch.inference_mode()
def greedy_answers(
    model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy continuations of prompt token lists (BOS first, as training sees them), `batch_size` at a time;
    generation ends at EOS.

    Token ids rather than text (`bitune.core.generation.generate_text`): the prompts are the training
    tokenisation of the questions, truncated as in training, and batches are kept to the evaluation's size.
    """
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch = pad_left(prompts[start : start + batch_size], pad_token_id(tokenizer))
        outputs += generate_new_text(
            model,
            tokenizer,
            batch["input_ids"].to(model.device),
            batch["attention_mask"].to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return outputs


def free_accelerator_memory() -> None:
    """Return a released model's GPU memory now, not at the next garbage collection (cells run back to back)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def evaluate_base_model(experiment: Experiment, tasks: Sequence[EvaluationTask]) -> None:
    """Score the untuned base model once (`base_eval.json`), the reference row of the report."""
    config = experiment.train_config(experiment.cells()[0])
    fingerprint = plain(
        {
            "model": config.model.name_or_path,
            "stages": experiment.stage_settings(),
            "evaluation": experiment.evaluation_fingerprint(),
        }
    )
    path = experiment.root / BASE_EVAL_FILE
    if path.is_file() and json.loads(path.read_text(encoding="utf-8")).get("fingerprint") == fingerprint:
        return
    model, tokenizer = load_for_inference(
        base_model=config.model.name_or_path,
        tokenizer=config.model.tokenizer,
        device=config.device,
        dtype=config.base_dtype,
    )
    scores = evaluate_model(model, tokenizer, tasks, experiment.evaluation)
    atomic_write_json(path, {"fingerprint": fingerprint, "tasks": scores})
    del model
    free_accelerator_memory()
    tqdm.write(f"untuned base model: {describe_scores(scores)}")


def describe_scores(scores: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{name} {entry['metric']} {entry['metrics'][entry['metric']]['value']:.3f}"
        for name, entry in scores.items()
    )


__all__ = [
    "EXACT_MATCH",
    "SYNTHETIC_METRICS",
    "EvaluationTask",
    "SyntheticTask",
    "describe_scores",
    "evaluate_base_model",
    "evaluate_model",
    "free_accelerator_memory",
    "greedy_answers",
    "load_evaluation_tasks",
    "score_synthetic_task",
]
