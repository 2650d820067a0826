"""The experiment report: the paired permutation test, the tables and the plots, on hand-made experiment folders."""

import itertools
import json
import re

import numpy as np
import pytest

from bitune.cli import main
from bitune.errors import BituneInputError
from bitune.experiments.layout import (
    CELLS_DIR,
    DONE_FILE,
    EVAL_FILE,
    EXPERIMENT_FILE,
    METRICS_FILE,
    cell_name,
)
from bitune.experiments.report import (
    EXACT_TEST_LIMIT,
    compare,
    paired_permutation_test,
    read_results,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def brute_force_p_value(differences):
    """An independent exact sign-flip test: every sign pattern, counted in plain Python."""
    values = [d for d in differences if d != 0]
    observed = abs(sum(values))
    patterns = list(itertools.product((1, -1), repeat=len(values)))
    reached = sum(abs(sum(s * v for s, v in zip(signs, values))) >= observed - 1e-12 for signs in patterns)
    return reached / len(patterns)


@pytest.mark.parametrize(
    ("differences", "expected"),
    [
        ([1, 1, 1, 1, 1], 2 / 32),  # only all-plus and all-minus reach |sum| = 5
        ([1, -1], 1.0),
        ([1, 1, 1, 0], 2 / 8),  # the zero carries no information
        ([1, 1, 1, -1], 10 / 16),  # |sum| >= 2: sums 4, 2 (x4), -2 (x4), -4
        ([0.5, 0.5, 1.0], 2 / 8),  # weighted: only +-(0.5 + 0.5 + 1) reach 2
        ([0, 0], 1.0),
    ],
)
def test_paired_permutation_test_known_values(differences, expected):
    assert paired_permutation_test(differences) == pytest.approx(expected)


def test_paired_permutation_test_matches_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(5):
        differences = rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0], size=10, p=[0.15, 0.15, 0.2, 0.25, 0.25])
        assert paired_permutation_test(differences) == pytest.approx(brute_force_p_value(differences))


def test_paired_permutation_test_samples_beyond_the_exact_limit():
    differences = np.array([1.0] * 12 + [-1.0] * 4 + [0.5, -0.5])  # 18 non-zero: sampled
    assert differences.size > EXACT_TEST_LIMIT
    patterns = (np.arange(2**18)[:, None] >> np.arange(18)) & 1
    exact = np.mean(np.abs((2 * patterns - 1) @ differences) >= abs(differences.sum()) - 1e-9)
    assert paired_permutation_test(differences) == pytest.approx(exact, abs=0.02)
    # Nothing reaches the observed sum: the sampled p-value is (0 + 1) / (resamples + 1).
    assert paired_permutation_test([1.0] * 40, resamples=999) == pytest.approx(1 / 1000)


def test_compare_weights_every_task_alike_in_the_average():
    # Task a: 5 items all improved by 1; task b: 20 items, unchanged. Average difference = (1 + 0) / 2.
    result = compare({"a": np.ones(5), "b": np.zeros(20)}, {"a": np.zeros(5), "b": np.zeros(20)})
    assert result["a"].difference == 1.0 and result["a"].p_value == pytest.approx(2 / 32)
    assert result["b"].p_value == 1.0
    assert result["average"].difference == pytest.approx(0.5)
    assert result["average"].p_value == pytest.approx(2 / 32)


# ---------------------------------------------------------------------------------------------- report files

TASKS = {"quiz": "acc", "lookup": "exact_match"}
ITEMS = 6


