"""Scores and their aggregation, computed exactly as lm-evaluation-harness 0.4.13 computes them.

* Multiple choice: `acc` (the option with the highest log-likelihood is the gold one) and `acc_norm` (the same
  after dividing each log-likelihood by the option's length in characters, the delimiter not counted).
* Generation (GSM8K): `strict_match` reads the number after "#### ", `flexible_match` the last number in the
  output; both compare after lm-eval's normalisation (no commas, no "$", no trailing ".", lower case).
* Each mean comes with lm-eval's standard error: the sample standard deviation of the per-item scores over
  sqrt(n). Grouped tasks (MMLU subjects) report every group, the micro average (all items alike; lm-eval's
  group score, with its pooled standard error) and the macro average (groups alike).

Example:
    >>> scores = [multiple_choice_scores([-1.0, -9.0], ["a", "b"], gold=0),
    ...           multiple_choice_scores([-4.0, -6.0], ["a", "bbbbbb"], gold=1)]
    >>> result = summarize("toy", scores)
    >>> result.metrics["acc"].value, result.metrics["acc_norm"].value
    (0.5, 1.0)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from bitune.evaluation.tasks import (
    FLEXIBLE_ANSWER_PATTERN,
    IGNORED_ANSWER_PATTERNS,
    STRICT_ANSWER_PATTERN,
    Task,
)

# The answer patterns of lm-eval's gsm8k filters live with the tasks (bitune.evaluation.tasks).
INVALID_ANSWER = "[invalid]"  # what lm-eval's filters return when the output holds no answer


def multiple_choice_scores(
    loglikelihoods: Sequence[float], choices: Sequence[str], gold: int
) -> dict[str, float]:
    """`acc` and `acc_norm` (1.0 or 0.0) of one item; ties go to the first option, as numpy's argmax.

    `choices` are the options without the leading delimiter (`MultipleChoiceItem.choices`): lm-eval's
    `acc_norm` divides by their length.

    Example:
        >>> multiple_choice_scores([-3.0, -4.0], ["no", "yes yes"], gold=1)
        {'acc': 0.0, 'acc_norm': 1.0}
    """
    if len(loglikelihoods) != len(choices):
        raise ValueError(f"{len(loglikelihoods)} log-likelihoods for {len(choices)} choices")
    scores = np.asarray(loglikelihoods, dtype=np.float64)
    lengths = np.array([len(choice) for choice in choices], dtype=np.float64)
    return {
        "acc": float(np.argmax(scores) == gold),
        "acc_norm": float(np.argmax(scores / lengths) == gold),
    }


def extract_strict_answer(output: str) -> str:
    """The number after the first "#### " in `output`, or "[invalid]"."""
    match = re.search(STRICT_ANSWER_PATTERN, output)
    return match.group(1).strip() if match else INVALID_ANSWER


def extract_flexible_answer(output: str) -> str:
    """The last number in `output`, or "[invalid]"."""
    matches = re.findall(FLEXIBLE_ANSWER_PATTERN, output)
    if not matches:
        return INVALID_ANSWER
    return next(group for group in matches[-1] if group).strip()


def normalize_answer(answer: str) -> str:
    """lm-eval's gsm8k normalisation: drop commas, "$", anything up to "#### " and one trailing "."; lower case.

    Example:
        >>> normalize_answer("$1,250.")
        '1250'
    """
    for pattern in IGNORED_ANSWER_PATTERNS:
        answer = re.sub(pattern, "", answer)
    return answer.lower()


def generation_scores(output: str, target: str) -> dict[str, float]:
    """`strict_match` and `flexible_match` (1.0 or 0.0) of one generated `output` against the reference.

    `output` is the generation cut at the task's first stop sequence, as lm-eval cuts it.

    Example:
        >>> generation_scores("She pays 3 * $4 = $12.\\n#### 12", "12")
        {'strict_match': 1.0, 'flexible_match': 1.0}
        >>> generation_scores("The answer is 1,000.", "1000")
        {'strict_match': 0.0, 'flexible_match': 1.0}
    """
    reference = normalize_answer(target)
    return {
        "strict_match": float(normalize_answer(extract_strict_answer(output)) == reference),
        "flexible_match": float(normalize_answer(extract_flexible_answer(output)) == reference),
    }


@dataclass(frozen=True)
class Estimate:
    """A mean score, its standard error (nan with fewer than 2 items) and the number of items."""

    value: float
    stderr: float
    n: int


@dataclass
class TaskResult:
    """A task's scores: over all items, and per group with their macro average when the task has groups."""

    task: str
    metrics: dict[str, Estimate]  # all items; for a grouped task, lm-eval's group score (micro average)
    groups: dict[str, dict[str, Estimate]] = field(default_factory=dict)
    macro: dict[str, Estimate] = field(default_factory=dict)


def mean_with_stderr(scores: Sequence[float]) -> Estimate:
    """The mean and lm-eval's `mean_stderr`: sample standard deviation (n - 1) over sqrt(n).

    Example:
        >>> mean_with_stderr([1.0, 0.0, 1.0, 1.0])
        Estimate(value=0.75, stderr=0.25, n=4)
    """
    n = len(scores)
    if n == 0:
        raise ValueError("no scores to average")
    mean = math.fsum(scores) / n
    if n < 2:
        return Estimate(mean, math.nan, n)
    variance = math.fsum((score - mean) ** 2 for score in scores) / (n - 1)
    return Estimate(mean, math.sqrt(variance / n), n)


