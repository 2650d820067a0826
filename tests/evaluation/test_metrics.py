"""Metrics: hand-computed values, lm-eval's own functions, and a whole lm-eval run on exported tasks."""

from __future__ import annotations

import math
import random
import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bitune.evaluation.metrics import (
    Estimate,
    extract_flexible_answer,
    extract_strict_answer,
    format_results_table,
    generation_scores,
    mean_with_stderr,
    multiple_choice_scores,
    score_task,
    summarize,
)
from bitune.evaluation.tasks import GenerationItem, MultipleChoiceItem, Task, export_lm_eval_task, load_task

lm_eval_metrics = pytest.importorskip("lm_eval.api.metrics")


# ------------------------------------------------------------------------------------------ per item


def test_acc_takes_the_highest_loglikelihood_and_acc_norm_divides_by_length() -> None:
    # acc_norm: -1/1 = -1.0 < -2/4 = -0.5, so the long option wins once normalised
    assert multiple_choice_scores([-1.0, -2.0], ["a", "bbbb"], gold=1) == {"acc": 0.0, "acc_norm": 1.0}
    assert multiple_choice_scores([-1.0, -2.0], ["a", "bbbb"], gold=0) == {"acc": 1.0, "acc_norm": 0.0}


def test_acc_norm_does_not_count_the_delimiter() -> None:
    # by option length: -2.5/3 > -1/1, option 0 wins; counting the leading space (-2.5/4 < -1/2) option 1 would
    assert multiple_choice_scores([-2.5, -1.0], ["aaa", "b"], gold=0) == {"acc": 0.0, "acc_norm": 1.0}


def test_ties_go_to_the_first_option() -> None:
    assert multiple_choice_scores([-2.0, -2.0], ["ab", "cd"], gold=0) == {"acc": 1.0, "acc_norm": 1.0}
    assert multiple_choice_scores([-2.0, -2.0], ["ab", "cd"], gold=1) == {"acc": 0.0, "acc_norm": 0.0}


def test_one_loglikelihood_per_choice() -> None:
    with pytest.raises(ValueError, match="2 log-likelihoods for 3 choices"):
        multiple_choice_scores([-1.0, -2.0], ["a", "b", "c"], gold=0)


@pytest.mark.parametrize(
    ("output", "strict", "flexible"),
    [
        ("3 + 4 = 7.\n#### 7", "7", "7"),
        ("#### -1,234.5 and then 8", "-1,234.5", "8"),
        ("The answer is $1,000.", "[invalid]", "$1,000."),
        ("3 apples and 5 pears", "[invalid]", "5"),
        ("It costs -3 dollars", "[invalid]", "-3"),
        ("no idea", "[invalid]", "[invalid]"),
    ],
)
def test_answer_extraction(output: str, strict: str, flexible: str) -> None:
    assert (extract_strict_answer(output), extract_flexible_answer(output)) == (strict, flexible)


def test_generation_scores_normalise_both_sides() -> None:
    assert generation_scores("The answer is $1,000.", "1,000") == {"strict_match": 0.0, "flexible_match": 1.0}
    assert generation_scores("so 2125\n#### 2,125.", "2,125") == {"strict_match": 1.0, "flexible_match": 1.0}
    assert generation_scores("#### 18\nQuestion: 19", "18") == {"strict_match": 1.0, "flexible_match": 0.0}


def lm_eval_generation_scores(output: str, target: str) -> dict[str, float]:
    """lm-eval's gsm8k filters and exact_match, straight from its own code."""
    from lm_eval.filters.extraction import RegexFilter

    from bitune.evaluation.tasks import FLEXIBLE_ANSWER_PATTERN, IGNORED_ANSWER_PATTERNS

    strict = RegexFilter().apply([[output]], [{}])[0][0]
    flexible = RegexFilter(regex_pattern=FLEXIBLE_ANSWER_PATTERN, group_select=-1).apply([[output]], [{}])[0][
        0
    ]
    return {
        name: lm_eval_metrics.exact_match_hf_evaluate(
            [answer], [target], regexes_to_ignore=list(IGNORED_ANSWER_PATTERNS), ignore_case=True
        )["exact_match"]
        for name, answer in (("strict_match", strict), ("flexible_match", flexible))
    }


