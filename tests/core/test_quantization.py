"""k-bit base models (QLoRA-style) on the CPU, through bitsandbytes (CPU support since 0.46).

Bitune trains both adapters and the mixing coefficients on a frozen 4-bit or 8-bit base; the checkpoint records
the quantization, so it loads back onto the same quantized base; the merged export refuses a quantized base.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig
from tiny_models import tiny_model

from bitune import BituneError, BituneModel, collate, generate_text
from bitune.cli import main
from bitune.core.export import export_merged
from bitune.core.loading import load_base_model, load_tokenizer, quantization_of
from bitune.core.pretrained import load_for_inference
from bitune.core.prompts import encode_prompts, render_prompt
from bitune.training import TrainConfig, train

bnb = pytest.importorskip("bitsandbytes")

pytestmark = [
    pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning"),  # 8-bit layers cast float32 inputs
]

QUANTIZATIONS = ["4bit", "8bit"]
PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 10, 11, 12]]
ANSWERS = [[13, 14, 2], [15, 2]]


def lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (linear layers wide enough for 4-bit blocks), a character tokenizer, addition data."""
    from training.test_training import char_tokenizer

    folder = tmp_path_factory.mktemp("kbit")
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(folder / "model")
    char_tokenizer().save_pretrained(folder / "model")
    rows = [{"prompt": f"what is {a}+{b}?", "completion": str(a + b)} for a in range(5) for b in range(5)]
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def quantized(folder: Path, quantization: str):
    return load_base_model(folder / "model", dtype="float32", quantization=quantization, device="cpu")


def dequantized(model, folder: Path):
    """The full-precision tiny model with each 4-bit layer's weight replaced by its dequantized NF4 weight."""
    from bitsandbytes.functional import dequantize_4bit

    reference = load_base_model(folder / "model", dtype="float32")
    layers = dict(model.named_modules())
    for name, module in reference.named_modules():
        layer = layers.get(f"{name}.base_layer", layers.get(name))  # under a PEFT adapter, or bare
        if isinstance(layer, bnb.nn.Linear4bit):
            module.weight.data = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    return reference


def gradients(model: BituneModel) -> dict[str, torch.Tensor]:
    model(**collate(PROMPTS, ANSWERS)).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_gradients_reach_both_adapters_and_the_coefficients_through_4bit_layers(folder: Path) -> None:
    """The same gradients as the full-precision model with the dequantized weights, after an eval-mode run
    (the support check; a 4-bit CPU layer that repacked its weights then would have no backward)."""
    model = BituneModel.from_base(quantized(folder, "4bit"), lora())
    reference = BituneModel.from_base(dequantized(model.base_model, folder), lora())
    reference.load_state_dict(model.trainable_parameters(), strict=False)
    with torch.no_grad():
        model.eval()(**collate(PROMPTS, ANSWERS))
    got, expected = gradients(model.train()), gradients(reference.train())
    assert got.keys() == expected.keys()
    assert any(".causal." in n for n in got) and any(".bidir." in n for n in got)
    assert {"mixer.keys", "mixer.values"} <= got.keys()
    # None where the full-precision model has none too: the bidirectional pass stops at the last layer's keys
    # and values, so that layer's later θ_b weights get no gradient.
    assert {n for n, g in got.items() if g is None} == {n for n, g in expected.items() if g is None}
    for name, grad in got.items():
        if grad is not None:  # the earliest layers' adapters get theirs through every 4-bit layer above them
            torch.testing.assert_close(grad, expected[name], atol=1e-5, rtol=1e-3, msg=name)
    assert any(
        grad.abs().sum() > 0 for name, grad in got.items() if "layers.0." in name and ".bidir." in name
    )


def test_gradients_reach_both_adapters_and_the_coefficients_through_8bit_layers(folder: Path) -> None:
    """LLM.int8() also rounds the activations: the gradients stay near the full-precision ones."""
    model = BituneModel.from_base(quantized(folder, "8bit"), lora())
    reference = BituneModel.from_base(load_base_model(folder / "model", dtype="float32"), lora())
    reference.load_state_dict(model.trainable_parameters(), strict=False)
    got, expected = gradients(model.train()), gradients(reference.train())
    assert got.keys() == expected.keys() and {"mixer.keys", "mixer.values"} <= got.keys()
    assert {n for n, g in got.items() if g is None} == {n for n, g in expected.items() if g is None}
    for name, grad in got.items():
        if grad is None:
            continue
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), expected[name].flatten(), dim=0)
        assert expected[name].abs().sum() == 0 or cosine > 0.9, (name, cosine)


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_quantized_logits_stay_close_to_full_precision(folder: Path, quantization: str) -> None:
    """Random tiny weights: 4-bit NF4 moves the logits by ≈10% of their spread, 8-bit by ≈1%."""
    full = load_base_model(folder / "model", dtype="float32").eval()
    model = quantized(folder, quantization).eval()
    ids = torch.tensor([PROMPTS[0] + ANSWERS[0]])
    with torch.no_grad():
        expected, got = full(ids).logits, model(ids).logits
    relative = ((got - expected).norm() / (expected - expected.mean()).norm()).item()
    assert relative < {"4bit": 0.25, "8bit": 0.05}[quantization]


