"""Two small `Cache` classes through which Bitune reads and writes the prompt's K/V.

transformers hands every attention layer's post-RoPE keys and values to `past_key_values.update()`; these
caches use that public hook instead of a forked model class or a custom attention function, so every
attention backend (eager, sdpa, flash, flex) and every model family works unchanged.

* `KVRecorder` records what a prompt pass computes and returns it untouched (the pass sees no past).
* `PrefixCache` serves a fixed prefix (the mixed prompt K/V) to the answer pass and never grows.

Both are idempotent, so a decoder layer can be replayed by activation checkpointing with them attached.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class PromptEncoded(Exception):
    """Raised by a `KVRecorder` that stops early: the last layer's keys and values are all the pass needs."""


class _RecordingLayer(DynamicLayer):
    def __init__(self, stop: bool = False) -> None:
        super().__init__()
        self.stop = stop
        self.recorded: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        # Stored aside (not in .keys) so the cache still reports length 0 to the model's mask builder.
        self.recorded = (key_states, value_states)
        if self.stop:
            raise PromptEncoded
        return key_states, value_states


class KVRecorder(Cache):
    """Records each layer's keys and values of one forward pass over the prompt.

    Example:
        >>> recorder = KVRecorder(num_layers=2)
        >>> recorder.get_seq_length()
        0
    """

    def __init__(self, num_layers: int, stop_after_last: bool = False) -> None:
        # With `stop_after_last`, recording the last layer raises `PromptEncoded`: the prompt pass skips that
        # layer's attention, MLP and the final norm, which nothing downstream reads.
        layers = [_RecordingLayer(stop=stop_after_last and i == num_layers - 1) for i in range(num_layers)]
        super().__init__(layers=layers)

    def recorded(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        missing = [i for i, layer in enumerate(self.layers) if layer.recorded is None]
        if missing:
            raise RuntimeError(
                f"layers {missing} never passed their keys/values to the cache; this model's attention does not "
                "use `past_key_values.update`, which Bitune relies on"
            )
        return [layer.recorded for layer in self.layers]


class _PrefixLayer(DynamicLayer):
    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


class PrefixCache(Cache):
    """A read-only cache holding a fixed prefix of keys and values for every layer.

    Every layer keeps the whole prefix (also on sliding-window layers): the model's mask builder applies the
    window from absolute positions, so the result equals a sliding-window cache's.

    Example:
        >>> k = torch.zeros(1, 2, 3, 4)
        >>> PrefixCache([(k, k)]).get_seq_length()
        3
    """

    def __init__(self, prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__(layers=[_PrefixLayer(k, v) for k, v in prefix])
