"""Scoring: the cached per-context path equals a full forward, and `bitune eval` end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from bitune import BituneConfig, BituneModel, collate
from bitune.cli import main
from bitune.core.plain import PlainModel
from bitune.evaluation.scoring import (
    cut_at_stop_sequences,
    encode_pair,
    generate_until,
    loglikelihoods,
)

MODES = ["bitune", "no_mixing", "baseline", "plain"]


def perturbed(model: BituneModel) -> BituneModel:
    """Move adapters and mixing coefficients off their initial values, as training would."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.trainable_parameters().values():
            param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def scoring_model(mode: str, base: torch.nn.Module) -> BituneModel | PlainModel:
    if mode == "plain":
        return PlainModel(base).eval()
    peft = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    return perturbed(BituneModel.from_base(base, peft, BituneConfig(mode=mode)))


def reference_logprobs(
    model: BituneModel | PlainModel, context: list[int], continuation: list[int]
) -> torch.Tensor:
    """Log-probabilities over the vocabulary at each continuation token, from one full forward, no cache reuse."""
    with torch.no_grad():
        if isinstance(model, PlainModel):
            ids = torch.tensor([context + continuation], device=model.device)
            logits = model.base_model(ids).logits[0, len(context) - 1 : -1]
        else:
            logits = model(
                **{k: v.to(model.device) for k, v in collate([context], [continuation]).items()}
            ).logits[0]
    return logits.float().log_softmax(-1)


def random_requests(seed: int, vocab: int = 64) -> list[tuple[list[int], list[int]]]:
    """Questions with 1 to 5 options of 1 to 4 tokens (single-token ones share an answer-pass row, some
    options repeat), contexts of 2 to 12 tokens, all shuffled together."""
    rng = random.Random(seed)
    requests = []
    for _ in range(7):
        context = [1] + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 11))]
        repeated = [rng.randrange(3, vocab)]
        for _ in range(rng.randint(1, 5)):
            length = rng.choice([1, 1, 2, 4])
            option = [rng.randrange(3, vocab) for _ in range(length)]
            requests.append((context, rng.choice([option, repeated])))
    rng.shuffle(requests)
    return requests


# ---------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("mode", MODES)
def test_cached_scores_equal_a_full_forward_of_context_and_option(mode: str) -> None:
    model = scoring_model(mode, tiny_model("llama"))
    requests = random_requests(seed=0)
    assert len({tuple(c) for c, _ in requests}) < len(requests)  # options share contexts
    expected = []
    for context, continuation in requests:
        logprobs = reference_logprobs(model, context, continuation)
        total = logprobs[torch.arange(len(continuation)), continuation].sum().item()
        expected.append((pytest.approx(total, abs=1e-5), logprobs.argmax(-1).tolist() == continuation))
    for batch_size in (1, 3, 100):
        scores = loglikelihoods(model, requests, batch_size=batch_size, progress=False)
        assert [(score.logprob, score.is_greedy) for score in scores] == expected


@pytest.mark.parametrize("mode", MODES)
def test_is_greedy_marks_the_argmax_continuation(mode: str) -> None:
    model = scoring_model(mode, tiny_model("llama"))
    context = [1, 7, 8, 9]
    greedy = reference_logprobs(model, context, [5, 5, 5]).argmax(-1)[:1].tolist()
    greedy += reference_logprobs(model, context, greedy + [5]).argmax(-1)[1:2].tolist()
    other = [(greedy[0] + 1) % 64, greedy[1]]
    first, second = loglikelihoods(model, [(context, greedy), (context, other)], progress=False)
    assert first.is_greedy and not second.is_greedy


@pytest.mark.parametrize("mode", MODES)
def test_contexts_are_truncated_from_the_left_like_lm_eval(mode: str) -> None:
    model = scoring_model(mode, tiny_model("llama"))
    context, options = [1, *range(10, 20)], [[30], [31, 32, 33]]
    scores = loglikelihoods(model, [(context, option) for option in options], max_length=8, progress=False)
    for option, score in zip(options, scores, strict=True):
        kept = (context + option)[-9:][
            : -len(option)
        ]  # lm-eval: (context + continuation)[-(max_length + 1):]
        logprobs = reference_logprobs(model, kept, option)
        assert score.logprob == pytest.approx(
            logprobs[torch.arange(len(option)), option].sum().item(), abs=1e-5
        )


