"""The config key reference (docs/config_reference.md) and the shipped recipes follow the config dataclasses."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bitune.training import load_config
from bitune.training.reference import REFERENCE_FILE, config_keys, main, reference_markdown, undocumented_keys

REPO = Path(__file__).resolve().parents[2]
RECIPES = ("paper_lora", "paper_dora", "paper_ia3")


def flat_keys(mapping: dict, prefix: str = "") -> set[str]:
    """The dotted keys of a config file; a mapping under a key that takes one (trainer_args) is one key."""
    keys = set()
    for key, value in mapping.items():
        if isinstance(value, dict) and value and not prefix:
            keys |= flat_keys(value, f"{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def test_every_config_key_is_documented_and_the_reference_is_current():
    assert undocumented_keys() == []
    assert (REPO / REFERENCE_FILE).read_text(encoding="utf-8") == reference_markdown(), (
        "docs/config_reference.md is out of date: run python -m bitune.training.reference"
    )
    text = reference_markdown()
    for key in config_keys():
        assert f"| `{key.name}` |" in text


def test_the_reference_command_checks_and_writes(tmp_path, capsys):
    target = tmp_path / "reference.md"
    assert main(["--check", str(target)]) == 1
    assert main([str(target)]) == 0 and main(["--check", str(target)]) == 0
    assert target.read_text() == reference_markdown()
    assert "out of date" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_shipped_recipe_sets_every_key(recipe):
    path = REPO / "configs" / f"{recipe}.yaml"
    documented = {key.name for key in config_keys() if not key.name.startswith("data.path[]")}
    assert flat_keys(yaml.safe_load(path.read_text())) == documented
    config = load_config(path)
    assert config.data.empty == "drop"  # the bundled Alpaca sample has rows with empty answers
