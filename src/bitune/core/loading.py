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


GGUF_SUFFIX = ".gguf"


def gguf_location(
    name_or_path: str | Path, gguf_file: str | None = None
) -> tuple[str | Path, dict[str, str]]:
    """`(folder, {"gguf_file": name})` for a GGUF file given as a path to it (or a folder plus `gguf_file`);
    `(name_or_path, {})` for anything else.

    Example:
        >>> gguf_location("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        (PosixPath('models'), {'gguf_file': 'SmolLM2-135M-Instruct.Q4_1.gguf'})
        >>> gguf_location("HuggingFaceTB/SmolLM2-135M")
        ('HuggingFaceTB/SmolLM2-135M', {})
    """
    if gguf_file is not None:
        return name_or_path, {"gguf_file": gguf_file}
    if str(name_or_path).endswith(GGUF_SUFFIX):
        path = Path(name_or_path)
        return path.parent, {"gguf_file": path.name}
    return name_or_path, {}


def _check_local(name_or_path: str | Path) -> None:
    """A path that looks local but does not exist is reported at once instead of being tried on the hub."""
    text = str(name_or_path)
    looks_local = text.startswith((".", "/", "~")) or text.endswith(GGUF_SUFFIX) or text.count("/") > 1
    if looks_local and not Path(text).expanduser().exists():
        raise BituneInputError(f"model {text!r}: no such file or folder")


def load_base_model(
    name_or_path: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    attn_implementation: str | None = None,
    **from_pretrained_kwargs: Any,
) -> PreTrainedModel:
    """A causal LM from a local folder, a GGUF file or a hub id, without remote code unless
    `trust_remote_code=True`.

    A GGUF file (`path/to/model.gguf`, or a folder with `gguf_file="model.gguf"`) is dequantized on load; the
    model then records the file's path as its name, so a checkpoint trained on it finds it again.

    Example:
        >>> model = load_base_model("HuggingFaceTB/SmolLM2-135M", dtype="bfloat16")  # doctest: +SKIP
    """
    location, gguf = gguf_location(name_or_path, from_pretrained_kwargs.pop("gguf_file", None))
    _check_local(location if not gguf else Path(location) / gguf["gguf_file"])
    kwargs: dict[str, Any] = {"trust_remote_code": False, **from_pretrained_kwargs, **gguf}
    kwargs["dtype"] = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except OSError as error:
        raise BituneInputError(f"cannot load the model {str(name_or_path)!r}: {error}") from None
    if gguf:
        model.config._name_or_path = str(Path(location) / gguf["gguf_file"])
        quantizer = model.hf_quantizer
        if quantizer is not None and getattr(quantizer, "kernel", None) is None:  # no packed-block kernel
            # The weights are plain tensors now: the model saves, exports and trains like any other.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
    return model


def load_tokenizer(name_or_path: str | Path):
    """The tokenizer of a model (folder, GGUF file or hub id), with a padding token (its EOS when it has none).

    Example:
        >>> tokenizer = load_tokenizer("HuggingFaceTB/SmolLM2-135M")  # doctest: +SKIP
    """
    location, gguf = gguf_location(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **gguf)
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


def tokenizer_source(*folders: str | Path | None) -> str | Path | None:
    """The first of `folders` that holds a tokenizer (tokenizer_config.json), else the last one given.

    Example:
        >>> tokenizer_source("runs/ckpt-without-tokenizer", "models/base")
        'models/base'
    """
    given = [folder for folder in folders if folder is not None]
    for folder in given:
        if (Path(folder) / "tokenizer_config.json").is_file():
            return folder
    return given[-1] if given else None
