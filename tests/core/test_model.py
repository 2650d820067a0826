"""The Bitune forward: equivalences, bidirectionality, batching, gradients, ablations."""

from __future__ import annotations

import pytest
import torch
from peft import IA3Config, LoraConfig
from tiny_models import FAMILIES, tiny_model
from transformers import BertConfig, BertForMaskedLM, FalconConfig, FalconForCausalLM

from bitune import MODES, BituneConfig, BituneError, BituneInputError, BituneModel, collate, split_sequences
from bitune.core.batch import positions

PROMPTS = [[1, 5, 6, 7, 8, 9, 10], [1, 11, 12], [1, 13, 14, 15, 16]]
ANSWERS = [[20, 21, 2], [22, 2], [23, 24, 25, 26, 2]]
ATOL = 1e-5


def lora(**kwargs) -> LoraConfig:
    # Random B as well as A, so that both adapters change the model from the first step.
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **kwargs)


def ia3() -> IA3Config:
    return IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])


def perturb_ia3(model: BituneModel) -> None:
    # IA3 starts as the identity (all ones); move it off so adapters differ and gradients are generic.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_l" in name:
                param.add_(0.1 * torch.randn_like(param))


def bitune(family="llama", mode="bitune", peft=None, alpha_zero=False, **kwargs) -> BituneModel:
    model = BituneModel.from_base(tiny_model(family, **kwargs), peft or lora(), BituneConfig(mode=mode))
    if alpha_zero:
        with torch.no_grad():
            model.mixer.keys.zero_()
            model.mixer.values.zero_()
    return model.eval()


def plain_answer_logits(model: BituneModel, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """The causal adapter's ordinary forward over one whole unpadded sequence, at the answer positions."""
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = model.peft_model(input_ids=ids).logits[0]
    return logits[len(prompt) - 1 : len(prompt) + len(answer) - 1]


@pytest.mark.parametrize("family", FAMILIES)
def test_alpha_zero_and_baseline_equal_plain_peft_forward(family):
    model = bitune(family, alpha_zero=True)
    baseline = BituneModel(model.peft_model, BituneConfig(mode="baseline"))
    batch = collate(PROMPTS, ANSWERS)
    with torch.no_grad():
        mixed, plain = model(**batch), baseline(**batch)
    for i, (prompt, answer) in enumerate(zip(PROMPTS, ANSWERS)):
        reference = plain_answer_logits(model, prompt, answer)
        torch.testing.assert_close(mixed.logits[i, : len(answer)], reference, atol=ATOL, rtol=0)
        torch.testing.assert_close(plain.logits[i, : len(answer)], reference, atol=ATOL, rtol=0)
        reference_loss = torch.nn.functional.cross_entropy(reference, torch.tensor(answer))
        torch.testing.assert_close(mixed.sample_losses[i], reference_loss, atol=ATOL, rtol=0)
    # With α ≠ 0 the bidirectional pass changes the answer's logits.
    model.mixer.reset_parameters()
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, mixed.logits, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_bidirectional_pass_sees_later_prompt_tokens_and_causal_pass_does_not(family):
    model = bitune(family)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    changed = ids.clone()
    changed[0, 2] = 30  # within every test model's sliding window of 4 tokens
    mask = torch.ones_like(ids)
    causal_pass, bidir_pass = MODES["bitune"].passes
    with torch.no_grad():
        for prompt_pass, should_change in ((causal_pass, False), (bidir_pass, True)):
            before = model._prompt_pass(prompt_pass, ids, mask)
            after = model._prompt_pass(prompt_pass, changed, mask)
            # Layer 0's K/V are computed before any attention, so look from layer 1 on; token 0 only.
            for (k0, v0), (k1, v1) in zip(before[1:], after[1:]):
                assert torch.equal(k0[:, :, 0], k1[:, :, 0]) != should_change
                assert torch.equal(v0[:, :, 0], v1[:, :, 0]) != should_change


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_equals_each_sample_alone(family, padding_side):
    model = bitune(family)
    full = [p + a for p, a in zip(PROMPTS, ANSWERS)]
    width = max(map(len, full))
    ids = torch.full((len(full), width), 63)  # a real token id as padding: it must never matter
    mask = torch.zeros_like(ids)
    for i, row in enumerate(full):
        span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row), 1
    batch = split_sequences(ids, mask, [len(p) for p in PROMPTS], pad_token_id=63)
    with torch.no_grad():
        together = model(**batch)
        for i, (prompt, answer) in enumerate(zip(PROMPTS, ANSWERS)):
            alone = model(**collate([prompt], [answer]))
            torch.testing.assert_close(together.logits[i, : len(answer)], alone.logits[0], atol=ATOL, rtol=0)
            torch.testing.assert_close(together.sample_losses[i], alone.sample_losses[0], atol=ATOL, rtol=0)


def test_padding_tokens_never_change_real_outputs():
    model = bitune("llama")
    batch = collate(PROMPTS, ANSWERS, pad_token_id=0)
    other = collate(PROMPTS, ANSWERS, pad_token_id=40)
    with torch.no_grad():
        a, b = model(**batch), model(**other)
    keep = batch["answer_mask"].bool()
    torch.testing.assert_close(a.logits[keep], b.logits[keep], atol=ATOL, rtol=0)


