"""The Bitune checkpoint format: standard PEFT adapter folders plus the mixing coefficients.

    checkpoint/
      bitune_config.json         base model (a local one by absolute path and by path relative to this folder),
                                 PEFT method, mode, mixing function, c, library version, SHA-256 of the weight files
      bitune_mixer.safetensors   "keys" and "values": the 2·L raw coefficients w (absent without mixing)
      causal/                    θ_c: adapter_config.json + adapter_model.safetensors (a PEFT adapter)
      bidir/                     θ_b, same layout (absent in modes without it)
      tokenizer files            when a tokenizer was given

Everything is safetensors or JSON (no pickle), written atomically. Reading checks what it reads: a missing,
corrupt or changed weight file (its SHA-256 differs from the recorded one), weights that do not fit the base
model, or a config this version cannot read is a `BituneInputError` naming the file. A merged export (`bitune.core.export`) has the
same layout plus the merged base model's own files; its config says `"merged": true` and its base model is the
folder itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import torch
from peft import PeftModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from bitune._version import __version__
from bitune.core.loading import load_base_model, quantization_of
from bitune.core.mixing import Mixer
from bitune.core.modes import BituneConfig
from bitune.errors import BituneError, BituneInputError
from bitune.files import atomic_directory, file_sha256

CONFIG_FILE = "bitune_config.json"
MIXER_FILE = "bitune_mixer.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # inside each adapter folder (PEFT's name)
FORMAT_VERSION = 1
KNOWN_ADAPTERS = ("causal", "bidir")


def save_bitune(model: nn.Module, output_dir: str | Path, tokenizer=None) -> Path:
    """Write `model` to `output_dir` (replaced atomically if it exists)."""
    if model.merged:
        raise BituneError(
            "this model is a merged export (bitune.core.export); copy its folder instead of saving it"
        )
    output_dir = Path(output_dir)
    adapters = list(model.bitune_config.spec.adapters)
    config = describe(model)
    with atomic_directory(output_dir) as staging:
        model.peft_model.save_pretrained(staging, selected_adapters=adapters, safe_serialization=True)
        write_mixer(model, staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_config(staging, {**config, **base_model_relative(config["base_model"], output_dir)})
    return output_dir


def describe(model: nn.Module) -> dict:
    """The content of `bitune_config.json` for `model` (`bitune.core.export` overrides a few fields)."""
    base = model.base_model
    adapters = list(model.bitune_config.spec.adapters)
    return {
        "format": "bitune",
        "format_version": FORMAT_VERSION,
        "bitune_version": __version__,
        "base_model": local_or_hub(base.config._name_or_path),
        "base_model_class": type(base).__name__,
        "peft_type": str(model.peft_model.peft_config[adapters[0]].peft_type.value),
        "adapters": adapters,
        "num_layers": base.config.get_text_config(decoder=True).num_hidden_layers,
        # Restored on load: a model trained with eager attention (e.g. Gemma2's soft-capping) must not
        # come back as sdpa.
        "attn_implementation": base.config._attn_implementation,
        # Restored on load too: a model trained on a k-bit base comes back on the same k-bit base.
        "quantization": quantization_of(base),
        "bitune": model.bitune_config.to_dict(),
    }


def local_or_hub(name_or_path: str | None) -> str | None:
    """A base model's name as a checkpoint records it: a local file or folder by its absolute path (so that the
    checkpoint loads from any working directory), a hub id as it is.

    Example:
        >>> local_or_hub("HuggingFaceTB/SmolLM2-135M")
        'HuggingFaceTB/SmolLM2-135M'
    """
    if not name_or_path:
        return None
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else str(name_or_path)


def base_model_relative(base_model: str | None, folder: str | Path) -> dict:
    """`{"base_model_relative": PATH}`: a local base model's path relative to the checkpoint `folder`, found
    again when both are moved together; empty for a hub id.

    Example:
        >>> base_model_relative("/models/base", "/models/runs/a/final")
        {'base_model_relative': '../../../base'}
    """
    if not base_model or not Path(base_model).is_absolute():
        return {}
    return {"base_model_relative": os.path.relpath(base_model, Path(folder).resolve())}


def write_config(folder: Path, config: dict) -> None:
    """Write `bitune_config.json` into `folder`, with the SHA-256 of the weight files already there."""
    files = [folder / MIXER_FILE, *(folder / name / ADAPTER_WEIGHTS for name in config.get("adapters", []))]
    checksums = {path.relative_to(folder).as_posix(): file_sha256(path) for path in files if path.is_file()}
    (folder / CONFIG_FILE).write_text(json.dumps({**config, "sha256": checksums}, indent=2) + "\n")


def write_mixer(model: nn.Module, folder: Path) -> None:
    """Save the mixing coefficients (if the mode mixes) as float32 safetensors."""
    if model.mixer is not None:
        state = {k: v.detach().float().cpu().contiguous() for k, v in model.mixer.state_dict().items()}
        save_file(state, folder / MIXER_FILE)


def read_config(checkpoint_dir: str | Path) -> dict:
    """The parsed `bitune_config.json` of a checkpoint, with a clear error if it is not one."""
    path = Path(checkpoint_dir) / CONFIG_FILE
    if not Path(checkpoint_dir).is_dir():
        raise BituneInputError(f"{checkpoint_dir}: no such checkpoint folder")
    if not path.is_file():
        raise BituneInputError(f"{checkpoint_dir} is not a Bitune checkpoint: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BituneInputError(f"{path}: not valid JSON ({error}); the checkpoint is damaged") from None
    if not isinstance(config, dict):
        raise BituneInputError(f"{path}: expected a JSON object; the checkpoint is damaged")
    for field in ("adapters", "bitune", "format_version"):
        if field not in config:
            raise BituneInputError(f"{path}: field {field!r} is missing")

    def invalid(field: str, expected: str) -> BituneInputError:
        return BituneInputError(
            f"{path}: field {field!r} must be {expected}, got {config.get(field)!r}; the checkpoint is damaged"
        )

    version = config["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise invalid("format_version", "a positive integer")
    if version > FORMAT_VERSION:
        raise BituneInputError(
            f"{path}: format version {version} is newer than this bitune reads ({FORMAT_VERSION}); upgrade bitune"
        )
    adapters = config["adapters"]
    if not isinstance(adapters, list) or not all(name in KNOWN_ADAPTERS for name in adapters):
        raise invalid("adapters", f"a list of adapter names ({', '.join(KNOWN_ADAPTERS)})")
    if not isinstance(config["bitune"], dict):
        raise invalid("bitune", "a mapping of Bitune settings")
    try:
        BituneConfig(**config["bitune"])
    except (TypeError, BituneInputError) as error:
        raise BituneInputError(f"{path}: field 'bitune': {error}") from None
    layers = config.get("num_layers")
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 1):
        raise invalid("num_layers", "a positive integer")
    for field in ("base_model", "base_model_relative", "attn_implementation"):
        if config.get(field) is not None and not isinstance(config[field], str):
            raise invalid(field, "text")
    if not isinstance(config.get("sha256", {}), dict):
        raise invalid("sha256", "a mapping of file names to checksums")
    return config


def verify_files(checkpoint_dir: str | Path, config: dict | None = None) -> None:
    """Check every weight file whose SHA-256 the checkpoint records (absent in checkpoints of older versions).

    A file that is gone, or whose bytes changed (a bit flipped on disk, a partial copy), is a
    `BituneInputError` naming it.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config = read_config(checkpoint_dir) if config is None else config
    for name, expected in config.get("sha256", {}).items():
        path = checkpoint_dir / name
        if not path.is_file():
            raise BituneInputError(f"{path}: missing; the checkpoint is incomplete, copy it again")
        if file_sha256(path) != expected:
            raise BituneInputError(
                f"{path}: the file is corrupt (its SHA-256 differs from the one in {CONFIG_FILE}); restore the "
                "checkpoint from a good copy"
            )


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing, unreadable or non-finite one is a `BituneInputError`."""
    path = Path(path)
    if not path.is_file():
        raise BituneInputError(f"{path}: missing; the checkpoint is incomplete")
    try:
        weights = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise BituneInputError(
            f"{path}: not a readable safetensors file ({error}); the file is corrupt"
        ) from None
    for key, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise BituneInputError(f"{path}: {key} holds NaN or infinite values; the file is corrupt")
    return weights


def recorded_base_model(checkpoint_dir: str | Path) -> str | None:
    """Where the checkpoint's base model comes from: its recorded id/path, or the folder itself for a merged
    export; None when it was built from a config object."""
    return base_model_location(checkpoint_dir, read_config(checkpoint_dir))


def base_model_location(checkpoint_dir: str | Path, config: dict) -> str | None:
    """Where to load the base model that `config` (the checkpoint's `bitune_config.json`) records: a hub id as
    it is; a local path where it was (absolute), else relative to the checkpoint; a merged export: the folder.

    A local base model found in neither place is a `BituneInputError` at once, never a hub lookup.
    """
    if config.get("merged", False):
        return str(checkpoint_dir)
    recorded, relative = config.get("base_model"), config.get("base_model_relative")
    if not recorded:
        return None
    beside = Path(checkpoint_dir).resolve() / relative if relative else None
    if Path(recorded).is_absolute():
        if Path(recorded).exists():
            return recorded
        if beside is not None and beside.exists():
            return str(beside)
        raise BituneInputError(
            f"{Path(checkpoint_dir) / CONFIG_FILE}: the base model {recorded} is gone"
            f"{f' (nor is it at {beside})' if beside is not None else ''}; pass the base model it was trained "
            "on (--base-model PATH, or base_model=)"
        )
    return recorded  # a hub id (or a relative path recorded by an older version)


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
        base_model = base_model_location(checkpoint_dir, config)
        if not base_model:
            raise BituneInputError(
                f"{checkpoint_dir / CONFIG_FILE} names no base model (it was built from a config object); "
                "pass base_model= explicitly"
            )
    # The checkpoint's own files are checked before the (slow) base model is loaded.
    adapters = config["adapters"]
    for name in adapters:
        folder = checkpoint_dir / name
        if not (folder / ADAPTER_WEIGHTS).is_file():
            raise BituneInputError(
                f"{folder}: {ADAPTER_WEIGHTS} is missing (bitune loads adapters from safetensors only)"
            )
    verify_files(checkpoint_dir, config)
    for name in adapters:
        load_weights(checkpoint_dir / name / ADAPTER_WEIGHTS)
    bitune_config = BituneConfig(**config["bitune"])
    mixer_state = load_weights(checkpoint_dir / MIXER_FILE) if bitune_config.spec.mixed else None

    if isinstance(base_model, (str, Path)):
        if config.get("attn_implementation"):
            from_pretrained_kwargs.setdefault("attn_implementation", config["attn_implementation"])
        if config.get("quantization"):
            from_pretrained_kwargs.setdefault("quantization", config["quantization"])
        base_model = load_base_model(base_model, **from_pretrained_kwargs)
    base_model.requires_grad_(False)
    base_name = base_model.config._name_or_path or type(base_model).__name__
    layers = base_model.config.get_text_config(decoder=True).num_hidden_layers
    if config.get("num_layers") is not None and config["num_layers"] != layers:
        raise BituneInputError(
            f"{checkpoint_dir}: trained on a base model with {config['num_layers']} layers, but {base_name} has "
            f"{layers}; load it on the base model it was trained on"
        )

    try:
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
    except BituneInputError:
        raise
    except (RuntimeError, ValueError, TypeError, KeyError, OSError, SafetensorError) as error:
        raise BituneInputError(
            f"{checkpoint_dir}: its adapters do not fit the base model {base_name} ({_first_line(error)}); load "
            "it on the base model it was trained on"
        ) from None

    mixer = None
    if mixer_state is not None:
        mixer = Mixer(layers, c=bitune_config.c, function=bitune_config.mixing)
        try:
            mixer.load_state_dict(mixer_state)
        except RuntimeError as error:
            raise BituneInputError(
                f"{checkpoint_dir / MIXER_FILE}: does not fit the model ({_first_line(error)}); the checkpoint is "
                "damaged"
            ) from None
        mixer.to(base_model.device).requires_grad_(is_trainable)
    return Loaded(peft_model, bitune_config, mixer, merged)


def _first_line(error: BaseException) -> str:
    """The gist of a library error: its first non-empty line after the heading, shortened."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = (
        lines[1]
        if len(lines) > 1 and lines[0].endswith(":")
        else (lines[0] if lines else type(error).__name__)
    )
    return text if len(text) <= 300 else text[:297] + "..."


def load_mixer_state(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The raw mixing coefficients of a checkpoint (for reports and plots)."""
    return load_weights(Path(checkpoint_dir) / MIXER_FILE)
