"""The Bitune model: any Hugging Face causal LM with a causal and a bidirectional PEFT adapter.

Forward (training and scoring), for a batch laid out as in `bitune.core.batch`:

    prompt[:-1] ──causal pass, θ_c──────────► K_c, V_c ─┐
    prompt[:-1] ──bidirectional pass, θ_b──► K_b, V_b ─┴─ mix per layer ─► prompt cache
    [prompt[-1], answer[:-1]] ──causal, θ_c, reading the prompt cache──► logits ─► loss on answer tokens

The ablations of the paper are the same pipeline with other passes (`bitune.core.modes.MODES`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from bitune.core.batch import check_batch, positions
from bitune.core.caches import KVRecorder
from bitune.core.checkpoint import load_parts, save_bitune
from bitune.core.compat import (
    cache_argument,
)
from bitune.core.generation import generate
from bitune.core.layer_sync import layer_synchronous_logits
from bitune.core.loading import keep_quantized_layers_trainable, load_base_model
from bitune.core.mixing import Mixer
from bitune.core.modes import BIDIR_ADAPTER, CAUSAL_ADAPTER, BituneConfig, PromptPass
from bitune.core.passes import (
    KV,
    PromptState,
    answer_pass_logits,
    num_layers,
    record_prompt_pass,
)
from bitune.errors import BituneError


@dataclass
class BituneOutput:
    """What `BituneModel.forward` returns.

    `loss` is the mean cross-entropy over all answer tokens of the batch (or the sum divided by
    `num_items_in_batch` when given); `sample_losses` the mean over each sample's answer tokens;
    `logits[:, t]` predicts `answer_ids[:, t]`.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    sample_losses: torch.Tensor
    num_tokens: torch.Tensor


