"""Bitune: bidirectional instruction-tuning for decoder-only language models.

Example:
    >>> from bitune import BituneConfig, BituneModel, collate
"""

import logging

# peft imports bitsandbytes when it is installed; on CPUs with AVX512-BF16 its import warns that an optional
# faster kernel package is missing, on every command. Its 4-bit layers work without it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from bitune._version import __version__  # noqa: E402
from bitune.core.batch import collate, split_sequences  # noqa: E402
from bitune.core.generation import generate_text, stream  # noqa: E402
from bitune.core.model import BituneModel, BituneOutput, PromptState  # noqa: E402
from bitune.core.modes import BIDIR_ADAPTER, CAUSAL_ADAPTER, MODES, BituneConfig  # noqa: E402
from bitune.errors import BituneError, BituneInputError  # noqa: E402

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
