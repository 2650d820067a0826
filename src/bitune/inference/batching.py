"""Dynamic batching for serving: requests that arrive together are prefilled and decoded as one batch.

One worker thread owns the model. Requests wait in a queue; each turn of the worker

1. admits waiting requests while the batch has room (`max_batch_size` sequences; a request with `n` choices
   takes `n`). When the batch is empty it first waits `wait_ms` for companions, so that requests arriving
   together start together; a running batch takes newcomers at its next step, without waiting;
2. prefills the admitted prompts (Bitune's prefill: both prompt passes over `prompt[:-1]`, mixed per layer;
   `BituneModel.encode_prompt`), in groups of similar length so that a long prompt pads no short one, and
   merges their caches into the running batch (left-padded, rows aligned on the right);
3. decodes one token for every sequence of the batch in one forward of the causal model (θ_c), from a
   `DynamicCache` that holds every row's prompt and answer so far;
4. hands each sequence its new text, and drops the rows that finished (end of sequence, a stop string, their
   token limit) or whose client went away.

A long prompt therefore delays the others by its own prefill only, and each sequence's tokens are those it
gets alone: positions count its real tokens, padding is masked, and greedy decoding takes the argmax of its
own logits (sampling draws from its own seeded generator).
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from bitune.core.batch import pad_left
from bitune.core.compat import cache_argument
from bitune.core.loading import pad_token_id
from bitune.core.modes import CAUSAL_ADAPTER
from bitune.errors import BituneError, BituneInputError

logger = logging.getLogger(__name__)

KV = list[tuple[torch.Tensor, torch.Tensor]]


class PromptTooLong(BituneInputError):
    """The prompt fills the model's positions (or more)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    Args:
        max_tokens: the most new tokens per choice.
        temperature: 0 decodes greedily; otherwise the logits are divided by it and sampled.
        top_p: nucleus sampling: only the most likely tokens whose probabilities add up to `top_p` are drawn.
        stop: texts that end a choice where they first appear (not included in its text).
        seed: seeds the sampler of choice i with `seed + i` (unset: a random seed).
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Event:
    """What the worker tells a request: a choice's new text, and with `finish_reason` its end.

    `finish_reason` is "stop" (end of sequence or a stop string), "length" (`max_tokens` or the model's
    positions) or "error" (then `error` says what went wrong); `tokens` counts the choice's tokens so far.
    """

    choice: int
    text: str
    finish_reason: str | None = None
    tokens: int = 0
    error: str | None = None


class Ticket:
    """A submitted request: `cancel()` (e.g. when its client disconnects) frees its rows at the next step."""

    def __init__(
        self, prompt_ids: list[int], params: SamplingParams, n: int, on_event: Callable[[Event], None]
    ):
        self.prompt_ids = prompt_ids
        self.params = params
        self.n = n
        self.on_event = on_event
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Row:
    """One sequence being decoded: a choice of a request."""

    ticket: Ticket
    choice: int
    limit: int
    text: TextTail
    generator: torch.Generator | None
    tokens: int = 0
    done: bool = False


@dataclass
class BatchStats:
    """Counters for tests and benchmarks: steps run, the most rows decoded together, prefill calls."""

    steps: int = 0
    max_rows: int = 0
    prefills: int = 0
    prefilled_rows: int = 0
    row_counts: deque[int] = field(default_factory=lambda: deque(maxlen=10_000))  # rows per step, the latest


