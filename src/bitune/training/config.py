"""The settings of a training run: one YAML file, plus `--dotted.key value` overrides on the command line.

    model:      {name_or_path: google/gemma-2b}          # hub id or local folder (shorthand: model: ID)
    data:       {path: train.jsonl, max_length: 512}     # bitune.data.samples.DataConfig (shorthand: data: PATH)
    validation: {size: 0.02}                             # held-out samples for the eval loss (optional)
    peft:       {kind: lora, r: 8, alpha: 1}
    bitune:     {mode: bitune}                           # or an ablation: naive_bidir, no_mixing, ...
    training:   {learning_rate: 3.0e-4, max_steps: 3000, batch_size: 10}
    output_dir: runs/gemma-2b-bitune

Every field has the paper's value as its default (see configs/paper_lora.yaml). Unknown keys and
ill-typed values raise `BituneInputError` naming the key and where it came from.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from peft import IA3Config, LoraConfig, PeftConfig
from transformers import SchedulerType, TrainingArguments

from bitune.core.loading import DEVICES, DTYPES, QUANTIZATIONS
from bitune.core.modes import BituneConfig
from bitune.data.samples import DataConfig
from bitune.errors import BituneInputError
from bitune.settings import apply_overrides, build, expand_shorthands, parse_overrides, read_yaml_mapping

PEFT_KINDS = ("lora", "dora", "ia3")
PRECISIONS = ("bf16", "fp16", "fp32")
# The base weights are stored in the precision the run computes in, unless model.dtype says otherwise.
PRECISION_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# A section given a plain value sets its main field: `model: gpt2`, `--data train.jsonl`.
SHORTHANDS = {"model": "name_or_path", "data": "path"}


@dataclass
class ModelSettings:
    """The frozen base model.

    Args:
        name_or_path: a Hugging Face hub id or a local model folder.
        tokenizer: where to load the tokenizer from (default: `name_or_path`).
        dtype: dtype of the frozen base weights: auto (as stored), float32, bfloat16 or float16
            (default: that of `training.precision`).
        attn_implementation: "sdpa" (transformers' default) or "eager" (e.g. Gemma2).
        quantization: "4bit" (NF4, QLoRA-style) or "8bit": load the frozen base k-bit quantized with
            bitsandbytes (GPU, or CPU with bitsandbytes >= 0.46); both adapters and the mixing coefficients train
            in full precision on top. Default: not quantized.
    """

    name_or_path: str | None = None
    tokenizer: str | None = None
    dtype: str | None = None
    attn_implementation: str | None = None
    quantization: str | None = None

    def __post_init__(self) -> None:
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise BituneInputError(
                f"model.quantization {self.quantization!r} is unknown; use one of {', '.join(QUANTIZATIONS)}"
            )
        if self.dtype is not None and self.dtype not in tuple(DTYPES):
            raise BituneInputError(
                f"model.dtype {self.dtype!r} is unknown; use one of {', '.join(tuple(DTYPES))}"
            )


@dataclass
class ValidationSettings:
    """Held-out data for the eval loss: a separate file, or a share of the training samples.

    Args:
        path: a validation file (or a list of sources, as `data.path`), read with the same format, template
            and length limits as `data`.
        size: otherwise hold out this many training samples (or this fraction, if below 1), chosen
            with `data.seed`.
        limit: evaluate on a random `limit` of the validation samples (seeded with `data.seed`), to bound the
            time each evaluation takes; null: all of them.
    """

    path: str | list[str | dict[str, Any]] | None = None
    size: int | float | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.path is not None and self.size is not None:
            raise BituneInputError(
                "validation: set either path (a file) or size (held-out samples), not both"
            )
        if self.limit is not None and self.limit < 1:
            raise BituneInputError(f"validation.limit must be at least 1 (or null), got {self.limit}")


@dataclass
class PeftSettings:
    """The PEFT method of both adapters (the causal θ_c and the bidirectional θ_b).

    Args:
        kind: "lora", "dora" (weight-decomposed LoRA) or "ia3".
        r, alpha, dropout: LoRA/DoRA rank, lora_alpha and lora_dropout (ignored by IA3).
        target_modules: a regular expression matched against full module names, or a list of name
            suffixes; the default ".*_proj" is every *_proj linear layer, as in the paper.
        feedforward_modules: IA3 only: the target modules scaled on their input (default: PEFT's choice
            for the model family).
    """

    kind: str = "lora"
    r: int = 8
    alpha: float = 1.0
    dropout: float = 0.0
    target_modules: str | list[str] | None = ".*_proj"
    feedforward_modules: str | list[str] | None = None

    def __post_init__(self) -> None:
        if self.kind not in PEFT_KINDS:
            raise BituneInputError(f"peft.kind {self.kind!r} is unknown; use one of {', '.join(PEFT_KINDS)}")
        if self.r < 1:
            raise BituneInputError(f"peft.r must be at least 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise BituneInputError(f"peft.dropout must be in [0, 1), got {self.dropout}")
        if self.feedforward_modules is not None and self.kind != "ia3":
            raise BituneInputError("peft.feedforward_modules applies to kind ia3 only; remove it")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise BituneInputError(f"peft.alpha must be a positive number, got {self.alpha}")
        for name in ("target_modules", "feedforward_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as error:
                    raise BituneInputError(
                        f"peft.{name} {value!r} is not a valid regular expression ({error})"
                    ) from None
            elif isinstance(value, list) and not all(value):
                raise BituneInputError(f"peft.{name} must not hold an empty name, got {value!r}")

    def to_peft_config(self) -> PeftConfig:
        """The `peft` config object both adapters are built from."""
        if self.kind == "ia3":
            return IA3Config(target_modules=self.target_modules, feedforward_modules=self.feedforward_modules)
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            use_dora=self.kind == "dora",
        )


@dataclass
class TrainingSettings:
    """Optimisation, precision, evaluation and checkpointing (names follow `transformers.TrainingArguments`).

    Args:
        learning_rate, lr_scheduler_type, warmup_ratio: AdamW's peak learning rate, the schedule ("linear",
            "cosine", "constant_with_warmup", ... any transformers SchedulerType) and the share of
            `max_steps` spent warming up linearly from 0.
        max_steps: optimizer steps (the data is repeated as often as needed).
        batch_size: samples per device per forward; the effective batch is
            batch_size × gradient_accumulation_steps × number of processes.
        eval_batch_size: samples per device per forward when computing the eval loss (default: batch_size).
        gradient_accumulation_steps: forwards per optimizer step; the loss is the mean over the answer
            tokens of all of them, so any split of the effective batch gives the same update.
        max_grad_norm: gradient clipping (0 disables it, and with it the logged grad_norm).
        weight_decay, adam_beta1, adam_beta2, adam_epsilon: AdamW's decoupled weight decay, betas and epsilon.
        precision: "bf16" or "fp16" (mixed precision, fp32 adapters) or "fp32".
        activation_checkpointing: recompute decoder layers in backward (exact; saves activation memory).
        seed: the seed of the fresh adapters, of dropout and of the data order.
        eval_steps, save_steps, logging_steps: every how many optimizer steps to compute the eval loss, write
            a checkpoint and log metrics (0: never; the run always ends with an eval and a final save).
        save_total_limit: keep only the newest N checkpoints (null: all).
        resume_from_checkpoint: a checkpoint folder, or "latest" for the newest complete checkpoint in
            output_dir (starts fresh when there is none). A resume is refused when the settings that define
            the run (model, data, PEFT, Bitune, hyper-parameters; see docs/training.md) differ from the
            checkpoint's.
        force_resume: resume even so: the new settings apply from the checkpoint's step on, and each difference
            is reported (a changed max_steps re-stretches the learning-rate schedule).
        report_to: logging integrations (default: tensorboard when installed); metrics.jsonl is always written.
        trainer_args: further `transformers.TrainingArguments` fields, passed as they are (advanced).
    """

    learning_rate: float = 3e-4
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.1
    max_steps: int = 3000
    batch_size: int = 10
    eval_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    precision: str = "bf16"
    activation_checkpointing: bool = False
    seed: int = 42
    eval_steps: int = 0
    save_steps: int = 500
    save_total_limit: int | None = None
    logging_steps: int = 10
    resume_from_checkpoint: str | None = None
    force_resume: bool = False
    report_to: list[str] | None = None
    trainer_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise BituneInputError(
                f"training.precision {self.precision!r} is unknown; use one of {', '.join(PRECISIONS)}"
            )
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise BituneInputError(f"training.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_steps", "save_steps", "logging_steps"):
            if getattr(self, name) < 0:
                raise BituneInputError(
                    f"training.{name} must be 0 (never) or positive, got {getattr(self, name)}"
                )
        if not 0 <= self.warmup_ratio < 1:
            raise BituneInputError(f"training.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise BituneInputError(
                f"training.learning_rate must be a positive number, got {self.learning_rate}"
            )
        for name in ("max_grad_norm", "weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise BituneInputError(f"training.{name} must be 0 (off) or a positive number, got {value}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise BituneInputError(f"training.{name} must be in [0, 1), got {getattr(self, name)}")
        if not (math.isfinite(self.adam_epsilon) and self.adam_epsilon > 0):
            raise BituneInputError(
                f"training.adam_epsilon must be a positive number, got {self.adam_epsilon}"
            )
        for name in ("eval_batch_size", "save_total_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise BituneInputError(
                    f"training.{name} must be at least 1 (or null), got {getattr(self, name)}"
                )
        schedules = [kind.value for kind in SchedulerType]
        if self.lr_scheduler_type not in schedules:
            raise BituneInputError(
                f"training.lr_scheduler_type {self.lr_scheduler_type!r} is unknown; use one of {', '.join(schedules)}"
            )
        known = {f.name for f in fields(TrainingArguments)}
        for key in self.trainer_args:
            if key not in known:
                raise BituneInputError(
                    f"training.trainer_args.{key} is not a transformers TrainingArguments field; remove it"
                )


@dataclass
class TrainConfig:
    """Everything a training run needs; `load_config` reads it from YAML, `bitune.training.train` runs it.

    Args:
        model, data, validation, peft, bitune, training: the sections (one dataclass each).
        output_dir: the run's folder: train_config.yaml, metrics.jsonl, TensorBoard logs, checkpoint-N, final.
        device: "auto" (a GPU if there is one), "cpu", "cuda" or "mps".

    Example:
        >>> config = TrainConfig.from_dict({"model": "gpt2", "data": "train.jsonl", "output_dir": "runs/a"})
        >>> config.peft.r, config.training.learning_rate, config.bitune.mode
        (8, 0.0003, 'bitune')
    """

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataConfig | None = None
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    peft: PeftSettings = field(default_factory=PeftSettings)
    bitune: BituneConfig = field(default_factory=BituneConfig)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    output_dir: str | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise BituneInputError(f"device {self.device!r} is unknown; use one of {', '.join(DEVICES)}")
        for key, value in (
            ("model.name_or_path", self.model.name_or_path),
            ("data.path", self.data),
            ("output_dir", self.output_dir),
        ):
            if value is None:
                raise BituneInputError(f"{key} is required; set it in the config file or with --{key} VALUE")

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any], source: str = "config") -> TrainConfig:
        """Build a config from plain data (as read from YAML); `source` names it in error messages."""
        return build(cls, expand_shorthands(mapping, SHORTHANDS), source)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def base_dtype(self) -> str:
        """The dtype name the frozen base weights are loaded in."""
        return self.model.dtype or PRECISION_DTYPES[self.training.precision]


def read_config_file(path: Path) -> dict[str, Any]:
    """A training config file as a mapping, shorthands expanded (what `load_config` and an experiment's
    `train: {base: ...}` read)."""
    return expand_shorthands(
        read_yaml_mapping(path, "config file", "sections (model:, data:, ...)"), SHORTHANDS
    )


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config (or start from the defaults) and apply `--dotted.key value` overrides.

    Example:
        >>> config = load_config("configs/paper_lora.yaml", ["--bitune.mode", "baseline"])
        >>> config.model.name_or_path, config.bitune.mode, config.training.max_steps
        ('google/gemma-2b', 'baseline', 3000)
    """
    mapping: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        path = Path(path)
        source = f"{path} (with command-line overrides)" if overrides else str(path)
        mapping = read_config_file(path)
    mapping = apply_overrides(TrainConfig, mapping, overrides, SHORTHANDS)
    return TrainConfig.from_dict(mapping, source)


__all__ = [
    "ModelSettings",
    "PEFT_KINDS",
    "PRECISIONS",
    "PRECISION_DTYPES",
    "PeftSettings",
    "SHORTHANDS",
    "TrainConfig",
    "TrainingSettings",
    "ValidationSettings",
    "load_config",
    "parse_overrides",
    "read_config_file",
]
