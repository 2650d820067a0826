"""Merged export for serving: θ_c folded into the base weights, so decoding runs at the base model's speed.

A Bitune model runs its causal passes (the causal prompt pass, the answer, every decoding step) with θ_c and
its bidirectional prompt pass with θ_b. With LoRA both are low-rank updates of the same weight W, so

    causal:  W + s_c·B_c·A_c  =  W'                                        (merged once: plain weights)
    bidir:   W + s_b·B_b·A_b  =  W' + [s_b·B_b | −s_c·B_c]·[A_b; A_c]    (a rank-(r_b + r_c) LoRA, scaling 1)

The export stores W' as an ordinary model and, in the modes that have θ_b, that one LoRA, whose layers the
loaded `BituneModel` plugs in for the bidirectional prefill only: every other pass and every decoding step
runs the plain model, at its speed. In the modes without θ_b (naive_bidir, shared_weights, baseline) every
pass runs θ_c, so the export has no adapter at all. The layout is a Bitune checkpoint (`bitune.core.checkpoint`) plus the
merged model's own files; `BituneModel.from_pretrained(folder)` loads it, and so does
`AutoModelForCausalLM.from_pretrained(folder)` (the causal model alone: the baseline mode's fine-tuned model).

    export/
      config.json, generation_config.json, model.safetensors     W' (θ_c merged)
      bidir/                                                     the rank-(r_b + r_c) LoRA, in modes with θ_b
      bitune_config.json ("merged": true), bitune_mixer.safetensors, tokenizer files

Only plain LoRA on linear layers can be exported this way; DoRA, IA3 and the other methods are refused.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, PeftType
from peft.tuners import lora
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file

from bitune.core.checkpoint import describe, local_or_hub, write_config, write_mixer
from bitune.core.loading import quantization_of
from bitune.core.modes import BIDIR_ADAPTER, CAUSAL_ADAPTER
from bitune.errors import BituneError, BituneInputError
from bitune.files import atomic_directory

if TYPE_CHECKING:
    from bitune.core.model import BituneModel


@torch.no_grad()
def export_merged(
    model: BituneModel,
    output_dir: str | Path,
    tokenizer=None,
    *,
    overwrite: bool = False,
    source: str | Path | None = None,
) -> Path:
    """Write `model` with θ_c merged into the base weights to `output_dir` (atomically); `model` is unchanged.

    `output_dir` must be new or empty, unless `overwrite` (then what it holds is replaced); it may never be,
    hold or lie inside `source` (the checkpoint `model` was loaded from) or the local base model's folder,
    which the export would destroy (`BituneInputError`).

    The exported model computes the same outputs as `model` (up to the rounding of the merge, done in float32
    and stored in the base weights' dtype) and decodes with the bare merged weights. Needs CPU memory for one
    copy of the adapted weights. Raises `BituneError` for anything but plain LoRA (see `check_exportable`).

    Example:
        >>> from peft import LoraConfig
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from bitune import BituneModel
        >>> base = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
        >>> model = BituneModel.from_base(base, LoraConfig(r=4, target_modules="all-linear"))
        >>> folder = export_merged(model, "/tmp/bitune-export-example", overwrite=True)
        >>> BituneModel.from_pretrained(folder).merged
        True
    """
    layers = check_exportable(model)
    base = model.base_model
    check_export_folder(output_dir, overwrite, [source, local_or_hub(base.config._name_or_path)])
    has_bidir = BIDIR_ADAPTER in model.bitune_config.spec.adapters
    config = {
        **describe(model),
        "base_model": ".",  # this folder: `bitune.core.checkpoint` loads merged exports from themselves
        "merged": True,
        "merged_from": local_or_hub(base.config._name_or_path),
        "adapters": [BIDIR_ADAPTER] if has_bidir else [],
    }
    output_dir = Path(output_dir)
    with atomic_directory(output_dir) as staging:
        base.save_pretrained(staging, state_dict=_merged_state_dict(base, layers))
        if has_bidir:
            adapter_config, weights = _bidir_relative_to_merged(
                layers, model.peft_model.peft_config[BIDIR_ADAPTER]
            )
            adapter_config.save_pretrained(staging / BIDIR_ADAPTER)
            save_file(weights, staging / BIDIR_ADAPTER / SAFETENSORS_WEIGHTS_NAME, metadata={"format": "pt"})
        write_mixer(model, staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_config(staging, config)
    return output_dir


def check_export_folder(output_dir: str | Path, overwrite: bool, protected: list[str | Path | None]) -> None:
    """Raise a `BituneInputError` unless `output_dir` may be (re)written: new or empty (or `overwrite`), and
    neither one of the `protected` folders, nor inside one, nor holding one."""
    output = Path(output_dir).resolve()
    for folder in protected:
        if folder is None or not Path(folder).exists():
            continue  # a hub id, or nothing
        kept = Path(folder).resolve()
        if output == kept or output in kept.parents or kept in output.parents:
            raise BituneInputError(
                f"cannot export into {output_dir}: it is, holds or lies inside {folder}, which the export reads "
                "from and would destroy; choose another folder"
            )
    if output.exists() and not output.is_dir():
        raise BituneInputError(f"cannot export into {output_dir}: it is a file; choose a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise BituneInputError(
            f"cannot export into {output_dir}: the folder is not empty and everything in it would be replaced; "
            "choose a new folder, or pass --overwrite (overwrite=True) to replace it"
        )


# LoraConfig settings that make an adapter more than a low-rank update of linear weights, and why.
_NOT_MERGEABLE = {
    "use_dora": "DoRA rescales each column of W + ΔW by a trained magnitude over its norm, so θ_b is no "
    "low-rank update of the merged weights",
    "bias": "it trains base-model biases outside the adapters",
    "lora_bias": "it adds a trained bias to each adapter",
    "modules_to_save": "it trains a full copy of modules per adapter, which no LoRA can express",
    "trainable_token_indices": "it trains embedding rows per adapter, which no LoRA can express",
    "layer_replication": "replicated layers share base weights, so merging θ_c into one changes the others",
}


def check_exportable(model: BituneModel) -> dict[str, lora.Linear]:
    """Raise a `BituneError` saying why unless `model` merges exactly; returns its LoRA layers by name."""
    if model.merged:
        raise BituneError("this model is already a merged export")
    quantization = quantization_of(model.base_model)
    if quantization is not None:
        raise BituneError(
            f"the base model is {quantization}-quantized: merging θ_c into quantized weights would round it "
            "away. Export the checkpoint on the full-precision base instead (`bitune export --quantization "
            'none`, or BituneModel.from_pretrained(checkpoint, quantization="none")); the merged model then '
            "computes with full-precision base weights, as QLoRA merges do"
        )
    for name, config in model.peft_model.peft_config.items():
        if config.peft_type != PeftType.LORA:
            raise BituneError(
                f"adapter {name!r} is {config.peft_type.value}: the merged export supports LoRA only, whose "
                "adapters are low-rank weight updates that can be re-expressed relative to each other"
            )
        for field, reason in _NOT_MERGEABLE.items():
            value = getattr(config, field)
            if value and value != "none":
                raise BituneError(
                    f"adapter {name!r} cannot be exported merged with {field}={value!r}: {reason}"
                )

    base = model.base_model
    layers = {name: module for name, module in base.named_modules() if isinstance(module, BaseTunerLayer)}
    uses = Counter(p.data_ptr() for _, p in base.named_parameters(remove_duplicate=False))
    for name, layer in layers.items():
        if type(layer) is not lora.Linear:
            raise BituneError(
                f"{name} is a {type(layer).__name__}: the merged export supports LoRA on (unquantized) "
                "linear layers only; exclude this module from target_modules"
            )
        variants = [type(layer.lora_variant[a]).__name__ for a in layer.lora_A if a in layer.lora_variant]
        if variants:
            raise BituneError(
                f"{name} uses the LoRA variant {variants[0]}, which is no plain low-rank update; "
                "only plain LoRA is exported merged"
            )
        if layer.merged:
            raise BituneError(f"{name} has an adapter merged into its weights; call unmerge_adapter() first")
        if uses[layer.get_base_layer().weight.data_ptr()] > 1:
            raise BituneError(
                f"the weight of {name} is shared with another module (tied weights): merging θ_c into it "
                "would change that module too; exclude it from target_modules"
            )
    return layers


def _merged_state_dict(base: torch.nn.Module, layers: dict[str, lora.Linear]) -> dict[str, torch.Tensor]:
    """The base model's state dict under its own names (no PEFT wrappers), with θ_c added to the weights."""
    wrapped = tuple(f"{name}." for name in layers)
    state = {key: value for key, value in base.state_dict().items() if not key.startswith(wrapped)}
    for name, layer in layers.items():
        linear = layer.get_base_layer()
        state.update({f"{name}.{key}": value for key, value in linear.state_dict().items()})
        if CAUSAL_ADAPTER in layer.lora_A:
            delta = layer.get_delta_weight(CAUSAL_ADAPTER)  # scaling and fan_in_fan_out included
            merged = linear.weight.float() + delta.float()
            state[f"{name}.weight"] = merged.to("cpu", linear.weight.dtype)  # the copy goes to CPU memory
    return state


def _bidir_relative_to_merged(
    layers: dict[str, lora.Linear], bidir_config: LoraConfig
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """θ_b − θ_c per layer as one LoRA, A = [A_b; A_c] and B = [s_b·B_b | −s_c·B_c], in PEFT's file format."""
    weights, ranks = {}, {}
    for name, layer in layers.items():
        parts = [
            (layer.lora_A[adapter].weight, sign * layer.scaling[adapter] * layer.lora_B[adapter].weight)
            for adapter, sign in ((BIDIR_ADAPTER, 1.0), (CAUSAL_ADAPTER, -1.0))
            if adapter in layer.lora_A
        ]
        lora_a = torch.cat([a for a, _ in parts], dim=0)
        lora_b = torch.cat([b for _, b in parts], dim=1)
        weights[f"base_model.model.{name}.lora_A.weight"] = lora_a.detach().cpu().contiguous()
        weights[f"base_model.model.{name}.lora_B.weight"] = lora_b.detach().cpu().contiguous()
        ranks[name] = lora_a.shape[0]
    # Scaling 1 everywhere (lora_alpha = r, no rsLoRA): the scalings are already folded into B.
    rank = Counter(ranks.values()).most_common(1)[0][0]
    other_ranks = {name: r for name, r in ranks.items() if r != rank}
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        rank_pattern=other_ranks,
        alpha_pattern=other_ranks,
        target_modules=sorted(layers),
        fan_in_fan_out=bidir_config.fan_in_fan_out,
        task_type=bidir_config.task_type,
        inference_mode=True,
    )
    return config, weights
