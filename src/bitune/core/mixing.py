"""The trainable per-layer blend of the causal and bidirectional prompt encodings."""

from __future__ import annotations

import torch
from torch import nn


class Mixer(nn.Module):
    """2·L trainable scalars: one coefficient for keys and one for values in every layer.

    `α = f(w) / (f(w) + c)` with f = |·| (or relu); the mixed cache is `(1 − α)·causal + α·bidirectional`,
    computed in float32 and cast back to the cache dtype.

    Example:
        >>> mixer = Mixer(num_layers=2)
        >>> mixer.alphas()[0].tolist()
        [0.5, 0.5]
    """

    def __init__(self, num_layers: int, c: float = 0.01, function: str = "abs") -> None:
        super().__init__()
        self.c = c
        self.function = function
        self.keys = nn.Parameter(torch.empty(num_layers, dtype=torch.float32))
        self.values = nn.Parameter(torch.empty(num_layers, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every w = c, so every α starts at 0.5."""
        with torch.no_grad():
            self.keys.fill_(self.c)
            self.values.fill_(self.c)

    def alpha(self, w: torch.Tensor) -> torch.Tensor:
        magnitude = w.abs() if self.function == "abs" else torch.relu(w)
        return magnitude / (magnitude + self.c)

    def alphas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(α for keys, α for values), one entry per layer."""
        return self.alpha(self.keys), self.alpha(self.values)

    def mix(
        self, layer: int, causal: tuple[torch.Tensor, torch.Tensor], bidir: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Blend one layer's (keys, values) of the two prompt passes."""
        mixed = []
        for w, c_states, b_states in zip((self.keys, self.values), causal, bidir):
            alpha = self.alpha(w[layer])
            blend = torch.lerp(c_states.float(), b_states.float(), alpha)  # (1 − α)·c + α·b
            mixed.append(blend.to(c_states.dtype))
        return mixed[0], mixed[1]

    def extra_repr(self) -> str:
        return f"num_layers={self.keys.numel()}, c={self.c}, function={self.function!r}"
