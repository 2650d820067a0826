"""Save → load rebuilds the exact model; the format is safetensors + JSON only."""

from __future__ import annotations

import json

import pytest
import torch
from peft import IA3Config, LoraConfig
from tiny_models import tiny_model

from bitune import BituneConfig, BituneInputError, BituneModel, collate
from bitune.core.checkpoint import CONFIG_FILE, MIXER_FILE

PROMPTS = [[1, 5, 6, 7, 8, 9, 10], [1, 11, 12]]
ANSWERS = [[20, 21, 2], [22, 2]]


def trained(mode: str = "bitune", peft=None) -> BituneModel:
    peft = peft or LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    model = BituneModel.from_base(tiny_model("llama"), peft, BituneConfig(mode=mode, mixing="relu", c=0.02))
    with torch.no_grad():  # move everything off its initial value, as training would
        for param in model.trainable_parameters().values():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


@pytest.mark.parametrize("mode", ["bitune", "naive_bidir", "no_mixing", "baseline"])
def test_save_then_load_gives_identical_outputs_and_generation(tmp_path, mode):
    model = trained(mode)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = BituneModel.from_pretrained(tmp_path / "ckpt", base_model=tiny_model("llama"))
    assert loaded.bitune_config == model.bitune_config
    batch = collate(PROMPTS, ANSWERS)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)
    kwargs = dict(max_new_tokens=5, do_sample=False)
    assert torch.equal(
        loaded.generate(batch["prompt_ids"], batch["prompt_mask"], **kwargs),
        model.generate(batch["prompt_ids"], batch["prompt_mask"], **kwargs),
    )
    assert not any(p.requires_grad for p in loaded.parameters())


def test_layout_and_config(tmp_path):
    model = trained(
        peft=IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    )
    model.save_pretrained(tmp_path / "ckpt")
    names = {
        p.relative_to(tmp_path / "ckpt").as_posix() for p in (tmp_path / "ckpt").rglob("*") if p.is_file()
    }
    assert {
        CONFIG_FILE,
        MIXER_FILE,
        "causal/adapter_model.safetensors",
        "bidir/adapter_model.safetensors",
    } <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    config = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert config["peft_type"] == "IA3" and config["adapters"] == ["causal", "bidir"]
    assert config["bitune"] == {
        "mode": "bitune",
        "mixing": "relu",
        "c": 0.02,
        "implementation": "layer_synchronous",
    }
    assert config["num_layers"] == 2 and config["bitune_version"]


def test_trainable_reload_trains_every_parameter_again(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = BituneModel.from_pretrained(tmp_path / "ckpt", base_model=tiny_model("llama"), is_trainable=True)
    assert set(loaded.trainable_parameters()) == set(model.trainable_parameters())


def test_base_model_is_loaded_from_the_recorded_path(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = BituneModel.from_base(base, LoraConfig(r=2, target_modules="all-linear"))
    model.save_pretrained(tmp_path / "ckpt")
    loaded = BituneModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.config._name_or_path == str(tmp_path / "base")


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(BituneInputError, match="not a Bitune checkpoint"):
        BituneModel.from_pretrained(tmp_path, base_model=tiny_model("llama"))
    trained().save_pretrained(tmp_path / "ckpt")
    with pytest.raises(BituneInputError, match="names no base model"):
        BituneModel.from_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "bidir" / "adapter_model.safetensors").unlink()
    with pytest.raises(BituneInputError, match="safetensors"):
        BituneModel.from_pretrained(tmp_path / "ckpt", base_model=tiny_model("llama"))


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = trained()
    model.save_pretrained(tmp_path / "ckpt")
    before = sorted(p.name for p in (tmp_path / "ckpt").rglob("*"))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("bitune.core.checkpoint.save_file", broken)
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    BituneModel.from_pretrained(tmp_path / "ckpt", base_model=tiny_model("llama"))


def test_attention_implementation_is_saved_and_restored(tmp_path):
    base = tiny_model("llama")
    base.set_attn_implementation("eager")
    base.save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    model = BituneModel.from_base(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager"),
        LoraConfig(r=2, target_modules="all-linear"),
    )
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())["attn_implementation"] == "eager"
    assert BituneModel.from_pretrained(tmp_path / "ckpt").config._attn_implementation == "eager"
    # An explicit choice still wins.
    reloaded = BituneModel.from_pretrained(tmp_path / "ckpt", attn_implementation="sdpa")
    assert reloaded.config._attn_implementation == "sdpa"


def test_a_relative_base_model_path_loads_from_any_working_directory(tmp_path, monkeypatch):
    """Issue 14, 5: the checkpoint records where its base model is (absolute, and relative to itself)."""
    project = tmp_path / "project"
    tiny_model("llama", seed=1).save_pretrained(project / "models" / "base")
    monkeypatch.chdir(project)
    model = trained_on("models/base")
    model.save_pretrained("runs/ckpt")
    config = json.loads((project / "runs" / "ckpt" / CONFIG_FILE).read_text())
    assert config["base_model"] == str(project / "models" / "base")
    assert config["base_model_relative"] == "../../models/base"

    elsewhere = tmp_path / "elsewhere"  # holds another model under the same relative name
    tiny_model("llama", seed=2).save_pretrained(elsewhere / "models" / "base")
    monkeypatch.chdir(elsewhere)
    assert_same_logits(BituneModel.from_pretrained(project / "runs" / "ckpt"), model)

    # The project moved as a whole: its recorded absolute path is gone, the relative one finds it.
    moved = tmp_path / "moved"
    project.rename(moved)
    assert_same_logits(BituneModel.from_pretrained(moved / "runs" / "ckpt"), model)

    # The base model gone: a clear error at once, never a hub lookup.
    (moved / "models" / "base").rename(moved / "models" / "other")
    with pytest.raises(BituneInputError, match=r"the base model .*/project/models/base is gone"):
        BituneModel.from_pretrained(moved / "runs" / "ckpt")


def trained_on(base: str) -> BituneModel:
    model = BituneModel.from_base(base, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    return model.eval()


def assert_same_logits(loaded: BituneModel, model: BituneModel) -> None:
    batch = collate(PROMPTS, ANSWERS)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**batch).logits, model(**batch).logits, atol=0, rtol=0)


def test_weight_files_carry_checksums_and_damage_is_named(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path / "ckpt")
    checksums = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())["sha256"]
    assert sorted(checksums) == sorted(
        [MIXER_FILE, "bidir/adapter_model.safetensors", "causal/adapter_model.safetensors"]
    )
    path = tmp_path / "ckpt" / "bidir" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 1  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(BituneInputError, match=r"bidir/adapter_model\.safetensors: the file is corrupt"):
        BituneModel.from_pretrained(tmp_path / "ckpt", base_model=tiny_model("llama"))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"format_version": "1"}, "'format_version' must be a positive integer"),
        ({"format_version": 2}, "format version 2 is newer"),
        ({"num_layers": 0}, "'num_layers' must be a positive integer"),
        ({"num_layers": 3}, "trained on a base model with 3 layers"),
        ({"adapters": "causal"}, "'adapters' must be a list"),
        ({"bitune": {"mode": "bitune", "speed": 2}}, "field 'bitune'"),
        ({"sha256": [1]}, "'sha256' must be a mapping"),
    ],
)
def test_a_damaged_config_is_named(tmp_path, fields, message):
    trained().save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / CONFIG_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    with pytest.raises(BituneInputError, match=message):
        BituneModel.from_pretrained(tmp_path / "ckpt", base_model=tiny_model("llama"))
