"""Evaluate a model on benchmark tasks: the `evaluate` function and the `bitune eval` / `bitune lm-eval` commands.

    bitune eval --checkpoint runs/bitune/final --tasks piqa arc_easy mmlu --data-dir ../shared/data
    bitune eval --base-model meta-llama/Llama-3.2-1B --peft-adapter runs/lora/final --tasks gsm8k --limit 100
    bitune eval --base-model meta-llama/Llama-3.2-1B --tasks my_quiz.yaml --style plain --log-samples

Scores (acc and acc_norm; strict and flexible match for generation tasks) come with standard errors, per task
(MMLU: per subject, micro and macro average) and averaged over tasks; they are printed as a table and written
as JSON (`--output`), with per-sample predictions beside it on request (`--log-samples`).

`bitune lm-eval ARGS` runs lm-evaluation-harness's command line with the `bitune` model registered (see
`bitune.evaluation.harness`).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from bitune import __version__
from bitune.core.checkpoint import read_config
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
from bitune.evaluation.scoring import (
    ScoringModel,
    context_window,
    generate_until,
    load_scoring_model,
    score_multiple_choice,
    tokenizer_source,
)
from bitune.evaluation.tasks import MULTIPLE_CHOICE, STYLES, TASK_NAMES, Task, load_task
from bitune.files import atomic_write_json, atomic_write_text

DTYPES = ("auto", "float32", "bfloat16", "float16")


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
        >>> model = load_scoring_model("path/to/base", checkpoint="runs/bitune/final")  # doctest: +SKIP
        >>> tasks = [load_task("piqa", data_dir="../shared/data", limit=100)]  # doctest: +SKIP
        >>> print(evaluate(model, tokenizer, tasks).table())  # doctest: +SKIP
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


# ---------------------------------------------------------------------------------------------- bitune eval


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0] if __doc__ else None
    model = parser.add_argument_group(
        "model (a Bitune checkpoint, or a base model with an optional PEFT adapter)"
    )
    model.add_argument(
        "--checkpoint", type=Path, help="a Bitune checkpoint folder (BituneModel.save_pretrained)"
    )
    model.add_argument(
        "--base-model", help="base model path or hub id (with --checkpoint: overrides the one it names)"
    )
    model.add_argument(
        "--peft-adapter", type=Path, help="a plain PEFT adapter folder, applied to --base-model"
    )
    model.add_argument(
        "--tokenizer",
        help="tokenizer path or hub id; unset: the checkpoint's or adapter's, else the base model's",
    )
    model.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    model.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="weights dtype ('auto': the model's own)"
    )

    data = parser.add_argument_group("tasks")
    data.add_argument(
        "--tasks",
        nargs="+",
        required=True,
        help=f"built-in tasks ({', '.join(TASK_NAMES)}) or task spec files (.yaml/.json), space or comma separated",
    )
    data.add_argument(
        "--data-dir", type=Path, help="read built-in tasks from DIR/<task>/<split>.jsonl instead of the hub"
    )
    data.add_argument(
        "--task-file",
        action="append",
        default=[],
        metavar="TASK=PATH",
        help="read TASK from this data file (repeatable)",
    )
    data.add_argument(
        "--style", default="full", choices=STYLES, help="prompt style: the paper's or lm-eval's"
    )
    data.add_argument("--limit", type=int, help="evaluate only the first N items of each task")

    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=int, default=8, help="questions per batch")
    run.add_argument(
        "--max-new-tokens", type=int, help="generation tasks: override the task's limit of 256 new tokens"
    )
    run.add_argument("--output", type=Path, default=Path("eval_results.json"), help="JSON file of the scores")
    run.add_argument(
        "--log-samples",
        action="store_true",
        help="also write every sample's prediction to OUTPUT.samples.jsonl",
    )


def run_eval(args: argparse.Namespace) -> int:
    tasks = _load_tasks(args)  # first: a typo in a task name should not wait for a model to load
    if args.checkpoint is None and args.base_model is None:
        raise BituneInputError("name the model to evaluate: --checkpoint DIR, or --base-model PATH")
    if args.batch_size < 1:
        raise BituneInputError(f"--batch-size must be at least 1, got {args.batch_size}")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = load_scoring_model(
        args.base_model, checkpoint=args.checkpoint, peft_adapter=args.peft_adapter, dtype=dtype
    ).to(args.device)
    tokenizer = _load_tokenizer(args)

    evaluation = evaluate(
        model,
        tokenizer,
        tasks,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        log_samples=args.log_samples,
    )
    print(evaluation.table())
    report = {
        "model": {
            "checkpoint": _text(args.checkpoint),
            "base_model": args.base_model,
            "peft_adapter": _text(args.peft_adapter),
            "mode": getattr(getattr(model, "bitune_config", None), "mode", "plain"),
            "dtype": args.dtype,
        },
        "tasks": {
            task.name: {"source": task.source, "split": task.split, "items": len(task.items)}
            for task in tasks
        },
        "settings": {"style": args.style, "limit": args.limit, "batch_size": args.batch_size},
        "bitune_version": __version__,
        **evaluation.to_dict(),
    }
    atomic_write_json(args.output, report)
    print(f"wrote {args.output}")
    if args.log_samples:
        path = args.output.with_suffix(".samples.jsonl")
        lines = [
            json.dumps({"task": task, **sample}, ensure_ascii=False) + "\n"
            for task, samples in evaluation.samples.items()
            for sample in samples
        ]
        atomic_write_text(path, "".join(lines))
        print(f"wrote {path}")
    return 0


def _load_tasks(args: argparse.Namespace) -> list[Task]:
    names = [name for value in args.tasks for name in value.split(",") if name]
    files = {}
    for entry in args.task_file:
        name, separator, path = entry.partition("=")
        if not separator or not name or not path:
            raise BituneInputError(f"--task-file {entry!r}: write TASK=PATH, e.g. piqa=data/piqa_dev.jsonl")
        if name not in names:
            raise BituneInputError(
                f"--task-file {entry!r}: {name!r} is not one of the --tasks ({', '.join(names)})"
            )
        files[name] = Path(path)
    return [
        load_task(
            name,
            data_dir=None if name in files else args.data_dir,
            path=files.get(name),
            style=args.style,
            limit=args.limit,
        )
        for name in names
    ]


def _load_tokenizer(args: argparse.Namespace):
    base = args.base_model
    if base is None and args.checkpoint is not None:
        base = read_config(args.checkpoint).get("base_model")
    source = args.tokenizer or tokenizer_source(args.checkpoint, args.peft_adapter, base)
    if source is None:
        raise BituneInputError(
            f"{args.checkpoint} holds no tokenizer and names no base model; pass --tokenizer"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:
        raise BituneInputError(f"could not load a tokenizer from {source}: {error}") from error
    if tokenizer.pad_token is None:  # padding is only masked, so any token will do (lm-eval's choice)
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)


# ---------------------------------------------------------------------------------------------- bitune lm-eval


def add_lm_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run lm-evaluation-harness's command line with the `bitune` model registered, e.g. "
        "`bitune lm-eval run --model bitune --model_args pretrained=BASE,bitune=CHECKPOINT --tasks piqa`. "
        "Every argument is lm-eval's; `bitune lm-eval run --help` lists them."
    )
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER, metavar="ARGS", help="lm-eval's arguments")
    # All arguments, options and -h included, belong to lm-eval: this parser must not claim any of them.
    parser.prefix_chars = "\0"


def run_lm_eval(args: argparse.Namespace) -> int:
    try:
        from bitune.evaluation import harness
    except ImportError as error:
        raise BituneInputError(
            f"bitune lm-eval needs lm-evaluation-harness: pip install 'bitune[eval]' ({error})"
        ) from error
    return harness.main(args.lm_eval_args)


__all__ = ["Evaluation", "add_eval_arguments", "add_lm_eval_arguments", "evaluate", "run_eval", "run_lm_eval"]
