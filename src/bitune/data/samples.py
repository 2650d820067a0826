"""Instruction-tuning data: files (or hub datasets) in, per-sample prompt/answer token lists out.

Three steps, each usable on its own:

1. `load_records` (`bitune.data.records`) reads rows from a local file (JSON list, JSON Lines, CSV, Parquet) or a Hugging Face hub
   dataset, remembering where each row came from ("train.jsonl, line 7"; "data.json, row 3" where rows of a
   JSON list, CSV, Parquet file or hub dataset count from 0 and the CSV header is not a row).
2. A *format* (`bitune.data.formats`) turns each row into a conversation and an answer: `alpaca` (instruction, input, output),
   `prompt_completion` (prompt, completion), `messages` (OpenAI role/content or ShareGPT from/value turns; the
   last assistant turn is the answer), `csqa` (question, choices {label, text}, answerKey: the schema of
   commonsense_qa and ai2_arc), or `columns` (a mapping such as {"prompt": "question", "answer": "answer"};
   a value may also be a template over the row, e.g. "{rationale} So the answer is {answer}."). `auto` picks
   one from the columns of the first row.
3. A *template* (`bitune.core.prompts`) turns the conversation into prompt text: `plain` (the paper's "Question: {prompt}\\n\\nAnswer:",
   answer " " + answer), `chat` (the tokenizer's chat template), or any string containing {prompt}. The answer's
   tokens are those that follow the prompt's in prompt + answer (as the paper's code splits them), so the
   boundary is exact; the prompt starts with BOS (if the tokenizer has one) and the answer ends with EOS.

Bad input raises `BituneInputError` naming the file, row and field before anything is returned.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from transformers import PreTrainedTokenizerBase

from bitune.core.prompts import PLAIN_TEMPLATE, encode_prompts, split_answers
from bitune.data.formats import (
    FORMATS,
    EmptyFieldError,
    Example,
    check_columns,
    config_error,
    format_reader,
    is_int,
)
from bitune.data.records import Record, load_records
from bitune.errors import BituneInputError

logger = logging.getLogger(__name__)

OVERLONG_POLICIES = ("drop", "truncate")
EMPTY_POLICIES = ("error", "drop")

T = TypeVar("T")


@dataclass
class DataConfig:
    """Where the data is and how it becomes samples (plain types only, so it maps onto YAML).

    Args:
        path: a local .json/.jsonl/.csv/.parquet file, or a Hugging Face hub dataset name.
        split: the split of a hub dataset (a local file is one split already).
        format: "auto", "alpaca", "prompt_completion", "messages", "columns" or "csqa" (see the module doc).
        template: "plain" (the paper's), "chat" (the tokenizer's chat template) or a string with {prompt}.
        columns: for format "columns": {"prompt": ..., "answer": ...}, each a column name or a template
            such as "{context}\\n{question}".
        max_length: the most prompt + answer tokens a sample may have.
        overlong: "drop" longer samples (the paper) or "truncate" them (the prompt loses its start, after
            BOS, down to half of max_length at most; then the answer loses its end, before EOS).
        empty: "error" on an empty prompt or answer, or "drop" such rows (counted in the stats).
        limit: keep a random `limit` of the samples (seeded, in file order); None keeps all.
        seed: the seed of that choice.

    Example:
        >>> DataConfig("train.jsonl", columns={"prompt": "question", "answer": "answer"}).format
        'columns'
    """

    path: str
    split: str = "train"
    format: str = "auto"
    template: str = "plain"
    columns: dict[str, str] | None = None
    max_length: int = 512
    overlong: str = "drop"
    empty: str = "error"
    limit: int | None = None
    seed: int = 42

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, os.PathLike)) or not os.fspath(self.path):
            config_error("path", f"{self.path!r} must be a file path or a hub dataset name")
        self.path = os.fspath(self.path)
        if self.format not in FORMATS:
            config_error("format", f"{self.format!r} is not a known format; use one of {', '.join(FORMATS)}")
        if self.template not in ("plain", "chat") and (
            not isinstance(self.template, str) or "{prompt}" not in self.template
        ):
            config_error(
                "template",
                f"{self.template!r} is unknown; use 'plain', 'chat' or a string containing {{prompt}}",
            )
        if self.columns is not None:
            if self.format == "auto":
                self.format = "columns"
            check_columns(self.columns, self.format)
        elif self.format == "columns":
            config_error(
                "columns", 'format "columns" needs a mapping like {"prompt": "question", "answer": "answer"}'
            )
        if not is_int(self.max_length) or self.max_length < 4:
            config_error("max_length", f"{self.max_length!r} must be an integer of at least 4")
        if self.overlong not in OVERLONG_POLICIES:
            config_error("overlong", f"{self.overlong!r} is unknown; use 'drop' or 'truncate'")
        if self.empty not in EMPTY_POLICIES:
            config_error("empty", f"{self.empty!r} is unknown; use 'error' or 'drop'")
        if self.limit is not None and (not is_int(self.limit) or self.limit < 1):
            config_error("limit", f"{self.limit!r} must be a positive integer or null")


@dataclass
class Sample:
    """One training example: prompt tokens (BOS first, if any) and answer tokens (EOS last)."""

    prompt_ids: list[int]
    answer_ids: list[int]


@dataclass
class DataStats:
    """What happened to the rows on their way to samples."""

    rows: int
    samples: int = 0
    dropped_empty: int = 0
    dropped_overlong: int = 0
    truncated: int = 0

    def __str__(self) -> str:
        return (
            f"{self.rows} rows -> {self.samples} samples (dropped: {self.dropped_empty} empty, "
            f"{self.dropped_overlong} too long; truncated: {self.truncated})"
        )


def load_dataset_samples(
    config: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[Sample], DataStats]:
    """Read `config.path` and turn it into samples; see `load_records` and `build_samples`.

    Example:
        >>> config = DataConfig("../shared/data/gsm8k/train.jsonl", limit=100)  # doctest: +SKIP
        >>> samples, stats = load_dataset_samples(config, tokenizer)  # doctest: +SKIP
    """
    return build_samples(load_records(config.path, config.split), tokenizer, config)


def build_samples(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, config: DataConfig
) -> tuple[list[Sample], DataStats]:
    """Turn raw rows into token samples with `config`'s format, template and length policy.

    Every row is checked before any is tokenised: on bad input this raises `BituneInputError` and returns
    nothing. Dropped and truncated samples are counted in the returned stats and logged.

    Example:
        >>> records = [Record("doc, row 0", {"instruction": "Add 2 and 3.", "input": "", "output": "5"})]
        >>> samples, stats = build_samples(records, tokenizer, DataConfig("doc"))  # doctest: +SKIP
        >>> tokenizer.decode(samples[0].prompt_ids + samples[0].answer_ids)  # doctest: +SKIP
        '<s>Question: Add 2 and 3.\\n\\nAnswer: 5</s>'
    """
    if not records:
        raise BituneInputError(f"{config.path}: no rows to build samples from")
    if tokenizer.eos_token_id is None:
        raise BituneInputError(
            "the tokenizer has no EOS token; set tokenizer.eos_token (answers must end with it)"
        )
    if config.template == "chat" and not tokenizer.chat_template:
        raise BituneInputError(
            "template 'chat' needs a tokenizer with a chat template; set tokenizer.chat_template, or use "
            "template 'plain' or a template string containing {prompt}"
        )
    stats = DataStats(rows=len(records))
    read = format_reader(config.format, config.columns, records[0])
    examples = []
    for record in records:
        try:
            examples.append(read(record))
        except EmptyFieldError:
            if config.empty == "error":
                raise
            stats.dropped_empty += 1
    if config.template == "chat":
        prompts, separator = [_render_chat(example, tokenizer) for example in examples], ""
    else:
        template = PLAIN_TEMPLATE if config.template == "plain" else config.template
        prompts = [_render_text(example, template) for example in examples]
        # The answer follows the prompt after one space ("Answer: 5"), unless the template ends in whitespace.
        separator = "" if template[-1].isspace() else " "
    samples = _tokenize(examples, prompts, [separator + example.answer for example in examples], tokenizer)
    samples = _apply_length_policy(samples, config, stats, tokenizer.bos_token_id)
    if config.limit is not None and config.limit < len(samples):
        kept = sorted(random.Random(config.seed).sample(range(len(samples)), config.limit))
        samples = [samples[i] for i in kept]
    stats.samples = len(samples)
    _log(stats, config)
    if not samples:
        raise BituneInputError(
            f"{config.path}: no samples left ({stats}); raise max_length, set overlong: truncate, or fix the rows"
        )
    return samples, stats


def split_off(items: Sequence[T], size: int | float, seed: int = 42) -> tuple[list[T], list[T]]:
    """Split `items` into (rest, held_out): a random `size` of them (a count, or a fraction in (0, 1)).

    Both parts keep the original order; the same seed gives the same split.

    Example:
        >>> split_off(list(range(10)), 0.2, seed=0)
        ([0, 1, 2, 3, 4, 5, 7, 8], [6, 9])
    """
    if isinstance(size, float) and 0 < size < 1:
        count = max(1, round(len(items) * size))
    elif is_int(size) and size >= 1:
        count = size
    else:
        raise BituneInputError(f"held-out size {size!r} must be a positive count or a fraction in (0, 1)")
    if count >= len(items):
        raise BituneInputError(
            f"holding out {count} of {len(items)} samples leaves none to train on; use a smaller size"
        )
    held_out = set(random.Random(seed).sample(range(len(items)), count))
    rest = [item for i, item in enumerate(items) if i not in held_out]
    return rest, [items[i] for i in sorted(held_out)]


def _render_text(example: Example, template: str) -> str:
    if len(example.turns) != 1:
        raise BituneInputError(
            f"{example.location}: a conversation of {len(example.turns) + 1} turns needs template 'chat' "
            "(the tokenizer's chat template); set template: chat"
        )
    return template.replace("{prompt}", example.turns[0]["content"])


def _render_chat(example: Example, tokenizer: PreTrainedTokenizerBase) -> str:
    from jinja2 import TemplateError  # chat templates need jinja2 (transformers imports it the same way)

    try:
        return tokenizer.apply_chat_template(example.turns, tokenize=False, add_generation_prompt=True)
    except TemplateError as error:
        raise BituneInputError(
            f"{example.location}: the tokenizer's chat template rejects this conversation ({error}); fix the row"
        ) from None


def _tokenize(
    examples: list[Example], prompts: list[str], answers: list[str], tokenizer: PreTrainedTokenizerBase
) -> list[Sample]:
    if not examples:
        return []
    prompt_ids = encode_prompts(tokenizer, prompts)
    answer_ids = split_answers(tokenizer, prompts, prompt_ids, answers)
    samples = []
    for example, prompt, answer in zip(examples, prompt_ids, answer_ids, strict=True):
        if len(prompt) < 2:
            raise BituneInputError(
                f"{example.location}: the prompt is {len(prompt)} token long, and Bitune needs at least 2 (it "
                "encodes all but the last one twice); use a template with text around {prompt}"
            )
        samples.append(Sample(prompt, [*answer, tokenizer.eos_token_id]))
    return samples


def _apply_length_policy(
    samples: list[Sample], config: DataConfig, stats: DataStats, bos: int | None
) -> list[Sample]:
    kept = []
    for sample in samples:
        if len(sample.prompt_ids) + len(sample.answer_ids) <= config.max_length:
            kept.append(sample)
        elif config.overlong == "drop":
            stats.dropped_overlong += 1
        else:
            kept.append(_truncate(sample, config.max_length, bos))
            stats.truncated += 1
    return kept


def _truncate(sample: Sample, max_length: int, bos: int | None) -> Sample:
    """Cut the prompt's start (after BOS; down to half of max_length at most), then the answer's end (before EOS)."""
    prompt, answer = sample.prompt_ids, sample.answer_ids
    prompt_budget = max(max_length - len(answer), min(len(prompt), max_length // 2))
    if len(prompt) > prompt_budget:
        head = prompt[:1] if bos is not None and prompt[0] == bos else []
        prompt = head + prompt[len(prompt) - prompt_budget + len(head) :]
    answer_budget = max_length - len(prompt)
    if len(answer) > answer_budget:
        answer = answer[: answer_budget - 1] + answer[-1:]
    return Sample(prompt, answer)


def _log(stats: DataStats, config: DataConfig) -> None:
    logger.info("%s: %s", config.path, stats)
    if stats.dropped_empty:
        logger.warning("%s: dropped %d rows with an empty prompt or answer", config.path, stats.dropped_empty)
    if stats.dropped_overlong:
        logger.warning(
            "%s: dropped %d samples longer than max_length=%d tokens (set overlong: truncate to keep them)",
            config.path,
            stats.dropped_overlong,
            config.max_length,
        )
    if stats.truncated:
        logger.warning(
            "%s: truncated %d samples to max_length=%d tokens",
            config.path,
            stats.truncated,
            config.max_length,
        )
