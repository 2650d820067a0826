"""The real pretrained SmolLM2-135M-Instruct (byte-level BPE, chat template, a BOS its tokenizer does not add).

Everything else is tested on tiny random models and a 0.26M-parameter model; these tests show that tokenizer,
template and scale survive a real model: Bitune at α = 0 is the plain model, prompts are tokenised alike
everywhere, `bitune eval` agrees with stock lm-eval, and a short training run on real instructions works.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from bitune import BituneConfig, BituneModel, collate, generate_text
from bitune.cli import main
from bitune.core.loading import load_tokenizer
from bitune.core.prompts import encode_prompts, render_prompt
from bitune.data.records import Record
from bitune.data.samples import DataConfig, build_samples
from bitune.evaluation.scoring import encode_pair

from .conftest import short_run_config

pytestmark = pytest.mark.slow

QUESTIONS = [
    "Which is heavier, a feather or a brick?",
    "What is the capital of France?",
    "Name a primary colour.",
]


@pytest.fixture(scope="module")
def plain(smollm2: Path):
    return AutoModelForCausalLM.from_pretrained(smollm2).eval()


@pytest.fixture(scope="module")
def tokenizer(smollm2: Path):
    return load_tokenizer(smollm2)


def at_alpha_zero(model: BituneModel) -> BituneModel:
    """Mixing coefficients w = 0, so α = 0: the prompt cache is the causal pass's (θ_c, untrained = identity)."""
    with torch.no_grad():
        model.mixer.keys.zero_()
        model.mixer.values.zero_()
    return model.eval()


def lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")


def test_the_tokenizer_is_one_that_does_not_add_its_bos(tokenizer) -> None:
    assert tokenizer.bos_token == "<|im_start|>"
    text = render_prompt(QUESTIONS[0], "plain")
    assert encode_prompts(tokenizer, [text])[0] == tokenizer(text)["input_ids"]
    assert tokenizer.bos_token_id not in encode_prompts(tokenizer, [text])[0]


