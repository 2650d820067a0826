"""Merged export: θ_c in the base weights, θ_b as one LoRA relative to them; same outputs, bare decoding."""

from __future__ import annotations

import json

import pytest
import torch
from peft import IA3Config, LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

from bitune import MODES, BituneConfig, BituneError, BituneInputError, BituneModel, collate
from bitune.cli import main
from bitune.core.checkpoint import CONFIG_FILE
from bitune.core.export import export_merged
from bitune.core.modes import BIDIR_ADAPTER

PROMPTS = [[1, 5, 6, 7, 8, 9, 10], [1, 11, 12], [1, 13, 14, 15, 16]]
ANSWERS = [[20, 21, 2], [22, 2], [23, 24, 25, 2]]
NEW_TOKENS = 6
TWO_ADAPTER_MODES = [mode for mode, spec in MODES.items() if BIDIR_ADAPTER in spec.adapters]
ONE_ADAPTER_MODES = [mode for mode in MODES if mode not in TWO_ADAPTER_MODES]
LORA = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
# Other ranks and scalings per module (rank_pattern, alpha_pattern, rsLoRA).
PATTERNED_LORA = LoraConfig(
    r=4,
    lora_alpha=8,
    target_modules="all-linear",
    init_lora_weights=False,
    use_rslora=True,
    rank_pattern={"q_proj": 2},
    alpha_pattern={"down_proj": 3},
)


def trained(mode: str = "bitune", peft=LORA, family: str = "llama") -> BituneModel:
    model = BituneModel.from_base(tiny_model(family), peft, BituneConfig(mode=mode))
    with torch.no_grad():  # move everything off its initial value, as training would
        for param in model.trainable_parameters().values():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


@torch.no_grad()
def logits(model: BituneModel) -> torch.Tensor:
    return model(**collate(PROMPTS, ANSWERS)).logits


def greedy(model) -> torch.Tensor:
    batch = collate(PROMPTS, [[2]] * len(PROMPTS))
    ids, mask = batch["prompt_ids"], batch["prompt_mask"]
    output = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return output[:, ids.shape[1] :]


def export_and_load(model: BituneModel, tmp_path) -> BituneModel:
    return BituneModel.from_pretrained(export_merged(model, tmp_path / "export")).eval()


@pytest.mark.parametrize("mode", list(MODES))
def test_exported_model_gives_the_same_logits_and_generation(tmp_path, mode):
    model = trained(mode)
    expected_logits, expected_tokens = logits(model), greedy(model)
    exported = export_and_load(model, tmp_path)
    assert exported.merged and exported.bitune_config == model.bitune_config
    torch.testing.assert_close(logits(exported), expected_logits, atol=1e-5, rtol=0)
    assert torch.equal(greedy(exported), expected_tokens)
    # Exporting left the original model exactly as it was.
    torch.testing.assert_close(logits(model), expected_logits, atol=0, rtol=0)
    assert any(isinstance(m, BaseTunerLayer) for m in model.modules())


@pytest.mark.parametrize(
    ("family", "peft"),
    [
        ("llama", PATTERNED_LORA),
        ("qwen2", LORA),  # projections with biases
        ("gemma", LORA),  # tied input and output embeddings
    ],
)
def test_exact_for_other_ranks_scalings_and_families(tmp_path, family, peft):
    model = trained("bitune", peft, family)
    torch.testing.assert_close(logits(export_and_load(model, tmp_path)), logits(model), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", TWO_ADAPTER_MODES)
def test_only_the_bidirectional_prefill_runs_an_adapter(tmp_path, mode):
    exported = export_and_load(trained(mode), tmp_path)
    lora_layers = [m for m in exported.modules() if isinstance(m, BaseTunerLayer)]
    assert len(lora_layers) == 14  # all-linear: 7 projections x 2 layers
    calls = []
    for layer in lora_layers:
        # Rank r_b + r_c; the scalings are folded into B.
        assert layer.r[BIDIR_ADAPTER] == 8 and layer.scaling[BIDIR_ADAPTER] == 1.0
        layer.register_forward_hook(lambda *args: calls.append(1))
    # Outside the bidirectional pass the model holds its bare linear layers: the plain model, at its speed.
    assert not any(isinstance(m, BaseTunerLayer) for m in exported.base_model.modules())
    greedy(exported)
    # θ_b runs in the one bidirectional pass over the prompts (each layer at most once), not while decoding.
    assert 0 < len(calls) <= len(lora_layers)
    assert not any(isinstance(m, BaseTunerLayer) for m in exported.base_model.modules())


@pytest.mark.parametrize("mode", ONE_ADAPTER_MODES)
def test_modes_without_bidirectional_adapter_export_no_adapter(tmp_path, mode):
    exported = export_and_load(trained(mode), tmp_path)
    assert not any(isinstance(m, BaseTunerLayer) for m in exported.modules())
    assert not (tmp_path / "export" / BIDIR_ADAPTER).exists()


def test_baseline_export_is_a_plain_transformers_model(tmp_path):
    model = trained("baseline")
    export_merged(model, tmp_path / "export")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert torch.equal(greedy(plain), greedy(model))


def test_layout_and_config(tmp_path):
    model = trained("bitune")
    model.base_model.config._name_or_path = "org/base-model"
    export_merged(model, tmp_path / "export")
    folder = tmp_path / "export"
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {
        "config.json",
        "model.safetensors",
        "bidir/adapter_config.json",
        "bidir/adapter_model.safetensors",
        "bitune_mixer.safetensors",
        CONFIG_FILE,
    } <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) or n.startswith("causal/") for n in names)
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["merged"] is True and config["base_model"] == "."
    assert config["merged_from"] == "org/base-model" and config["adapters"] == ["bidir"]
    assert config["bitune"]["mode"] == "bitune"


