"""The layer-synchronous Bitune forward: one traversal of the decoder stack per step.

The three-pass forward (`BituneModel.encode_prompt` + `answer_logits`) runs the whole stack three times in a
row. Here the answer pass drives the traversal and, just before each decoder layer runs for the answer, the
same layer first runs for the two prompt streams; their keys and values are mixed and handed to the answer at
that very layer. Every layer's forward and backward work therefore happens together, which lets activation
checkpointing and per-layer sharding (FSDP2, ZeRO-3) treat a layer as one unit.

Nothing of a model's code is copied: each prompt stream's per-layer inputs (embeddings, rotary tables, masks
per layer type) are prepared by the model's own decoder `forward`, run once with the layers swapped for
recorders; the layers themselves are then called with those inputs, exactly as the decoder would call them.
The three-pass forward remains the readable reference and the test oracle.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache

from bitune.core.caches import PromptEncoded, _PrefixLayer
from bitune.core.modes import CAUSAL_ADAPTER, PromptPass
from bitune.core.passes import answer_pass_inputs, prompt_pass_inputs


class _LayerInputs(nn.Module):
    """Stands in for a decoder layer: records what the decoder would pass to it and changes nothing."""

    def __init__(self, layer: nn.Module, sink: list) -> None:
        super().__init__()
        self.sink = sink
        # Some decoders read per-layer attributes while looping (e.g. Gemma's `attention_type`).
        self.__dict__.update(
            {k: v for k, v in vars(layer).items() if not k.startswith("_") and k != "training"}
        )

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.sink.append((hidden_states, args, kwargs))
        return hidden_states


@dataclass
class _PromptStream:
    """One reading of the prompt, advanced one decoder layer at a time."""

    prompt_pass: PromptPass
    recorder: Any  # a KVRecorder
    hidden: torch.Tensor | None = None
    layer_inputs: list = field(default_factory=list)


class _JustInTimePrefix(Cache):
    """The answer pass's cache: layer l's prefix is produced by `fill(l)` right before layer l needs it."""

    def __init__(self, num_layers: int, prefix_length: int) -> None:
        super().__init__(layers=[])
        self.prefix_length = prefix_length
        self.layers = [None] * num_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.prefix_length

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.prefix_length + query_length, 0

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.layers)

    def set_prefix(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.layers[layer_idx] = _PrefixLayer(keys, values)


@contextlib.contextmanager
def _layers_replaced(decoder: nn.Module, sink: list) -> Iterator[None]:
    layers = decoder.layers
    decoder.layers = nn.ModuleList(_LayerInputs(layer, sink) for layer in layers)
    try:
        yield
    finally:
        decoder.layers = layers


def _prepare_stream(model: nn.Module, prompt_pass: PromptPass, ids, mask) -> _PromptStream:
    """Let the model's decoder build this stream's embeddings, rotary tables and masks for every layer."""
    decoder = model.base_model.get_decoder()
    stream = _PromptStream(prompt_pass, model._recorder())
    sink: list = []
    with model._adapter(prompt_pass.adapter), _layers_replaced(decoder, sink):
        decoder(**prompt_pass_inputs(decoder, ids, mask, stream.recorder, prompt_pass.bidirectional))
    stream.hidden = sink[0][0]
    stream.layer_inputs = [(args, kwargs) for _, args, kwargs in sink]
    return stream


def layer_synchronous_logits(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    answer_ids: torch.Tensor,
    answer_mask: torch.Tensor,
) -> torch.Tensor:
    """Answer logits of a Bitune (or ablation) forward, computed layer by layer; equals the three-pass forward."""
    spec = model.bitune_config.spec
    decoder = model.base_model.get_decoder()
    layers = list(decoder.layers[: model.config.get_text_config(decoder=True).num_hidden_layers])
    ids, mask = prompt_ids[:, :-1], prompt_mask[:, :-1]
    streams = [_prepare_stream(model, p, ids, mask) for p in spec.passes]
    prefix = _JustInTimePrefix(len(layers), ids.shape[1])

    def advance_prompt_streams(layer: nn.Module, args: tuple) -> None:
        index = layers.index(layer)
        for stream in streams:
            layer_args, layer_kwargs = stream.layer_inputs[index]
            # `forward`, not `__call__`: this runs inside the answer's call of the layer, whose hooks
            # (e.g. FSDP2's gather and reshard) then cover all three streams as one unit.
            with model._adapter(stream.prompt_pass.adapter), contextlib.suppress(PromptEncoded):
                stream.hidden = layer.forward(stream.hidden, *layer_args, **layer_kwargs)
        recorded = [stream.recorder.layers[index].recorded for stream in streams]
        keys, values = model.mixer.mix(index, *recorded) if spec.mixed else recorded[0]
        prefix.set_prefix(index, keys, values)

    hooks = [layer.register_forward_pre_hook(advance_prompt_streams) for layer in layers]
    inputs = answer_pass_inputs(model.base_model, prompt_ids, prompt_mask, answer_ids, answer_mask, prefix)
    try:
        with model._adapter(CAUSAL_ADAPTER):
            return model.base_model(**inputs).logits
    finally:
        for hook in hooks:
            hook.remove()