class BituneModel(nn.Module):
    """A decoder-only LM that reads its prompt twice (causally and bidirectionally) and answers causally.

    Build one with `BituneModel.from_base` (fresh adapters) or `BituneModel.from_pretrained` (a saved
    checkpoint; `is_trainable=True` to train on). It is an `nn.Module`: train it with any optimizer, the HF
    `Trainer` or `bitune.training`.

    Weights, by state-dict name (`model.state_dict()`, `model.named_parameters()`):

    * θ_c and θ_b are two named adapters of one `peft.PeftModel` (`model.peft_model`), called
      `bitune.CAUSAL_ADAPTER` ("causal") and `bitune.BIDIR_ADAPTER` ("bidir"): e.g.
      `peft_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.causal.weight`. Read or set one
      adapter alone with `peft.get_peft_model_state_dict(model.peft_model, adapter_name="bidir")` and
      `peft.set_peft_model_state_dict(...)`; each is saved as a standard PEFT adapter folder.
    * The 2·L raw mixing coefficients w are `mixer.keys` and `mixer.values` (float32, one per layer; α per
      layer from `model.alphas()`); absent in modes without mixing.
    * The base weights are frozen and stay those of the base model.

    Example:
        >>> from peft import LoraConfig
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from bitune import BituneModel, collate
        >>> base = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
        >>> model = BituneModel.from_base(base, LoraConfig(r=4, target_modules="all-linear"))
        >>> batch = collate([[1, 5, 6, 7]], [[8, 2]])
        >>> out = model(**batch)
        >>> out.logits.shape
        torch.Size([1, 2, 32])
        >>> out.loss.backward()
    """

    # The HF Trainer must not assume this forward normalises the loss over the global batch by itself.
    accepts_loss_kwargs = False

    def __init__(
        self,
        peft_model: PeftModel | PreTrainedModel,
        config: BituneConfig,
        mixer: Mixer | None = None,
        *,
        merged: bool = False,
    ) -> None:
        super().__init__()
        self.peft_model = peft_model
        self.bitune_config = config
        self.mixer = mixer
        # A merged export (`bitune.core.export`) holds θ_c in its base weights: the causal passes run no adapter;
        # `peft_model` holds only θ_b (relative to the merged weights), or is the bare model if there is no θ_b.
        self.merged = merged
        keep_quantized_layers_trainable(peft_model)
        self._tuner_layers = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]
        if merged:
            # θ_b's LoRA layers are plugged in for the bidirectional pass only; every other pass (decoding
            # included) runs the bare linear layers, i.e. the plain model at its own speed. Registered here
            # too, so that `.to()` and the like reach them while they are unplugged.
            self._merged_lora = nn.ModuleList(self._tuner_layers)
            self._lora_slots = [
                _slot(peft_model, name, m)
                for name, m in peft_model.named_modules()
                if m in self._tuner_layers
            ]
        self._current_adapter = CAUSAL_ADAPTER
        self._use_adapter(CAUSAL_ADAPTER)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_base(
        cls,
        base_model: PreTrainedModel | str,
        peft_config: PeftConfig,
        config: BituneConfig | None = None,
        *,
        check_support: bool = True,
        **from_pretrained_kwargs,
    ) -> BituneModel:
        """Wrap a base causal LM (object, hub id or local path) with fresh adapters and mixing coefficients.

        `peft_config` configures both adapters (any PEFT method that supports two named adapters on one model:
        LoRA, DoRA, IA3, ...). The base weights are frozen. `from_pretrained_kwargs` go to
        `AutoModelForCausalLM.from_pretrained` when `base_model` is a name.
        """
        config = config or BituneConfig()
        if isinstance(base_model, (str, Path)):
            base_model = load_base_model(base_model, **from_pretrained_kwargs)
        keep_quantized_layers_trainable(base_model)  # before the support check runs it in eval mode
        if check_support:
            check_model_support(base_model)
        base_model.requires_grad_(False)
        adapters = config.spec.adapters
        peft_model = get_peft_model(base_model, peft_config, adapter_name=adapters[0])
        for name in adapters[1:]:
            peft_model.add_adapter(name, peft_config)
        # PEFT freezes every adapter but the active one; Bitune trains them all.
        peft_model.set_requires_grad(list(adapters), True)
        mixer = None
        if config.spec.mixed:
            mixer = Mixer(num_layers(base_model), c=config.c, function=config.mixing).to(base_model.device)
        return cls(peft_model, config, mixer)

    @classmethod
    def from_pretrained(
        cls,
        checkpoint_dir: str | Path,
        base_model: PreTrainedModel | str | None = None,
        *,
        is_trainable: bool = False,
        **from_pretrained_kwargs,
    ) -> BituneModel:
        """Rebuild a saved Bitune model; see `bitune.core.checkpoint` for the format.

        The base model is the one the checkpoint records (with the attention implementation it was trained
        with) unless given. With `is_trainable=True` both adapters and the mixing coefficients train and the
        model is in training mode; otherwise it is frozen, in eval mode.
        """
        parts = load_parts(checkpoint_dir, base_model, is_trainable=is_trainable, **from_pretrained_kwargs)
        return cls(parts.peft_model, parts.bitune_config, parts.mixer, merged=parts.merged).train(
            is_trainable
        )

    def save_pretrained(self, output_dir: str | Path, tokenizer=None) -> Path:
        """Write the adapters, mixing coefficients, config (and tokenizer) atomically to `output_dir`."""
        return save_bitune(self, output_dir, tokenizer=tokenizer)

    # ------------------------------------------------------------------ the method

    @property
    def base_model(self) -> PreTrainedModel:
        """The wrapped causal LM (its linear layers carry the adapters)."""
        return self.peft_model.get_base_model() if isinstance(self.peft_model, PeftModel) else self.peft_model

    @property
    def config(self):
        return self.base_model.config

    @property
    def device(self) -> torch.device:
        return self.base_model.device

    def encode_prompt(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> PromptState:
        """Prefill: run the prompt passes over `prompt[:-1]` and mix their keys and values per layer."""
        ids, mask = prompt_ids[:, :-1], prompt_mask[:, :-1]
        spec = self.bitune_config.spec
        encodings = [self._prompt_pass(p, ids, mask) for p in spec.passes]
        if spec.mixed:
            causal, bidir = encodings
            cache = [self.mixer.mix(i, c, b) for i, (c, b) in enumerate(zip(causal, bidir))]
        else:
            cache = encodings[0]
        return PromptState(cache, prompt_ids, prompt_mask)

    def answer_logits(
        self, state: PromptState, answer_ids: torch.Tensor, answer_mask: torch.Tensor
    ) -> torch.Tensor:
        """Answer pass with θ_c from the prompt cache; `logits[:, t]` predicts `answer_ids[:, t]`."""
        with self._adapter(CAUSAL_ADAPTER):
            return answer_pass_logits(self.base_model, state, answer_ids, answer_mask)

    def forward(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> BituneOutput:
        """Loss and logits of the answers given the prompts (layout: `bitune.core.batch`)."""
        check_batch(prompt_ids, prompt_mask, answer_ids, answer_mask)
        self._check_activation_checkpointing()
        if self.bitune_config.spec.single_pass:
            logits = self._single_pass_logits(prompt_ids, prompt_mask, answer_ids, answer_mask)
        elif self.bitune_config.implementation == "layer_synchronous":
            logits = layer_synchronous_logits(self, prompt_ids, prompt_mask, answer_ids, answer_mask)
        else:  # the three-pass reference
            logits = self.answer_logits(self.encode_prompt(prompt_ids, prompt_mask), answer_ids, answer_mask)
        return answer_loss(logits, answer_ids, answer_mask, num_items_in_batch)

    def _single_pass_logits(self, prompt_ids, prompt_mask, answer_ids, answer_mask) -> torch.Tensor:
        """Plain fine-tuning: one causal pass over the whole sequence, logits only where the loss needs them."""
        tokens = torch.cat([prompt_ids, answer_ids[:, :-1]], dim=1)
        mask = torch.cat([prompt_mask, answer_mask[:, :-1]], dim=1)
        with self._adapter(CAUSAL_ADAPTER):
            return self.base_model(
                input_ids=tokens,
                attention_mask=mask,
                position_ids=positions(mask),
                use_cache=False,
                logits_to_keep=answer_ids.shape[1],
            ).logits

    def _prompt_pass(self, prompt_pass: PromptPass, ids: torch.Tensor, mask: torch.Tensor) -> KV:
        with self._adapter(prompt_pass.adapter):
            return record_prompt_pass(
                self.base_model,
                ids,
                mask,
                bidirectional=prompt_pass.bidirectional,
                stop_early=not self._checkpointing(),
            )

    def _recorder(self) -> KVRecorder:
        """A K/V recorder for one prompt pass of this model (see `record_prompt_pass`)."""
        return KVRecorder(num_layers(self.base_model), stop_after_last=not self._checkpointing())

    def _checkpointing(self) -> bool:
        return self.training and any(
            getattr(m, "gradient_checkpointing", False) for m in self._decoder_layers()
        )

    # ------------------------------------------------------------------ generation

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **generate_kwargs
    ):
        """Like `transformers` `generate`; prefill reads the prompts twice. See `bitune.core.generation.generate`."""
        return generate(self, input_ids, attention_mask, **generate_kwargs)

    # ------------------------------------------------------------------ adapters and checkpointing

    @contextlib.contextmanager
    def _adapter(self, name: str) -> Iterator[None]:
        """Route every PEFT layer through one adapter for the duration of a pass.

        PEFT's own `set_adapter` also flips `requires_grad`, which would silently drop the gradients of the
        adapter used by an earlier pass of the same step; this switch only changes the routing.
        """
        previous = self._current_adapter
        self._use_adapter(name)
        try:
            yield
        finally:
            self._use_adapter(previous)

    def _use_adapter(self, name: str) -> None:
        self._current_adapter = name
        if self.merged:
            for parent, attribute, layer in self._lora_slots:
                setattr(parent, attribute, layer if name == BIDIR_ADAPTER else layer.get_base_layer())
            return
        for layer in self._tuner_layers:
            layer._active_adapter = name

    def _replay_context(self):
        """`context_fn` for activation checkpointing: replay a layer with the adapter of its first run."""
        return contextlib.nullcontext(), self._adapter(self._current_adapter)

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, **kwargs
    ) -> None:
        """Recompute decoder layers in backward, exactly: non-reentrant, with each pass's own adapter."""
        options = dict(activation_checkpointing_kwargs or {})
        if options.get("use_reentrant"):
            raise BituneError(
                "reentrant activation checkpointing loses the gradients of Bitune's prompt passes; "
                "use use_reentrant=False (the default)"
            )
        options.update(use_reentrant=False, context_fn=self._replay_context)
        self.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=options, **kwargs)
        for layer in self._decoder_layers():
            # The prompt passes record K/V and the answer pass reads a fixed prefix: replaying a layer
            # is harmless, so the cache may stay attached under checkpointing.
            layer._can_checkpoint_with_cache = True

    gradient_checkpointing_enable = activation_checkpointing_enable

    def activation_checkpointing_disable(self) -> None:
        self.base_model.activation_checkpointing_disable()

    gradient_checkpointing_disable = activation_checkpointing_disable

    def _decoder_layers(self) -> list[nn.Module]:
        return [m for m in self.base_model.modules() if isinstance(m, GradientCheckpointingLayer)]

    def _check_activation_checkpointing(self) -> None:
        if not self.training:
            return
        for layer in self._decoder_layers():
            if getattr(layer, "gradient_checkpointing", False):
                options = getattr(layer._gradient_checkpointing_func, "keywords", {})
                if options.get("context_fn") != self._replay_context:
                    raise BituneError(
                        "activation checkpointing was enabled on the inner model; enable it with "
                        "BituneModel.activation_checkpointing_enable() so each pass replays with its own adapter"
                    )
                return

    # ------------------------------------------------------------------ introspection

    def alphas(self) -> dict[str, list[float]]:
        """The current mixing coefficients α per layer, for keys and values (empty without mixing)."""
        if self.mixer is None:
            return {}
        keys, values = self.mixer.alphas()
        return {"keys": keys.tolist(), "values": values.tolist()}

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}