def summarize(
    task: str, item_scores: Sequence[Mapping[str, float]], groups: Sequence[str | None] | None = None
) -> TaskResult:
    """Average per-item scores (`multiple_choice_scores` / `generation_scores` results) into a `TaskResult`.

    With `groups` (one per item, e.g. the MMLU subject) the result also holds every group's scores and their
    macro average; `metrics` is then the micro average, with lm-eval's pooled standard error
    (`pooled_sample_stderr`); the macro average's standard error is sqrt(sum of squared group errors) / k.
    """
    if not item_scores:
        raise ValueError(f"task {task!r} has no scored items")
    names = list(item_scores[0])
    columns = {name: [scores[name] for scores in item_scores] for name in names}
    if groups is None or all(group is None for group in groups):
        return TaskResult(task, {name: mean_with_stderr(values) for name, values in columns.items()})
    if len(groups) != len(item_scores) or any(group is None for group in groups):
        raise ValueError("give one group per scored item, or none at all")

    per_group: dict[str, dict[str, Estimate]] = {}
    for group in sorted(set(groups)):  # type: ignore[type-var]
        members = [index for index, item_group in enumerate(groups) if item_group == group]
        per_group[group] = {
            name: mean_with_stderr([values[i] for i in members]) for name, values in columns.items()
        }
    micro, macro = {}, {}
    for name, values in columns.items():
        estimates = [group_scores[name] for group_scores in per_group.values()]
        total = sum(estimate.n for estimate in estimates)
        pooled_variance = (
            math.fsum((e.n - 1) * e.stderr**2 * e.n for e in estimates) / (total - len(estimates))
            if total > len(estimates)
            else math.nan
        )
        micro[name] = Estimate(math.fsum(values) / total, math.sqrt(pooled_variance / total), total)
        macro[name] = Estimate(
            math.fsum(e.value for e in estimates) / len(estimates),
            math.sqrt(math.fsum(e.stderr**2 for e in estimates)) / len(estimates),
            total,
        )
    return TaskResult(task, micro, per_group, macro)


def score_task(task: Task, predictions: Sequence[Sequence[float]] | Sequence[str]) -> TaskResult:
    """Score a whole task: per item, the options' log-likelihoods (multiple choice) or the generated text.

    Example (from the repository root):
        >>> from bitune.evaluation.tasks import load_task
        >>> task = load_task("piqa", data_dir="../shared/data", limit=2)
        >>> score_task(task, [[-1.0, -2.0], [-1.0, -2.0]]).metrics["acc"].value
        0.5
    """
    if len(predictions) != len(task.items):
        raise ValueError(f"{len(predictions)} predictions for {len(task.items)} items of {task.name!r}")
    if task.kind == "multiple_choice":
        scores = [
            multiple_choice_scores(loglikelihoods, item.choices, item.gold)  # type: ignore[arg-type, union-attr]
            for loglikelihoods, item in zip(predictions, task.items, strict=True)
        ]
    else:
        scores = [
            generation_scores(output, item.target)
            for output, item in zip(predictions, task.items, strict=True)
        ]  # type: ignore[arg-type, union-attr]
    return summarize(task.name, scores, [item.group for item in task.items])


def average_over_tasks(results: Sequence[TaskResult]) -> dict[str, Estimate]:
    """Each metric averaged over the tasks that report it, every task weighing the same.

    A grouped task counts once, with its micro average; the standard error is that of a mean of independent
    estimates, sqrt(sum of squared errors) / k, and `n` counts the items of all those tasks.

    Example:
        >>> average_over_tasks([summarize("a", [{"acc": 1.0}, {"acc": 1.0}]),
        ...                     summarize("b", [{"acc": 0.0}, {"acc": 1.0}])])["acc"]
        Estimate(value=0.75, stderr=0.25, n=4)
    """
    names = list(dict.fromkeys(name for result in results for name in result.metrics))
    average = {}
    for name in names:
        estimates = [result.metrics[name] for result in results if name in result.metrics]
        average[name] = Estimate(
            math.fsum(e.value for e in estimates) / len(estimates),
            math.sqrt(math.fsum(e.stderr**2 for e in estimates)) / len(estimates),
            sum(e.n for e in estimates),
        )
    return average


def format_results_table(results: Sequence[TaskResult]) -> str:
    """Render results as an aligned plain-text table: one row per task/group and metric.

    Example:
        >>> print(format_results_table([summarize("toy", [{"acc": 1.0}, {"acc": 0.0}])]))
        task  metric   value  stderr  n
        toy   acc     0.5000  0.5000  2
    """
    rows = [("task", "metric", "value", "stderr", "n")]

    def add(label: str, metrics: Mapping[str, Estimate]) -> None:
        for position, (name, estimate) in enumerate(metrics.items()):
            stderr = "n/a" if math.isnan(estimate.stderr) else f"{estimate.stderr:.4f}"
            rows.append(
                (label if position == 0 else "", name, f"{estimate.value:.4f}", stderr, str(estimate.n))
            )

    for result in results:
        if not result.groups:
            add(result.task, result.metrics)
            continue
        add(f"{result.task} (micro)", result.metrics)
        add(f"{result.task} (macro)", result.macro)
        for group, metrics in result.groups.items():
            add(f"  {group}", metrics)
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.ljust(width) if column < 2 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


__all__ = [
    "Estimate",
    "TaskResult",
    "average_over_tasks",
    "extract_flexible_answer",
    "extract_strict_answer",
    "format_results_table",
    "generation_scores",
    "mean_with_stderr",
    "multiple_choice_scores",
    "normalize_answer",
    "score_task",
    "summarize",
]
