"""Instruction-tuning data: files (or hub datasets) in, per-sample prompt/answer token lists out.

Three steps, each usable on its own:

1. `load_records` (`bitune.data.records`) reads rows from a local file (JSON list, JSON Lines, CSV, Parquet) or a Hugging Face hub
   dataset, remembering where each row came from ("train.jsonl, line 7"; "data.json, row 3" where rows of a
   JSON list, CSV, Parquet file or hub dataset count from 0 and the CSV header is not a row). Several files or
   data sets can be mixed in one run (`DataConfig.path` as a list, each with an optional `weight` and `limit`).
2. A *format* (`bitune.data.formats`) turns each row into a conversation and an answer: `alpaca` (instruction, input, output),
   `prompt_completion` (prompt, completion), `messages` (OpenAI role/content or ShareGPT from/value turns; the
   last assistant turn is the answer), `csqa` (question, choices {label, text}, answerKey: the schema of
   commonsense_qa and ai2_arc), or `columns` (a mapping such as {"prompt": "question", "answer": "answer"};
   a value may also be a template over the row, e.g. "{rationale} So the answer is {answer}."). `auto` picks
   one from the columns of the first row.
3. A *template* (`bitune.core.prompts`) turns the conversation into prompt text: `plain` (the paper's "Question: {prompt}\\n\\nAnswer:",
   answer " " + answer), `chat` (the tokenizer's chat template, or `chat_template`: a well-known one by name
   or Jinja text), or any string containing {prompt}. The answer's
   tokens are those that follow the prompt's in prompt + answer (as the paper's code splits them), so the
   boundary is exact; the prompt starts with BOS (if the tokenizer has one) and the answer ends with EOS.

Bad input raises `BituneInputError` naming the file, row and field before anything is returned.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, NoReturn, TypeVar

from transformers import PreTrainedTokenizerBase

from bitune.core.prompts import PLAIN_TEMPLATE, chat_template_text, encode_prompts, render_chat, split_answers
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
from bitune.settings import build

logger = logging.getLogger(__name__)

OVERLONG_POLICIES = ("drop", "truncate")
EMPTY_POLICIES = ("error", "drop")

T = TypeVar("T")


@dataclass
class DataSource:
    """One of several data sources mixed in a run: an item of a `data.path` list (a path alone, or a mapping).

    Args:
        path: a local .json/.jsonl/.csv/.parquet file, or a Hugging Face hub dataset name.
        split: the split of a hub dataset (default: `data.split`).
        format: this source's format (default: `data.format`); set it when the sources differ.
        columns: this source's column mapping, for format "columns" (default: `data.columns`).
        weight: how often each of its samples is used: 2 repeats every sample, 0.5 keeps a random half,
            1.5 repeats a random half once more (seeded with `data.seed`).
        limit: keep a random `limit` of this source's samples (before the weight); None keeps all.

    Example:
        >>> DataConfig(["a.jsonl", {"path": "b.jsonl", "weight": 2}]).sources[1].weight
        2.0
    """

    path: str
    split: str | None = None
    format: str | None = None
    columns: dict[str, str] | None = None
    weight: float = 1.0
    limit: int | None = None

    def __post_init__(self) -> None:
        def fail(name: str, problem: str) -> NoReturn:
            raise BituneInputError(f"data source {self.path!r}, field '{name}': {problem}")

        if not isinstance(self.path, (str, os.PathLike)) or not os.fspath(self.path):
            fail("path", "must be a file path or a hub dataset name")
        self.path = os.fspath(self.path)
        if self.format is not None and self.format not in FORMATS:
            fail("format", f"{self.format!r} is not a known format; use one of {', '.join(FORMATS)}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not self.weight > 0:
            fail("weight", f"{self.weight!r} must be a positive number (1: each sample once)")
        self.weight = float(self.weight)
        if self.limit is not None and (not is_int(self.limit) or self.limit < 1):
            fail("limit", f"{self.limit!r} must be a positive integer or null")


@dataclass
class DataConfig:
    """Where the data is and how it becomes samples (plain types only, so it maps onto YAML).

    Args:
        path: a local .json/.jsonl/.csv/.parquet file, or a Hugging Face hub dataset name; or a list of them
            to mix, each a path or a mapping {path, split, format, columns, weight, limit} (`DataSource`).
        split: the split of a hub dataset (a local file is one split already).
        format: "auto", "alpaca", "prompt_completion", "messages", "columns" or "csqa" (see the module doc).
        template: "plain" (the paper's), "chat" (a chat template: `chat_template`, else the tokenizer's) or a
            string with {prompt}.
        chat_template: the chat template of template "chat", instead of the tokenizer's own: a name (chatml,
            zephyr, llama2, gemma) or Jinja text as in a tokenizer_config.json; setting it turns template
            "plain" (the default) into "chat". The checkpoint's tokenizer keeps it, so `bitune generate` and
            `bitune chat` with --template chat (and lm-eval's --apply_chat_template) render prompts as training did.
        columns: for format "columns": {"prompt": ..., "answer": ...}, each a column name or a template
            such as "{context}\\n{question}".
        max_length: the most prompt + answer tokens a sample may have.
        overlong: "drop" longer samples (the paper) or "truncate" them (the prompt loses its start, after
            BOS, down to half of max_length at most; then the answer loses its end, before EOS).
        empty: "error" on an empty prompt or answer, or "drop" such rows (counted in the stats).
        limit: keep a random `limit` of the samples (seeded, in file order; of the mix, with several
            sources); None keeps all.
        seed: the seed of that choice (and of the sources' limits and weights).

    Example:
        >>> DataConfig("train.jsonl", columns={"prompt": "question", "answer": "answer"}).format
        'columns'
    """

    path: str | list[str | dict[str, Any]]
    split: str = "train"
    format: str = "auto"
    template: str = "plain"
    chat_template: str | None = None
    columns: dict[str, str] | None = None
    max_length: int = 512
    overlong: str = "drop"
    empty: str = "error"
    limit: int | None = None
    seed: int = 42

    def __post_init__(self) -> None:
        if isinstance(self.path, (list, tuple)):
            self.path = [_plain_source(item, index) for index, item in enumerate(self.path)]
            if not self.path:
                config_error("path", "an empty list; give one path, or a list of paths to mix")
            _ = self.sources  # checks every item
        else:
            if not isinstance(self.path, (str, os.PathLike)) or not os.fspath(self.path):
                config_error("path", f"{self.path!r} must be a file path or a hub dataset name")
            self.path = os.fspath(self.path)
        if self.chat_template is not None:
            chat_template_text(self.chat_template)  # a known name or Jinja text
            if self.template == "plain":
                self.template = "chat"
            elif self.template != "chat":
                config_error(
                    "chat_template",
                    f"applies to template 'chat', not {self.template!r}; remove one of the two",
                )
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

    @property
    def sources(self) -> list[DataSource]:
        """The data sources: one for a single path, one per item of a `path` list."""
        if isinstance(self.path, str):
            return [DataSource(self.path)]
        return [
            DataSource(item)
            if isinstance(item, str)
            else build(DataSource, item, f"data config, path[{index}]")
            for index, item in enumerate(self.path)
        ]

    def for_source(self, source: DataSource) -> DataConfig:
        """The settings one source is read with: its own path, split, format, columns and limit."""
        own_format = source.format is not None or source.columns is not None
        return replace(
            self,
            path=source.path,
            split=source.split or self.split,
            format=(source.format or "auto") if own_format else self.format,
            columns=source.columns if own_format else self.columns,
            limit=source.limit,
        )


def _plain_source(item: Any, index: int) -> str | dict[str, Any]:
    """An item of a `path` list as plain data (a path, or a mapping of `DataSource` fields)."""
    if isinstance(item, DataSource):
        return {f.name: getattr(item, f.name) for f in fields(item)}
    if isinstance(item, os.PathLike):
        return os.fspath(item)
    if isinstance(item, (str, Mapping)):
        return item if isinstance(item, str) else dict(item)
    config_error(
        f"path[{index}]", f"{item!r} must be a path or a mapping such as {{path: a.jsonl, weight: 2}}"
    )


@dataclass
class Sample:
    """One training example: prompt tokens (BOS first, if any) and answer tokens (EOS last)."""

    prompt_ids: list[int]
    answer_ids: list[int]


@dataclass
class DataStats:
    """What happened to the rows on their way to samples; with several sources, the totals and `sources`
    (each source's own stats, its `samples` counted after its limit and weight)."""

    rows: int
    samples: int = 0
    dropped_empty: int = 0
    dropped_overlong: int = 0
    truncated: int = 0
    path: str | None = field(default=None, compare=False)
    weight: float = field(default=1.0, compare=False)
    sources: list[DataStats] = field(default_factory=list)

    def __str__(self) -> str:
        text = (
            f"{self.rows} rows -> {self.samples} samples (dropped: {self.dropped_empty} empty, "
            f"{self.dropped_overlong} too long; truncated: {self.truncated})"
        )
        if self.sources:
            parts = "; ".join(
                f"{source.path}: {source.rows} rows -> {source.samples} samples"
                + (f" (weight {source.weight:g})" if source.weight != 1 else "")
                for source in self.sources
            )
            text += f" from {len(self.sources)} sources ({parts})"
        return text


def load_dataset_samples(
    config: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[Sample], DataStats]:
    """Read `config.path` and turn it into samples; see `load_records` and `build_samples`.

    With several sources (`path` a list), each is read with its own format and limit, its samples repeated
    or thinned by its weight, and the mix (in source order) cut to `config.limit`; the stats count each
    source's rows and samples.

    Example:
        >>> config = DataConfig("../shared/data/instruct/alpaca_gpt4_999.json", limit=100)
        >>> samples, stats = load_dataset_samples(config, tokenizer)
        >>> print(stats)
        999 rows -> 100 samples (dropped: 0 empty, 400 too long; truncated: 0)
        >>> tokenizer.decode(samples[0].prompt_ids), tokenizer.decode(samples[0].answer_ids)
        ('<s> Question: Generate a one-sentence title for a creative recipe.\\n\\nAnswer:',
         '"Rainbow Veggie Hummus Wrap: A Colorful and Nutritious Meal"</s>')
    """
    if isinstance(config.path, str):
        return build_samples(load_records(config.path, config.split), tokenizer, config)
    mixed: list[Sample] = []
    stats = DataStats(rows=0)
    for index, source in enumerate(config.sources):
        part = config.for_source(source)
        samples, part_stats = build_samples(load_records(part.path, part.split), tokenizer, part)
        samples = _weighted(samples, source.weight, random.Random(config.seed * 1000 + index))
        if not samples:
            raise BituneInputError(
                f"{source.path}: weight {source.weight} keeps none of its {part_stats.samples} samples; raise it"
            )
        part_stats.samples, part_stats.weight = len(samples), source.weight
        stats.sources.append(part_stats)
        mixed.extend(samples)
        for name in ("rows", "dropped_empty", "dropped_overlong", "truncated"):
            setattr(stats, name, getattr(stats, name) + getattr(part_stats, name))
    mixed = random_subset(mixed, config.limit, config.seed)
    stats.samples = len(mixed)
    logger.info("data mix: %s", stats)
    return mixed, stats


def _weighted(samples: list[Sample], weight: float, rng: random.Random) -> list[Sample]:
    """Every sample `int(weight)` times, then a random share `weight - int(weight)` of them once more."""
    whole, share = int(weight), weight - int(weight)
    extra = sorted(rng.sample(range(len(samples)), round(share * len(samples))))
    return samples * whole + [samples[i] for i in extra]


def random_subset(items: list[T], limit: int | None, seed: int) -> list[T]:
    """A random `limit` of `items` in their order (all of them when `limit` is None or not smaller)."""
    if limit is None or limit >= len(items):
        return items
    kept = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in kept]


def build_samples(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, config: DataConfig
) -> tuple[list[Sample], DataStats]:
    """Turn raw rows into token samples with `config`'s format, template and length policy.

    Every row is checked before any is tokenised: on bad input this raises `BituneInputError` and returns
    nothing. Dropped and truncated samples are counted in the returned stats and logged.

    Example:
        >>> records = [Record("doc, row 0", {"instruction": "Add 2 and 3.", "input": "", "output": "5"})]
        >>> samples, stats = build_samples(records, tokenizer, DataConfig("doc"))
        >>> tokenizer.decode(samples[0].prompt_ids + samples[0].answer_ids)
        '<s> Question: Add 2 and 3.\\n\\nAnswer: 5</s>'
        >>> tokenizer.convert_ids_to_tokens(samples[0].answer_ids)  # " 5" and EOS
        ['▁', '5', '</s>']
    """
    if not records:
        raise BituneInputError(f"{config.path}: no rows to build samples from")
    if tokenizer.eos_token_id is None:
        raise BituneInputError(
            "the tokenizer has no EOS token; set tokenizer.eos_token (answers must end with it)"
        )
    if config.template == "chat" and not (config.chat_template or tokenizer.chat_template):
        raise BituneInputError(
            "template 'chat': the tokenizer has no chat template; set data.chat_template (a name such as "
            "chatml or zephyr, or Jinja text), or use template 'plain' or a template string containing {prompt}"
        )
    stats = DataStats(rows=len(records), path=config.path)
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
        prompts, separator = (
            [_render_chat(example, tokenizer, config.chat_template) for example in examples],
            "",
        )
    else:
        template = PLAIN_TEMPLATE if config.template == "plain" else config.template
        prompts = [_render_text(example, template) for example in examples]
        # The answer follows the prompt after one space ("Answer: 5"), unless the template ends in whitespace.
        separator = "" if template[-1].isspace() else " "
    samples = _tokenize(examples, prompts, [separator + example.answer for example in examples], tokenizer)
    samples = _apply_length_policy(samples, config, stats, tokenizer.bos_token_id)
    samples = random_subset(samples, config.limit, config.seed)
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


def _render_chat(example: Example, tokenizer: PreTrainedTokenizerBase, chat_template: str | None) -> str:
    try:
        return render_chat(example.turns, tokenizer, chat_template)
    except BituneInputError as error:
        raise BituneInputError(f"{example.location}: {error}; fix the row") from None


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
