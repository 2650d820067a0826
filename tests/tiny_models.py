"""Tiny random models of every supported family, built from config classes (no hub)."""

from __future__ import annotations

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 64
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# Sliding windows of 4 tokens are shorter than the test prompts, so the window logic is exercised.
FAMILIES = {
    "llama": (LlamaForCausalLM, LlamaConfig, {}),
    "mistral": (MistralForCausalLM, MistralConfig, {"sliding_window": 4}),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, {}),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, {"head_dim": 8}),
    "gemma": (GemmaForCausalLM, GemmaConfig, {"head_dim": 8}),
    "gemma2": (
        Gemma2ForCausalLM,
        Gemma2Config,
        {"head_dim": 8, "sliding_window": 4, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    ),
    "gemma3": (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        {"head_dim": 8, "sliding_window": 4},
    ),
    "phi3": (Phi3ForCausalLM, Phi3Config, {}),
    "phi": (PhiForCausalLM, PhiConfig, {"partial_rotary_factor": 0.5}),
}

# Gemma2's soft-capping is not available in SDPA; transformers uses eager for it.
ATTENTION = {"gemma2": "eager"}


def tiny_model(family: str = "llama", seed: int = 0, num_layers: int = 2, **overrides) -> torch.nn.Module:
    model_class, config_class, extra = FAMILIES[family]
    if family == "gemma3":  # alternate sliding-window and full-attention layers
        extra = {
            **extra,
            "layer_types": [("sliding_attention", "full_attention")[i % 2] for i in range(num_layers)],
        }
    config = config_class(**{**COMMON, **extra, "num_hidden_layers": num_layers, **overrides})
    config._attn_implementation = ATTENTION.get(family, "sdpa")
    torch.manual_seed(seed)
    model = model_class(config)
    return model.eval()
