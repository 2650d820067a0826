"""Scoring models: log-likelihoods of continuations and greedy generations, one prompt encoding per context.

Bitune's two prompt passes read only the context, so the mixed prompt cache of a multiple-choice question is
computed once and every option is scored from it: the cache is repeated once per option and one answer pass
reads all of them. Questions are batched (longest first, `batch_size` contexts per batch); options whose
answer-pass inputs are equal (e.g. single-token options " A", " B", ...) share one row of that pass.

Anything with `encode_prompt`, `answer_logits` and `generate` can be scored (`ScoringModel`): a
`bitune.BituneModel` (any mode; a plain PEFT adapter is a `BituneModel` in mode "baseline") or a bare
Hugging Face causal LM wrapped in `PlainModel`. `load_scoring_model` builds the right one.

Tokenisation and truncation follow lm-evaluation-harness 0.4.13 (`TemplateLM._encode_pair`, `HFLM`), so these
scores are the ones lm-eval computes for the same model.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = PlainModel(LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)))
    >>> first, second = loglikelihoods(model, [([1, 5, 6], [7, 8]), ([1, 5, 6], [9])], progress=False)
    >>> first.logprob < 0 and isinstance(second.is_greedy, bool)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from bitune.core.model import BituneModel, PromptState, answer_pass_logits, record_prompt_pass
from bitune.core.modes import CAUSAL_ADAPTER, BituneConfig
from bitune.errors import BituneInputError
from bitune.evaluation.tasks import MultipleChoiceItem

# lm-eval's default context window when neither the model config nor the tokenizer names one.
DEFAULT_MAX_LENGTH = 2048
# Tokenizers without a limit report this huge `model_max_length` (transformers' VERY_LARGE_INTEGER).
_UNLIMITED = int(1e30)


class ScoringModel(Protocol):
    """What the scorer needs from a model (`BituneModel` and `PlainModel` have it)."""

    @property
    def config(self) -> PretrainedConfig: ...

    @property
    def device(self) -> torch.device: ...

    def encode_prompt(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> PromptState: ...

    def answer_logits(
        self, state: PromptState, answer_ids: torch.Tensor, answer_mask: torch.Tensor
    ) -> torch.Tensor: ...

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **generate_kwargs
    ) -> torch.Tensor: ...


class PlainModel(nn.Module):
    """A Hugging Face causal LM with `BituneModel`'s scoring interface: the prompt is read once, causally.

    Scores equal the model's own forward over context + continuation; this is how a base model is evaluated
    on the same code path (and with the same per-context cache reuse) as a Bitune model.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = PlainModel(LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16,
        ...     intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)))
        >>> state = model.encode_prompt(torch.tensor([[1, 5, 6]]), torch.ones(1, 3, dtype=torch.long))
        >>> model.answer_logits(state, torch.tensor([[7, 8]]), torch.ones(1, 2, dtype=torch.long)).shape
        torch.Size([1, 2, 32])
    """

    def __init__(self, base_model: PreTrainedModel) -> None:
        super().__init__()
        self.base_model = base_model

    @property
    def config(self) -> PretrainedConfig:
        return self.base_model.config

    @property
    def device(self) -> torch.device:
        return self.base_model.device

    def encode_prompt(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> PromptState:
        """Prefill: the keys and values of `prompt[:-1]`, as `BituneModel.encode_prompt` returns them."""
        ids, mask = prompt_ids[:, :-1], prompt_mask[:, :-1]
        # Recorded K/V rather than a DynamicCache: sliding-window layers of the latter drop old tokens.
        return PromptState(
            record_prompt_pass(self.base_model, ids, mask, bidirectional=False), prompt_ids, prompt_mask
        )

    def answer_logits(
        self, state: PromptState, answer_ids: torch.Tensor, answer_mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits of the answers after the cached prompts; `logits[:, t]` predicts `answer_ids[:, t]`."""
        return answer_pass_logits(self.base_model, state, answer_ids, answer_mask)

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **generate_kwargs
    ):
        """The model's own `generate` (returns prompt + new tokens)."""
        return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)


