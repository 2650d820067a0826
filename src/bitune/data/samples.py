"""Instruction-tuning data: files (or hub datasets) in, per-sample prompt/answer token lists out.

Three steps, each usable on its own:

1. `load_records` reads rows from a local file (JSON list, JSON Lines, CSV, Parquet) or a Hugging Face hub
   dataset, remembering where each row came from ("train.jsonl, line 7"; "data.json, row 3" where rows of a
   JSON list, CSV, Parquet file or hub dataset count from 0 and the CSV header is not a row).
2. A *format* turns each row into a conversation and an answer: `alpaca` (instruction, input, output),
   `prompt_completion` (prompt, completion), `messages` (OpenAI role/content or ShareGPT from/value turns; the
   last assistant turn is the answer), `csqa` (question, choices {label, text}, answerKey: the schema of
   commonsense_qa and ai2_arc), or `columns` (a mapping such as {"prompt": "question", "answer": "answer"};
   a value may also be a template over the row, e.g. "{rationale} So the answer is {answer}."). `auto` picks
   one from the columns of the first row.
3. A *template* turns the conversation into prompt text: `plain` (the paper's "Question: {prompt}\\n\\nAnswer:",
   answer " " + answer), `chat` (the tokenizer's chat template), or any string containing {prompt}. The answer's
   tokens are those that follow the prompt's in prompt + answer (as the paper's code splits them), so the
   boundary is exact; the prompt starts with BOS (if the tokenizer has one) and the answer ends with EOS.

Bad input raises `BituneInputError` naming the file, row and field before anything is returned.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import os
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from transformers import PreTrainedTokenizerBase

from bitune.core.prompts import PLAIN_TEMPLATE, encode_prompts, split_answers
from bitune.errors import BituneInputError

logger = logging.getLogger(__name__)

FORMATS = ("auto", "alpaca", "prompt_completion", "messages", "columns", "csqa")
OVERLONG_POLICIES = ("drop", "truncate")
EMPTY_POLICIES = ("error", "drop")
FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
# OpenAI roles plus the ShareGPT names for them.
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}

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
            _config_error("path", f"{self.path!r} must be a file path or a hub dataset name")
        self.path = os.fspath(self.path)
        if self.format not in FORMATS:
            _config_error("format", f"{self.format!r} is not a known format; use one of {', '.join(FORMATS)}")
        if self.template not in ("plain", "chat") and (
            not isinstance(self.template, str) or "{prompt}" not in self.template
        ):
            _config_error(
                "template",
                f"{self.template!r} is unknown; use 'plain', 'chat' or a string containing {{prompt}}",
            )
        if self.columns is not None:
            if self.format == "auto":
                self.format = "columns"
            _check_columns(self.columns, self.format)
        elif self.format == "columns":
            _config_error(
                "columns", 'format "columns" needs a mapping like {"prompt": "question", "answer": "answer"}'
            )
        if not _is_int(self.max_length) or self.max_length < 4:
            _config_error("max_length", f"{self.max_length!r} must be an integer of at least 4")
        if self.overlong not in OVERLONG_POLICIES:
            _config_error("overlong", f"{self.overlong!r} is unknown; use 'drop' or 'truncate'")
        if self.empty not in EMPTY_POLICIES:
            _config_error("empty", f"{self.empty!r} is unknown; use 'error' or 'drop'")
        if self.limit is not None and (not _is_int(self.limit) or self.limit < 1):
            _config_error("limit", f"{self.limit!r} must be a positive integer or null")


@dataclass(frozen=True)
class Record:
    """One raw row and where it came from (used in every error message about it)."""

    location: str
    fields: dict[str, Any]


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


@dataclass
class _Example:
    """A row in a format-free shape: the conversation before the answer, and the answer."""

    location: str
    turns: list[dict[str, str]]
    answer: str


class _EmptyFieldError(BituneInputError):
    """An empty prompt or answer: an error, unless the config drops such rows."""


# ----------------------------------------------------------------------------------------------------------
# Public API


def load_dataset_samples(
    config: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[Sample], DataStats]:
    """Read `config.path` and turn it into samples; see `load_records` and `build_samples`.

    Example:
        >>> config = DataConfig("../shared/data/gsm8k/train.jsonl", limit=100)  # doctest: +SKIP
        >>> samples, stats = load_dataset_samples(config, tokenizer)  # doctest: +SKIP
    """
    return build_samples(load_records(config.path, config.split), tokenizer, config)


def load_records(source: str | Path, split: str = "train") -> list[Record]:
    """Read every row of a local file or, if no such file exists, of a hub dataset's `split`.

    Local files are parsed here rather than by `datasets`, so that errors can name the exact line or row
    (and so that nothing is written to the datasets cache). A `.json` file that does not start with `[`
    is read as JSON Lines, as `datasets` does.

    Example:
        >>> records = load_records("../shared/data/gsm8k/train.jsonl")  # doctest: +SKIP
        >>> records[0].location, sorted(records[0].fields)  # doctest: +SKIP
        ('../shared/data/gsm8k/train.jsonl, line 1', ['answer', 'question'])
    """
    path = Path(source)
    if path.is_file():
        records = _read_file(path)
        if not records:
            raise BituneInputError(f"{path}: the file holds no rows; add some, or point path to another file")
        return records
    if path.exists():
        raise BituneInputError(f"{path} is not a file; point path to a {'/'.join(FILE_SUFFIXES)} file")
    if path.suffix.lower() in FILE_SUFFIXES:
        raise BituneInputError(f"{path}: no such file; check the path (relative paths start at {Path.cwd()})")
    return _read_hub(str(source), split)


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
    read = _format_reader(config, records[0])
    examples = []
    for record in records:
        try:
            examples.append(read(record))
        except _EmptyFieldError:
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
    elif _is_int(size) and size >= 1:
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


# ----------------------------------------------------------------------------------------------------------
# Reading rows


def _read_file(path: Path) -> list[Record]:
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise BituneInputError(f"{path}: unsupported file type {suffix!r}; use {', '.join(FILE_SUFFIXES)}")
    raw = path.read_bytes()
    if not raw.strip():
        raise BituneInputError(f"{path}: the file is empty; point path to a file with rows")
    if suffix == ".parquet":
        return _read_parquet(raw, path)
    text = _decode(raw, path)
    if suffix == ".csv":
        return _read_csv(text, path)
    if suffix == ".json" and text.lstrip().startswith("["):
        rows = _parse_json(text, path, first_line=1)
        return [_record(row, f"{path}, row {i}") for i, row in enumerate(rows)]
    return _read_json_lines(text, path)


def _decode(raw: bytes, path: Path) -> str:
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise BituneInputError(
            f"{path}, line {line}: byte {raw[error.start]:#04x} is not UTF-8; re-save the file as UTF-8"
        ) from None


def _read_json_lines(text: str, path: Path) -> list[Record]:
    # Split on "\n" only: str.splitlines would also split inside JSON strings at characters such as U+2028.
    return [
        _record(_parse_json(line, path, first_line=number), f"{path}, line {number}")
        for number, line in enumerate(text.split("\n"), start=1)
        if line.strip()
    ]


def _parse_json(text: str, path: Path, first_line: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise BituneInputError(
            f"{path}, line {first_line + error.lineno - 1}: invalid JSON ({error.msg}, column {error.colno}); "
            "fix the line (JSON Lines files hold one JSON object per line)"
        ) from None
    except RecursionError:
        raise BituneInputError(f"{path}, line {first_line}: JSON nested too deeply; fix the file") from None


def _read_csv(text: str, path: Path) -> list[Record]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    records = []
    try:
        for index, row in enumerate(reader):
            if None in row:
                raise BituneInputError(
                    f"{path}, row {index}: more values than the header has columns; quote values that "
                    "contain commas"
                )
            records.append(Record(f"{path}, row {index}", row))
    except csv.Error as error:  # raised before the reader counts the failing record's first line
        raise BituneInputError(
            f"{path}, line {reader.line_num + 1}: unreadable CSV ({error}); fix the file"
        ) from None
    return records


def _read_parquet(raw: bytes, path: Path) -> list[Record]:
    import pyarrow as pa  # imported here: only Parquet input needs it
    import pyarrow.parquet as pq

    # A corrupt file raises ArrowException or OSError; a string column that is not UTF-8, UnicodeDecodeError.
    try:
        rows = pq.read_table(io.BytesIO(raw)).to_pylist()
    except (pa.ArrowException, OSError, UnicodeDecodeError) as error:
        raise BituneInputError(f"{path}: unreadable Parquet file ({error}); re-export it") from None
    return [Record(f"{path}, row {index}", row) for index, row in enumerate(rows)]


def _read_hub(name: str, split: str) -> list[Record]:
    import datasets  # imported here: slow to import, and only hub input needs it

    try:
        dataset = datasets.load_dataset(name, split=split)
    except (OSError, ValueError) as error:
        raise BituneInputError(
            f"{name!r} is no local file and could not be loaded from the Hugging Face hub (split {split!r}): "
            f"{error}. Check the path, or the dataset name and split"
        ) from None
    return [_record(row, f"{name} [{split}], row {index}") for index, row in enumerate(dataset)]


def _record(row: Any, location: str) -> Record:
    if not isinstance(row, dict):
        raise BituneInputError(
            f"{location}: expected an object with named fields, got {_kind(row)}; each row must be a JSON object"
        )
    return Record(location, row)


# ----------------------------------------------------------------------------------------------------------
# Formats: a row -> (conversation before the answer, answer)

Reader = Callable[[Record], _Example]


def _format_reader(config: DataConfig, first: Record) -> Reader:
    name, columns = config.format, config.columns
    if name == "auto":
        name, columns = _detect_format(first)
    if name == "columns":
        return lambda record: _read_columns(record, columns)
    readers = {
        "alpaca": _read_alpaca,
        "prompt_completion": _read_prompt_completion,
        "messages": _read_messages,
        "csqa": _read_csqa,
    }
    return readers[name]


def _detect_format(first: Record) -> tuple[str, dict[str, str] | None]:
    names = set(first.fields)
    if names & {"messages", "conversations"}:
        return "messages", None
    if {"instruction", "output"} <= names:
        return "alpaca", None
    if {"prompt", "completion"} <= names:
        return "prompt_completion", None
    if {"question", "choices", "answerKey"} <= names:
        return "csqa", None
    if {"question", "answer"} <= names:
        return "columns", {"prompt": "question", "answer": "answer"}
    raise BituneInputError(
        f"{first.location}: cannot tell the format from the fields {sorted(map(str, names))}; set format "
        f"(one of {', '.join(FORMATS[1:])}), or columns such as {{'prompt': 'question', 'answer': 'answer'}}"
    )


def _read_alpaca(record: Record) -> _Example:
    instruction = _field(record, "instruction")
    extra = _field(record, "input", optional=True)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return _Example(record.location, [_user(prompt)], _field(record, "output"))


def _read_prompt_completion(record: Record) -> _Example:
    return _Example(record.location, [_user(_field(record, "prompt"))], _field(record, "completion"))


def _read_columns(record: Record, columns: dict[str, str]) -> _Example:
    return _Example(
        record.location, [_user(_column(record, columns["prompt"]))], _column(record, columns["answer"])
    )


def _column(record: Record, spec: str) -> str:
    if not _is_column_template(spec):
        return _field(record, spec)
    return "".join(
        literal + (_field(record, name) if name is not None else "")
        for literal, name, _, _ in _parse_columns(spec)
    )


def _read_csqa(record: Record) -> _Example:
    question = _field(record, "question")
    choices = record.fields.get("choices")
    labels = choices.get("label") if isinstance(choices, dict) else None
    texts = choices.get("text") if isinstance(choices, dict) else None
    if not (
        isinstance(labels, list)
        and isinstance(texts, list)
        and len(labels) == len(texts) > 0
        and all(isinstance(item, str) for item in labels + texts)
    ):
        raise BituneInputError(
            f"{record.location}, field 'choices': expected {{'label': [...], 'text': [...]}}, two lists of text "
            "of the same length (the commonsense_qa / ai2_arc schema); fix the row or choose another format"
        )
    key = _field(record, "answerKey")
    if key not in labels:
        raise BituneInputError(
            f"{record.location}, field 'answerKey': {key!r} is not one of the labels {labels}; fix the row"
        )
    gold = labels.index(key)
    answer = _text(texts[gold], record.location, f"choices.text[{gold}]")
    # The options are listed as the evaluation prompt lists them, and the answer is the option's text.
    prompt = question + "\n\nChoices:\n" + "\n".join(texts)
    return _Example(record.location, [_user(prompt)], answer)


def _read_messages(record: Record) -> _Example:
    key = "messages" if "messages" in record.fields else "conversations"
    turns = record.fields.get(key)
    if not isinstance(turns, list) or not turns:
        raise BituneInputError(
            f"{record.location}, field '{key}': expected a non-empty list of turns, got {_kind(turns)}; fix "
            "the row or choose another format"
        )
    conversation = [_turn(turn, record.location, f"{key}[{index}]") for index, turn in enumerate(turns)]
    if conversation[-1]["role"] != "assistant":
        raise BituneInputError(
            f"{record.location}, field '{key}': the last turn must be the assistant's (it is the answer); "
            "remove the turns after it, or add the answer"
        )
    if not any(turn["role"] == "user" for turn in conversation[:-1]):
        raise BituneInputError(
            f"{record.location}, field '{key}': no user turn before the answer; add the question as a user turn"
        )
    return _Example(record.location, conversation[:-1], conversation[-1]["content"])


def _turn(turn: Any, location: str, label: str) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise BituneInputError(
            f"{location}, field '{label}': expected an object, got {_kind(turn)}; fix the row"
        )
    role_key, content_key = ("role", "content") if "role" in turn else ("from", "value")
    role = turn.get(role_key)
    if not isinstance(role, str) or role not in ROLES:
        raise BituneInputError(
            f"{location}, field '{label}.{role_key}': {role!r:.40} is not a supported role; use one of "
            f"{', '.join(ROLES)}"
        )
    return {"role": ROLES[role], "content": _text(turn.get(content_key), location, f"{label}.{content_key}")}


def _field(record: Record, name: str, optional: bool = False) -> str:
    return _text(record.fields.get(name), record.location, name, optional)


def _text(value: Any, location: str, label: str, optional: bool = False) -> str:
    if value is None:
        if optional:
            return ""
        raise BituneInputError(
            f"{location}: field '{label}' is missing; add it, or set format/columns to match your data"
        )
    if not isinstance(value, str):
        raise BituneInputError(f"{location}: field '{label}' is {_kind(value)}, expected text; fix the row")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # e.g. a lone surrogate from a "\ud800" escape: no tokenizer can read it
        raise BituneInputError(f"{location}: field '{label}' holds invalid Unicode; fix the text") from None
    if not value.strip() and not optional:
        raise _EmptyFieldError(
            f"{location}: field '{label}' is empty; fill it in, or set empty: drop to skip such rows"
        )
    return value


def _user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


# ----------------------------------------------------------------------------------------------------------
# Templates and tokens


def _render_text(example: _Example, template: str) -> str:
    if len(example.turns) != 1:
        raise BituneInputError(
            f"{example.location}: a conversation of {len(example.turns) + 1} turns needs template 'chat' "
            "(the tokenizer's chat template); set template: chat"
        )
    return template.replace("{prompt}", example.turns[0]["content"])


def _render_chat(example: _Example, tokenizer: PreTrainedTokenizerBase) -> str:
    from jinja2 import TemplateError  # chat templates need jinja2 (transformers imports it the same way)

    try:
        return tokenizer.apply_chat_template(example.turns, tokenize=False, add_generation_prompt=True)
    except TemplateError as error:
        raise BituneInputError(
            f"{example.location}: the tokenizer's chat template rejects this conversation ({error}); fix the row"
        ) from None


def _tokenize(
    examples: list[_Example], prompts: list[str], answers: list[str], tokenizer: PreTrainedTokenizerBase
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


# ----------------------------------------------------------------------------------------------------------
# Small helpers


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


def _check_columns(columns: Any, format_name: str) -> None:
    if format_name != "columns":
        _config_error(
            "columns", f"applies to format 'columns' only, not {format_name!r}; remove one of the two"
        )
    if not isinstance(columns, dict) or set(columns) != {"prompt", "answer"}:
        _config_error("columns", f'{columns!r} must be a mapping with exactly the keys "prompt" and "answer"')
    for key, spec in columns.items():
        if not isinstance(spec, str) or not spec.strip():
            _config_error(
                f"columns.{key}", f"{spec!r} must be a column name or a template such as '{{question}}'"
            )
        if _is_column_template(spec):
            try:
                parts = _parse_columns(spec)
            except ValueError as error:
                _config_error(f"columns.{key}", f"{spec!r} is not a valid template ({error})")
            if any(name == "" or conversion or format_spec for _, name, format_spec, conversion in parts):
                _config_error(
                    f"columns.{key}",
                    f"{spec!r}: write fields as {{column}}, with no format spec; use {{{{ for {{",
                )


def _is_column_template(spec: str) -> bool:
    return "{" in spec or "}" in spec


def _parse_columns(spec: str) -> list[tuple[str, str | None, str | None, str | None]]:
    """Literal text and {column} fields of a column template (Python format syntax, values are not formatted)."""
    return list(string.Formatter().parse(spec))


def _config_error(name: str, problem: str) -> NoReturn:
    raise BituneInputError(f"data config, field '{name}': {problem}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    """How a wrongly typed value is described in error messages (no repr of containers: they may be huge)."""
    if isinstance(value, (bool, int, float, str)):
        return f"{type(value).__name__} {value!r:.40}"
    if isinstance(value, dict):
        return "an object" if value else "an empty object"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    return "null" if value is None else type(value).__name__
