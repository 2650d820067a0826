"""Smoke test of the benchmark scripts: each runs end to end on a tiny model and writes its JSON.

No timing is asserted (the numbers of a tiny model on a shared machine mean nothing); the point is that the
scripts keep working as the library changes. They run in this process through their `main(argv)` (one
interpreter start-up for all); the memory script still measures in child processes.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

TINY = ["--model-size", "tiny", "--quick", "--threads", "1"]
TRAINING = ["--shapes", "6x3", "--batch-size", "2"]
ARGUMENTS = {
    "train_throughput": [*TINY, *TRAINING, "--repeats", "1", "--warmup", "0"],
    "reference_style": [*TINY, *TRAINING, "--repeats", "1", "--warmup", "0"],
    "inference_speed": [
        *TINY,
        "--prompt-length",
        "6",
        "--new-tokens",
        "3",
        "--batch-sizes",
        "1",
        "2",
        "--repeats",
        "1",
    ],
    "memory": [*TINY, *TRAINING],
    "last_layer": [*TINY, *TRAINING, "--repeats", "1", "--warmup", "0"],
    "fused_streams": [*TINY, *TRAINING, "--repeats", "1", "--warmup", "0"],
    "serving": [*TINY, "--clients", "1", "2", "--requests", "4", "--max-tokens", "3"],
}

ROW_KEYS = {
    "train_throughput": {
        "P", "T", "checkpointing", "B", "seconds", "R_baseline", "R_stock", "R_baseline_over_B", "R_stock_over_B",
        "stock_samples_per_s", "baseline_samples_per_s", "bitune_samples_per_s", "bitune_tokens_per_s",
    },
    "reference_style": {
        "P", "T", "seconds", "reference_style_samples_per_s", "reference_sized_masks_samples_per_s",
        "bitune_one_by_one_samples_per_s", "bitune_samples_per_s", "speedup", "speedup_over_sized_masks",
        "full_size_mask_cost", "fast_path_gain", "batching_gain",
    },
    "inference_speed": {
        "batch_size", "plain_prefill_ms", "bitune_prefill_ms", "prefill_ratio", "prefill_bound",
        "plain_decode_ms", "bitune_decode_ms", "decode_ratio",
    },
    "last_layer": {"P", "T", "seconds", "skipped_step_s", "computed_step_s", "computed_over_skipped"},
    "fused_streams": {"P", "seconds", "two_calls_s", "one_call_s", "one_over_two"},
    "serving": {
        "clients", "max_batch_size", "requests", "requests_per_s", "tokens_per_s", "mean_latency_s",
        "mean_rows_per_step", "speedup", "same_texts_as_one_at_a_time",
    },
    "memory": {
        "P", "T", "checkpointing", "stock_step_mib", "baseline_step_mib", "bitune_step_mib", "bitune_peak_mib",
        "step_ratio_baseline", "step_ratio_stock", "peak_ratio_baseline", "bound",
    },
}  # fmt: skip

# How many rows each run above produces: checkpointing off/on for the training scripts, one per batch size.
ROWS = {
    "train_throughput": 2,
    "reference_style": 1,
    "inference_speed": 2,
    "memory": 2,
    "last_layer": 1,
    "fused_streams": 1,
    "serving": 3,  # one row per number of clients, and the unbatched control
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Run every script once; the parsed JSON of each. Leaves this process's global state as it found it."""
    folder = tmp_path_factory.mktemp("benchmarks")
    sys.path.insert(0, str(BENCHMARKS))
    verbosity, threads = transformers.logging.get_verbosity(), torch.get_num_threads()
    try:
        with torch.random.fork_rng(), warnings.catch_warnings():
            for name, arguments in ARGUMENTS.items():
                importlib.import_module(name).main([*arguments, "--output", str(folder / f"{name}.json")])
    finally:
        sys.path.remove(str(BENCHMARKS))
        for name in [*ARGUMENTS, "common"]:
            sys.modules.pop(name, None)
        transformers.logging.set_verbosity(verbosity)
        torch.set_num_threads(threads)
    return {name: json.loads((folder / f"{name}.json").read_text()) for name in ARGUMENTS}


@pytest.mark.parametrize("name", list(ARGUMENTS))
def test_script_writes_its_results(results: dict[str, dict], name: str) -> None:
    result = results[name]
    assert result["benchmark"] == name
    assert result["environment"]["model_size"] == "tiny"
    assert result["environment"]["parameters"] > 0
    assert len(result["rows"]) == ROWS[name]
    for row in result["rows"]:
        assert ROW_KEYS[name] <= row.keys()


def test_training_bound_is_the_issues_formula(results: dict[str, dict]) -> None:
    row = results["train_throughput"]["rows"][0]
    assert (row["P"], row["T"]) == (6, 3)
    assert row["B"] == pytest.approx((6 + 3) / (2 * 6 + 3 - 1))
    assert row["R_baseline_over_B"] == pytest.approx(row["R_baseline"] / row["B"])


