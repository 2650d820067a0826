"""Generation: prefill reads the prompt twice and mixes the cache, then decoding is ordinary `generate`."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from transformers import (
    DynamicCache,
    StoppingCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
    TextIteratorStreamer,
)

from bitune.core.batch import left_pad, pad_left
from bitune.core.compat import cache_argument
from bitune.core.loading import pad_token_id as tokenizer_pad_id
from bitune.core.modes import CAUSAL_ADAPTER
from bitune.core.passes import max_positions
from bitune.core.prompts import encode_prompts
from bitune.errors import BituneInputError


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **generate_kwargs,
) -> torch.Tensor:
    """Generate continuations of a batch of prompts; returns prompt + new tokens, as `transformers` does.

    Accepts every argument of `transformers.GenerationMixin.generate` (greedy or sampling, `temperature`,
    `top_p`, `max_new_tokens`, `stop_strings` with `tokenizer=`, `eos_token_id`, `streamer`, ...). Prompts
    may be padded on either side; they are re-padded on the left.

    Example:
        >>> ids = tokenizer(["Once upon a time"], return_tensors="pt")
        >>> output = model.generate(**ids, max_new_tokens=8, do_sample=False)
        >>> output.shape, tokenizer.decode(output[0])
        (torch.Size([1, 13]), '<s> Once upon a time, there was a little girl')
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if (attention_mask.sum(-1) < 2).any():
        raise BituneInputError("every prompt needs at least 2 tokens to generate from (add a BOS token)")
    pad_token_id = generate_kwargs.get("pad_token_id", model.base_model.generation_config.pad_token_id) or 0
    if not bool(attention_mask[:, -1].all()):
        padded = left_pad(input_ids, attention_mask, pad_token_id)
        input_ids, attention_mask = padded["input_ids"], padded["attention_mask"]
    generate_kwargs.setdefault("pad_token_id", pad_token_id)
    check_generation(generate_kwargs, input_ids.shape[1], max_positions(model.config))
    _readable_stop_strings(generate_kwargs, prompt_length=input_ids.shape[1])
    if not model.bitune_config.spec.single_pass:
        # The cache covers prompt[:-1]; `generate` then feeds the last prompt token itself (see
        # hf_stack_notes: a cache over the whole prompt makes `generate` re-feed every prompt token).
        state = model.encode_prompt(input_ids, attention_mask)
        generate_kwargs.update(
            cache_argument(model.base_model, DynamicCache(state.cache, config=model.config))
        )
    with model._adapter(CAUSAL_ADAPTER):
        return model.base_model.generate(
            input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs
        )