def test_4bit_logits_equal_the_model_with_dequantized_weights(folder: Path) -> None:
    """The CPU backend computes what the NF4 weights give: 4-bit's error is all in the weights' rounding."""
    model = quantized(folder, "4bit").eval()
    reference = dequantized(model, folder).eval()
    ids = torch.tensor([PROMPTS[0] + ANSWERS[0]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-4)


def test_a_short_training_run_lowers_the_loss_and_reloads_onto_the_quantized_base(
    folder: Path, tmp_path: Path
) -> None:
    config = TrainConfig.from_dict(
        {
            "model": {"name_or_path": str(folder / "model"), "quantization": "4bit"},
            "data": {"path": str(folder / "train.jsonl"), "max_length": 64},
            "peft": {"r": 4, "alpha": 8},
            "training": {
                "max_steps": 12,
                "batch_size": 8,
                "learning_rate": 1e-2,
                "warmup_ratio": 0.0,
                "precision": "fp32",
                "save_steps": 0,
                "logging_steps": 1,
                "report_to": [],
            },
            "device": "cpu",
            "output_dir": str(tmp_path / "run"),
        }
    )
    final = train(config)
    losses = [
        json.loads(line)["loss"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert json.loads((final / "bitune_config.json").read_text())["quantization"] == "4bit"

    model, tokenizer = load_for_inference(checkpoint=final, device="cpu")
    assert quantization_of(model.base_model) == "4bit"
    assert model.alphas() != {"keys": [0.5, 0.5], "values": [0.5, 0.5]}  # the coefficients trained
    # On the full-precision base it is another model (what an export merges into).
    full, _ = load_for_inference(checkpoint=final, device="cpu", quantization="none")
    assert quantization_of(full.base_model) is None


def test_save_load_gives_identical_outputs(folder: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(folder / "model")
    model = BituneModel.from_base(quantized(folder, "4bit"), lora())
    with torch.no_grad():  # trained-looking coefficients, so that both passes matter
        model.mixer.keys.uniform_(-0.05, 0.05)
        model.mixer.values.uniform_(-0.05, 0.05)
    model.eval()
    model.save_pretrained(tmp_path / "ckpt", tokenizer=tokenizer)
    again, _ = load_for_inference(checkpoint=tmp_path / "ckpt", device="cpu")
    batch = collate(PROMPTS, ANSWERS)
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, model(**batch).logits)
    texts = [render_prompt("what is 2+2?", "plain"), render_prompt("what is 1+3?", "plain")]
    kwargs = dict(max_new_tokens=6, do_sample=False)
    assert generate_text(again, tokenizer, texts, **kwargs) == generate_text(
        model, tokenizer, texts, **kwargs
    )


def test_export_refuses_a_quantized_base_and_exports_on_the_full_precision_one(
    folder: Path, tmp_path: Path, capsys
) -> None:
    model = BituneModel.from_base(quantized(folder, "4bit"), lora())
    with pytest.raises(BituneError, match="4bit-quantized.*--quantization none"):
        export_merged(model, tmp_path / "never")
    model.save_pretrained(tmp_path / "ckpt")
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), str(tmp_path / "export")]) == 2
    assert "4bit-quantized" in capsys.readouterr().err
    assert not (tmp_path / "export").exists()
    arguments = ["export", "--checkpoint", str(tmp_path / "ckpt"), "--quantization", "none"]
    assert main([*arguments, str(tmp_path / "export")]) == 0
    assert BituneModel.from_pretrained(tmp_path / "export").merged


def test_bad_quantization_names_are_refused(folder: Path) -> None:
    from bitune import BituneInputError

    with pytest.raises(BituneInputError, match="quantization '3bit' is unknown"):
        load_base_model(folder / "model", quantization="3bit")
    with pytest.raises(BituneInputError, match="model.quantization '3bit'"):
        TrainConfig.from_dict(
            {"model": {"name_or_path": "m", "quantization": "3bit"}, "data": "d", "output_dir": "o"}
        )
    assert (
        yaml.safe_load(
            TrainConfig.from_dict(
                {"model": {"name_or_path": "m", "quantization": "8bit"}, "data": "d", "output_dir": "o"}
            ).to_yaml()
        )["model"]["quantization"]
        == "8bit"
    )


@pytest.mark.slow
def test_smollm2_quantized_logits_against_full_precision(smollm2: Path) -> None:
    """Measured on the real SmolLM2-135M-Instruct (already a Q4_1 GGUF, dequantized), over 3 chat prompts:

    8-bit: mean KL(full ‖ quantized) ≈ 0.04–0.07 nats per position, top-1 agreement ≈ 0.87–0.92;
    4-bit NF4: mean KL ≈ 1.4–1.5 nats, top-1 agreement ≈ 0.46–0.57 (a 135M model re-quantized to 4 bits
    loses much; the kernel itself matches the dequantized NF4 weights, see the tiny-model test above).
    """
    tokenizer = load_tokenizer(smollm2)
    questions = [
        "What is the capital of France?",
        "Name three primary colours.",
        "Write a haiku about the sea.",
    ]
    ids = encode_prompts(tokenizer, [render_prompt(q, "chat", tokenizer) for q in questions])
    full = load_base_model(smollm2, dtype="float32").eval()
    bounds = {"8bit": (0.15, 0.8), "4bit": (2.0, 0.35)}
    for quantization, (max_kl, min_agreement) in bounds.items():
        model = load_base_model(smollm2, dtype="float32", quantization=quantization, device="cpu").eval()
        for prompt in ids:
            tokens = torch.tensor([prompt])
            with torch.no_grad():
                expected = full(tokens).logits.log_softmax(-1)
                got = model(tokens).logits.log_softmax(-1)
            kl = (expected.exp() * (expected - got)).sum(-1).mean().item()
            agreement = (expected.argmax(-1) == got.argmax(-1)).float().mean().item()
            assert kl < max_kl and agreement > min_agreement, (quantization, kl, agreement)
        del model