def test_reference_style_refuses_to_time_different_math(monkeypatch: pytest.MonkeyPatch) -> None:
    """The emulated reference must compute Bitune's loss: a causal mask in its bidirectional pass is caught."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import common
    import reference_style

    try:
        args = reference_style.parse_args(["--model-size", "tiny", "--threads", "1"])
        base = common.build_base(args)
        batch = common.random_batch(2, 6, 3, base.config.vocab_size, "cpu")
        causal_only = functools.partial(
            reference_style.reference_style_loss,
            masks=lambda causal_lm, bidirectional: reference_style.full_size_masks(causal_lm, False),
        )
        losses = {"bitune": reference_style.bitune_loss, "reference_style": causal_only}
        models = {kind: common.wrap("bitune", base) for kind in losses}
        with pytest.raises(AssertionError, match="different losses"):
            reference_style.check_same_loss(models, losses, batch)
        losses["reference_style"] = reference_style.reference_style_loss
        reference_style.check_same_loss(models, losses, batch)
    finally:
        sys.modules.pop("common", None)
        sys.modules.pop("reference_style", None)


def test_serving_answers_alike_at_every_level_and_batches_concurrent_clients(
    results: dict[str, dict],
) -> None:
    rows = results["serving"]["rows"]
    assert all(row["same_texts_as_one_at_a_time"] for row in rows)
    assert [row["max_batch_size"] for row in rows] == [16, 16, 1]


def test_model_flops_count_every_pass(results: dict[str, dict]) -> None:
    """MFU's model FLOPs: 6·N per token of every pass (P+T for the baselines, 2P+T−1 for Bitune's three)."""
    result = results["train_throughput"]
    row, parameters = result["rows"][0], result["environment"]["parameters"]
    assert row["baseline_model_flops_per_step"] == 6 * parameters * (6 + 3) * 2
    assert row["bitune_model_flops_per_step"] == 6 * parameters * (2 * 6 + 3 - 1) * 2
    assert result["peak_flops"] is None and row["bitune_mfu"] is None  # a CPU: no peak unless --peak-flops


@pytest.mark.slow
def test_gpu_suite_smoke_run_prints_the_table_and_writes_the_json(tmp_path: Path) -> None:
    """benchmarks/gpu_suite.sh --smoke: every part of the one-shot GPU script, on the CPU, so it cannot rot."""
    completed = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_suite.sh"), "--smoke", "--output-dir", str(tmp_path)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    assert "| part | setting | result | throughput | status |" in completed.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (tmp_path / "summary.md").read_text().count("\n| ") == len(summary["rows"]) + 1
    assert {name: part["status"] for name, part in summary["parts"].items()} == {
        "train_sdpa": "ok", "train_fa2": "skipped", "eval_speed": "ok", "reference_style": "ok", "grid": "ok",
    }  # fmt: skip
    training = json.loads((tmp_path / "train_sdpa.json").read_text())
    assert training["rows"][0]["bitune_mfu"] > 0  # the smoke run gives a nominal --peak-flops
    grid = json.loads((tmp_path / "grid.json").read_text())
    assert grid["complete"] and [cell["method"] for cell in grid["cells"]] == ["baseline", "bitune"]
    assert all(cell["train_tokens_per_s"] > 0 for cell in grid["cells"])
    assert grid["base"]["accuracy"]["arc_easy"] >= 0


def test_mixing_probe_forces_alpha_and_reproduces_the_cell_at_its_own(
    stories260k: Path, shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the α the cell was scored with, the probe gives the cell's own item scores; 0 and 1 are exact."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from bitune import BituneModel
    from bitune.core.loading import load_tokenizer
    from bitune.evaluation.runner import evaluate
    from bitune.evaluation.tasks import load_task

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import mixing_probe

    torch.manual_seed(0)
    model = BituneModel.from_base(
        AutoModelForCausalLM.from_pretrained(stories260k), LoraConfig(r=4, target_modules="all-linear")
    ).eval()
    for alpha in (0.0, 0.3, 1.0):
        mixing_probe.force_alphas(model, alpha)
        keys, values = model.mixer.alphas()
        assert torch.allclose(torch.cat([keys, values]), torch.tensor(alpha), atol=1e-6)

    cell = tmp_path / "bitune-lora-seed1"
    mixing_probe.force_alphas(model, 0.3)
    tokenizer = load_tokenizer(stories260k)
    model.save_pretrained(cell / "final", tokenizer=tokenizer)
    entry = {"name": "arc_easy", "data_dir": str(shared_data), "path": None}
    entry |= {"split": "test", "style": "full", "limit": 6, "metric": None}
    task = load_task(**{key: value for key, value in entry.items() if key != "metric"})
    samples = evaluate(model, tokenizer, [task], log_samples=True, progress=False).samples["arc_easy"]
    learned = {"metric": "acc", "items": {"acc": [sample["acc"] for sample in samples]}}
    (cell / "done.json").write_text(json.dumps({"evaluation": {"max_new_tokens": None, "tasks": [entry]}}))
    (cell / "eval.json").write_text(json.dumps({"tasks": {"arc_easy": learned}}))

    rows = mixing_probe.main([str(cell), "--alphas", "0.3", "0", "--batch-size", "4"])
    assert [row["alpha"] for row in rows] == ["learned", 0.3, 0.0]
    assert rows[1]["acc"] == rows[0]["acc"] and rows[1]["difference_to_learned"] == 0.0
    assert json.loads((cell / "mixing_probe.json").read_text()) == rows
