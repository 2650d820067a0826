"""Bitune: bidirectional instruction-tuning for decoder-only language models.

Example:
    >>> from bitune import BituneConfig, BituneModel, collate
"""

from bitune._version import __version__
from bitune.core.batch import collate, split_sequences
from bitune.core.generation import generate_text, stream
from bitune.core.model import BituneModel, BituneOutput, PromptState
from bitune.core.modes import BIDIR_ADAPTER, CAUSAL_ADAPTER, MODES, BituneConfig
from bitune.errors import BituneError, BituneInputError

__all__ = [
    "__version__",
    "BIDIR_ADAPTER",
    "CAUSAL_ADAPTER",
    "MODES",
    "BituneConfig",
    "BituneError",
    "BituneInputError",
    "BituneModel",
    "BituneOutput",
    "PromptState",
    "collate",
    "generate_text",
    "split_sequences",
    "stream",
]
