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

import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from peft import IA3Config, LoraConfig, PeftConfig

from bitune.core.modes import BituneConfig
from bitune.data.samples import DataConfig
from bitune.errors import BituneInputError

PEFT_KINDS = ("lora", "dora", "ia3")
PRECISIONS = ("bf16", "fp16", "fp32")
DEVICES = ("auto", "cpu", "cuda", "mps")
BASE_DTYPES = ("auto", "float32", "bfloat16", "float16")
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
    """

    name_or_path: str | None = None
    tokenizer: str | None = None
    dtype: str | None = None
    attn_implementation: str | None = None

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in BASE_DTYPES:
            raise BituneInputError(
                f"model.dtype {self.dtype!r} is unknown; use one of {', '.join(BASE_DTYPES)}"
            )


@dataclass
class ValidationSettings:
    """Held-out data for the eval loss: a separate file, or a share of the training samples.

    Args:
        path: a validation file, read with the same format, template and limits as `data`.
        size: otherwise hold out this many training samples (or this fraction, if below 1), chosen
            with `data.seed`.
    """

    path: str | None = None
    size: int | float | None = None

    def __post_init__(self) -> None:
        if self.path is not None and self.size is not None:
            raise BituneInputError(
                "validation: set either path (a file) or size (held-out samples), not both"
            )


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
        max_grad_norm: gradient clipping (0 disables it, and with it the logged grad_norm).
        precision: "bf16" or "fp16" (mixed precision, fp32 adapters) or "fp32".
        activation_checkpointing: recompute decoder layers in backward (exact; saves activation memory).
        eval_steps, save_steps, logging_steps: every how many optimizer steps to compute the eval loss, write
            a checkpoint and log metrics (0: never; the run always ends with an eval and a final save).
        save_total_limit: keep only the newest N checkpoints (null: all).
        resume_from_checkpoint: a checkpoint folder, or "latest" for the newest complete checkpoint in
            output_dir (starts fresh when there is none).
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


@dataclass
class TrainConfig:
    """Everything a training run needs; `load_config` reads it from YAML, `bitune.training.train` runs it.

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
        return _build(cls, _expand_shorthands(mapping), "", source)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def base_dtype(self) -> str:
        """The dtype name the frozen base weights are loaded in."""
        return self.model.dtype or PRECISION_DTYPES[self.training.precision]


