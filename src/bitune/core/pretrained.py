"""Loading a model to use: a Bitune checkpoint, a plain PEFT adapter or a bare base model, with its tokenizer.

`load_for_inference` is the one way generation (`bitune generate`, `bitune chat`), evaluation and experiments
load what they run. It builds on `bitune.core.loading` (dtypes, devices, base models, tokenizers), which the
checkpoint code below it uses too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from bitune.core.checkpoint import recorded_base_model
from bitune.core.loading import (
    check_quantization,
    load_base_model,
    load_tokenizer,
    quantization_of,
    resolve_device,
    tokenizer_source,
    torch_dtype,
)
from bitune.core.model import BituneModel
from bitune.core.modes import CAUSAL_ADAPTER, BituneConfig
from bitune.core.plain import PlainModel
from bitune.errors import BituneInputError


def load_for_inference(
    *,
    checkpoint: str | Path | None = None,
    base_model: PreTrainedModel | str | Path | None = None,
    peft_adapter: str | Path | None = None,
    tokenizer: str | Path | Any | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    quantization: str | None = None,
) -> tuple[BituneModel | PlainModel, Any]:
    """A trained model for generation or scoring, in eval mode on `device`, and its tokenizer.

    The model is a `BituneModel` for a Bitune checkpoint (or a merged export), a `BituneModel` in mode
    "baseline" for a plain PEFT adapter (it reads the prompt causally with the adapter, exactly like the
    `PeftModel` would), and a `bitune.core.plain.PlainModel` for a bare base model.

    Args:
        checkpoint: a folder written by `BituneModel.save_pretrained` (or `bitune export`).
        base_model: the base model (hub id, local folder, or an already loaded model); for a checkpoint it
            defaults to the one the checkpoint records.
        peft_adapter: a plain PEFT adapter folder, applied to `base_model`.
        tokenizer: a tokenizer, or where to load it from; by default the one saved with the checkpoint (or
            adapter), else the base model's.
        device: "auto" (a GPU if there is one), "cpu", "cuda", "cuda:N", "mps".
        dtype: of the base weights when they are loaded here ("auto": the model's own).
        quantization: load the base model k-bit quantized ("4bit", "8bit"; see
            `bitune.core.loading.quantization_config`) or not ("none"); by default as the checkpoint records it
            (a model trained on a 4-bit base is loaded on the same 4-bit base), else in full precision.

    Example:
        >>> model, tokenizer = load_for_inference(checkpoint=checkpoint, device="cpu")  # + its recorded base
        >>> type(model).__name__, model.training, model.device
        ('BituneModel', False, device(type='cpu'))
        >>> model, tokenizer = load_for_inference(base_model=base, device="cpu")  # or a hub id
        >>> type(model).__name__
        'PlainModel'
    """
    if checkpoint is not None and peft_adapter is not None:
        raise BituneInputError("give a Bitune checkpoint or a PEFT adapter, not both")
    if checkpoint is None and base_model is None:
        raise BituneInputError("name the model to load: a Bitune checkpoint, or a base model")
    if peft_adapter is not None and not (Path(peft_adapter) / "adapter_config.json").is_file():
        raise BituneInputError(f"{peft_adapter}: not a PEFT adapter folder (adapter_config.json is missing)")
    target = resolve_device(device)
    dtype = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    loading: dict[str, Any] = {"dtype": dtype, "device": target}
    if check_quantization(quantization) is not None:
        loading["quantization"] = quantization
    source = None
    if tokenizer is None:  # found before the model is loaded, so that a missing one fails fast
        base_name = base_model if isinstance(base_model, (str, Path)) else None
        if base_name is None and checkpoint is not None:
            base_name = recorded_base_model(checkpoint)
        if base_name is None:  # an already loaded base model: where it was loaded from, if anywhere
            base_name = getattr(base_model, "name_or_path", None) or None
        source = tokenizer_source(checkpoint, peft_adapter, base_name)
        if source is None:
            where = checkpoint or peft_adapter or "the base model"
            raise BituneInputError(
                f"no tokenizer: {where} holds none and names no base model; pass the base model or a tokenizer"
            )
    elif isinstance(tokenizer, (str, Path)):
        source = tokenizer

    if checkpoint is not None:
        model = BituneModel.from_pretrained(checkpoint, base_model, **loading)
    else:
        if isinstance(base_model, (str, Path)):
            base_model = load_base_model(base_model, **loading)
        if peft_adapter is not None:
            # Named like Bitune's causal adapter, which mode "baseline" routes every pass through.
            peft_model = PeftModel.from_pretrained(base_model, peft_adapter, adapter_name=CAUSAL_ADAPTER)
            model = BituneModel(peft_model, BituneConfig(mode="baseline"))
        else:
            model = PlainModel(base_model)
    if source is not None:
        tokenizer = load_tokenizer(source)
    if quantization_of(model.base_model) is None:  # a quantized model was loaded onto its device already
        model = model.to(target)
    return model.eval(), tokenizer


__all__ = ["load_for_inference"]