class TextTail:
    """A choice's text as its tokens arrive: what can be sent so far, and whether a stop string ended it.

    Text is held back while it could still become a stop string or ends in an incomplete UTF-8 character.

    Example:
        >>> from types import SimpleNamespace
        >>> words = {1: "Hel", 2: "lo", 3: " Que", 4: "stion"}
        >>> tokenizer = SimpleNamespace(decode=lambda ids, **_: "".join(words[i] for i in ids))
        >>> tail = TextTail(tokenizer, ("Question",))
        >>> [tail.push(i) for i in (1, 2, 3, 4)]
        [('Hel', False), ('lo', False), (' ', False), ('', True)]
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already handed out

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; returns (new text to send, whether a stop string ended the choice)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            longest = max(len(s) for s in self.stop)
            start = max(0, self.sent - longest + 1)
            hits = [index for index in (text.find(s, start) for s in self.stop) if index >= 0]
            if hits:
                return self._send(text, max(min(hits), self.sent)), True
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its other bytes
            return "", False
        return self._send(text, len(text) - self._possible_stop(text)), False

    def flush(self) -> str:
        """The text held back, at the end of a choice that no stop string ended."""
        return self._send(self.tokenizer.decode(self.ids, skip_special_tokens=True), None)

    def _send(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        piece = text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece

    def _possible_stop(self, text: str) -> int:
        """The length of the longest end of `text` that begins a stop string."""
        for size in range(min(len(text), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(text[-size:]) for s in self.stop):
                return size
        return 0


class Batcher:
    """Serves generation requests for one model with dynamic batching (see the module docstring).

    `model` is a `BituneModel` (any mode, or a merged export) or a `bitune.core.plain.PlainModel`, in eval mode.
    Submit with `submit`; events arrive on the worker thread through each request's `on_event`.

    Example:
        >>> import queue
        >>> events = queue.Queue()
        >>> batcher = Batcher(model, tokenizer, max_batch_size=16, wait_ms=5)
        >>> prompt = tokenizer("Once upon a time").input_ids
        >>> ticket = batcher.submit(prompt, SamplingParams(max_tokens=8, temperature=0), 1, events.put)
        >>> text = ""
        >>> while (event := events.get(timeout=30)).finish_reason is None:
        ...     text += event.text
        >>> text + event.text, event.finish_reason, event.tokens
        (', there was a little girl', 'length', 8)
        >>> batcher.close()
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch_size: int = 16,
        wait_ms: float = 10.0,
        max_positions: int | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise BituneInputError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if wait_ms < 0:
            raise BituneInputError(f"wait_ms must be 0 or more, got {wait_ms}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.wait = wait_ms / 1000
        self.max_positions = max_positions or model_positions(model)
        self.pad_token_id = pad_token_id(tokenizer)
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        self.stats = BatchStats()
        self._pending: deque[Ticket] = deque()
        self._condition = threading.Condition()
        self._closed = False
        # The running batch (worker thread only): rows, their cache, padding mask, next inputs and positions.
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros(0, 0, dtype=torch.long)
        self._inputs = torch.zeros(0, dtype=torch.long)
        self._positions = torch.zeros(0, dtype=torch.long)
        self._thread = threading.Thread(target=self._work, name="bitune-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the client side

    def submit(
        self, prompt_ids: Sequence[int], params: SamplingParams, n: int, on_event: Callable[[Event], None]
    ) -> Ticket:
        """Queue a prompt (token ids) for `n` choices; raises `BituneInputError` for what cannot be served."""
        prompt_ids = [int(token) for token in prompt_ids]
        if not prompt_ids:
            raise BituneInputError("the prompt is empty")
        if self.max_positions is not None and len(prompt_ids) >= self.max_positions:
            raise PromptTooLong(
                f"the prompt has {len(prompt_ids)} tokens; this model reads at most {self.max_positions} "
                "positions, prompt and answer together"
            )
        if params.max_tokens < 1:
            raise BituneInputError(f"max_tokens must be at least 1, got {params.max_tokens}")
        if not 1 <= n <= self.max_batch_size:
            raise BituneInputError(f"n must be between 1 and {self.max_batch_size} (the batch size)")
        ticket = Ticket(prompt_ids, params, n, on_event)
        with self._condition:
            if self._closed:
                raise BituneError("the batcher is closed")
            self._pending.append(ticket)
            self._condition.notify()
        return ticket

    @property
    def load(self) -> int:
        """Sequences being decoded or waiting (a snapshot, for health checks and tests)."""
        with self._condition:
            return len(self._rows) + self._waiting_rows()

    def close(self) -> None:
        """Stop the worker after its current step; requests still open end with an error event."""
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._thread.join(timeout=60)

    # ------------------------------------------------------------------ the worker

    def _work(self) -> None:
        with torch.inference_mode():
            while True:
                admitted = self._next_admissions()
                if admitted is None:
                    break
                try:
                    if admitted:
                        self._prefill(admitted)
                    if self._rows:
                        self._step()
                except Exception as error:  # the batch is lost, the server goes on
                    logger.exception("generation failed")
                    self._fail(
                        [*admitted, *(row.ticket for row in self._rows)], f"generation failed: {error}"
                    )
                    self._reset()
        self._fail(list(self._pending) + [row.ticket for row in self._rows], "the server is shutting down")

    def _next_admissions(self) -> list[Ticket] | None:
        """Waiting requests that fit into the batch now (None once closed); blocks while there is nothing to do."""
        with self._condition:
            while not self._pending and not self._rows and not self._closed:
                self._condition.wait()
            if self._closed:
                return None
            if (
                not self._rows and self.wait > 0
            ):  # an idle batch waits a moment for requests arriving together
                deadline = time.monotonic() + self.wait
                while self._waiting_rows() < self.max_batch_size and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._condition.wait(remaining)
            admitted, room = [], self.max_batch_size - len(self._rows)
            while self._pending and (self._pending[0].cancelled or self._pending[0].n <= room):
                ticket = self._pending.popleft()
                if not ticket.cancelled:
                    admitted.append(ticket)
                    room -= ticket.n
            return admitted

    def _waiting_rows(self) -> int:
        return sum(ticket.n for ticket in self._pending if not ticket.cancelled)

    def _prefill(self, tickets: list[Ticket]) -> None:
        """Prefill the admitted prompts (grouped by length) and add their rows to the batch."""
        for group in _length_groups(tickets):
            lengths = [len(ticket.prompt_ids) for ticket in group]
            repeats = torch.tensor([ticket.n for ticket in group])
            if max(lengths) > 1:
                batch = pad_left([ticket.prompt_ids for ticket in group], self.pad_token_id)
                ids = batch["input_ids"].to(self.model.device)
                mask = batch["attention_mask"].to(self.model.device)
                state = self.model.encode_prompt(ids, mask)
                cache = [
                    (
                        k.repeat_interleave(repeats.to(k.device), 0),
                        v.repeat_interleave(repeats.to(v.device), 0),
                    )
                    for k, v in state.cache
                ]
                cache_mask = mask[:, :-1].repeat_interleave(repeats.to(mask.device), 0)
                self.stats.prefills += 1
                self.stats.prefilled_rows += len(group)
            else:  # one-token prompts: nothing precedes the token that decoding starts from
                cache, cache_mask = None, torch.zeros(int(repeats.sum()), 0, dtype=torch.long)
            inputs = torch.tensor([ticket.prompt_ids[-1] for ticket in group]).repeat_interleave(repeats)
            positions = torch.tensor(lengths).repeat_interleave(repeats) - 1
            rows = [self._new_row(ticket, choice) for ticket in group for choice in range(ticket.n)]
            self._merge(rows, cache, cache_mask, inputs, positions)

    def _new_row(self, ticket: Ticket, choice: int) -> _Row:
        params = ticket.params
        limit = params.max_tokens
        if self.max_positions is not None:
            limit = min(limit, self.max_positions - len(ticket.prompt_ids))
        generator = None
        if not params.greedy:
            generator = torch.Generator(self.model.device)
            seed = params.seed + choice if params.seed is not None else random.SystemRandom().getrandbits(63)
            generator.manual_seed(seed)
        return _Row(ticket, choice, limit, TextTail(self.tokenizer, params.stop), generator)

    def _merge(
        self,
        rows: list[_Row],
        cache: KV | None,
        mask: torch.Tensor,
        inputs: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        """Append rows (their cache left-padded to the batch's width, or the batch's to theirs)."""
        device = self.model.device
        old = _layers(self._cache)
        width = max(self._mask.shape[1], mask.shape[1])
        reference = old or cache  # per layer: the heads, head size and dtype of the cache
        merged = None
        if reference is not None:
            merged = []
            for index, (like_keys, like_values) in enumerate(reference):
                old_keys, old_values = old[index] if old else (None, None)
                new_keys, new_values = cache[index] if cache else (None, None)
                merged.append(
                    (
                        torch.cat(
                            [
                                _left_pad(old_keys, len(self._rows), width, like_keys),
                                _left_pad(new_keys, len(rows), width, like_keys),
                            ]
                        ),
                        torch.cat(
                            [
                                _left_pad(old_values, len(self._rows), width, like_values),
                                _left_pad(new_values, len(rows), width, like_values),
                            ]
                        ),
                    )
                )
        self._mask = torch.cat(
            [_pad_mask(self._mask, width, device), _pad_mask(mask.to(device), width, device)]
        )
        self._cache = DynamicCache(ddp_cache_data=merged) if merged else None
        self._inputs = torch.cat([self._inputs.to(device), inputs.to(device)])
        self._positions = torch.cat([self._positions.to(device), positions.to(device)])
        self._rows.extend(rows)

    def _step(self) -> None:
        """One decoding step for every row; then hand out the text and drop the finished rows."""
        base = self.model.base_model
        rows = len(self._rows)
        mask = torch.cat([self._mask, torch.ones(rows, 1, dtype=torch.long, device=self._mask.device)], dim=1)
        cache = self._cache if self._cache is not None else DynamicCache()
        with self._causal():
            logits = base(
                input_ids=self._inputs[:, None],
                attention_mask=mask,
                position_ids=self._positions[:, None],
                use_cache=True,
                logits_to_keep=1,
                **cache_argument(base, cache),
            ).logits[:, -1]
        tokens = self._choose(logits)
        self._cache, self._mask = cache, mask
        self._inputs, self._positions = tokens, self._positions + 1
        self.stats.steps += 1
        self.stats.max_rows = max(self.stats.max_rows, rows)
        self.stats.row_counts.append(rows)
        for row, token in zip(self._rows, tokens.tolist()):
            self._advance(row, token)
        self._drop_finished()

    def _causal(self):
        """Decoding runs θ_c (a `BituneModel`), or the plain model."""
        adapter = getattr(self.model, "_adapter", None)
        return adapter(CAUSAL_ADAPTER) if adapter is not None else contextlib.nullcontext()

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row's next token: the argmax for greedy rows, a draw from its own generator otherwise."""
        tokens = logits.argmax(-1)
        for index, row in enumerate(self._rows):
            if row.generator is not None:
                tokens[index] = sample(logits[index], row.ticket.params, row.generator)
        return tokens

    def _advance(self, row: _Row, token: int) -> None:
        if row.ticket.cancelled:
            row.done = True
            return
        row.tokens += 1
        if token in self.eos_token_ids:
            self._emit(row, row.text.flush(), "stop")
            return
        piece, stopped = row.text.push(token)
        if stopped:
            self._emit(row, piece, "stop")
        elif row.tokens >= row.limit:
            self._emit(row, piece + row.text.flush(), "length")
        elif piece:
            self._emit(row, piece, None)

    def _emit(self, row: _Row, text: str, finish_reason: str | None) -> None:
        if finish_reason is not None:
            row.done = True
        try:
            row.ticket.on_event(Event(row.choice, text, finish_reason, row.tokens))
        except Exception:  # a listener that fails loses its request, not the batch
            logger.exception("a request's listener failed; cancelling it")
            row.ticket.cancel()
            row.done = True

    def _drop_finished(self) -> None:
        for row in self._rows:
            if row.ticket.cancelled:
                row.done = True
        keep = [index for index, row in enumerate(self._rows) if not row.done]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._reset()
            return
        index = torch.tensor(keep, device=self._mask.device)
        self._rows = [self._rows[i] for i in keep]
        mask = self._mask.index_select(0, index)
        first = int(mask.any(0).long().argmax())  # columns that are padding in every remaining row go
        self._mask = mask[:, first:]
        layers = [
            (k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:])
            for k, v in _layers(self._cache)
        ]
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._inputs = self._inputs.index_select(0, index)
        self._positions = self._positions.index_select(0, index)

    def _reset(self) -> None:
        self._rows, self._cache = [], None
        self._mask = torch.zeros(0, 0, dtype=torch.long)
        self._inputs = torch.zeros(0, dtype=torch.long)
        self._positions = torch.zeros(0, dtype=torch.long)

    def _fail(self, tickets: list[Ticket], message: str) -> None:
        for ticket in dict.fromkeys(tickets):  # once per request, in order
            if ticket.cancelled:
                continue
            ticket.cancel()
            for choice in range(ticket.n):
                with contextlib.suppress(Exception):
                    ticket.on_event(Event(choice, "", "error", error=message))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Draw a token from one row of logits with temperature and nucleus (top-p) sampling."""
    scores = logits.float() / params.temperature
    if params.top_p < 1:
        ordered, order = scores.sort(descending=True)
        probabilities = ordered.softmax(-1)
        outside = probabilities.cumsum(-1) - probabilities > params.top_p  # the top token always stays
        scores = torch.full_like(scores, float("-inf")).scatter(
            0, order, ordered.masked_fill(outside, float("-inf"))
        )
    return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))


def model_positions(model) -> int | None:
    """The most positions the model reads (`max_position_embeddings`), if its config says."""
    config = model.config.get_text_config(decoder=True)
    return getattr(config, "max_position_embeddings", None)


def _eos_token_ids(model, tokenizer) -> set[int]:
    ids = model.base_model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _length_groups(tickets: list[Ticket], waste: float = 0.25) -> list[list[Ticket]]:
    """Tickets sorted by prompt length, cut into groups whose padding adds at most `waste` to their tokens
    (one-token prompts, which need no prefill, form one group)."""
    groups: list[list[Ticket]] = []
    for ticket in sorted(tickets, key=lambda ticket: len(ticket.prompt_ids)):
        length = len(ticket.prompt_ids)
        if groups:
            group = groups[-1]
            shortest = len(group[0].prompt_ids)
            real = sum(len(t.prompt_ids) for t in group) + length
            if (length == 1) == (shortest == 1) and (len(group) + 1) * length <= (1 + waste) * real:
                group.append(ticket)
                continue
        groups.append([ticket])
    return groups


def _layers(cache: DynamicCache | None) -> KV | None:
    if cache is None:
        return None
    return [(layer.keys, layer.values) for layer in cache.layers]


def _left_pad(states: torch.Tensor | None, rows: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """`states` ([rows, heads, length, dim], or None: nothing cached) left-padded with zeros to `width` positions."""
    if states is not None and states.shape[2] == width:
        return states
    padded = like.new_zeros((rows, like.shape[1], width, like.shape[3]))
    if states is not None and states.shape[2]:
        padded[:, :, width - states.shape[2] :] = states
    return padded


def _pad_mask(mask: torch.Tensor, width: int, device: torch.device) -> torch.Tensor:
    mask = mask.to(device)
    if mask.shape[1] == width:
        return mask
    return torch.cat([mask.new_zeros(mask.shape[0], width - mask.shape[1]), mask], dim=1)


__all__ = [
    "BatchStats",
    "Batcher",
    "Event",
    "PromptTooLong",
    "SamplingParams",
    "TextTail",
    "Ticket",
    "model_positions",
    "sample",
]
