"""`PlainModel`: a bare causal LM with `BituneModel`'s inference interface, and `ScoringModel`, that interface.

Anything with `encode_prompt`, `answer_logits` and `generate` can be scored and generated from: a
`bitune.BituneModel` (any mode; a plain PEFT adapter is a `BituneModel` in mode "baseline") or a bare
Hugging Face causal LM wrapped in `PlainModel`. `bitune.core.pretrained.load_for_inference` builds the right one.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from bitune.core.passes import PromptState, answer_pass_logits, record_prompt_pass


class ScoringModel(Protocol):
    """What the scorer needs from a model (`BituneModel` and `PlainModel` have it)."""

    @property
    def config(self) -> PretrainedConfig: ...

    @property
    def device(self) -> torch.device: ...

    def encode_prompt(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> PromptState: ...

    def answer_logits(
        self, state: PromptState, answer_ids: torch.Tensor, answer_mask: torch.Tensor
    ) -> torch.Tensor: ...

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **generate_kwargs
    ) -> torch.Tensor: ...


class PlainModel(nn.Module):
    """A Hugging Face causal LM with `BituneModel`'s scoring interface: the prompt is read once, causally.

    Scores equal the model's own forward over context + continuation; this is how a base model is evaluated
    on the same code path (and with the same per-context cache reuse) as a Bitune model.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = PlainModel(LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16,
        ...     intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)))
        >>> state = model.encode_prompt(torch.tensor([[1, 5, 6]]), torch.ones(1, 3, dtype=torch.long))
        >>> model.answer_logits(state, torch.tensor([[7, 8]]), torch.ones(1, 2, dtype=torch.long)).shape
        torch.Size([1, 2, 32])
    """

    def __init__(self, base_model: PreTrainedModel) -> None:
        super().__init__()
        self.base_model = base_model

    @property
    def config(self) -> PretrainedConfig:
        return self.base_model.config

    @property
    def device(self) -> torch.device:
        return self.base_model.device

    def encode_prompt(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> PromptState:
        """Prefill: the keys and values of `prompt[:-1]`, as `BituneModel.encode_prompt` returns them."""
        ids, mask = prompt_ids[:, :-1], prompt_mask[:, :-1]
        # Recorded K/V rather than a DynamicCache: sliding-window layers of the latter drop old tokens.
        return PromptState(
            record_prompt_pass(self.base_model, ids, mask, bidirectional=False), prompt_ids, prompt_mask
        )

    def answer_logits(
        self, state: PromptState, answer_ids: torch.Tensor, answer_mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits of the answers after the cached prompts; `logits[:, t]` predicts `answer_ids[:, t]`."""
        return answer_pass_logits(self.base_model, state, answer_ids, answer_mask)

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **generate_kwargs
    ):
        """The model's own `generate` (returns prompt + new tokens)."""
        return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)


__all__ = ["PlainModel", "ScoringModel"]
