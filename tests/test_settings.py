"""Settings files: YAML that is not UTF-8, not YAML, or names a key twice is refused naming the file and line;
any config, however broken, gives a `TrainConfig` or a `BituneInputError` and nothing else (fuzzed)."""

from __future__ import annotations

import math
import tempfile
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bitune.errors import BituneInputError
from bitune.settings import load_yaml, read_yaml_mapping
from bitune.training.config import TrainConfig, load_config


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: a\ntraining:\n  max_steps: 1\ndata: d.jsonl\ntraining:\n  max_steps: 2\n")
    with pytest.raises(
        BituneInputError, match=r"run\.yaml, line 5: key 'training' is given twice \(first on line 2\)"
    ):
        read_yaml_mapping(path, "config file", "sections")
    # Merge keys may still be overridden: that is what they are for.
    assert load_yaml("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  y: 3\n", "s")["other"] == {"x": 1, "y": 3}


def test_not_utf8_not_a_file_and_not_yaml_are_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"model: caf\xe9\n")
    with pytest.raises(
        BituneInputError, match=r"run\.yaml: not UTF-8 text \(byte 10 is 0xe9\); save it as UTF-8"
    ):
        load_config(path)
    with pytest.raises(BituneInputError, match="is a folder, not a config file"):
        load_config(tmp_path)
    path.write_text("model: [a\n")
    with pytest.raises(BituneInputError, match=r"run\.yaml: not valid YAML \(.*line 2"):
        load_config(path)
    path.write_text("seed: 2023-02-30\n")  # a date that does not exist
    with pytest.raises(BituneInputError, match=r"run\.yaml: not valid YAML"):
        load_config(path)


# ----------------------------------------------------------------------------------------------------------
# Fuzzing: a TrainConfig or a BituneInputError, nothing else


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for field in fields(cls):
        hint = typing.get_type_hints(cls)[field.name]
        nested = next((option for option in (*typing.get_args(hint), hint) if is_dataclass(option)), None)
        keys += dotted_keys(nested, f"{prefix}{field.name}.") if nested else [f"{prefix}{field.name}"]
    return keys


KEYS = dotted_keys(TrainConfig)
VALID = {"model": "m", "data": {"path": "d.jsonl"}, "output_dir": "o"}
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(
        ["bf16", "lora", "linear", "auto", "cpu", "plain", "{prompt}", "latest", "1e-3", "nan", "-1"]
    )
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def loads_or_refuses(text: str | bytes, overrides: list[str] = ()) -> TrainConfig | None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        try:
            config = load_config(path, list(overrides))
        except BituneInputError as error:
            assert str(error).startswith((str(path), "command line")), error  # it names where the problem is
            event("refused")
            return None
    event("loaded")
    training = config.training
    assert math.isfinite(training.learning_rate) and training.learning_rate > 0
    assert training.max_steps >= 1 and training.batch_size >= 1 and training.max_grad_norm >= 0
    assert load_config_text(config.to_yaml()) == config  # what a run writes reads back as the same config
    return config


def load_config_text(text: str) -> TrainConfig:
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "copy.yaml").write_text(text)
        return load_config(Path(folder) / "copy.yaml")


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes(content: bytes) -> None:
    loads_or_refuses(content)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(KEYS) | st.text(max_size=8), VALUES), max_size=4))
def test_random_values_at_any_key(edits: list[tuple[str, object]]) -> None:
    config = {section: dict(value) if isinstance(value, dict) else value for section, value in VALID.items()}
    for key, value in edits:
        target = config
        *sections, name = key.split(".")
        for section in sections:
            if not isinstance(target.get(section), dict):
                target[section] = {}
            target = target[section]
        target[name] = value
    loads_or_refuses(yaml.safe_dump(config, allow_unicode=True))


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from(KEYS)
            | st.sampled_from(["model", "data", "training", "peft.x"])
            | st.text(max_size=8),
            st.text(max_size=8)
            | st.sampled_from(["0", "-1", "nan", "inf", "[a, b]", "{x: 1}", "null", "true", "1e-3"]),
        ),
        max_size=4,
    ),
    st.booleans(),
)
def test_random_command_line_overrides(overrides: list[tuple[str, str]], equals: bool) -> None:
    arguments = [
        part for key, value in overrides for part in ([f"--{key}={value}"] if equals else [f"--{key}", value])
    ]
    loads_or_refuses(yaml.safe_dump(VALID), arguments)


LINES = st.sampled_from(
    ["model: m", "data: d.jsonl", "output_dir: o", "training:", "  max_steps: 3", "  max_steps: 0", "peft:",
     "  r: 4", "  r: 4", "  target_modules: [q_proj", "data:", "  path: x", "- a", "  - b", "\t", "base: x.yaml",
     "&a {x: 1}", "<<: *a", "? [a]", "!!python/object:os.system x", "bitune: {mode: bitune, mode: baseline}", "..."]
)  # fmt: skip


@FUZZ
@given(st.lists(LINES, max_size=8))
def test_random_yaml_lines(lines: list[str]) -> None:
    loads_or_refuses("\n".join(lines) + "\n")