@given(
    output=st.text(alphabet="0123456789$.,-# \nxA", max_size=30),
    target=st.sampled_from(["7", "-3", "1,000", "12.5", "0"]),
)
def test_generation_scores_agree_with_lm_eval(output: str, target: str) -> None:
    assert generation_scores(output, target) == lm_eval_generation_scores(output, target)


# ------------------------------------------------------------------------------------------ aggregation


def test_mean_with_stderr_by_hand() -> None:
    # mean 0.75; sample variance (3 * 0.25**2 + 0.75**2) / 3 = 0.25; stderr = 0.5 / sqrt(4)
    assert mean_with_stderr([1.0, 0.0, 1.0, 1.0]) == Estimate(0.75, 0.25, 4)
    assert math.isnan(mean_with_stderr([1.0]).stderr)
    with pytest.raises(ValueError):
        mean_with_stderr([])


def test_mean_with_stderr_matches_lm_eval() -> None:
    scores = [float(value) for value in random.Random(7).choices([0, 1], k=321)]

    estimate = mean_with_stderr(scores)

    assert estimate.value == pytest.approx(lm_eval_metrics.mean(scores), abs=1e-12)
    assert estimate.stderr == pytest.approx(lm_eval_metrics.mean_stderr(scores), abs=1e-12)


def test_groups_give_micro_and_macro_averages() -> None:
    scores = [{"acc": value} for value in (1.0, 0.0, 1.0, 1.0, 1.0, 0.0)]
    groups = ["b", "b", "b", "a", "b", "a"]  # a: [1, 0] -> 0.5 ± 0.5; b: [1, 0, 1, 1] -> 0.75 ± 0.25

    result = summarize("toy", scores, groups)

    assert list(result.groups) == ["a", "b"]
    assert result.groups["a"]["acc"] == Estimate(0.5, 0.5, 2)
    assert result.groups["b"]["acc"] == Estimate(0.75, 0.25, 4)
    # micro: 4/6; pooled variance ((2-1) * 0.5**2 * 2 + (4-1) * 0.25**2 * 4) / (6 - 2) = 0.3125
    assert result.metrics["acc"].value == pytest.approx(4 / 6)
    assert result.metrics["acc"].stderr == pytest.approx(math.sqrt(0.3125 / 6))
    assert result.metrics["acc"].stderr == pytest.approx(
        lm_eval_metrics.pooled_sample_stderr([0.5, 0.25], [2, 4])
    )
    # macro: (0.5 + 0.75) / 2, stderr sqrt(0.5**2 + 0.25**2) / 2
    assert result.macro["acc"] == Estimate(0.625, math.sqrt(0.3125) / 2, 6)
    assert result.macro["acc"].stderr == pytest.approx(lm_eval_metrics.unweighted_mean_stderr([0.5, 0.25]))


def test_summarize_without_groups() -> None:
    result = summarize("toy", [{"acc": 1.0, "acc_norm": 0.0}, {"acc": 0.0, "acc_norm": 0.0}], [None, None])

    assert result.metrics == {"acc": Estimate(0.5, 0.5, 2), "acc_norm": Estimate(0.0, 0.0, 2)}
    assert (result.groups, result.macro) == ({}, {})


def test_results_table() -> None:
    plain = summarize("piqa", [{"acc": 1.0, "acc_norm": 1.0}, {"acc": 0.0, "acc_norm": 1.0}])
    grouped = summarize(
        "mmlu", [{"acc": 1.0}, {"acc": 0.0}, {"acc": 1.0}, {"acc": 1.0}], ["law", "law", "art", "art"]
    )
    single = summarize("one", [{"acc": 1.0}])

    assert format_results_table([plain, grouped, single]) == (
        "task          metric     value  stderr  n\n"
        "piqa          acc       0.5000  0.5000  2\n"
        "              acc_norm  1.0000  0.0000  2\n"
        "mmlu (micro)  acc       0.7500  0.2500  4\n"
        "mmlu (macro)  acc       0.7500  0.2500  4\n"
        "  art         acc       1.0000  0.0000  2\n"
        "  law         acc       0.5000  0.5000  2\n"
        "one           acc       1.0000     n/a  1"
    )


