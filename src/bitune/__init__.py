"""Bitune: bidirectional instruction-tuning for decoder-only language models.

Example:
    >>> from bitune import BituneConfig, BituneModel, collate
"""

__version__ = "0.1.0"

from bitune.core.batch import collate, split_sequences  # noqa: E402
from bitune.core.generation import generate_text, stream  # noqa: E402
from bitune.core.model import BituneModel, BituneOutput, PromptState  # noqa: E402
from bitune.core.modes import MODES, BituneConfig  # noqa: E402
from bitune.errors import BituneError, BituneInputError  # noqa: E402

__all__ = [
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
