"""The Bitune checkpoint format: standard PEFT adapter folders plus the mixing coefficients.

    checkpoint/
      bitune_config.json         base model, PEFT method, mode, mixing function, c, library version
      bitune_mixer.safetensors   "keys" and "values": the 2·L raw coefficients w (absent without mixing)
      causal/                    θ_c: adapter_config.json + adapter_model.safetensors (a PEFT adapter)
      bidir/                     θ_b, same layout (absent in modes without it)
      tokenizer files            when a tokenizer was given

Everything is safetensors or JSON (no pickle), written atomically. A merged export (`bitune.core.export`) has the
same layout plus the merged base model's own files; its config says `"merged": true` and its base model is the
folder itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from bitune._version import __version__
from bitune.core.loading import load_base_model
from bitune.core.mixing import Mixer
from bitune.core.modes import BituneConfig
from bitune.errors import BituneError, BituneInputError
from bitune.files import atomic_directory

if TYPE_CHECKING:
    from bitune.core.model import BituneModel

CONFIG_FILE = "bitune_config.json"
MIXER_FILE = "bitune_mixer.safetensors"
FORMAT_VERSION = 1


def save_bitune(model: BituneModel, output_dir: str | Path, tokenizer=None) -> Path:
    """Write `model` to `output_dir` (replaced atomically if it exists)."""
    if model.merged:
        raise BituneError(
            "this model is a merged export (bitune.core.export); copy its folder instead of saving it"
        )
    output_dir = Path(output_dir)
    adapters = list(model.bitune_config.spec.adapters)
    with atomic_directory(output_dir) as staging:
        model.peft_model.save_pretrained(staging, selected_adapters=adapters, safe_serialization=True)
        write_mixer(model, staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_config(staging, describe(model))
    return output_dir


def describe(model: BituneModel) -> dict:
    """The content of `bitune_config.json` for `model` (`bitune.core.export` overrides a few fields)."""
    base = model.base_model
    adapters = list(model.bitune_config.spec.adapters)
    return {
        "format": "bitune",
        "format_version": FORMAT_VERSION,
        "bitune_version": __version__,
        "base_model": base.config._name_or_path or None,
        "base_model_class": type(base).__name__,
        "peft_type": str(model.peft_model.peft_config[adapters[0]].peft_type.value),
        "adapters": adapters,
        "num_layers": base.config.get_text_config(decoder=True).num_hidden_layers,
        # Restored on load: a model trained with eager attention (e.g. Gemma2's soft-capping) must not
        # come back as sdpa.
        "attn_implementation": base.config._attn_implementation,
        "bitune": model.bitune_config.to_dict(),
    }


def write_config(folder: Path, config: dict) -> None:
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def write_mixer(model: BituneModel, folder: Path) -> None:
    """Save the mixing coefficients (if the mode mixes) as float32 safetensors."""
    if model.mixer is not None:
        state = {k: v.detach().float().cpu().contiguous() for k, v in model.mixer.state_dict().items()}
        save_file(state, folder / MIXER_FILE)


def read_config(checkpoint_dir: str | Path) -> dict:
    """The parsed `bitune_config.json` of a checkpoint, with a clear error if it is not one."""
    path = Path(checkpoint_dir) / CONFIG_FILE
    if not path.is_file():
        raise BituneInputError(f"{checkpoint_dir} is not a Bitune checkpoint: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BituneInputError(f"{path}: not valid JSON ({error})") from error
    for field in ("adapters", "bitune", "format_version"):
        if field not in config:
            raise BituneInputError(f"{path}: field {field!r} is missing")
    if config["format_version"] > FORMAT_VERSION:
        raise BituneInputError(
            f"{path}: format version {config['format_version']} is newer than this bitune reads "
            f"({FORMAT_VERSION}); upgrade bitune"
        )
    return config


def recorded_base_model(checkpoint_dir: str | Path) -> str | None:
    """Where the checkpoint's base model comes from: its recorded id/path, or the folder itself for a merged
    export; None when it was built from a config object."""
    config = read_config(checkpoint_dir)
    return str(checkpoint_dir) if config.get("merged", False) else config.get("base_model")


class Loaded(NamedTuple):
    """The parts of a saved model, as `BituneModel(*loaded)` takes them."""

    peft_model: PeftModel | PreTrainedModel
    bitune_config: BituneConfig
    mixer: Mixer | None
    merged: bool


def load_parts(
    checkpoint_dir: str | Path,
    base_model: PreTrainedModel | str | None = None,
    *,
    is_trainable: bool = False,
    **from_pretrained_kwargs,
) -> Loaded:
    """The adapters (on the base model from the checkpoint unless given), config and mixing coefficients."""
    checkpoint_dir = Path(checkpoint_dir)
    config = read_config(checkpoint_dir)
    merged = config.get("merged", False)
    if merged:
        if base_model is not None:
            raise BituneInputError(
                f"{checkpoint_dir} is a merged export that carries its own base weights; load it without "
                "base_model (pass loading options such as dtype as keyword arguments)"
            )
        if is_trainable:
            raise BituneInputError(
                f"{checkpoint_dir} is a merged export, for inference only; "
                "train from the checkpoint it was exported from"
            )
        base_model = checkpoint_dir
    elif base_model is None:
        base_model = config.get("base_model")
        if not base_model:
            raise BituneInputError(
                f"{checkpoint_dir / CONFIG_FILE} names no base model (it was built from a config object); "
                "pass base_model= explicitly"
            )
    if isinstance(base_model, (str, Path)):
        if config.get("attn_implementation"):
            from_pretrained_kwargs.setdefault("attn_implementation", config["attn_implementation"])
        base_model = load_base_model(base_model, **from_pretrained_kwargs)
    base_model.requires_grad_(False)

    adapters = config["adapters"]
    for name in adapters:
        folder = checkpoint_dir / name
        if not (folder / "adapter_model.safetensors").is_file():
            raise BituneInputError(
                f"{folder}: adapter_model.safetensors is missing (bitune loads adapters from safetensors only)"
            )
    if adapters:
        peft_model = PeftModel.from_pretrained(
            base_model, checkpoint_dir / adapters[0], adapter_name=adapters[0], is_trainable=is_trainable
        )
        for name in adapters[1:]:
            peft_model.load_adapter(checkpoint_dir / name, adapter_name=name, is_trainable=is_trainable)
        if is_trainable:
            peft_model.set_requires_grad(adapters, True)
    else:  # a merged export of a mode without θ_b: the merged base model is the whole model
        peft_model = base_model

    bitune_config = BituneConfig(**config["bitune"])
    mixer = None
    if bitune_config.spec.mixed:
        mixer = Mixer(config["num_layers"], c=bitune_config.c, function=bitune_config.mixing)
        mixer.load_state_dict(load_file(checkpoint_dir / MIXER_FILE))
        mixer.to(base_model.device).requires_grad_(is_trainable)
    return Loaded(peft_model, bitune_config, mixer, merged)


def load_mixer_state(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The raw mixing coefficients of a checkpoint (for reports and plots)."""
    return load_file(Path(checkpoint_dir) / MIXER_FILE)
