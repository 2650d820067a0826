"""`bitune eval`: score a Bitune checkpoint, PEFT adapter or base model on benchmark tasks.

    bitune eval --checkpoint runs/bitune/final --tasks piqa arc_easy mmlu --data-dir ../shared/data
    bitune eval --base-model meta-llama/Llama-3.2-1B --peft-adapter runs/lora/final --tasks gsm8k --limit 100
    bitune eval --base-model meta-llama/Llama-3.2-1B --tasks my_quiz.yaml --style plain --log-samples

Scores (acc and acc_norm; strict and flexible match for generation tasks) come with standard errors, per task
(MMLU: per subject, micro and macro average) and averaged over tasks; they are printed as a table and written
as JSON (`--output`), with per-sample predictions beside it on request (`--log-samples`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bitune.cli.common import add_device_arguments, add_quantization_argument, model_source
from bitune.errors import BituneInputError
from bitune.evaluation.runner import run_evaluation
from bitune.evaluation.tasks import STYLES, TASK_NAMES

HELP = "score a Bitune checkpoint, PEFT adapter or base model on benchmark tasks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `eval` arguments to `parser`."""
    parser.description = (
        "Score a Bitune checkpoint, PEFT adapter or base model on benchmark tasks: scores with standard "
        "errors, per task and averaged over tasks, printed as a table and written as JSON."
    )
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
    add_device_arguments(model)
    add_quantization_argument(model)

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

    run_group = parser.add_argument_group("run")
    run_group.add_argument("--batch-size", type=int, default=8, help="questions per batch")
    run_group.add_argument(
        "--max-new-tokens", type=int, help="generation tasks: override the task's limit of 256 new tokens"
    )
    run_group.add_argument(
        "--output", type=Path, default=Path("eval_results.json"), help="JSON file of the scores"
    )
    run_group.add_argument(
        "--log-samples",
        action="store_true",
        help="also write every sample's prediction to OUTPUT.samples.jsonl",
    )


def run(args: argparse.Namespace) -> int:
    """Run the `eval` command; returns the exit code."""
    names = [name for value in args.tasks for name in value.split(",") if name]
    task_files = _task_files(args.task_file, names)
    if args.checkpoint is None and args.base_model is None:
        raise BituneInputError("name the model to evaluate: --checkpoint DIR, or --base-model PATH")
    evaluation, written = run_evaluation(
        names,
        **model_source(args),
        data_dir=args.data_dir,
        task_files=task_files,
        style=args.style,
        limit=args.limit,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        output=args.output,
        log_samples=args.log_samples,
    )
    print(evaluation.table())
    for path in written:
        print(f"wrote {path}")
    return 0


def _task_files(entries: list[str], names: list[str]) -> dict[str, Path]:
    """--task-file TASK=PATH entries as {task: path}, each TASK one of the --tasks."""
    files = {}
    for entry in entries:
        name, separator, path = entry.partition("=")
        if not separator or not name or not path:
            raise BituneInputError(f"--task-file {entry!r}: write TASK=PATH, e.g. piqa=data/piqa_dev.jsonl")
        if name not in names:
            raise BituneInputError(
                f"--task-file {entry!r}: {name!r} is not one of the --tasks ({', '.join(names)})"
            )
        files[name] = Path(path)
    return files
