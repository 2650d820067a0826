"""What differs between the transformers releases bitune supports (see `pyproject.toml`), in one place.

* 5.24 renames the cache argument of model forwards and `generate` from `past_key_values` to `cache` (the
  old name is deprecated, and removed in 5.40 for forwards).

Releases before 5.23 are not supported: their activation checkpointing runs a decoder layer's hooks inside the
checkpoint, which replays the layer-synchronous forward's prompt streams wrongly.
"""

from __future__ import annotations

import functools
import inspect

from torch import nn
from transformers.cache_utils import Cache


@functools.cache
def _cache_parameter(forward_owner: type) -> str:
    parameters = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_argument(module: nn.Module, cache: Cache) -> dict[str, Cache]:
    """`{name: cache}` for calling `module` (or the `generate` of the same release) with a cache.

    Example:
        >>> from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
        >>> list(cache_argument(model, DynamicCache())) in (["cache"], ["past_key_values"])
        True
    """
    return {_cache_parameter(type(module)): cache}