def check_generation(generate_kwargs: dict, prompt_length: int, positions: int | None) -> None:
    """Refuse decoding settings that cannot work, naming the setting: `max_new_tokens` below 1, sampling at
    temperature 0 or with `top_p` outside (0, 1], a prompt the model cannot read (longer than its positions).
    `max_new_tokens` is capped so that prompt and answer fit the model's positions.

    Example:
        >>> check_generation({"max_new_tokens": 0}, prompt_length=5, positions=128)
        Traceback (most recent call last):
        bitune.errors.BituneInputError: max_new_tokens (--max-new-tokens) must be at least 1, got 0
    """
    new_tokens = generate_kwargs.get("max_new_tokens")
    if new_tokens is not None and (
        isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1
    ):
        raise BituneInputError(f"max_new_tokens (--max-new-tokens) must be at least 1, got {new_tokens!r}")
    if generate_kwargs.get("do_sample"):
        temperature, top_p, top_k = (generate_kwargs.get(k) for k in ("temperature", "top_p", "top_k"))
        if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
            raise BituneInputError(
                f"temperature (--temperature) must be positive when sampling, got {temperature}; for greedy "
                "decoding leave out --do-sample (do_sample=False)"
            )
        if top_p is not None and not 0 < top_p <= 1:
            raise BituneInputError(f"top_p (--top-p) must be in (0, 1], got {top_p}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise BituneInputError(f"top_k must be a whole number of at least 0, got {top_k!r}")
    if positions is not None:
        if prompt_length >= positions:
            raise BituneInputError(
                f"the prompt is {prompt_length} tokens long, and the model reads {positions} positions at most "
                "(prompt and answer together); shorten the prompt"
            )
        if new_tokens is not None and prompt_length + new_tokens > positions:
            generate_kwargs["max_new_tokens"] = positions - prompt_length


class DecodedStopStrings(StoppingCriteria):
    """Stops each row once the text it generated contains one of `stop_strings`, by decoding it every step.

    For tokenizers that transformers' `StopStringCriteria` cannot read: it decodes every vocabulary entry
    after a fixed prefix, which a closed word-level vocabulary (e.g. `bitune.experiments.synthetic`'s) cannot spell.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str], prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = list(stop_strings)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        stopped = [any(stop in text for stop in self.stop_strings) for text in texts]
        return torch.tensor(stopped, dtype=torch.bool, device=input_ids.device)


def _readable_stop_strings(generate_kwargs: dict, prompt_length: int) -> None:
    """Swap `stop_strings` for `DecodedStopStrings` when transformers cannot handle the tokenizer."""
    stop_strings, tokenizer = generate_kwargs.get("stop_strings"), generate_kwargs.get("tokenizer")
    if not stop_strings or tokenizer is None:
        return
    stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
    try:
        StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings)
    except ValueError:
        del generate_kwargs["stop_strings"]
        criteria = StoppingCriteriaList(generate_kwargs.get("stopping_criteria") or [])
        criteria.append(DecodedStopStrings(tokenizer, stop_strings, prompt_length))
        generate_kwargs["stopping_criteria"] = criteria


def generate_text(model: nn.Module, tokenizer, prompts: Sequence[str], **generate_kwargs) -> list[str]:
    """Generate one completion per prompt string and return the new text only.

    The prompts are tokenised as training tokenises them (`bitune.core.prompts.encode_prompts`) and
    left-padded. `model` is anything with `BituneModel`'s `generate` (a `BituneModel`, a
    `bitune.core.plain.PlainModel`).

    Example:
        >>> generate_text(model, tokenizer, ["Once upon a time", "The cat"], max_new_tokens=8)
        [', there was a little girl', 'and a boy were play']
    """
    encoded = _encode(tokenizer, prompts, model.device)
    return generate_new_text(
        model, tokenizer, encoded["input_ids"], encoded["attention_mask"], **generate_kwargs
    )


def generate_new_text(
    model: nn.Module,
    tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    **generate_kwargs,
) -> list[str]:
    """Generate from already tokenised prompts and return the new text only (special tokens skipped).

    The one place that completes the generation arguments: the tokenizer's padding id (`pad_token_id`) and,
    for `stop_strings`, the tokenizer itself. `generate_text` calls it after tokenising; evaluation calls it
    with prompts tokenised as lm-eval tokenises them.
    """
    generate_kwargs.setdefault("pad_token_id", tokenizer_pad_id(tokenizer))
    if "stop_strings" in generate_kwargs:
        generate_kwargs.setdefault("tokenizer", tokenizer)
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
    return tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)


def stream(model: nn.Module, tokenizer, prompt: str, **generate_kwargs) -> Iterator[str]:
    """Yield the answer to one prompt piece by piece as it is generated (for chat and interactive use).

    Example:
        >>> for piece in stream(model, tokenizer, "Once upon a time", max_new_tokens=12):
        ...     print(piece, end="", flush=True)
        , there was a little girl named Lily. She
    """
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    encoded = _encode(tokenizer, [prompt], model.device)
    generate_kwargs.setdefault("pad_token_id", tokenizer_pad_id(tokenizer))
    if "stop_strings" in generate_kwargs:  # transformers needs the tokenizer to find them
        generate_kwargs.setdefault("tokenizer", tokenizer)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            generate(
                model, encoded["input_ids"], encoded["attention_mask"], streamer=streamer, **generate_kwargs
            )
        except BaseException as error:  # re-raised in the caller's thread below
            errors.append(error)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]


def _encode(tokenizer, prompts: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    batch = pad_left(encode_prompts(tokenizer, prompts), tokenizer_pad_id(tokenizer))
    return {k: v.to(device) for k, v in batch.items()}