def answer_loss(
    logits: torch.Tensor,
    answer_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> BituneOutput:
    """Next-token cross-entropy on answer tokens only, in float32."""
    token_losses = F.cross_entropy(logits.float().transpose(1, 2), answer_ids, reduction="none")
    token_losses = token_losses * answer_mask
    counts = answer_mask.sum(-1)
    total = token_losses.sum()
    denominator = counts.sum() if num_items_in_batch is None else num_items_in_batch
    return BituneOutput(
        loss=total / denominator,
        logits=logits,
        sample_losses=token_losses.sum(-1) / counts.clamp(min=1),
        num_tokens=counts.sum(),
    )


@torch.no_grad()
def check_model_support(model: PreTrainedModel) -> None:
    """Raise a clear `BituneError` unless `model` is a decoder-only LM whose attention Bitune can switch.

    Three probes on a 3-token input: the causal pass must not let token 0 see token 2, the bidirectional
    pass (`is_causal=False`) must, and every layer must hand its keys/values to the cache.
    """
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        raise BituneError(f"{name} is an encoder-decoder model; Bitune needs a decoder-only causal LM")
    try:
        decoder = model.get_decoder()
    except (AttributeError, ValueError, NotImplementedError) as error:
        raise BituneError(f"{name} has no decoder to wrap; Bitune needs a decoder-only causal LM") from error
    vocab = model.config.get_text_config(decoder=True).vocab_size
    first = torch.tensor([[1, 2, 3]], device=model.device) % vocab
    second = first.clone()
    second[0, 2] = (second[0, 2] + 1) % vocab
    was_training = model.training
    model.eval()
    try:

        def first_token_state(ids: torch.Tensor, **kwargs) -> torch.Tensor:
            recorder = KVRecorder(num_layers(model))
            out = decoder(input_ids=ids, use_cache=True, **cache_argument(decoder, recorder), **kwargs)
            recorder.recorded()
            return out.last_hidden_state[0, 0]

        causal_changes = not torch.equal(first_token_state(first), first_token_state(second))
        bidir_changes = not torch.equal(
            first_token_state(first, is_causal=False), first_token_state(second, is_causal=False)
        )
    except RuntimeError as error:
        raise BituneError(f"{name} cannot be used with Bitune: {error}") from error
    finally:
        model.train(was_training)
    if causal_changes:
        raise BituneError(
            f"{name}: the first token sees later tokens in a causal pass; Bitune needs a decoder-only causal LM "
            "(encoder-only models such as BERT are not supported)"
        )
    if not bidir_changes:
        raise BituneError(
            f"{name}: its attention ignores `is_causal=False`, so Bitune cannot make the prompt pass "
            "bidirectional; use a model family whose forward accepts it (Llama, Mistral, Qwen2/3, Gemma 1-3, "
            "Phi, Phi3, ...) and an attention implementation that honours it (eager or sdpa)"
        )


def _slot(root: nn.Module, name: str, module: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    """(parent, attribute name, module) of the submodule `name` of `root`."""
    parent, _, attribute = name.rpartition(".")
    return root.get_submodule(parent), attribute, module