def load_scoring_model(
    base_model: PreTrainedModel | str | Path | None = None,
    *,
    checkpoint: str | Path | None = None,
    peft_adapter: str | Path | None = None,
    **from_pretrained_kwargs,
) -> BituneModel | PlainModel:
    """The model to evaluate, in eval mode: a Bitune checkpoint, a plain PEFT adapter, or a bare base model.

    Args:
        base_model: the base model (object, local path or hub id); for a checkpoint, defaults to the base
            model its `bitune_config.json` names.
        checkpoint: a folder written by `BituneModel.save_pretrained`.
        peft_adapter: a plain PEFT adapter folder; it becomes a `BituneModel` in mode "baseline", which reads
            the prompt causally with the adapter, exactly like the `PeftModel` would.
        from_pretrained_kwargs: for `AutoModelForCausalLM.from_pretrained` (e.g. `dtype`).

    Example:
        >>> model = load_scoring_model("path/to/base", checkpoint="runs/bitune/final")  # doctest: +SKIP
    """
    if checkpoint is not None and peft_adapter is not None:
        raise BituneInputError("give a Bitune checkpoint or a PEFT adapter, not both")
    if checkpoint is None and base_model is None:
        raise BituneInputError("name the model to evaluate: a Bitune checkpoint or a base model")
    if isinstance(base_model, (str, Path)):
        try:
            base_model = AutoModelForCausalLM.from_pretrained(base_model, **from_pretrained_kwargs)
        except OSError as error:
            raise BituneInputError(f"could not load the base model {base_model}: {error}") from error
    if checkpoint is not None:
        model = BituneModel.from_pretrained(checkpoint, base_model, **from_pretrained_kwargs)
    elif peft_adapter is not None:
        if not (Path(peft_adapter) / "adapter_config.json").is_file():
            raise BituneInputError(
                f"{peft_adapter}: not a PEFT adapter folder (adapter_config.json is missing)"
            )
        # Named like Bitune's causal adapter, which mode "baseline" routes every pass through.
        peft_model = PeftModel.from_pretrained(base_model, peft_adapter, adapter_name=CAUSAL_ADAPTER)
        model = BituneModel(peft_model, BituneConfig(mode="baseline"))
    else:
        model = PlainModel(base_model)
    return model.eval()


def tokenizer_source(*folders: str | Path | None) -> str | Path | None:
    """The first of `folders` that holds a tokenizer (tokenizer_config.json), else the last one given.

    Example:
        >>> tokenizer_source("runs/ckpt-without-tokenizer", "models/base")
        'models/base'
    """
    given = [folder for folder in folders if folder is not None]
    for folder in given:
        if (Path(folder) / "tokenizer_config.json").is_file():
            return folder
    return given[-1] if given else None


def context_window(config, tokenizer=None, default: int = DEFAULT_MAX_LENGTH) -> int:
    """The most tokens the model reads at once, found where lm-eval looks for it (`resolve_max_length`)."""
    config = getattr(config, "text_config", None) or config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit < _UNLIMITED else default


# ---------------------------------------------------------------------------------------------- log-likelihoods


