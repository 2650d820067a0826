"""Generation: prefill with both prompt passes, then ordinary decoding with the causal adapter."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from tiny_models import FAMILIES, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from bitune import BituneConfig, BituneModel, collate, generate_text, stream
from bitune.experiments.synthetic import build_tokenizer

PROMPTS = [[1, 5, 6, 7, 8, 9, 10], [1, 11, 12], [1, 13, 14, 15, 16]]
NEW_TOKENS = 6


def bitune(family: str = "llama", mode: str = "bitune") -> BituneModel:
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return BituneModel.from_base(tiny_model(family), config, BituneConfig(mode=mode)).eval()


def greedy(model: BituneModel, prompts: list[list[int]]) -> list[list[int]]:
    batch = collate(prompts, [[2]] * len(prompts))
    output = model.generate(
        batch["prompt_ids"],
        batch["prompt_mask"],
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        eos_token_id=None,
    )
    return output[:, batch["prompt_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_teacher_forced_argmax(family):
    model = bitune(family)
    generated = greedy(model, PROMPTS)
    with torch.no_grad():
        logits = model(**collate(PROMPTS, generated)).logits
    assert logits.argmax(-1).tolist() == generated


@pytest.mark.parametrize("mode", ["bitune", "no_mixing", "baseline"])
def test_batched_generation_equals_one_by_one(mode):
    model = bitune("llama", mode)
    together = greedy(model, PROMPTS)
    alone = [greedy(model, [prompt])[0] for prompt in PROMPTS]
    assert together == alone


def test_right_padded_prompts_are_repadded_on_the_left():
    model = bitune()
    left = collate(PROMPTS, [[2]] * 3)
    ids, mask = left["prompt_ids"], left["prompt_mask"]
    right_ids = torch.stack([torch.roll(r, -int((m == 0).sum())) for r, m in zip(ids, mask)])
    right_mask = torch.stack([torch.roll(m, -int((m == 0).sum())) for m in mask])
    kwargs = dict(max_new_tokens=4, do_sample=False)
    expected = model.generate(ids, mask, **kwargs)[:, ids.shape[1] :]
    assert torch.equal(model.generate(right_ids, right_mask, **kwargs)[:, ids.shape[1] :], expected)


def test_sampling_arguments_pass_through():
    model = bitune()
    batch = collate(PROMPTS, [[2]] * 3)

    def sample() -> torch.Tensor:
        torch.manual_seed(0)
        return model.generate(
            batch["prompt_ids"],
            batch["prompt_mask"],
            do_sample=True,
            temperature=0.7,
            top_p=0.9,
            max_new_tokens=5,
        )

    first, second = sample(), sample()
    assert torch.equal(first, second) and first.shape[1] == batch["prompt_ids"].shape[1] + 5


def test_trained_tiny_model_with_alpha_zero_tells_its_known_story(stories260k):
    """On the real pretrained model, Bitune with α = 0 and no-op adapters is the base model, text for text."""
    tokenizer = AutoTokenizer.from_pretrained(stories260k)
    base = AutoModelForCausalLM.from_pretrained(stories260k)
    model = BituneModel.from_base(base, LoraConfig(r=4, target_modules="all-linear")).eval()
    with torch.no_grad():
        model.mixer.keys.zero_()
        model.mixer.values.zero_()
    prompt = "Once upon a time"
    text = generate_text(model, tokenizer, [prompt], max_new_tokens=20, do_sample=False)[0]
    assert text.startswith(", there was a little girl named Lily")
    # With the bidirectional pass mixed in (α = 0.5), the trained model reads the prompt differently.
    model.mixer.reset_parameters()
    with torch.no_grad():
        ids = tokenizer(["Once upon a time, there was a little girl"], return_tensors="pt")
        mixed = model.encode_prompt(ids["input_ids"], ids["attention_mask"]).cache
        model.mixer.keys.zero_()
        model.mixer.values.zero_()
        causal = model.encode_prompt(ids["input_ids"], ids["attention_mask"]).cache
    assert not torch.allclose(mixed[-1][0], causal[-1][0], atol=1e-3)


def test_streaming_yields_the_same_text_as_generate(stories260k):
    tokenizer = AutoTokenizer.from_pretrained(stories260k)
    model = BituneModel.from_base(
        AutoModelForCausalLM.from_pretrained(stories260k), LoraConfig(r=4, target_modules="all-linear")
    ).eval()
    kwargs = dict(max_new_tokens=12, do_sample=False)
    pieces = list(stream(model, tokenizer, "Once upon a time", **kwargs))
    assert len(pieces) > 1
    assert "".join(pieces) == generate_text(model, tokenizer, ["Once upon a time"], **kwargs)[0]


def test_stop_strings_end_generation(stories260k):
    tokenizer = AutoTokenizer.from_pretrained(stories260k)
    model = BituneModel.from_base(
        AutoModelForCausalLM.from_pretrained(stories260k), LoraConfig(r=4, target_modules="all-linear")
    ).eval()
    free = generate_text(model, tokenizer, ["Once upon a time"], max_new_tokens=30, do_sample=False)[0]
    stopped = generate_text(
        model, tokenizer, ["Once upon a time"], max_new_tokens=30, do_sample=False, stop_strings=["Lily"]
    )[0]
    assert "Lily" in free and stopped.endswith("Lily") and len(stopped) < len(free)


def test_stop_strings_work_with_a_closed_word_level_vocabulary():
    """transformers' StopStringCriteria cannot read bitune.experiments.synthetic's tokenizer; generation still stops."""
    tokenizer = build_tokenizer()
    base = tiny_model("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model = BituneModel.from_base(base, LoraConfig(r=4, target_modules="all-linear")).eval()
    prompts = ["mary went to the garden . where is mary ?", "john has the ball . who has the ball ?"]
    # With an EOS id, `generate` pads the rows that stopped while others go on (without one it lets them run).
    kwargs = dict(max_new_tokens=10, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    free = [text.split() for text in generate_text(model, tokenizer, prompts, **kwargs)]
    # A word both rows generate, first at different places: each row must stop at its own.
    stop = next(word for word in free[0] if word in free[1] and free[0].index(word) != free[1].index(word))
    stopped = generate_text(model, tokenizer, prompts, stop_strings=[stop], **kwargs)
    for words, cut in zip(free, stopped):
        until = next(end for end in range(1, len(words) + 1) if stop in " ".join(words[:end]))
        assert cut.split() == words[:until] and until < len(words)