def scores_of(method: str, seed: int) -> dict[str, list[float]]:
    """Per-item scores: bitune gets every quiz item right, the baseline the first half; lookups differ by seed."""
    quiz = [1.0] * ITEMS if method == "bitune" else [1.0] * (ITEMS // 2) + [0.0] * (ITEMS // 2)
    lookup = [float((index + seed) % 2) for index in range(ITEMS)]
    return {"quiz": quiz, "lookup": lookup}


def make_experiment_folder(root, methods=("baseline", "bitune", "no_mixing"), seeds=(1, 2), unfinished=()):
    cells = [
        {"method": m, "peft": "lora", "seed": s, "name": cell_name(m, "lora", s)}
        for m in methods
        for s in seeds
    ]
    experiment = {
        "source": "test.yaml",
        "grid": {"methods": list(methods), "peft": ["lora"], "seeds": list(seeds)},
        "cells": cells,
        "tasks": [{"name": task, "metric": metric} for task, metric in TASKS.items()],
        "summary": [["base model", "tiny"]],
    }
    (root / EXPERIMENT_FILE).write_text(json.dumps(experiment))
    for cell in cells:
        folder = root / CELLS_DIR / cell["name"]
        folder.mkdir(parents=True)
        scores = scores_of(cell["method"], cell["seed"])
        tasks = {
            task: {
                "metric": metric,
                "metrics": {metric: {"value": float(np.mean(scores[task])), "stderr": 0.1, "n": ITEMS}},
                "items": {"id": [f"{task}-{i}" for i in range(ITEMS)], metric: scores[task]},
            }
            for task, metric in TASKS.items()
        }
        alphas = {} if cell["method"] == "baseline" else {"keys": [0.4, 0.6], "values": [0.5, 0.7]}
        (folder / EVAL_FILE).write_text(json.dumps({"tasks": tasks, "alphas": alphas}))
        lines = [{"step": step, "loss": 2.0 / step, "alphas": alphas} for step in (1, 2, 3)]
        lines.append({"step": 3, "eval_loss": 1.0})
        (folder / METRICS_FILE).write_text("".join(json.dumps(line) + "\n" for line in lines))
        if cell["name"] not in unfinished:
            (folder / DONE_FILE).write_text("{}")
    return root


def test_report_has_tables_tests_and_plots(tmp_path):
    unfinished = cell_name("no_mixing", "lora", 2)
    make_experiment_folder(tmp_path, unfinished=[unfinished])
    report = write_report(tmp_path)

    text = report.read_text()
    for heading in (
        "## Results",
        "### lora: score (%), mean ± std over seeds",
        "### lora: difference to the baseline (percentage points)",
        "### lora: Bitune against each ablation (percentage points)",
        "### lora: loss curves",
        "### lora: mixing coefficients",
        "## How to read this",
    ):
        assert heading in text
    assert f"not finished (left out below): {unfinished}" in text
    # bitune: quiz 100 % on both seeds; lookup 50 %; average 75 %.
    assert re.search(r"\| \*\*bitune\*\* \| 100\.0 ± 0\.0 \| 50\.0 ± 0\.0 \| 75\.0 ± 0\.0 \| 2 \|", text)
    # bitune vs baseline on quiz: +50 points from 3 items improved, exact p = 2/8.
    assert "| bitune | baseline | +50.0 (p=0.25) | +0.0 (p=1) |" in text
    for image in ("results.png", "loss_lora.png", "alphas_lora.png", "alpha_trajectories_lora.png"):
        assert f"]({image})" in text
        data = (report.parent / image).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000

    summary = json.loads((report.parent / "summary.json").read_text())
    assert summary["missing_cells"] == [unfinished]
    assert summary["peft"]["lora"]["methods"]["no_mixing"]["seeds"] == [1]
    baseline_quiz = summary["peft"]["lora"]["methods"]["baseline"]["scores"]["quiz"]
    assert baseline_quiz == [0.5, 0.5]


def test_report_command_and_missing_folder(tmp_path, capsys):
    make_experiment_folder(tmp_path, methods=("baseline",), seeds=(1,))
    assert main(["report", str(tmp_path)]) == 0
    assert "report.md" in capsys.readouterr().out
    text = (tmp_path / "report" / "report.md").read_text()
    assert "difference to the baseline" not in text  # nothing to compare with
    assert "mixing coefficients" not in text  # the baseline does not mix

    assert main(["report", str(tmp_path / "absent")]) == 2
    assert EXPERIMENT_FILE in capsys.readouterr().err


def test_cells_scored_on_different_items_are_refused(tmp_path):
    make_experiment_folder(tmp_path, methods=("baseline", "bitune"), seeds=(1,))
    path = tmp_path / CELLS_DIR / cell_name("bitune", "lora", 1) / EVAL_FILE
    evaluation = json.loads(path.read_text())
    evaluation["tasks"]["quiz"]["items"]["id"][0] = "another"
    path.write_text(json.dumps(evaluation))
    with pytest.raises(BituneInputError, match="different 'quiz' items"):
        read_results(tmp_path)
