"""`bitune demo --quick`: the README's first command, end to end at a quarter of its size."""

import json
import re
from pathlib import Path

import pytest

from bitune import BituneModel
from bitune.cli import main
from bitune.experiments.demo import run_demo
from bitune.experiments.layout import EVAL_FILE


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("demo")
    return output_dir, run_demo(output_dir, quick=True)


def test_quick_demo_tunes_a_model_from_nothing_above_the_untuned_one(demo_run):
    output_dir, result = demo_run
    tasks = {"person_location", "object_holder", "object_location"}
    assert set(result["untuned"]) == set(result["bitune"]) == tasks
    # The untuned base has never seen "Answer:" followed by a one-word answer; even 37 Bitune steps teach it
    # to answer with an entity of the asked type, so it lands above zero on average.
    untuned = sum(result["untuned"].values()) / len(tasks)
    tuned = sum(result["bitune"].values()) / len(tasks)
    assert tuned > untuned
    checkpoint = Path(result["checkpoint"])
    assert BituneModel.from_pretrained(checkpoint).bitune_config.mode == "bitune"
    assert (checkpoint.parent / EVAL_FILE).exists()
    assert json.loads(Path(result["test_file"]).read_text().splitlines()[0])["completion"]


def test_demo_command_prints_the_table_and_a_sample_and_resumes_without_retraining(demo_run, capsys):
    output_dir, result = demo_run
    assert main(["demo", "--quick", "--output-dir", str(output_dir)]) == 0  # every stage is done: reloads
    out = capsys.readouterr().out
    for task, value in result["bitune"].items():
        assert re.search(rf"{task}\s+{result['untuned'][task]:.3f}\s+{value:.3f}", out)
    assert "sample: 'Question: " in out and "-> '" in out
    assert f"checkpoint: {result['checkpoint']}" in out
