"""Loading base models and tokenizers: the one place that knows dtypes, devices and padding.

Every command, trainer, evaluator and experiment loads through these functions, so a model is read the same
way everywhere: no remote code unless asked for, weights from safetensors, one padding policy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from bitune.errors import BituneInputError

# Names a user writes (CLI flags, config files) -> what `from_pretrained(dtype=...)` takes.
DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEVICES = ("auto", "cpu", "cuda", "mps")


def torch_dtype(name: str) -> torch.dtype | str:
    """The dtype called `name` ("auto", "float32", "bfloat16", "float16").

    Example:
        >>> torch_dtype("bfloat16")
        torch.bfloat16
    """
    if name not in DTYPES:
        raise BituneInputError(f"dtype {name!r} is unknown; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` → a GPU if there is one (CUDA, then MPS), else the CPU; anything else is checked to exist.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise BituneInputError(
            f"device {device!r} is not a device; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(resolved.type, True):
        raise BituneInputError(f"device {device!r} is not available on this machine; use auto or cpu")
    return resolved


def load_base_model(
    name_or_path: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    attn_implementation: str | None = None,
    **from_pretrained_kwargs: Any,
) -> PreTrainedModel:
    """A causal LM from a local folder or a hub id, without remote code unless `trust_remote_code=True`.

    Example:
        >>> model = load_base_model("HuggingFaceTB/SmolLM2-135M", dtype="bfloat16")  # doctest: +SKIP
    """
    kwargs: dict[str, Any] = {"trust_remote_code": False, **from_pretrained_kwargs}
    kwargs["dtype"] = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except OSError as error:
        raise BituneInputError(f"cannot load the model {str(name_or_path)!r}: {error}") from None


def load_tokenizer(name_or_path: str | Path):
    """The tokenizer of a model, with a padding token (its EOS when it has none) for batches.

    Example:
        >>> tokenizer = load_tokenizer("HuggingFaceTB/SmolLM2-135M")  # doctest: +SKIP
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise BituneInputError(f"cannot load a tokenizer from {str(name_or_path)!r}: {error}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pad_token_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's padding token, else its EOS, else 0 (padding is masked out).

    Example:
        >>> pad_token_id(None)
        0
    """
    for token_id in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if token_id is not None:
            return token_id
    return 0