@pytest.mark.parametrize("mode", ["bitune", "baseline"])
def test_alpha_zero_and_baseline_equal_the_plain_model(smollm2: Path, plain, tokenizer, mode: str) -> None:
    model = BituneModel.from_base(
        AutoModelForCausalLM.from_pretrained(smollm2), lora(), BituneConfig(mode=mode), check_support=False
    )
    model = at_alpha_zero(model) if mode == "bitune" else model.eval()
    prompts = encode_prompts(tokenizer, [render_prompt(q, "plain") for q in QUESTIONS])
    answers = [tokenizer(" The answer is a brick.", add_special_tokens=False)["input_ids"]] * len(QUESTIONS)
    batch = collate(prompts, answers, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(**batch).logits
        for row, (prompt, answer) in enumerate(zip(prompts, answers)):
            expected = plain(torch.tensor([prompt + answer[:-1]])).logits[0, len(prompt) - 1 :]
            assert torch.allclose(logits[row, : len(answer)], expected, atol=1e-4, rtol=1e-5)
    texts = [render_prompt(q, "plain") for q in QUESTIONS]
    ours = generate_text(model, tokenizer, texts, max_new_tokens=12, do_sample=False)
    encoded = tokenizer(texts[:1], return_tensors="pt")
    theirs = plain.generate(
        **encoded, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    assert ours[0] == tokenizer.decode(theirs[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    assert ours[0].startswith(" The answer is a brick.")


def test_bitune_generate_gives_the_plain_models_answer_at_alpha_zero(
    smollm2: Path, tokenizer, tmp_path: Path, capsys
) -> None:
    model = at_alpha_zero(BituneModel.from_base(str(smollm2), lora(), check_support=False))
    model.save_pretrained(tmp_path / "ckpt", tokenizer=tokenizer)
    arguments = ["generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", QUESTIONS[0]]
    assert main([*arguments, "--max-new-tokens", "8", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == "The answer is a brick."


def test_the_chat_data_path_renders_the_tokenizers_own_template(tokenizer) -> None:
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTIONS[1]}]
    row = Record("chat.jsonl, line 1", {"messages": [*turns, {"role": "assistant", "content": "Paris."}]})
    (sample,), _ = build_samples([row], tokenizer, DataConfig("chat.jsonl", template="chat"))
    expected = tokenizer.apply_chat_template(
        turns, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert sample.prompt_ids == expected
    # The answer ends with the tokenizer's EOS, which is the chat template's end of turn.
    assert tokenizer.decode(sample.answer_ids) == "Paris.<|im_end|>"


def test_prompts_are_token_for_token_identical_in_training_generation_and_evaluation(tokenizer) -> None:
    text = render_prompt(QUESTIONS[2], "plain")
    row = Record("rows.jsonl, line 1", {"prompt": QUESTIONS[2], "completion": "Red."})
    (sample,), _ = build_samples([row], tokenizer, DataConfig("rows.jsonl"))
    context_ids, answer_ids = encode_pair(tokenizer, text, " Red.")
    assert sample.prompt_ids == context_ids == encode_prompts(tokenizer, [text])[0]
    assert sample.answer_ids == [*answer_ids, tokenizer.eos_token_id]


def test_bitune_eval_on_real_items_is_above_chance_and_equals_stock_lm_eval(
    smollm2: Path, shared_data: Path, tmp_path: Path, lm_eval_task_manager
) -> None:
    from evaluation.test_harness import assert_same_scores, our_samples, stock_loglikelihoods
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from bitune.evaluation.tasks import export_lm_eval_task, load_task

    limit, names = 100, ("arc_easy", "piqa")
    output = tmp_path / "ours.json"
    arguments = [
        "eval",
        "--base-model",
        str(smollm2),
        "--tasks",
        ",".join(names),
        "--data-dir",
        str(shared_data),
        "--style",
        "plain",  # lm-eval's prompts: with the options listed in the prompt a 135M model is near chance
    ]
    assert (
        main([*arguments, "--limit", str(limit), "--output", str(output), "--log-samples", "--device", "cpu"])
        == 0
    )
    report, samples = json.loads(output.read_text()), our_samples(output)
    tasks = [load_task(name, data_dir=shared_data, limit=limit, style="plain") for name in names]
    exported = [export_lm_eval_task(task, tmp_path / "tasks") for task in tasks]
    stock = simple_evaluate(
        model=HFLM(pretrained=str(smollm2), device="cpu", batch_size=16),
        tasks=exported,
        task_manager=lm_eval_task_manager(tmp_path / "tasks"),
        log_samples=True,
    )
    chance = {"arc_easy": 0.25, "piqa": 0.5}
    for task, name in zip(tasks, exported, strict=True):
        assert_same_scores(samples[task.name], stock_loglikelihoods(stock["samples"][name]))
        accuracy = report["results"][task.name]["metrics"]["acc"]["value"]
        assert accuracy == stock["results"][name]["acc,none"]
        assert accuracy > chance[task.name] + 0.05, f"{task.name}: {accuracy} is not above chance"


def test_a_short_training_run_on_real_instructions(
    smollm2: Path, shared_data: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """Validation loss falls; a resumed run ends exactly where the whole run did; the result reloads and chats."""

    assert main(["train", str(short_run_config(smollm2, shared_data, tmp_path / "run"))]) == 0
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    eval_losses = [entry["eval_loss"] for entry in logs if "eval_loss" in entry]
    assert len(eval_losses) == 2 and eval_losses[-1] < eval_losses[0]

    checkpoint = str(tmp_path / "run" / "checkpoint-2")
    resumed = short_run_config(smollm2, shared_data, tmp_path / "resumed", resume_from_checkpoint=checkpoint)
    assert main(["train", str(resumed)]) == 0
    whole = BituneModel.from_pretrained(tmp_path / "run" / "final").trainable_parameters()
    again = BituneModel.from_pretrained(tmp_path / "resumed" / "final").trainable_parameters()
    assert whole.keys() == again.keys()
    for name in whole:
        torch.testing.assert_close(again[name], whole[name], atol=1e-6, rtol=0)

    messages = iter([QUESTIONS[1]])
    monkeypatch.setattr("builtins.input", lambda prompt="", _next=messages.__next__: _next_or_eof(_next))
    arguments = ["chat", "--checkpoint", str(tmp_path / "run" / "final"), "--max-new-tokens", "8"]
    assert main([*arguments, "--device", "cpu"]) == 0
    assert "model> " in capsys.readouterr().out


def _next_or_eof(next_message):
    try:
        return next_message()
    except StopIteration:
        raise EOFError from None