def test_score_task() -> None:
    choice = Task(
        "toy",
        "multiple_choice",
        "full",
        "memory",
        [MultipleChoiceItem("0", "Q?", ["a", "bbbb"], 1), MultipleChoiceItem("1", "Q?", ["a", "b"], 0)],
    )
    generation = Task("sums", "generation", "full", "memory", [GenerationItem("0", "1+1?", "2")])

    assert score_task(choice, [[-1.0, -2.0], [-1.0, -2.0]]).metrics == {
        "acc": Estimate(0.5, 0.5, 2),
        "acc_norm": Estimate(1.0, 0.0, 2),
    }
    assert score_task(generation, ["#### 2"]).metrics["strict_match"].value == 1.0
    with pytest.raises(ValueError, match="1 predictions for 2 items"):
        score_task(choice, [[-1.0, -2.0]])


# ------------------------------------------------------------------------------------------ a whole lm-eval run


def scripted_loglikelihood(context: str, continuation: str) -> float:
    """A deterministic stand-in for a model: any text gets a fixed pseudo-random log-likelihood."""
    return -(zlib.crc32(f"{context}\0{continuation}".encode()) % 1000) / 100


def scripted_output(index: int, target: str) -> str:
    return [
        f"Half of it is {target}.\n#### {target}",
        f"The answer is ${target}.",
        f"It is {target}, plus 1 makes 123456.",
        "I do not know.",
        f"#### {target}7",
    ][index % 5]


def test_lm_eval_scores_exported_tasks_as_we_do(
    shared_data: Path, tmp_path: Path, lm_eval_task_manager
) -> None:
    import lm_eval
    from lm_eval.api.model import LM

    piqa = load_task("piqa", data_dir=shared_data, limit=40)
    mmlu = load_task("mmlu", data_dir=shared_data, style="plain")
    mmlu.items = [item for item in mmlu.items if item.group in ("anatomy", "virology", "astronomy")][::4]
    gsm8k = load_task("gsm8k", data_dir=shared_data, limit=30)
    outputs = {item.prompt: scripted_output(index, item.target) for index, item in enumerate(gsm8k.items)}

    class ScriptedLM(LM):
        def loglikelihood(self, requests):
            return [(scripted_loglikelihood(*request.args), False) for request in requests]

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

        def generate_until(self, requests):
            return [outputs[request.args[0]] for request in requests]

    folder = tmp_path / "tasks"
    names = [export_lm_eval_task(task, folder) for task in (piqa, mmlu, gsm8k)]
    run = lm_eval.simple_evaluate(
        model=ScriptedLM(),
        tasks=names,
        task_manager=lm_eval_task_manager(folder),
    )["results"]

    def ours(task: Task) -> dict[str, Estimate]:
        if task.kind == "generation":
            return score_task(task, [outputs[item.prompt] for item in task.items]).metrics
        predictions = [
            [scripted_loglikelihood(item.context, continuation) for continuation in item.continuations]
            for item in task.items
        ]
        return score_task(task, predictions).metrics

    for task, name in ((piqa, names[0]), (mmlu, names[1])):
        for metric, estimate in ours(task).items():
            assert run[name][f"{metric},none"] == pytest.approx(estimate.value, abs=1e-12)
            assert run[name][f"{metric}_stderr,none"] == pytest.approx(estimate.stderr, abs=1e-12)
    gsm8k_scores = ours(gsm8k)
    for metric, lm_eval_filter in (("strict_match", "strict-match"), ("flexible_match", "flexible-extract")):
        assert run[names[2]][f"exact_match,{lm_eval_filter}"] == pytest.approx(gsm8k_scores[metric].value)
        assert run[names[2]][f"exact_match_stderr,{lm_eval_filter}"] == pytest.approx(
            gsm8k_scores[metric].stderr
        )
    # the scripted model is neither always right nor always wrong, so the comparison means something
    assert 0 < ours(piqa)["acc"].value < 1 and 0 < gsm8k_scores["flexible_match"].value < 1
