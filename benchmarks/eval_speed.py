"""Evaluation speed: 4-option multiple-choice questions per second, Bitune's scorer against stock lm-eval.

Stock lm-eval (`hf`) runs one forward over context + option for every option (single-token options share one,
its logits cache); Bitune's scorer encodes each context once and scores all options from that cache, and
computes logits only where an option's tokens are scored. Compared on one random base model in one process,
interleaved, on real ARC-Easy and MMLU questions (lm-eval's own prompts, `--style plain`) tokenised with the
stories260K tokenizer:

    ours        bitune.evaluation.scoring on the plain model (`bitune eval --base-model`)
    lm-eval     stock lm-eval `hf` on the same model; the reference
    harness     lm-eval's `bitune` model (bitune.evaluation.harness) on the same plain model
    bitune      our scorer on a Bitune model (two prompt passes, LoRA adapters): the cost of the method

Same work per forward: our batches hold `--batch-size` questions, lm-eval's 4× as many (context, option)
requests. Speed ratios are medians of per-repetition ratios against lm-eval (> 1: faster).

    python benchmarks/eval_speed.py            # ~3 minutes on 2 cores
    python benchmarks/eval_speed.py --quick
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import common
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from transformers import AutoTokenizer, PreTrainedModel

from bitune import BituneConfig, BituneModel
from bitune.core.convert import convert_llama2c
from bitune.core.plain import PlainModel
from bitune.evaluation.harness import BituneLM
from bitune.evaluation.scoring import score_multiple_choice
from bitune.evaluation.tasks import MultipleChoiceItem, load_task

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TASKS = ("arc_easy", "mmlu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, repeats=2)
    parser.add_argument("--questions", type=int, default=24, help="4-option questions per task (default: 24)")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per batch (default: 8)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument(
        "--style", default="plain", choices=["plain", "full"], help="prompt style (default: plain)"
    )
    parser.add_argument("--data-dir", type=Path, default=SHARED_DATA, help="the shared data folder")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.questions = 1, min(args.questions, 8)
    return args


def four_option_questions(args: argparse.Namespace, task: str) -> list[MultipleChoiceItem]:
    items = load_task(task, data_dir=args.data_dir, style=args.style).items
    return [item for item in items if len(item.choices) == 4][: args.questions]  # type: ignore[union-attr]


def stock_requests(items: Sequence[MultipleChoiceItem]) -> list[Instance]:
    """The (context, option) requests lm-eval builds for these items."""
    pairs = [(item.context, option) for item in items for option in item.continuations]
    return [Instance("loglikelihood", {}, pair, index) for index, pair in enumerate(pairs)]


def candidates(
    args: argparse.Namespace, base: PreTrainedModel, tokenizer, items: Sequence[MultipleChoiceItem]
) -> dict[str, Callable[[], list[list[float]]]]:
    """Each configuration as a callable scoring every option of `items` (log-likelihoods per item)."""
    plain = PlainModel(base).eval()
    method = BituneModel.from_base(
        copy.deepcopy(base), common.lora_config(), BituneConfig(), check_support=False
    )
    stock = HFLM(pretrained=base, tokenizer=tokenizer, batch_size=4 * args.batch_size)
    harness = BituneLM(pretrained=plain, tokenizer=tokenizer, batch_size=args.batch_size)
    requests = stock_requests(items)

    def ours(model: torch.nn.Module) -> Callable[[], list[list[float]]]:
        def run() -> list[list[float]]:
            scores = score_multiple_choice(
                model, tokenizer, items, batch_size=args.batch_size, progress=False
            )
            return [[score.logprob for score in item] for item in scores]

        return run

    def lm_eval(lm: HFLM) -> Callable[[], list[list[float]]]:
        def run() -> list[list[float]]:
            flat = [logprob for logprob, _ in lm.loglikelihood(requests, disable_tqdm=True)]
            return [flat[4 * i : 4 * i + 4] for i in range(len(items))]

        return run

    return {
        "ours": ours(plain),
        "lm-eval": lm_eval(stock),
        "harness": lm_eval(harness),
        "bitune": ours(method.eval()),
    }


def measure(args: argparse.Namespace, base: PreTrainedModel, tokenizer, task: str) -> dict[str, Any]:
    items = four_option_questions(args, task)
    runs = candidates(args, base, tokenizer, items)
    # A first round, untimed, warms every configuration up and checks that the three on the plain model
    # compute the same numbers (their speeds compare only if they do the same work).
    scores = {name: run() for name, run in runs.items()}
    disagreement = {
        name: max(
            abs(a - b) for mine, theirs in zip(scores[name], scores["lm-eval"]) for a, b in zip(mine, theirs)
        )
        for name in ("ours", "harness")
    }
    timed = {name: common.timed(run, args.device) for name, run in runs.items()}
    seconds = common.interleaved(timed, args.repeats, max(args.warmup - 1, 0))
    row: dict[str, Any] = {"task": task, "style": args.style, "questions": len(items)}
    row["tokens_per_question"] = statistics.mean(len(tokenizer.encode(item.context)) for item in items)
    for name, times in seconds.items():
        row[f"{name}_q_per_s"] = len(items) / statistics.median(times)
        row[f"{name}_ratio"] = common.median_ratio(seconds["lm-eval"], times)
    row.update({f"{name}_max_abs_diff": value for name, value in disagreement.items()})
    row["raw_seconds"] = seconds
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not (args.data_dir / "models" / "stories260K.bin").is_file():
        sys.exit(f"eval_speed: the shared data folder {args.data_dir} (questions and tokenizer) is missing")
    common.setup(args)
    with tempfile.TemporaryDirectory() as folder:
        models = args.data_dir / "models"
        tokenizer_dir = convert_llama2c(
            models / "stories260K.bin", models / "tok512.bin", Path(folder) / "s260k"
        )
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    base = common.build_base(args).eval()
    if base.config.vocab_size < len(tokenizer):  # the "tiny" model of smoke runs
        base.resize_token_embeddings(len(tokenizer))
    print(
        f"{args.model_size} Llama: {common.parameter_count(base) / 1e6:.1f}M parameters, {args.dtype} on {args.device}"
    )

    rows = []
    for task in args.tasks:
        rows.append(measure(args, base, tokenizer, task))
        print(f"  {task}: ours x{rows[-1]['ours_ratio']:.2f} the speed of stock lm-eval", flush=True)
    common.print_table(
        f"4-option multiple choice, questions/s (batch {args.batch_size} questions; ratio = speed / stock "
        f"lm-eval's, median of {args.repeats} paired repetitions)",
        rows,
        ["task", "tokens_per_question", "lm-eval_q_per_s", "ours_q_per_s", "ours_ratio", "harness_ratio",
         "bitune_q_per_s", "bitune_ratio", "ours_max_abs_diff"],
    )  # fmt: skip
    return common.save_results(
        args, "eval_speed", rows, common.parameter_count(base), batch_size_questions=args.batch_size
    )


if __name__ == "__main__":
    main(sys.argv[1:])
