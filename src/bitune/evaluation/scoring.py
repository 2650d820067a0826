"""Scoring models: log-likelihoods of continuations and greedy generations, one prompt encoding per context.

Bitune's two prompt passes read only the context, so the mixed prompt cache of a multiple-choice question is
computed once and every option is scored from it: the cache is repeated once per option and one answer pass
reads all of them. Questions are batched (longest first, `batch_size` contexts per batch); options whose
answer-pass inputs are equal (e.g. single-token options " A", " B", ...) share one row of that pass.

Anything with `encode_prompt`, `answer_logits` and `generate` can be scored (`ScoringModel`): a
`bitune.BituneModel` (any mode; a plain PEFT adapter is a `BituneModel` in mode "baseline") or a bare
Hugging Face causal LM wrapped in `bitune.core.plain.PlainModel`. `bitune.core.pretrained.load_for_inference`
builds the right one.

Tokenisation and truncation follow lm-evaluation-harness 0.4.13 (`TemplateLM._encode_pair`, `HFLM`), so these
scores are the ones lm-eval computes for the same model.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from bitune.core.plain import PlainModel
    >>> model = PlainModel(LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)))
    >>> first, second = loglikelihoods(model, [([1, 5, 6], [7, 8]), ([1, 5, 6], [9])], progress=False)
    >>> first.logprob < 0 and isinstance(second.is_greedy, bool)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from bitune.core.batch import pad_left
from bitune.core.generation import generate_new_text
from bitune.core.loading import pad_token_id as tokenizer_pad_id
from bitune.core.plain import ScoringModel
from bitune.core.prompts import encode_prompts
from bitune.errors import BituneInputError
from bitune.evaluation.tasks import MultipleChoiceItem

# lm-eval's default context window when neither the model config nor the tokenizer names one.
DEFAULT_MAX_LENGTH = 2048
# Tokenizers without a limit report this huge `model_max_length` (transformers' VERY_LARGE_INTEGER).
_UNLIMITED = int(1e30)


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
    the tokenizer adds its special tokens (BOS) as usual (`bitune.core.prompts.encode_prompts`). An empty context becomes the BOS (or EOS) token.

    Example:
        >>> context, continuation = encode_pair(tokenizer, "Question: 2+2?\\nAnswer:", " 4")
        >>> context[:2], tokenizer.convert_ids_to_tokens(continuation)
        ([1, 410], ['▁', '4'])
        >>> encode_pair(tokenizer, "Once upon a time ", "there was")  # the space moves to the continuation
        ([1, 403, 407, 261, 378], [383, 286])
        >>> encode_pair(tokenizer, "Once upon a time", " there was")
        ([1, 403, 407, 261, 378], [383, 286])
    """
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        tokens = tokenizer.encode(continuation, add_special_tokens=False)
        return ([prefix], tokens) if tokens[:1] != [prefix] else (tokens[:1], tokens[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids, whole = encode_prompts(tokenizer, [context, context + continuation])
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
    """Per item, the `Loglikelihood` of each option's continuation after its context (`item.requests`).

    Example:
        >>> from bitune.evaluation.tasks import load_task
        >>> task = load_task("arc_easy", data_dir="../shared/data", limit=4)
        >>> scores = score_multiple_choice(model, tokenizer, task.items, progress=False)
        >>> scores[0][0]
        Loglikelihood(logprob=-143.8..., is_greedy=False)
        >>> [round(score.logprob, 1) for score in scores[0]], task.items[0].gold
        ([-143.8, -117.5, -101.0, -115.8], 0)
    """
    requests = [
        encode_pair(tokenizer, context, continuation)
        for item in items
        for context, continuation in item.requests
    ]
    scores = loglikelihoods(
        model,
        requests,
        batch_size=batch_size,
        pad_token_id=tokenizer_pad_id(tokenizer),
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
        >>> generate_until(model, tokenizer, ["Once upon a time", "The cat"], stop_sequences=["."],
        ...                max_new_tokens=16, progress=False)
        [', there was a little girl named Lily', 'and a boy were playing in the park']
    """
    eos = tokenizer.decode(tokenizer.eos_token_id, skip_special_tokens=False)
    stops = [*stop_sequences, *([eos] if eos and eos not in stop_sequences else [])]
    encoded = encode_prompts(tokenizer, prompts)
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), prompts[i]))
    keep = None if max_length is None else max_length - max_new_tokens
    if keep is not None and keep <= 0:
        raise BituneInputError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in {max_length} tokens"
        )
    outputs: list[str] = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="Generating", disable=not progress):
        batch = order[start : start + batch_size]
        padded = pad_left(
            [encoded[i][-keep:] if keep else encoded[i] for i in batch], tokenizer_pad_id(tokenizer)
        )
        input_ids, attention_mask = padded["input_ids"], padded["attention_mask"]
        texts = generate_new_text(
            model,
            tokenizer,
            input_ids.to(model.device),
            attention_mask.to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            stop_strings=list(stops),
        )
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


__all__ = [
    "Loglikelihood",
    "context_window",
    "cut_at_stop_sequences",
    "encode_pair",
    "generate_until",
    "loglikelihoods",
    "score_multiple_choice",
]
