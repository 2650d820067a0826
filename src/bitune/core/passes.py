"""The building blocks of every Bitune forward: one prompt pass, and the answer pass after a prompt cache.

The three-pass reference (`BituneModel.encode_prompt` + `answer_logits`), the layer-synchronous training forward
(`bitune.core.layer_sync`), generation and scoring all build their model calls here, so the inputs of a pass
(positions from the padding mask, the cache argument, the attention direction) are defined once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from bitune.core.batch import positions
from bitune.core.caches import KVRecorder, PrefixCache, PromptEncoded
from bitune.core.compat import cache_argument

KV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class PromptState:
    """A batch of prompts after prefill: the cache of `prompt[:-1]` and the prompts themselves."""

    cache: KV
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor

    def repeat_interleave(self, repeats: int | torch.Tensor) -> PromptState:
        """Each prompt `repeats` times in a row (or `repeats[i]` times), e.g. once per answer option to score."""

        def rep(t: torch.Tensor) -> torch.Tensor:
            return t.repeat_interleave(repeats, dim=0)

        return PromptState(
            [(rep(k), rep(v)) for k, v in self.cache], rep(self.prompt_ids), rep(self.prompt_mask)
        )


def prompt_pass_inputs(
    decoder: nn.Module, ids: torch.Tensor, mask: torch.Tensor, cache: Cache, bidirectional: bool
) -> dict[str, Any]:
    """Keyword arguments of one decoder pass over (left-padded) prompt tokens that writes its K/V to `cache`.

    `is_causal=False` switches every layer of a transformers model to bidirectional attention (sliding-window
    layers keep their window); padding stays masked.
    """
    direction = {"is_causal": False} if bidirectional else {}
    return dict(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions(mask),
        use_cache=True,
        **cache_argument(decoder, cache),
        **direction,
    )


def answer_pass_inputs(
    causal_lm: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    answer_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    cache: Cache,
) -> dict[str, Any]:
    """Keyword arguments of the answer pass: `[prompt[-1], answer[:-1]]`, causal, after the cached `prompt[:-1]`."""
    tokens = torch.cat([prompt_ids[:, -1:], answer_ids[:, :-1]], dim=1)
    mask = torch.cat([prompt_mask, answer_mask[:, :-1]], dim=1)
    return dict(
        input_ids=tokens,
        attention_mask=mask,
        position_ids=positions(mask)[:, -tokens.shape[1] :],
        use_cache=True,
        **cache_argument(causal_lm, cache),
    )


def record_prompt_pass(
    causal_lm: PreTrainedModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    bidirectional: bool,
    stop_early: bool = True,
) -> KV:
    """Each layer's keys and values of one pass of the decoder over (left-padded) prompt tokens.

    With `stop_early` the pass ends at the last layer's keys and values, skipping that layer's attention and
    MLP, which nothing reads (not under activation checkpointing: a replayed layer must run the way its first
    run did).
    """
    recorder = KVRecorder(num_layers(causal_lm), stop_after_last=stop_early)
    decoder = causal_lm.get_decoder()
    with contextlib.suppress(PromptEncoded):
        decoder(**prompt_pass_inputs(decoder, ids, mask, recorder, bidirectional))
    return recorder.recorded()


def answer_pass_logits(
    causal_lm: PreTrainedModel, state: PromptState, answer_ids: torch.Tensor, answer_mask: torch.Tensor
) -> torch.Tensor:
    """The answer pass: `[prompt[-1], answer[:-1]]` read causally after the cached `prompt[:-1]`."""
    inputs = answer_pass_inputs(
        causal_lm, state.prompt_ids, state.prompt_mask, answer_ids, answer_mask, PrefixCache(state.cache)
    )
    return causal_lm(**inputs).logits


def num_layers(model: PreTrainedModel) -> int:
    """The number of decoder layers (of the text model, for multimodal configs)."""
    return model.config.get_text_config(decoder=True).num_hidden_layers


def max_positions(config) -> int | None:
    """The most tokens a model reads at once, as its config names it (None when it names no limit).

    Example:
        >>> from transformers import LlamaConfig
        >>> max_positions(LlamaConfig(max_position_embeddings=128))
        128
    """
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
