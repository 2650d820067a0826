"""Bitune: bidirectional instruction-tuning for decoder-only language models.

Example:
    >>> from bitune import BituneConfig, BituneModel, collate
"""

__version__ = "0.1.0"

from .batch import collate, split_sequences  # noqa: E402
from .config import MODES, BituneConfig  # noqa: E402
from .errors import BituneError, BituneInputError  # noqa: E402
from .generation import generate_text, stream  # noqa: E402
from .model import BituneModel, BituneOutput, PromptState  # noqa: E402

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