def test_merged_export_is_for_inference_only(tmp_path):
    exported = export_and_load(trained(), tmp_path)
    with pytest.raises(BituneInputError, match="carries its own base weights"):
        BituneModel.from_pretrained(tmp_path / "export", base_model=tiny_model("llama"))
    with pytest.raises(BituneInputError, match="inference only"):
        BituneModel.from_pretrained(tmp_path / "export", is_trainable=True)
    with pytest.raises(BituneError, match="merged export"):
        exported.save_pretrained(tmp_path / "again")
    with pytest.raises(BituneError, match="already a merged export"):
        export_merged(exported, tmp_path / "again")


@pytest.mark.parametrize(
    ("mode", "family", "peft", "reason"),
    [
        ("bitune", "llama", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), "DoRA"),
        (
            "bitune",
            "llama",
            IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
            "IA3",
        ),
        (
            "bitune",
            "llama",
            LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
            "modules_to_save",
        ),
        ("baseline", "llama", LoraConfig(r=2, target_modules=["q_proj"], bias="all"), "bias='all'"),
        ("bitune", "llama", LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]), "linear layers only"),
        ("bitune", "gemma", LoraConfig(r=2, target_modules=["q_proj", "lm_head"]), "tied weights"),
    ],
)
def test_what_cannot_be_merged_exactly_is_refused(tmp_path, mode, family, peft, reason):
    model = BituneModel.from_base(tiny_model(family), peft, BituneConfig(mode=mode))
    with pytest.raises(BituneError, match=reason):
        export_merged(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def export_with_cli(tmp_path, model: BituneModel) -> int:
    tiny_model("llama").save_pretrained(tmp_path / "base")  # the weights `model` was built on
    model.save_pretrained(tmp_path / "ckpt")
    folders = ["--checkpoint", str(tmp_path / "ckpt"), "--base-model", str(tmp_path / "base")]
    return main(["export", *folders, str(tmp_path / "export")])


def test_cli_exports_a_checkpoint(tmp_path, capsys):
    model = trained("bitune")
    assert export_with_cli(tmp_path, model) == 0
    assert "a LoRA for the bidirectional prompt pass" in capsys.readouterr().out
    exported = BituneModel.from_pretrained(tmp_path / "export")
    torch.testing.assert_close(logits(exported), logits(model), atol=1e-5, rtol=0)


def test_cli_refusal_is_a_one_line_error(tmp_path, capsys):
    dora = LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    assert export_with_cli(tmp_path, BituneModel.from_base(tiny_model("llama"), dora)) == 2
    assert "DoRA" in capsys.readouterr().err


def test_a_model_with_an_adapter_merged_in_place_is_refused(tmp_path):
    model = trained()
    model.peft_model.merge_adapter(["causal"])
    with pytest.raises(BituneError, match="unmerge_adapter"):
        export_merged(model, tmp_path / "export")


def test_converting_the_export_reaches_its_unplugged_adapter(tmp_path):
    exported = export_and_load(trained(), tmp_path).to(torch.float64)
    lora_layers = [m for m in exported.modules() if isinstance(m, BaseTunerLayer)]
    assert lora_layers and all(m.lora_A[BIDIR_ADAPTER].weight.dtype == torch.float64 for m in lora_layers)


def test_export_refuses_a_non_empty_folder_unless_asked_to_overwrite(tmp_path, capsys):
    """Issue 14, 1: nothing in the output folder is deleted unless the user says so."""
    model = trained()
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "notes.txt").write_text("keep me")
    (tmp_path / "served" / "sub").mkdir()
    with pytest.raises(BituneInputError, match="the folder is not empty"):
        export_merged(model, tmp_path / "served")
    assert (tmp_path / "served" / "notes.txt").read_text() == "keep me" and (
        tmp_path / "served" / "sub"
    ).is_dir()
    export_merged(model, tmp_path / "served", overwrite=True)
    assert not (tmp_path / "served" / "notes.txt").exists()
    assert BituneModel.from_pretrained(tmp_path / "served").merged
    (tmp_path / "empty").mkdir()
    export_merged(model, tmp_path / "empty")  # an empty folder is as good as a new one

    assert export_with_cli(tmp_path / "cli", model) == 0
    (tmp_path / "cli" / "export" / "extra.txt").write_text("x")
    folders = ["--checkpoint", str(tmp_path / "cli" / "ckpt"), "--base-model", str(tmp_path / "cli" / "base")]
    assert main(["export", *folders, str(tmp_path / "cli" / "export")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "cli" / "export" / "extra.txt").exists()
    assert main(["export", *folders, "--overwrite", str(tmp_path / "cli" / "export")]) == 0
    assert not (tmp_path / "cli" / "export" / "extra.txt").exists()


@pytest.mark.parametrize("where", ["the checkpoint", "inside it", "around it", "the base model"])
def test_export_never_writes_over_what_it_reads(tmp_path, capsys, where):
    model = trained()
    assert export_with_cli(tmp_path, model) == 0
    capsys.readouterr()
    checkpoint, base = tmp_path / "ckpt", tmp_path / "base"
    target = {"the checkpoint": checkpoint, "inside it": checkpoint / "causal", "around it": tmp_path}.get(
        where, base
    )
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = main(
        ["export", "--checkpoint", str(checkpoint), "--base-model", str(base), "--overwrite", str(target)]
    )
    assert code == 2
    assert "which the export reads from and would destroy" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    with pytest.raises(BituneInputError, match="would destroy"):
        export_merged(
            BituneModel.from_pretrained(checkpoint, str(base)), target, overwrite=True, source=checkpoint
        )
