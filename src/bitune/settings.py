"""Reading settings: a YAML file into a mapping, `base:` files underneath it, `--dotted.key VALUE` overrides,
and typed (nested) dataclasses built from the result.

Every settings file of bitune is read here: training configs (`bitune.training.config`), experiment files
(`bitune.experiments.settings`) and task specs (`bitune.evaluation.tasks`). Errors are `BituneInputError`s
that name the file (or the command line) and the key.

Example:
    >>> from bitune.training.config import TrainingSettings
    >>> mapping = apply_overrides(TrainingSettings, {"max_steps": 10}, ["--learning_rate", "1e-3"])
    >>> build(TrainingSettings, mapping, "example").learning_rate
    0.001
"""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from bitune.errors import BituneInputError

BASE_KEY = "base"  # a file's `base:` names the file it extends

# ---------------------------------------------------------------------------------------------- files


def read_yaml_mapping(
    path: Path, description: str, keys: str, *, yes_no_text: bool = False
) -> dict[str, Any]:
    """A YAML (or JSON) file whose top level is a mapping; an empty file is an empty mapping.

    `description` names the kind of file in the error when it is missing ("config file"), `keys` describes the
    mapping expected at the top ("sections (model:, data:, ...)").

    Example:
        >>> read_yaml_mapping(Path("configs/paper_lora.yaml"), "config file", "sections (model:, ...)")["bitune"]["c"]
        0.01
    """
    path = Path(path)
    if path.is_dir():
        raise BituneInputError(f"{path}: is a folder, not a {description}; give the file's path")
    if not path.is_file():
        raise BituneInputError(f"{path}: no such {description}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise BituneInputError(
            f"{path}: not UTF-8 text (byte {error.start} is {error.object[error.start]:#04x}); save it as UTF-8"
        ) from None
    except OSError as error:
        raise BituneInputError(f"{path}: cannot read the {description} ({error.strerror or error})") from None
    loaded = load_yaml(text, str(path), yes_no_text=yes_no_text)
    if loaded is not None and not isinstance(loaded, dict):
        raise BituneInputError(f"{path}: expected a mapping of {keys} at the top")
    return loaded or {}


def load_yaml(text: str, source: str, *, yes_no_text: bool = False) -> Any:
    """YAML (or JSON) text as plain data, refusing a key given twice in one mapping (YAML itself would keep the
    last one silently); `source` names the text in errors.

    Example:
        >>> load_yaml("a: 1\\nb: [2, 3]\\n", "example")
        {'a': 1, 'b': [2, 3]}
        >>> load_yaml("a: 1\\na: 2\\n", "example")
        Traceback (most recent call last):
        bitune.errors.BituneInputError: example, line 2: key 'a' is given twice (first on line 1); keep one
    """
    try:
        # A SafeLoader: plain data only, no Python objects. `yes_no_text`: yes, no, on, off stay text.
        return yaml.load(text, Loader=_YesNoTextLoader if yes_no_text else _StrictLoader)
    except _DuplicateKey as duplicate:
        raise BituneInputError(f"{source}, {duplicate}") from None
    except yaml.YAMLError as error:
        raise BituneInputError(f"{source}: not valid YAML ({' '.join(str(error).split())})") from None
    except (ValueError, OverflowError, RecursionError) as error:  # e.g. a date that does not exist
        raise BituneInputError(f"{source}: not valid YAML ({error})") from None


class _DuplicateKey(Exception):
    pass


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping may not name a key twice (merge keys `<<:` may still be
    overridden)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            lines: dict[str, int] = {}
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key, line = key_node.value, key_node.start_mark.line + 1
                    if key in lines:
                        raise _DuplicateKey(
                            f"line {line}: key '{key}' is given twice (first on line {lines[key]}); keep one"
                        )
                    lines[key] = line
        return super().construct_mapping(node, deep)


class _YesNoTextLoader(_StrictLoader):
    """`_StrictLoader` with YAML 1.2's booleans: only true and false (any case); yes, no, on, off, y, n are text
    (so that `[no, yes]` are two option texts, not two booleans)."""


_YesNoTextLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in _StrictLoader.yaml_implicit_resolvers.items()
}
_YesNoTextLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def read_with_bases(
    path: Path, description: str, keys: str, including: tuple[Path, ...] = ()
) -> tuple[dict[str, Any], list[Path]]:
    """A settings file as a mapping with its `base:` file (and that one's base, ...) merged underneath, and the
    base files it came from (nearest first). The file's keys replace its base's, nested mappings key by key.

    `including`: the files whose base this one is (to refuse cycles).

    Example:
        >>> mapping, bases = read_with_bases(Path("configs/experiments/cpu_synthetic.yaml"), "experiment file", "...")
    """
    path = Path(path)
    mapping = read_yaml_mapping(path, description, keys)
    base = mapping.pop(BASE_KEY, None)
    if base is None:
        return mapping, []
    if not isinstance(base, str):
        raise BituneInputError(f"{path}: base must be the path of another {description}, got {base!r}")
    including = (*including, path.resolve())
    if Path(base).resolve() in including:
        raise BituneInputError(f"{path}: base: {base} is this file or includes it (a cycle)")
    base_mapping, bases = read_with_bases(Path(base), description, keys, including)
    return merged(base_mapping, mapping), [Path(base), *bases]


