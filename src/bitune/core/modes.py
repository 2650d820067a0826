"""Settings of a Bitune model: which ablation runs and how the two prompt passes are mixed."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from bitune.errors import BituneInputError

Mode = Literal["bitune", "naive_bidir", "no_mixing", "only_causal", "shared_weights", "baseline"]
MixingFunction = Literal["abs", "relu"]
Implementation = Literal["layer_synchronous", "three_pass"]

CAUSAL_ADAPTER = "causal"
BIDIR_ADAPTER = "bidir"


@dataclass(frozen=True)
class PromptPass:
    """One encoding of the prompt: which adapter reads it and with which attention pattern."""

    adapter: str
    bidirectional: bool


@dataclass(frozen=True)
class ModeSpec:
    """What one ablation does (the table on the method page).

    `passes[0]` is the pass whose K/V the cache falls back to without mixing; with `mixed`, the cache is
    (1 - α)·causal + α·second, per layer, for keys and values separately. With `single_pass` there is no
    prompt cache in training: prompt and answer are one causal sequence (plain PEFT fine-tuning), which equals
    reading the prompt with `passes[0]` and answering from its cache (how scoring and generation run it).
    """

    passes: tuple[PromptPass, ...]
    mixed: bool
    adapters: tuple[str, ...]
    single_pass: bool = False


MODES: dict[str, ModeSpec] = {
    "bitune": ModeSpec(
        (PromptPass(CAUSAL_ADAPTER, False), PromptPass(BIDIR_ADAPTER, True)),
        mixed=True,
        adapters=(CAUSAL_ADAPTER, BIDIR_ADAPTER),
    ),
    "naive_bidir": ModeSpec((PromptPass(CAUSAL_ADAPTER, True),), mixed=False, adapters=(CAUSAL_ADAPTER,)),
    "no_mixing": ModeSpec(
        (PromptPass(BIDIR_ADAPTER, True),), mixed=False, adapters=(CAUSAL_ADAPTER, BIDIR_ADAPTER)
    ),
    "only_causal": ModeSpec(
        (PromptPass(CAUSAL_ADAPTER, False), PromptPass(BIDIR_ADAPTER, False)),
        mixed=True,
        adapters=(CAUSAL_ADAPTER, BIDIR_ADAPTER),
    ),
    "shared_weights": ModeSpec(
        (PromptPass(CAUSAL_ADAPTER, False), PromptPass(CAUSAL_ADAPTER, True)),
        mixed=True,
        adapters=(CAUSAL_ADAPTER,),
    ),
    # Plain PEFT fine-tuning: the prompt is read causally by the one adapter that also writes the answer.
    "baseline": ModeSpec(
        (PromptPass(CAUSAL_ADAPTER, False),), mixed=False, adapters=(CAUSAL_ADAPTER,), single_pass=True
    ),
}


@dataclass
class BituneConfig:
    """How a Bitune model reads the prompt.

    Args:
        mode: the full method (`"bitune"`) or one of the ablations of the paper: `"naive_bidir"`,
            `"no_mixing"`, `"only_causal"`, `"shared_weights"`, or `"baseline"` (plain PEFT fine-tuning).
        mixing: `"abs"` for α = |w| / (|w| + c) (the paper), `"relu"` for α = relu(w) / (relu(w) + c).
        c: the constant of the mixing formula; every w starts at c, so α starts at 0.5.
        implementation: how the training forward runs the passes: `"layer_synchronous"` (one traversal of the
            decoder stack, each layer running its prompt passes just before the answer; the default) or
            `"three_pass"` (the prompt passes, then the answer pass, one after the other: the readable reference).
            Both compute the same numbers; generation and scoring always prefill with the three-pass building
            blocks.

    Example:
        >>> BituneConfig(mode="no_mixing").spec.mixed
        False
    """

    mode: Mode = "bitune"
    mixing: MixingFunction = "abs"
    c: float = 0.01
    implementation: Implementation = "layer_synchronous"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise BituneInputError(f"unknown Bitune mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.mixing not in ("abs", "relu"):
            raise BituneInputError(f"unknown mixing function {self.mixing!r}; choose 'abs' or 'relu'")
        if not self.c > 0:
            raise BituneInputError(f"mixing constant c must be positive, got {self.c}")
        if self.implementation not in ("layer_synchronous", "three_pass"):
            raise BituneInputError(
                f"unknown implementation {self.implementation!r}; choose 'layer_synchronous' or 'three_pass'"
            )

    @property
    def spec(self) -> ModeSpec:
        return MODES[self.mode]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
