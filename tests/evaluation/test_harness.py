"""lm-eval integration: `bitune eval` agrees with stock lm-eval and with lm-eval's `bitune` model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from task_shapes import SHAPES, write_shapes, write_stock_tasks
from transformers import AutoModelForCausalLM, AutoTokenizer

from bitune import BituneConfig, BituneModel
from bitune.cli import build_parser, main
from bitune.core.plain import PlainModel
from bitune.evaluation.scoring import encode_pair, loglikelihoods
from bitune.evaluation.tasks import export_lm_eval_task, load_task

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from bitune.evaluation.harness import BituneLM  # noqa: E402

LIMIT = 24  # PIQA item 22 is longer than the model's 512 tokens: truncation is compared too


def our_samples(output: Path) -> dict[str, list[dict]]:
    samples: dict[str, list[dict]] = {}
    for line in output.with_suffix(".samples.jsonl").read_text().splitlines():
        sample = json.loads(line)
        samples.setdefault(sample["task"], []).append(sample)
    return samples


def stock_loglikelihoods(samples: list[dict]) -> list[list[tuple[float, bool]]]:
    """Per document, lm-eval's (log-likelihood, is_greedy) of each option, in document order.

    In memory these are numbers; lm-eval's samples files hold them as text.
    """
    return [
        [(float(ll), str(greedy) == "True") for ((ll, greedy),) in s["resps"]]
        for s in sorted(samples, key=lambda s: s["doc_id"])
    ]


def assert_same_scores(ours: list[dict], theirs: list[list[tuple[float, bool]]]) -> None:
    assert len(ours) == len(theirs)
    for sample, options in zip(ours, theirs, strict=True):
        assert sample["loglikelihoods"] == pytest.approx([ll for ll, _ in options], rel=1e-5, abs=1e-4)
        assert sample["is_greedy"] == [greedy for _, greedy in options]


def test_the_bitune_model_is_registered() -> None:
    assert get_model("bitune") is BituneLM


def test_a_plain_model_scores_as_stock_lm_eval_scores_it(
    stories260k: Path, shared_data: Path, tmp_path: Path, lm_eval_task_manager
) -> None:
    output = tmp_path / "ours.json"
    arguments = [
        "eval",
        "--base-model",
        str(stories260k),
        "--tasks",
        "piqa,arc_easy",
        "--data-dir",
        str(shared_data),
    ]
    assert (
        main([*arguments, "--limit", str(LIMIT), "--output", str(output), "--log-samples", "--device", "cpu"])
        == 0
    )
    report, samples = json.loads(output.read_text()), our_samples(output)

    tasks = [load_task(name, data_dir=shared_data, limit=LIMIT) for name in ("piqa", "arc_easy")]
    names = [export_lm_eval_task(task, tmp_path / "tasks") for task in tasks]
    stock = lm_eval.simple_evaluate(
        model=HFLM(pretrained=str(stories260k), device="cpu", batch_size=8),
        tasks=names,
        task_manager=lm_eval_task_manager(tmp_path / "tasks"),
        log_samples=True,
    )
    for task, name in zip(tasks, names, strict=True):
        assert_same_scores(samples[task.name], stock_loglikelihoods(stock["samples"][name]))
        for metric in ("acc", "acc_norm"):
            assert (
                report["results"][task.name]["metrics"][metric]["value"]
                == stock["results"][name][f"{metric},none"]
            )


def test_each_new_task_spec_shape_scores_as_lm_eval_s_own_task(
    stories260k: Path, tmp_path: Path, lm_eval_task_manager
) -> None:
    """`bitune eval` on the docs/tasks.md specs for fixed options (BoolQ), a blank (WinoGrande, partial scoring)
    and endings (HellaSwag) gives the log-likelihoods and accuracies of stock lm-eval's boolq, winogrande and
    hellaswag tasks on the same rows."""
    specs = write_shapes(tmp_path / "data")
    lm_eval_tasks = Path(lm_eval.__file__).parent / "tasks"
    stock_names = write_stock_tasks(tmp_path / "stock", tmp_path / "data", lm_eval_tasks)
    output = tmp_path / "ours.json"
    arguments = ["eval", "--base-model", str(stories260k), "--tasks", ",".join(str(specs[n]) for n in SHAPES)]
    assert main([*arguments, "--output", str(output), "--log-samples", "--device", "cpu"]) == 0
    report, samples = json.loads(output.read_text()), our_samples(output)

    stock = lm_eval.simple_evaluate(
        model=HFLM(pretrained=str(stories260k), device="cpu", batch_size=8),
        tasks=list(stock_names.values()),
        task_manager=lm_eval_task_manager(tmp_path / "stock"),
        log_samples=True,
    )
    for name in SHAPES:
        assert_same_scores(samples[name], stock_loglikelihoods(stock["samples"][stock_names[name]]))
        for metric, value in stock["results"][stock_names[name]].items():
            if metric in ("acc,none", "acc_norm,none"):
                assert report["results"][name]["metrics"][metric.split(",")[0]]["value"] == value


def test_a_bitune_checkpoint_scores_alike_in_bitune_eval_and_lm_eval(
    stories260k: Path, shared_data: Path, tmp_path: Path, lm_eval_task_manager
) -> None:
    """One checkpoint, one format: `bitune eval` and `bitune lm-eval run --model bitune` agree, generation too."""
    model = BituneModel.from_base(
        AutoModelForCausalLM.from_pretrained(stories260k),
        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
        BituneConfig(mixing="relu"),
    )
    with torch.no_grad():
        for param in model.trainable_parameters().values():
            param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(tmp_path / "ckpt", tokenizer=AutoTokenizer.from_pretrained(stories260k))

    output = tmp_path / "ours.json"
    arguments = ["eval", "--checkpoint", str(tmp_path / "ckpt"), "--base-model", str(stories260k)]
    arguments += ["--tasks", "piqa,arc_easy,gsm8k", "--data-dir", str(shared_data), "--limit", "16"]
    arguments += ["--max-new-tokens", "8", "--batch-size", "4", "--output", str(output), "--log-samples"]
    assert main([*arguments, "--device", "cpu"]) == 0
    report, samples = json.loads(output.read_text()), our_samples(output)
    assert report["model"]["mode"] == "bitune"

    tasks = [load_task(name, data_dir=shared_data, limit=16) for name in ("piqa", "arc_easy")]
    generation = load_task("gsm8k", data_dir=shared_data, limit=4)
    generation.max_new_tokens = 8
    names = [export_lm_eval_task(task, tmp_path / "tasks") for task in (*tasks, generation)]
    lm_eval_task_manager(tmp_path / "tasks")  # offline, with a private datasets cache
    model_args = f"pretrained={stories260k},bitune={tmp_path / 'ckpt'}"
    arguments = [
        "lm-eval",
        "run",
        "--model",
        "bitune",
        "--model_args",
        model_args,
        "--tasks",
        ",".join(names),
    ]
    arguments += ["--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "4"]
    arguments += ["--output_path", str(tmp_path / "lm_eval"), "--log_samples"]
    assert main(arguments) == 0

    (results_file,) = (tmp_path / "lm_eval").rglob("results_*.json")
    theirs = json.loads(results_file.read_text())["results"]
    for task, name in zip(tasks, names[:-1], strict=True):
        (samples_file,) = (tmp_path / "lm_eval").rglob(f"samples_{name}_*.jsonl")
        stock = [json.loads(line) for line in samples_file.read_text().splitlines()]
        assert_same_scores(samples[task.name], stock_loglikelihoods(stock))
        for metric in ("acc", "acc_norm"):
            assert report["results"][task.name]["metrics"][metric]["value"] == theirs[name][f"{metric},none"]

    (samples_file,) = (tmp_path / "lm_eval").rglob(f"samples_{names[-1]}_*.jsonl")
    outputs = {}
    for line in samples_file.read_text().splitlines():
        sample = json.loads(line)
        outputs[sample["doc_id"]] = sample["resps"][0][0]
    ours = [sample["output"] for sample in samples["gsm8k"][:4]]
    assert ours == [outputs[i] for i in range(4)] and any(ours)

    # The checkpoint is really used: the base model scores differently.
    plain = PlainModel(AutoModelForCausalLM.from_pretrained(stories260k))
    tokenizer = AutoTokenizer.from_pretrained(stories260k)
    first = samples["piqa"][0]
    request = encode_pair(tokenizer, first["context"], " " + first["choices"][0])
    assert loglikelihoods(plain, [request], progress=False)[0].logprob != pytest.approx(
        first["loglikelihoods"][0]
    )


def test_bitune_lm_eval_takes_a_built_model(stories260k: Path) -> None:
    """`BituneLM(pretrained=model)` (as the speed benchmark uses it) scores with the given model's cache path."""
    tokenizer = AutoTokenizer.from_pretrained(stories260k)
    plain = PlainModel(AutoModelForCausalLM.from_pretrained(stories260k)).eval()
    lm = BituneLM(pretrained=plain, tokenizer=tokenizer, batch_size=2, device="cpu")
    pairs = [("Once upon a time", " there was"), ("Once upon a time", " a dog"), ("", "The end")]
    requests = [Instance("loglikelihood", {}, pair, index) for index, pair in enumerate(pairs)]
    expected = loglikelihoods(plain, [encode_pair(tokenizer, *pair) for pair in pairs], progress=False)
    assert lm.loglikelihood(requests, disable_tqdm=True) == [tuple(score) for score in expected]


def test_lm_eval_arguments_pass_through_untouched() -> None:
    parser = build_parser()
    legacy = ["--model", "bitune", "--tasks", "piqa", "-h"]  # lm-eval inserts `run` itself
    assert parser.parse_args(["lm-eval", *legacy]).lm_eval_args == legacy
    assert parser.parse_args(["lm-eval", "ls", "tasks"]).lm_eval_args == ["ls", "tasks"]


def test_python_m_harness_is_lm_eval_s_command_line() -> None:
    command = [sys.executable, "-m", "bitune.evaluation.harness", "run", "--help"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert finished.returncode == 0, finished.stderr
    assert "--model_args" in finished.stdout