def expected_gradients(model: BituneModel, name: str, mode: str) -> bool:
    """Whether parameter `name` must get a non-zero gradient in `mode`.

    Zero by the method itself:
    * the bidirectional adapter (θ_b) in the last layer beyond k/v: only that layer's keys and values of the
      prompt passes are used, so its query, output projection and MLP feed nothing the loss reads;
    * with shared weights, layer 0's coefficients: both passes compute layer 0's K/V from the same
      embeddings with the same weights before any attention, so K_c = K_b and α has no effect there.
    """
    last = f"layers.{model.config.num_hidden_layers - 1}."
    if name.startswith("mixer."):
        return mode in ("bitune", "only_causal", "shared_weights")
    if ".bidir" in name and last in name:
        return "k_proj" in name or "v_proj" in name
    return True


@pytest.mark.parametrize("mode", list(MODES))
def test_gradients_reach_exactly_the_parameters_that_train(mode):
    model = bitune("llama", mode=mode).train()
    model(**collate(PROMPTS, ANSWERS)).loss.backward()
    adapters = MODES[mode].adapters
    for name, param in model.named_parameters():
        is_adapter = "lora_" in name
        should_train = name.startswith("mixer.") or (is_adapter and any(f".{a}." in name for a in adapters))
        assert param.requires_grad == should_train, name
        if not should_train:
            assert param.grad is None, name
            continue
        grad = param.grad
        if name.startswith("mixer.") and mode == "shared_weights":
            assert grad[0] == 0 and (grad[1:] != 0).all(), name  # see expected_gradients
        elif expected_gradients(model, name, mode):
            assert grad is not None and grad.abs().sum() > 0, name
        else:
            assert grad is None or grad.abs().sum() == 0, name
    assert (model.mixer is not None) == MODES[mode].mixed


@pytest.mark.parametrize("peft", ["dora", "ia3"])
def test_other_peft_methods_train_both_adapters(peft):
    config = lora(use_dora=True) if peft == "dora" else ia3()
    model = bitune("llama", peft=config).train()
    if peft == "ia3":
        perturb_ia3(model)
    model(**collate(PROMPTS, ANSWERS)).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any(".causal" in n for n in grads) and any(".bidir" in n for n in grads)
    for name, grad in grads.items():
        if expected_gradients(model, name, "bitune"):
            assert grad is not None and grad.abs().sum() > 0, name
    assert not any(p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)


def test_activation_checkpointing_gives_the_same_gradients():
    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = bitune("llama", mode="bitune", peft=lora(lora_dropout=0.0)).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(**collate(PROMPTS, ANSWERS)).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=0, msg=name)


def test_checkpointing_enabled_behind_bitunes_back_is_refused():
    model = bitune("llama").train()
    model.base_model.activation_checkpointing_enable()
    with pytest.raises(BituneError, match="activation_checkpointing_enable"):
        model(**collate(PROMPTS, ANSWERS))
    with pytest.raises(BituneError, match="reentrant"):
        model.activation_checkpointing_enable({"use_reentrant": True})


def test_mixed_cache_matches_the_formula_by_hand_for_one_layer():
    model = bitune("llama", num_layers=1)
    with torch.no_grad():
        model.mixer.keys.fill_(-0.03)  # α_K = 0.03 / 0.04 = 0.75 (|w| makes the sign irrelevant)
        model.mixer.values.fill_(0.01)  # α_V = 0.5
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    mask = torch.ones_like(ids)

    def kv(adapter: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        # An independent route: PEFT's own adapter switch and an ordinary transformers cache.
        model.peft_model.set_adapter(adapter)
        with torch.no_grad():
            cache = model.peft_model(input_ids=ids[:, :-1], use_cache=True, **kwargs).past_key_values
        return cache.layers[0].keys, cache.layers[0].values

    (k_c, v_c), (k_b, v_b) = kv("causal"), kv("bidir", is_causal=False)
    model.peft_model.set_adapter("causal")
    with torch.no_grad():
        ((k, v),) = model.encode_prompt(ids, mask).cache
    torch.testing.assert_close(k, 0.25 * k_c + 0.75 * k_b, atol=1e-6, rtol=0)
    torch.testing.assert_close(v, 0.5 * v_c + 0.5 * v_b, atol=1e-6, rtol=0)
    assert model.alphas() == {"keys": [pytest.approx(0.75)], "values": [pytest.approx(0.5)]}


def test_relu_mixing_closes_negative_coefficients():
    model = BituneModel.from_base(tiny_model("llama"), lora(), BituneConfig(mixing="relu"))
    with torch.no_grad():
        model.mixer.keys.fill_(-1.0)
    assert model.alphas()["keys"] == [0.0, 0.0]


def test_positions_ignore_padding():
    assert positions(torch.tensor([[0, 0, 1, 1, 1]])).tolist() == [[0, 0, 0, 1, 2]]


def test_bad_batches_are_refused_with_a_fix():
    model = bitune("llama")
    batch = collate(PROMPTS, ANSWERS)
    right_padded = dict(batch, prompt_mask=batch["prompt_mask"].flip(-1))
    with pytest.raises(BituneInputError, match="padded on the left"):
        model(**right_padded)
    with pytest.raises(BituneInputError, match="at least 2 tokens"):
        model(**collate([[1]], [[2]]))
    with pytest.raises(BituneInputError, match="leaves no answer"):
        split_sequences(torch.tensor([[1, 2, 3]]), torch.ones(1, 3), [3])


def test_unsupported_models_are_named_in_the_error():
    bert = BertForMaskedLM(
        BertConfig(
            vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    )
    with pytest.raises(BituneError, match="BertForMaskedLM"):
        BituneModel.from_base(bert, lora())
    falcon = FalconForCausalLM(
        FalconConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2)
    )
    with pytest.raises(BituneError, match="FalconForCausalLM"):
        BituneModel.from_base(falcon, lora())
