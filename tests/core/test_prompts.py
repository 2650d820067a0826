"""Prompt text → tokens: one rule for training, generation and evaluation, on every kind of tokenizer."""

from __future__ import annotations

import pytest
import torch
from data.test_samples import make_tokenizer

from bitune.core.generation import generate_text
from bitune.core.prompts import CHAT_TEMPLATES, encode_prompts, render_chat, render_prompt
from bitune.data.records import Record
from bitune.data.samples import DataConfig, build_samples
from bitune.errors import BituneInputError
from bitune.evaluation.scoring import encode_pair

TOKENIZERS = {
    "adds BOS": make_tokenizer(),
    "has a BOS it does not add": make_tokenizer(adds_bos=False),
    "has no BOS": make_tokenizer(bos=False),
}
QUESTION = "What is the capital of France?"


class RecordingModel:
    """Stands in for a model: records the prompt tokens `generate` receives and generates nothing."""

    device = torch.device("cpu")

    def generate(self, input_ids, attention_mask, **kwargs):
        self.prompts = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]
        return input_ids


@pytest.mark.parametrize("kind", TOKENIZERS)
@pytest.mark.parametrize("template", ["plain", "chat"])
def test_training_generation_and_evaluation_see_the_same_prompt_tokens(kind: str, template: str) -> None:
    tokenizer = TOKENIZERS[kind]
    text = render_prompt(QUESTION, template, tokenizer)
    row = Record("rows.jsonl, line 1", {"prompt": QUESTION, "completion": "Paris"})
    (sample,), _ = build_samples([row], tokenizer, DataConfig("rows.jsonl", template=template))
    model = RecordingModel()
    generate_text(model, tokenizer, [text], max_new_tokens=1)
    context_ids, _ = encode_pair(tokenizer, text, " Paris")
    assert sample.prompt_ids == model.prompts[0] == context_ids == encode_prompts(tokenizer, [text])[0]


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_prompt_tokens_are_the_tokenizers_own(kind: str) -> None:
    """As `tokenizer(text)` encodes it: BOS only where the tokenizer adds one itself."""
    tokenizer = TOKENIZERS[kind]
    text = render_prompt(QUESTION, "plain")
    assert encode_prompts(tokenizer, [text]) == [tokenizer(text)["input_ids"]]
    assert (encode_prompts(tokenizer, [text])[0][0] == tokenizer.bos_token_id) == (kind == "adds BOS")


def test_a_chat_template_that_writes_bos_gets_no_second_one() -> None:
    tokenizer = TOKENIZERS["adds BOS"]
    text = render_prompt(QUESTION, "chat", tokenizer)
    assert text.startswith("<s>")
    (ids,) = encode_prompts(tokenizer, [text])
    assert ids.count(tokenizer.bos_token_id) == 1
    assert ids == tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=True, return_dict=False
    )


# What each model's own tokenizer renders for a system turn and a user turn (from the model cards' formats).
NAMED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "zephyr": "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n",
    "llama2": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]",
}


@pytest.mark.parametrize("name", NAMED)
def test_a_chat_template_by_name_renders_the_models_format(name: str) -> None:
    tokenizer = TOKENIZERS["adds BOS"]
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_chat(turns, tokenizer, name) == NAMED[name]
    assert tokenizer.chat_template not in CHAT_TEMPLATES.values()  # the tokenizer itself is untouched
    assert render_chat(turns, tokenizer, CHAT_TEMPLATES[name]) == NAMED[name]  # the same as Jinja text


def test_gemma_s_template_and_unknown_names() -> None:
    tokenizer = TOKENIZERS["adds BOS"]
    assert (
        render_prompt("Hi", "chat", tokenizer, "gemma")
        == "<s><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    )
    with pytest.raises(BituneInputError, match="System role not supported"):
        render_chat(
            [{"role": "system", "content": "x"}, {"role": "user", "content": "Hi"}], tokenizer, "gemma"
        )
    with pytest.raises(
        BituneInputError, match="chat_template 'vicuna' is unknown; use one of chatml, zephyr"
    ):
        render_prompt("Hi", "chat", tokenizer, "vicuna")
