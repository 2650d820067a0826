"""The layer-synchronous forward equals the three-pass reference, values and gradients."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from tiny_models import FAMILIES, tiny_model

from bitune import MODES, BituneConfig, BituneModel, collate
from bitune.core.layer_sync import layer_synchronous_logits
from conftest import torchrun

PROMPTS = [[1, 5, 6, 7, 8, 9, 10], [1, 11, 12], [1, 13, 14, 15, 16]]
ANSWERS = [[20, 21, 2], [22, 2], [23, 24, 25, 26, 2]]
ABLATIONS = [mode for mode in MODES if mode != "baseline"]


def bitune(family: str, mode: str) -> BituneModel:
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return BituneModel.from_base(tiny_model(family, num_layers=3), config, BituneConfig(mode=mode)).train()


def loss_and_gradients(model: BituneModel, layer_synchronous: bool) -> tuple[torch.Tensor, list]:
    model.bitune_config.implementation = "layer_synchronous" if layer_synchronous else "three_pass"
    model.zero_grad()
    output = model(**collate(PROMPTS, ANSWERS))
    output.loss.backward()
    return output.logits.detach(), [p.grad for p in model.trainable_parameters().values()]


def assert_same(model: BituneModel) -> None:
    reference_logits, reference_grads = loss_and_gradients(model, layer_synchronous=False)
    logits, grads = loss_and_gradients(model, layer_synchronous=True)
    torch.testing.assert_close(logits, reference_logits, atol=1e-5, rtol=0)
    for name, grad, reference in zip(model.trainable_parameters(), grads, reference_grads):
        if reference is None:
            assert grad is None or not grad.any(), name
        else:
            torch.testing.assert_close(grad, reference, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_equals_three_passes_for_every_family(family):
    assert_same(bitune(family, "bitune"))


@pytest.mark.parametrize("mode", ABLATIONS)
def test_equals_three_passes_for_every_ablation(mode):
    assert_same(bitune("llama", mode))


def test_equals_three_passes_under_activation_checkpointing():
    model = bitune("gemma3", "bitune")
    model.activation_checkpointing_enable()
    assert_same(model)


def test_one_traversal_runs_each_layer_for_all_streams_before_the_next_layer():
    model = bitune("llama", "bitune")
    order: list[int] = []
    for index, layer in enumerate(model.base_model.get_decoder().layers):
        layer.self_attn.register_forward_pre_hook(lambda module, args, index=index: order.append(index))
    with torch.no_grad():
        layer_synchronous_logits(model, **collate(PROMPTS, ANSWERS))
    # Layer by layer: the answer's call of a layer first runs the two prompt streams through it.
    assert order == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_prompt_passes_skip_everything_after_the_last_keys_and_values():
    model = bitune("llama", "bitune").eval()
    last = model.base_model.get_decoder().layers[-1]
    calls = {"mlp": 0}
    last.mlp.register_forward_hook(lambda *args: calls.__setitem__("mlp", calls["mlp"] + 1))
    with torch.no_grad():
        for layer_synchronous in (False, True):
            calls["mlp"] = 0
            model.bitune_config.implementation = "layer_synchronous" if layer_synchronous else "three_pass"
            model(**collate(PROMPTS, ANSWERS))
            assert calls["mlp"] == 1  # the answer pass only


def run_fsdp(tmp_path, implementation: str) -> dict:
    output = tmp_path / f"{implementation}.json"
    tests = Path(__file__).parent
    process = torchrun(
        str(tests / "fsdp_worker.py"), implementation, str(output), PYTHONPATH=str(tests.parent)
    )
    process.check_returncode()
    return json.loads(output.read_text())


def test_per_layer_fsdp2_with_checkpointing_trains_exactly(tmp_path):
    """Sharding every decoder layer works once each layer does all of its work inside one call.

    (The three-pass forward sends gradients to a layer's prompt passes through the K/V side channel, outside
    the FSDP2 window of that layer's call; with activation checkpointing their replay finds sharded weights.)
    """
    assert run_fsdp(tmp_path, "layer_sync") == {"max_grad_diff": pytest.approx(0.0, abs=1e-6)}