def merged(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` applied; nested mappings are merged key by key.

    Example:
        >>> merged({"a": {"x": 1, "y": 2}, "b": 1}, {"a": {"y": 3}, "b": None})
        {'a': {'x': 1, 'y': 3}, 'b': None}
    """
    result = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


def expand_shorthands(mapping: Mapping[str, Any], shorthands: Mapping[str, str]) -> dict[str, Any]:
    """A section given a plain value (text or a list) sets its main field: with {"model": "name_or_path"},
    `model: gpt2` is `model: {name_or_path: gpt2}`.

    Example:
        >>> expand_shorthands({"model": "gpt2", "seed": 1}, {"model": "name_or_path"})
        {'model': {'name_or_path': 'gpt2'}, 'seed': 1}
    """
    expanded = dict(mapping)
    for section, main_field in shorthands.items():
        if isinstance(expanded.get(section), (str, list)):  # `data: [a.jsonl, b.jsonl]` too
            expanded[section] = {main_field: expanded[section]}
    return expanded


def plain(data: Any) -> Any:
    """JSON-equal data (tuples become lists), so settings compare equal to a saved copy of them.

    Example:
        >>> plain({"a": (1, 2)})
        {'a': [1, 2]}
    """
    return json.loads(json.dumps(data))


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested mappings.

    Example:
        >>> changed_keys({"a": {"x": 1, "y": 2}}, {"a": {"x": 1, "y": 3}, "b": 0})
        ['a.y', 'b']
    """
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            k
            for key in sorted(set(old) | set(new), key=str)
            for k in changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        ]
    return [] if old == new else [prefix.rstrip(".")]


# ---------------------------------------------------------------------------------------------- overrides


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


def apply_overrides(
    cls: type,
    mapping: Mapping[str, Any],
    arguments: Sequence[str],
    shorthands: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """`mapping` with the `--dotted.key value` arguments set in it; every key is checked against `cls`.

    The values stay text: `build` converts them to the field's type. A section alone (`--model gpt2`) stands
    for its shorthand field (see `expand_shorthands`).
    """
    shorthands = shorthands or {}
    result = expand_shorthands(mapping, shorthands)
    for key, value in parse_overrides(arguments):
        parts = key.split(".")
        _check_key(cls, parts, f"command line (--{key})", shorthands)
        _set_dotted(result, parts, value, shorthands)
    return result


def _check_key(cls: type, parts: list[str], source: str, shorthands: Mapping[str, str]) -> None:
    """Raise unless `parts` names a field of `cls` (a section alone stands for its shorthand field)."""
    if len(parts) == 1 and parts[0] in shorthands:
        return
    hints = typing.get_type_hints(cls)
    name = parts[0]
    if name not in hints:
        raise BituneInputError(f"{source}: unknown key '{name}'; known keys: {', '.join(hints)}")
    nested = _dataclass_in(hints[name])
    if len(parts) > 1:
        if nested is not None:
            _check_key(nested, parts[1:], source, {})
        elif typing.get_origin(_strip_none(hints[name])) is not dict:
            raise BituneInputError(f"{source}: '{name}' has no sub-keys")


def _set_dotted(mapping: dict[str, Any], parts: list[str], value: str, shorthands: Mapping[str, str]) -> None:
    if len(parts) == 1 and parts[0] in shorthands:
        parts = [parts[0], shorthands[parts[0]]]
    for part in parts[:-1]:
        child = mapping.get(part)
        if isinstance(child, (str, list)) and part in shorthands:
            child = {shorthands[part]: child}
        if not isinstance(child, dict):
            child = {}
        mapping[part] = child
        mapping = child
    mapping[parts[-1]] = value


# ---------------------------------------------------------------------------------------------- typed construction


def build(cls: type, mapping: Any, source: str, prefix: str = "") -> Any:
    """An instance of the dataclass `cls` from plain data (nested dataclasses too), every value checked
    against its field's type; text from the command line is parsed as YAML where a non-text value is due.

    `source` names the data in errors ("configs/a.yaml", "command line"); `prefix` is the dotted key of
    `mapping` inside it ("training."). Errors of `cls.__post_init__` get `source` in front.
    """
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
                values[name] = build(hint, mapping[name], source, f"{prefix}{name}.")
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


def _strip_none(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return options[0] if len(options) == 1 else hint
    return hint


def _is_null(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in ("null", "none", "~")


def _parse_yaml(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError):
        return text


__all__ = [
    "BASE_KEY",
    "apply_overrides",
    "build",
    "changed_keys",
    "expand_shorthands",
    "load_yaml",
    "merged",
    "parse_overrides",
    "plain",
    "read_with_bases",
    "read_yaml_mapping",
]