def read_yaml_mapping(path: Path, description: str, sections: str) -> dict[str, Any]:
    """A YAML file whose top level maps section names to settings; an empty file is an empty mapping.

    `description` names the file in the error when it is missing ("config file"), `sections` gives examples of
    the sections expected at the top ("model:, data:, ...").

    Example:
        >>> read_yaml_mapping(Path("configs/paper_lora.yaml"), "config file", "model:, data:, ...")["bitune"]["c"]
        0.01
    """
    if not path.is_file():
        raise BituneInputError(f"{path}: no such {description}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise BituneInputError(f"{path}: not valid YAML ({error})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise BituneInputError(f"{path}: expected a mapping of sections ({sections}) at the top")
    return loaded or {}


def read_config_file(path: Path) -> dict[str, Any]:
    """A training config file as a mapping, shorthands expanded (what `load_config` and `train.base` read)."""
    return _expand_shorthands(read_yaml_mapping(path, "config file", "model:, data:, ..."))


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config (or start from the defaults) and apply `--dotted.key value` overrides.

    Example:
        >>> config = load_config("configs/paper_lora.yaml", ["--bitune.mode", "baseline"])  # doctest: +SKIP
    """
    mapping: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        path = Path(path)
        source = f"{path} (with command-line overrides)" if overrides else str(path)
        mapping = read_config_file(path)
    for key, value in parse_overrides(overrides):
        _check_key(TrainConfig, key.split("."), f"command line (--{key})")
        _set_dotted(mapping, key.split("."), value)
    return TrainConfig.from_dict(mapping, source)


def parse_overrides(arguments: Sequence[str]) -> list[tuple[str, str]]:
    """Pair up `--key value` / `--key=value` arguments; a `--flag` followed by another flag means true.

    Example:
        >>> parse_overrides(["--training.max_steps", "10", "--training.activation_checkpointing"])
        [('training.max_steps', '10'), ('training.activation_checkpointing', 'true')]
    """
    pairs, index = [], 0
    while index < len(arguments):
        argument = arguments[index]
        if not argument.startswith("--") or len(argument) == 2:
            raise BituneInputError(
                f"command line: expected --key value (e.g. --training.learning_rate 1e-4), got {argument!r}"
            )
        key, equals, value = argument[2:].partition("=")
        if not equals:
            following = arguments[index + 1] if index + 1 < len(arguments) else None
            if following is None or following.startswith("--"):
                value = "true"
            else:
                value, index = following, index + 1
        pairs.append((key, value))
        index += 1
    return pairs


# ----------------------------------------------------------------------------------------------------------
# Typed construction from plain data


def _build(cls: type, mapping: Any, prefix: str, source: str) -> Any:
    if not isinstance(mapping, Mapping):
        raise BituneInputError(
            f"{source}: {prefix.rstrip('.') or 'the file'} must be a mapping of keys to values"
        )
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    for key in mapping:
        if key not in known:
            raise BituneInputError(
                f"{source}: unknown key '{prefix}{key}'; known keys{' in ' + prefix.rstrip('.') if prefix else ''}: "
                f"{', '.join(known)}"
            )
    values = {}
    for name in known:
        if name in mapping:
            hint = _dataclass_in(hints[name])
            if hint is not None and mapping[name] is not None:
                values[name] = _build(hint, mapping[name], f"{prefix}{name}.", source)
            else:
                values[name] = _convert(mapping[name], hints[name], f"{prefix}{name}", source)
    try:
        return cls(**values)
    except TypeError as error:  # a required field is missing
        missing = [f.name for f in fields(cls) if f.name not in values]
        raise BituneInputError(
            f"{source}: {prefix}{missing[0] if missing else ''} is required ({error})"
        ) from None
    except BituneInputError as error:
        raise BituneInputError(f"{source}: {error}") from None


def _convert(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check `value` against a type hint; command-line strings are parsed as YAML where a non-string is due."""
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin is typing.Literal:
        if value in arguments:
            return value
        raise BituneInputError(
            f"{source}: {key} must be one of {', '.join(map(str, arguments))}, got {value!r}"
        )
    if origin in (typing.Union, types.UnionType):
        if type(None) in arguments and (value is None or _is_null(value)):
            return None
        options = [a for a in arguments if a is not type(None)]
        if isinstance(value, str) and isinstance(_parse_yaml(value), list):  # "[a, b]" on the command line
            options.sort(key=lambda option: typing.get_origin(option) is not list)
        for option in options:
            try:
                return _convert(value, option, key, source)
            except BituneInputError:
                continue
        raise _type_error(value, hint, key, source)
    if hint is str:
        if isinstance(value, str):
            return value
        raise _type_error(value, hint, key, source)
    if isinstance(value, str):
        value = _parse_yaml(value)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as text
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [_convert(item, arguments[0], key, source) for item in items]
    if origin is dict and isinstance(value, Mapping):
        return {str(k): _convert(v, arguments[1], f"{key}.{k}", source) for k, v in value.items()}
    raise _type_error(value, hint, key, source)


def _type_error(value: Any, hint: Any, key: str, source: str) -> BituneInputError:
    return BituneInputError(f"{source}: {key} must be {_describe(hint)}, got {value!r}")


def _describe(hint: Any) -> str:
    """A type hint in words, for error messages."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(hint))
    names = {int: "an integer", float: "a number", bool: "true or false", str: "text", type(None): "null"}
    if hint in names:
        return names[hint]
    return {list: "a list", dict: "a mapping"}.get(typing.get_origin(hint), str(hint))


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field holds (also through `X | None`), or None."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return next((o for o in options if is_dataclass(o)), None)


def _is_null(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in ("null", "none", "~")


def _parse_yaml(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _expand_shorthands(mapping: Mapping[str, Any]) -> dict[str, Any]:
    expanded = dict(mapping)
    for section, main_field in SHORTHANDS.items():
        if isinstance(expanded.get(section), str):
            expanded[section] = {main_field: expanded[section]}
    return expanded


def _check_key(cls: type, parts: list[str], source: str) -> None:
    """Raise unless `parts` names a field of `cls` (a section alone stands for its shorthand field)."""
    if len(parts) == 1 and parts[0] in SHORTHANDS:
        return
    hints = typing.get_type_hints(cls)
    name = parts[0]
    if name not in hints:
        raise BituneInputError(f"{source}: unknown key '{name}'; known keys: {', '.join(hints)}")
    nested = _dataclass_in(hints[name])
    if len(parts) > 1:
        if nested is not None:
            _check_key(nested, parts[1:], source)
        elif typing.get_origin(_strip_none(hints[name])) is not dict:
            raise BituneInputError(f"{source}: '{name}' has no sub-keys")


def _strip_none(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return options[0] if len(options) == 1 else hint
    return hint


def _set_dotted(mapping: dict[str, Any], parts: list[str], value: str) -> None:
    if len(parts) == 1 and parts[0] in SHORTHANDS:
        parts = [parts[0], SHORTHANDS[parts[0]]]
    for part in parts[:-1]:
        child = mapping.get(part)
        if isinstance(child, str) and part in SHORTHANDS:
            child = {SHORTHANDS[part]: child}
        if not isinstance(child, dict):
            child = {}
        mapping[part] = child
        mapping = child
    mapping[parts[-1]] = value