class Loglikelihood(NamedTuple):
    """A continuation's summed log-probability, and whether greedy decoding would have produced it."""

    logprob: float
    is_greedy: bool


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context and its continuation, split exactly as lm-eval 0.4.13 splits them.

    Trailing spaces of the context move to the continuation; the continuation's tokens are those of
    `context + continuation` after the context's own tokens (so a merge across the boundary is never split);
    the tokenizer adds its special tokens (BOS) as usual. An empty context becomes the BOS (or EOS) token.

    Example:
        >>> encode_pair(tokenizer, "Question: 2+2?\\nAnswer:", " 4")  # doctest: +SKIP
        ([1, 894, 29901, ...], [29871, 29946])
    """
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        tokens = tokenizer.encode(continuation, add_special_tokens=False)
        return ([prefix], tokens) if tokens[:1] != [prefix] else (tokens[:1], tokens[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


@torch.inference_mode()
def loglikelihoods(
    model: ScoringModel,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 8,
    pad_token_id: int = 0,
    max_length: int | None = None,
    progress: bool = True,
) -> list[Loglikelihood]:
    """Score token continuations: one `(context_ids, continuation_ids)` request in, one `Loglikelihood` out.

    Requests that share a context share one prompt encoding; `batch_size` counts distinct contexts. With
    `max_length`, each context loses its start until context + continuation[:-1] fits, as in lm-eval.
    """
    pairs = [_truncated(context, continuation, max_length) for context, continuation in requests]
    by_context: dict[tuple[int, ...], list[int]] = {}
    for index, (context, _) in enumerate(pairs):
        by_context.setdefault(context, []).append(index)
    # Longest first, as lm-eval: the batch that runs out of memory is the first one.
    contexts = sorted(by_context, key=lambda context: (-len(context), context))
    results: list[Loglikelihood | None] = [None] * len(pairs)
    with tqdm(total=len(pairs), desc="Scoring", disable=not progress) as bar:
        for start in range(0, len(contexts), batch_size):
            batch = contexts[start : start + batch_size]
            indices = [index for context in batch for index in by_context[context]]
            scores = _score_batch(model, batch, [by_context[c] for c in batch], pairs, pad_token_id)
            for index, score in zip(indices, scores, strict=True):
                results[index] = score
            bar.update(len(indices))
    return results  # type: ignore[return-value]


def _truncated(
    context: Sequence[int], continuation: Sequence[int], max_length: int | None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if not context or not continuation:
        raise BituneInputError(
            "a scoring request needs at least one context token and one continuation token"
        )
    if max_length is not None:
        if len(continuation) > max_length:
            raise BituneInputError(
                f"a continuation of {len(continuation)} tokens does not fit the model's {max_length}-token window"
            )
        context = context[max(0, len(context) + len(continuation) - max_length - 1) :]
    return tuple(context), tuple(continuation)


def _score_batch(
    model: ScoringModel,
    contexts: list[tuple[int, ...]],
    members: list[list[int]],
    pairs: list[tuple[tuple[int, ...], tuple[int, ...]]],
    pad_token_id: int,
) -> list[Loglikelihood]:
    """Encode `contexts` once, then score all their continuations (`members[i]` index `pairs`) in one pass."""
    device = model.device
    # One answer-pass row per distinct continuation[:-1] of a context: the logits depend on nothing else.
    row_inputs: list[tuple[int, ...]] = []
    rows_per_context: list[int] = []
    row_of_pair: list[int] = []
    for indices in members:
        first_row = len(row_inputs)
        rows: dict[tuple[int, ...], int] = {}
        for index in indices:
            continuation = pairs[index][1]
            if continuation[:-1] not in rows:
                rows[continuation[:-1]] = len(row_inputs)
                row_inputs.append(continuation)
            row_of_pair.append(rows[continuation[:-1]])
        rows_per_context.append(len(row_inputs) - first_row)

    # Bitune encodes prompt[:-1], so the prompt tensor needs 2 columns even when every context is 1 token.
    prompt_ids, prompt_mask = _pad([list(c) for c in contexts], pad_token_id, left=True, min_width=2)
    state = model.encode_prompt(prompt_ids.to(device), prompt_mask.to(device))
    if any(count != 1 for count in rows_per_context):  # e.g. letter options: one row per context already
        state = state.repeat_interleave(torch.tensor(rows_per_context, device=device))
    answer_ids, answer_mask = _pad([list(r) for r in row_inputs], pad_token_id, left=False)
    logprobs = (
        model.answer_logits(state, answer_ids.to(device), answer_mask.to(device)).float().log_softmax(-1)
    )

    flat = [index for indices in members for index in indices]
    targets, target_mask = _pad([list(pairs[index][1]) for index in flat], pad_token_id, left=False)
    targets, target_mask = targets.to(device), target_mask.to(device).bool()
    rows = torch.tensor(row_of_pair, device=device)
    steps = torch.arange(targets.shape[1], device=device)
    token_logprobs = logprobs[rows[:, None], steps[None, :], targets].masked_fill(~target_mask, 0.0)
    greedy = (logprobs.argmax(-1)[rows] == targets) | ~target_mask
    return [
        Loglikelihood(float(total), bool(is_greedy))
        for total, is_greedy in zip(token_logprobs.sum(-1).tolist(), greedy.all(-1).tolist(), strict=True)
    ]


def _pad(
    rows: list[list[int]], pad_token_id: int, left: bool, min_width: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    side = "left" if left else "right"
    tensors = [torch.tensor(row, dtype=torch.long) for row in rows]
    ids = pad_sequence(tensors, batch_first=True, padding_value=pad_token_id, padding_side=side)
    mask = pad_sequence([torch.ones_like(t) for t in tensors], batch_first=True, padding_side=side)
    extra = max(0, min_width - ids.shape[1])
    padding = (extra, 0) if left else (0, extra)
    return F.pad(ids, padding, value=pad_token_id), F.pad(mask, padding)


def score_multiple_choice(
    model: ScoringModel,
    tokenizer,
    items: Sequence[MultipleChoiceItem],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
) -> list[list[Loglikelihood]]:
    """Per item, the `Loglikelihood` of each option's continuation after the item's context.

    Example:
        >>> from bitune.evaluation.tasks import load_task
        >>> task = load_task("arc_easy", data_dir="../shared/data", limit=4)  # doctest: +SKIP
        >>> score_multiple_choice(model, tokenizer, task.items)[0]  # doctest: +SKIP
        [Loglikelihood(logprob=-41.2, is_greedy=False), ...]
    """
    requests = [
        encode_pair(tokenizer, item.context, option) for item in items for option in item.continuations
    ]
    scores = loglikelihoods(
        model,
        requests,
        batch_size=batch_size,
        pad_token_id=_pad_token_id(tokenizer),
        max_length=max_length,
        progress=progress,
    )
    per_item, start = [], 0
    for item in items:
        per_item.append(scores[start : start + len(item.choices)])
        start += len(item.choices)
    return per_item


# ---------------------------------------------------------------------------------------------- generation


@torch.inference_mode()
def generate_until(
    model: ScoringModel,
    tokenizer,
    prompts: Sequence[str],
    *,
    stop_sequences: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
) -> list[str]:
    """Greedy continuations of `prompts`, each cut before the first stop sequence (or EOS), as lm-eval does.

    Prompts are batched longest first and left-padded, like lm-eval's `generate_until`; with `max_length`
    a prompt keeps its last `max_length - max_new_tokens` tokens.

    Example:
        >>> generate_until(model, tokenizer, ["Question: 2+2?\\nAnswer:"], stop_sequences=["Question:"],
        ...                max_new_tokens=16)  # doctest: +SKIP
        [' 4']
    """
    eos = tokenizer.decode(tokenizer.eos_token_id, skip_special_tokens=False)
    stops = [*stop_sequences, *([eos] if eos and eos not in stop_sequences else [])]
    order = sorted(range(len(prompts)), key=lambda i: (-len(tokenizer.encode(prompts[i])), prompts[i]))
    keep = None if max_length is None else max_length - max_new_tokens
    if keep is not None and keep <= 0:
        raise BituneInputError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in {max_length} tokens"
        )
    outputs: list[str] = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="Generating", disable=not progress):
        batch = order[start : start + batch_size]
        encoded = tokenizer(
            [prompts[i] for i in batch], padding="longest", padding_side="left", return_tensors="pt"
        )
        input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        if keep is not None:
            input_ids, attention_mask = input_ids[:, -keep:], attention_mask[:, -keep:]
        generated = model.generate(
            input_ids.to(model.device),
            attention_mask.to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            stop_strings=list(stops),
            tokenizer=tokenizer,
            pad_token_id=_pad_token_id(tokenizer),
        )
        texts = tokenizer.batch_decode(generated[:, input_ids.shape[1] :], skip_special_tokens=True)
        for index, text in zip(batch, texts, strict=True):
            outputs[index] = cut_at_stop_sequences(text, stops)
    return outputs


def cut_at_stop_sequences(text: str, stop_sequences: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop sequence.

    Example:
        >>> cut_at_stop_sequences("12\\n\\nQuestion: next", ["Question:"])
        '12\\n\\n'
    """
    for stop in stop_sequences:
        if stop:
            text = text.split(stop)[0]
    return text


def _pad_token_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


__all__ = [
    "Loglikelihood",
    "PlainModel",
    "ScoringModel",
    "context_window",
    "cut_at_stop_sequences",
    "encode_pair",
    "generate_until",
    "load_scoring_model",
    "loglikelihoods",
    "score_multiple_choice",
    "tokenizer_source",
]
