"""Prompts as text and as tokens: the paper's template, chat templates, and how prompt and answer are tokenised.

Training data, generation, serving and evaluation all turn text into prompt tokens here, so the same text gives
the same tokens everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from bitune.errors import BituneInputError

PLAIN_TEMPLATE = "Question: {prompt}\n\nAnswer:"


def render_prompt(text: str, template: str, tokenizer=None) -> str:
    """Put a user message into a template: "plain" (the paper's), "chat" (the tokenizer's), "none", or "...{prompt}...".

    Example:
        >>> render_prompt("Hi", "plain")
        'Question: Hi\\n\\nAnswer:'
    """
    if template == "none":
        return text
    if template == "chat":
        if tokenizer is None or not tokenizer.chat_template:
            raise BituneInputError("template chat: the tokenizer has no chat template; use plain")
        message = [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True)
    if template == "plain":
        template = PLAIN_TEMPLATE
    if "{prompt}" not in template:
        raise BituneInputError(
            f"template {template!r}: use plain, chat, none, or a text containing {{prompt}}"
        )
    return template.replace("{prompt}", text)


def split_answers(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], prompt_ids: list[list[int]], answers: list[str]
) -> list[list[int]]:
    """Each answer's tokens as they follow its prompt: the tail of `prompt + answer`'s tokens.

    As the authors' code splits them (and lm-eval, for prompts that do not end in whitespace, whose trailing
    spaces it moves to the answer). Encoded alone, " Paris" gets a SentencePiece tokenizer's dummy prefix
    (Llama-2: an extra lone "▁" before "▁Paris") that the answer never has after a prompt. Where the whole
    text's tokens do not start with the prompt's (a merge across the boundary, e.g. after a prompt ending in a
    space), the answer is encoded alone, so that training and generation see the same prompt tokens.
    """
    wholes = encode_prompts(tokenizer, [prompt + answer for prompt, answer in zip(prompts, answers)])
    split = [
        whole[len(prompt) :] if whole[: len(prompt)] == prompt else None
        for prompt, whole in zip(prompt_ids, wholes)
    ]
    unsplit = [index for index, ids in enumerate(split) if ids is None]
    if unsplit:
        alone = tokenizer([answers[index] for index in unsplit], **_NO_SPECIAL_TOKENS)["input_ids"]
        for index, ids in zip(unsplit, alone):
            split[index] = ids
    return split


# Batched calls let a fast tokenizer work in parallel.
_NO_SPECIAL_TOKENS = dict(add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of rendered prompts, as the tokenizer itself encodes them (the same for training, generation,
    serving and evaluation).

    The tokenizer adds its own special tokens: BOS for Llama/Gemma-style tokenizers, nothing for those that add
    none (SmolLM2's `<|im_start|>` is a chat marker, not a prefix to every text). A text that already starts
    with the BOS text (a chat template that writes it) gets no second one. This is what `transformers`'
    `apply_chat_template` and lm-eval's `hf` model do.

    Example:
        >>> encode_prompts(tokenizer, ["Question: Hi\\n\\nAnswer:"])[0][:1] == [tokenizer.bos_token_id]
        True
    """
    bos = tokenizer.bos_token
    encoded: list[list[int]] = [[] for _ in texts]
    for add_special_tokens in (True, False):
        indices = [
            i for i, text in enumerate(texts) if (bool(bos) and text.startswith(bos)) != add_special_tokens
        ]
        if indices:
            options = {**_NO_SPECIAL_TOKENS, "add_special_tokens": add_special_tokens}
            for index, ids in zip(indices, tokenizer([texts[i] for i in indices], **options)["input_ids"]):
                encoded[index] = ids
    return encoded