@pytest.mark.parametrize("mode", MODES)
def test_a_one_token_context_is_read_by_the_answer_pass_alone(mode: str) -> None:
    """lm-eval's empty contexts and rolling windows: nothing to encode twice, the causal pass reads it all."""
    model = scoring_model(mode, tiny_model("llama"))
    requests = [([1], [20, 21, 22]), ([1, 5, 6], [20])]
    scores = loglikelihoods(model, requests, progress=False)
    causal = model.base_model if mode == "plain" else model.peft_model  # the causal adapter is the active one
    with torch.no_grad():
        logits = causal(input_ids=torch.tensor([[1, 20, 21]])).logits[0]
    expected = logits.log_softmax(-1)[torch.arange(3), [20, 21, 22]].sum().item()
    assert scores[0].logprob == pytest.approx(expected, abs=1e-5)
    alone = loglikelihoods(model, requests[:1], progress=False)[0]
    assert alone.logprob == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_greedy_generation_equals_decoding_with_full_forwards(mode: str, stories260k: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(stories260k)
    model = scoring_model(mode, AutoModelForCausalLM.from_pretrained(stories260k))
    prompts = ["Once upon a time", "Tom and Lily went to the park. They saw a big", "The cat"]
    outputs = generate_until(
        model, tokenizer, prompts, stop_sequences=["."], max_new_tokens=8, batch_size=2, progress=False
    )
    for prompt, output in zip(prompts, outputs, strict=True):
        prompt_ids, generated = tokenizer.encode(prompt), []
        for _ in range(8):  # greedy decoding, one full forward per new token
            generated.append(reference_logprobs(model, prompt_ids, [*generated, 0])[-1].argmax().item())
            if generated[-1] == tokenizer.eos_token_id:
                break
        expected = cut_at_stop_sequences(tokenizer.decode(generated, skip_special_tokens=True), ["."])
        assert output == expected
    assert any(outputs)


def test_pairs_are_split_as_lm_eval_splits_them(stories260k: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(stories260k)
    context, continuation = encode_pair(tokenizer, "Question: Is the sky blue?\nAnswer: ", "yes")
    whole = tokenizer.encode("Question: Is the sky blue?\nAnswer: yes")
    assert (
        context == tokenizer.encode("Question: Is the sky blue?\nAnswer:")
        and context[0] == tokenizer.bos_token_id
    )
    assert context + continuation == whole  # the trailing space moved to the continuation
    assert encode_pair(tokenizer, "", "Once upon") == (
        [tokenizer.bos_token_id],
        tokenizer.encode("Once upon", add_special_tokens=False),
    )


# ---------------------------------------------------------------------------------------------- bitune eval


def test_bitune_eval_writes_scores_and_samples(
    stories260k: Path, shared_data: Path, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "out" / "scores.json"
    arguments = [
        "eval",
        "--base-model",
        str(stories260k),
        "--tasks",
        "arc_easy,gsm8k",
        "--data-dir",
        str(shared_data),
    ]
    arguments += ["--limit", "5", "--max-new-tokens", "12", "--batch-size", "2", "--output", str(output)]
    assert main([*arguments, "--log-samples", "--device", "cpu"]) == 0
    assert "arc_easy" in capsys.readouterr().out

    report = json.loads(output.read_text())
    assert report["model"]["mode"] == "plain" and report["tasks"]["gsm8k"]["items"] == 5
    assert set(report["results"]["arc_easy"]["metrics"]) == {"acc", "acc_norm"}
    assert set(report["results"]["gsm8k"]["metrics"]) == {"strict_match", "flexible_match"}
    assert report["average"]["acc"]["n"] == 5

    samples = [json.loads(line) for line in output.with_suffix(".samples.jsonl").read_text().splitlines()]
    arc = [s for s in samples if s["task"] == "arc_easy"]
    gsm8k = [s for s in samples if s["task"] == "gsm8k"]
    assert len(arc) == len(gsm8k) == 5
    assert report["results"]["arc_easy"]["metrics"]["acc"]["value"] == sum(s["acc"] for s in arc) / 5
    for sample in arc:
        assert len(sample["loglikelihoods"]) == len(sample["choices"]) and sample["acc"] in (0.0, 1.0)
    for sample in gsm8k:
        assert "Question:" not in sample["output"] and sample["target"]
    assert any(sample["output"].strip() for sample in gsm8k)


def test_a_peft_adapter_is_scored_like_the_peft_model(
    stories260k: Path, shared_data: Path, tmp_path: Path
) -> None:
    """`--peft-adapter` takes the baseline path; its scores are those of the PeftModel's own forward."""
    from peft import PeftModel, get_peft_model

    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(stories260k), LoraConfig(r=4, init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    output = tmp_path / "scores.json"
    arguments = ["eval", "--base-model", str(stories260k), "--peft-adapter", str(tmp_path / "adapter")]
    arguments += ["--tasks", "piqa", "--data-dir", str(shared_data), "--limit", "3", "--output", str(output)]
    assert main([*arguments, "--log-samples", "--device", "cpu"]) == 0
    samples = [json.loads(line) for line in output.with_suffix(".samples.jsonl").read_text().splitlines()]

    tokenizer = AutoTokenizer.from_pretrained(stories260k)
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(stories260k), tmp_path / "adapter"
    )
    sample = samples[0]
    for choice, logprob in zip(sample["choices"], sample["loglikelihoods"], strict=True):
        context, continuation = encode_pair(tokenizer, sample["context"], " " + choice)
        with torch.no_grad():
            logits = reference(input_ids=torch.tensor([context + continuation])).logits[
                0, len(context) - 1 : -1
            ]
        expected = logits.log_softmax(-1)[torch.arange(len(continuation)), continuation].sum().item()
        assert logprob == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--tasks", "piqa_typo"], "Unknown task 'piqa_typo'"),
        (
            ["--tasks", "piqa", "--task-file", "piqa=/nonexistent/piqa.jsonl"],
            "/nonexistent/piqa.jsonl: no such",
        ),
        (
            ["--tasks", "piqa", "--data-dir", "/nonexistent"],
            "/nonexistent/piqa/validation.jsonl: no such file",
        ),
        (["--tasks", "piqa", "--task-file", "arc_easy=x.jsonl"], "'arc_easy' is not one of the --tasks"),
        (["--tasks", "piqa.yaml"], "piqa.yaml: no such task spec file"),
    ],
)
def test_bad_tasks_exit_2_with_a_message(arguments: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert main(["eval", "--base-model", str(tmp_path / "never-loaded"), *arguments]) == 2
    error = capsys.readouterr().err
    assert error.startswith("bitune eval: error:") and message in error


@pytest.mark.parametrize(
    ("model_arguments", "message"),
    [
        ([], "name the model to evaluate"),
        (["--base-model", "{tmp}/missing-model"], "no such file or folder"),
        (["--checkpoint", "{tmp}"], "is not a Bitune checkpoint"),
        (["--checkpoint", "{tmp}", "--peft-adapter", "{tmp}"], "not both"),
        (["--base-model", "{stories}", "--peft-adapter", "{tmp}"], "not a PEFT adapter folder"),
    ],
)
def test_bad_models_exit_2_with_a_message(
    model_arguments: list[str], message: str, stories260k: Path, shared_data: Path, tmp_path: Path, capsys
) -> None:
    model_arguments = [a.format(tmp=tmp_path, stories=stories260k) for a in model_arguments]
    arguments = ["eval", *model_arguments, "--tasks", "piqa", "--data-dir", str(shared_data), "--limit", "1"]
    assert main([*arguments, "--output", str(tmp_path / "scores.json")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "scores.json").exists()
