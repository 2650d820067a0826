"""Loading base models and tokenizers: the one place that knows dtypes, devices and padding.

Every command, trainer, evaluator and experiment loads through these functions, so a model is read the same
way everywhere: no remote code unless asked for, weights from safetensors, one padding policy.
"""

from __future__ import annotations

import os
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
# k-bit base models (QLoRA-style), through bitsandbytes: on CUDA GPUs and, since bitsandbytes 0.46, on the CPU.
QUANTIZATIONS = ("none", "4bit", "8bit")


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


def check_quantization(quantization: str | None) -> str | None:
    """`quantization` if it is one of `QUANTIZATIONS` (or None), else a `BituneInputError`.

    Example:
        >>> check_quantization("4bit")
        '4bit'
    """
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise BituneInputError(
            f"quantization {quantization!r} is unknown; use one of {', '.join(QUANTIZATIONS)}"
        )
    return quantization


def quantization_config(
    quantization: str | None, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto"
):
    """transformers' `BitsAndBytesConfig` for a base model quantized as `quantization` says ("4bit": NF4 with
    double quantization, as QLoRA; "8bit": LLM.int8()); None for "none" or None.

    The 4-bit layers compute in `dtype` (for "auto": bfloat16 on a GPU, float32 on the CPU). The output layer
    stays in full precision (transformers' default).

    Example:
        >>> quantization_config("4bit", "float32").bnb_4bit_quant_type
        'nf4'
    """
    if check_quantization(quantization) in (None, "none"):
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise BituneInputError(
            f"quantization {quantization!r} needs bitsandbytes: pip install bitsandbytes"
        ) from None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute_dtype = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    if compute_dtype == "auto":
        compute_dtype = torch.bfloat16 if resolve_device(device).type == "cuda" else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def quantization_of(model: PreTrainedModel) -> str | None:
    """ "4bit" or "8bit" for a base model loaded with bitsandbytes quantization, else None.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> quantization_of(LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))) is None
        True
    """
    if getattr(model, "is_loaded_in_4bit", False):
        return "4bit"
    if getattr(model, "is_loaded_in_8bit", False):
        return "8bit"
    return None


def keep_quantized_layers_trainable(model: torch.nn.Module) -> None:
    """Keep bitsandbytes' 4-bit layers on their differentiable CPU path.

    On CPUs with AVX512-BF16, a 4-bit layer that first runs in eval mode without gradients repacks its weights
    for a faster kernel and runs that kernel from then on, also in training, where it has no backward: the
    gradient would no longer flow through the layer to the adapters of earlier layers. Bitune switches between
    eval and training (support checks, evaluation during a run), so the repacking is turned off (and undone).
    """
    for module in model.modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                weight.data, weight.quant_state
            )


def quantized_device(device: str | torch.device = "auto") -> str:
    """Where a quantized model is loaded (it is quantized on its device and cannot be moved afterwards): the
    device, with a CUDA device under `torchrun`/`accelerate` being the process's own (`LOCAL_RANK`)."""
    resolved = resolve_device(device)
    if resolved.type == "cuda" and resolved.index is None:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return str(resolved)


def _check_safetensors(location: str | Path) -> None:
    """A local model folder whose weights are pickle files only is refused with a way out."""
    folder = Path(location)
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise BituneInputError(
                f"model {str(location)!r}: its weights are pickle files only ({', '.join(pickles[:3])}), which "
                "bitune does not load (unpickling can run code); convert them to safetensors "
                "(model.save_pretrained(folder, safe_serialization=True))"
            )


def load_base_model(
    name_or_path: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    attn_implementation: str | None = None,
    quantization: str | None = None,
    device: str | torch.device = "auto",
    **from_pretrained_kwargs: Any,
) -> PreTrainedModel:
    """A causal LM from a local folder, a GGUF file or a hub id, without remote code unless
    `trust_remote_code=True`.

    A GGUF file (`path/to/model.gguf`, or a folder with `gguf_file="model.gguf"`) is dequantized on load; the
    model then records the file's path as its name, so a checkpoint trained on it finds it again.

    `quantization` ("4bit", "8bit"; see `quantization_config`) loads the linear layers k-bit quantized with
    bitsandbytes, directly onto `device` (a quantized model is not moved afterwards); otherwise the model is
    loaded on the CPU and `device` is not used.

    Example:
        >>> model = load_base_model(base, dtype="bfloat16")  # a local folder
        >>> type(model).__name__, model.dtype, model.config.num_hidden_layers
        ('LlamaForCausalLM', torch.bfloat16, 5)
        >>> model = load_base_model("HuggingFaceTB/SmolLM2-135M", dtype="bfloat16")  # doctest: +SKIP
        >>> model = load_base_model("HuggingFaceTB/SmolLM2-135M", quantization="4bit")  # doctest: +SKIP
    """
    location, gguf = gguf_location(name_or_path, from_pretrained_kwargs.pop("gguf_file", None))
    _check_local(location if not gguf else Path(location) / gguf["gguf_file"])
    kwargs: dict[str, Any] = {"trust_remote_code": False, **from_pretrained_kwargs, **gguf}
    kwargs["dtype"] = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    bits = quantization_config(quantization, dtype, device)
    if bits is not None:
        if gguf:
            raise BituneInputError(
                f"{name_or_path}: a GGUF file cannot be loaded {quantization}-quantized; convert it first "
                "(bitune convert-gguf) and quantize the converted folder"
            )
        kwargs["quantization_config"] = bits
        kwargs.setdefault("device_map", {"": quantized_device(device)})
    if not gguf:
        _check_safetensors(location)
        kwargs.setdefault("use_safetensors", True)  # never unpickle weights: a pickle can run code
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except OSError as error:
        raise BituneInputError(f"cannot load the model {str(name_or_path)!r}: {error}") from None
    except ValueError as error:  # e.g. an encoder-only or encoder-decoder model: no causal LM class
        gist = next((line for line in str(error).splitlines() if line.strip()), "")[:300]
        raise BituneInputError(
            f"cannot load {str(name_or_path)!r} as a causal language model ({gist}); Bitune needs a decoder-only "
            "causal LM"
        ) from None
    if gguf:
        model.config._name_or_path = str(Path(location) / gguf["gguf_file"])
        quantizer = model.hf_quantizer
        if quantizer is not None and getattr(quantizer, "kernel", None) is None:  # no packed-block kernel
            # The weights are plain tensors now: the model saves, exports and trains like any other.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
    if bits is not None:
        keep_quantized_layers_trainable(model)
    return model


def load_tokenizer(name_or_path: str | Path):
    """The tokenizer of a model (folder, GGUF file or hub id), with a padding token (its EOS when it has none).

    Example:
        >>> tokenizer = load_tokenizer(base)
        >>> tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token
        ('<s>', '</s>', '<unk>')
    """
    location, gguf = gguf_location(name_or_path)
    _check_local(location if not gguf else Path(location) / gguf["gguf_file"])
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
