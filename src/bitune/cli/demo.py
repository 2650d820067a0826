"""`bitune demo`: a real Bitune job from nothing, in a few minutes on a CPU (`bitune.experiments.demo`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bitune.cli.common import HelpFormatter, quiet_libraries
from bitune.experiments.demo import DEFAULT_OUTPUT

HELP = "the self-contained demo: synthetic data, a tiny pretrained model, Bitune tuning, accuracy"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `demo` arguments to `parser`."""
    parser.formatter_class = HelpFormatter
    parser.description = (
        "Generate synthetic context-then-question data, pretrain a small Llama on its stories, Bitune-tune it on "
        "the questions and compare exact-match accuracy on held-out questions with the untuned model."
    )
    parser.epilog = "example: bitune demo --output-dir runs/demo   (rerunning continues where it stopped)"
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT, help="where data, models and results go")
    parser.add_argument(
        "--quick", action="store_true", help="a 4x smaller run (about a minute and a half), for smoke tests"
    )


@quiet_libraries()  # no library warnings or progress bars around the results
def run(args: argparse.Namespace) -> int:
    """Run the demo, print the accuracy table and one sample answer; returns the exit code."""
    from bitune.core.generation import generate_text
    from bitune.core.pretrained import load_for_inference
    from bitune.core.prompts import render_prompt
    from bitune.experiments.demo import run_demo

    result = run_demo(args.output_dir, args.quick)
    print(f"\n{'task':<18}{'untuned':>10}{'bitune':>10}   (exact match on held-out questions)")
    for task, value in result["bitune"].items():
        print(f"{task:<18}{result['untuned'][task]:>10.3f}{value:>10.3f}")
    print("chance: 0.125 (each answer is one of 8 names, places or objects)")
    model, tokenizer = load_for_inference(checkpoint=result["checkpoint"], device="cpu")
    rows = [json.loads(line) for line in Path(result["test_file"]).read_text().splitlines()]
    prompt = render_prompt(rows[0]["prompt"], "plain")
    answer = generate_text(model, tokenizer, [prompt], max_new_tokens=4, do_sample=False)[0]
    print(
        f"\ncheckpoint: {result['checkpoint']}\nsample: {prompt!r}\n  -> {answer.strip()!r} "
        f"(expected {rows[0]['completion']!r})"
    )
    return 0
