"""Formats: a row → the conversation before the answer, and the answer (`Example`).

`alpaca` (instruction, input, output), `prompt_completion` (prompt, completion), `messages` (OpenAI role/content
or ShareGPT from/value turns; the last assistant turn is the answer), `csqa` (question, choices {label, text},
answerKey: the schema of commonsense_qa and ai2_arc), or `columns` (a mapping such as {"prompt": "question",
"answer": "answer"}; a value may also be a template over the row, e.g. "{rationale} So the answer is {answer}.").
`auto` picks one from the columns of the first row.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from bitune.data.records import Record, describe_value
from bitune.errors import BituneInputError

FORMATS = ("auto", "alpaca", "prompt_completion", "messages", "columns", "csqa")
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}


@dataclass
class Example:
    """A row in a format-free shape: the conversation before the answer, and the answer."""

    location: str
    turns: list[dict[str, str]]
    answer: str


class EmptyFieldError(BituneInputError):
    """An empty prompt or answer: an error, unless the config drops such rows."""


Reader = Callable[[Record], Example]


def format_reader(name: str, columns: dict[str, str] | None, first: Record) -> Reader:
    """The function that reads rows of format `name` (`auto`: detected from the `first` row)."""
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


def _read_alpaca(record: Record) -> Example:
    instruction = _field(record, "instruction")
    extra = _field(record, "input", optional=True)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return Example(record.location, [_user(prompt)], _field(record, "output"))


def _read_prompt_completion(record: Record) -> Example:
    return Example(record.location, [_user(_field(record, "prompt"))], _field(record, "completion"))


def _read_columns(record: Record, columns: dict[str, str]) -> Example:
    return Example(
        record.location, [_user(_column(record, columns["prompt"]))], _column(record, columns["answer"])
    )


def _column(record: Record, spec: str) -> str:
    if not _is_column_template(spec):
        return _field(record, spec)
    return "".join(
        literal + (_field(record, name) if name is not None else "")
        for literal, name, _, _ in _parse_columns(spec)
    )


def _read_csqa(record: Record) -> Example:
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
    return Example(record.location, [_user(prompt)], answer)


def _read_messages(record: Record) -> Example:
    key = "messages" if "messages" in record.fields else "conversations"
    turns = record.fields.get(key)
    if not isinstance(turns, list) or not turns:
        raise BituneInputError(
            f"{record.location}, field '{key}': expected a non-empty list of turns, got {describe_value(turns)}; fix "
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
    return Example(record.location, conversation[:-1], conversation[-1]["content"])


def _turn(turn: Any, location: str, label: str) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise BituneInputError(
            f"{location}, field '{label}': expected an object, got {describe_value(turn)}; fix the row"
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
        raise BituneInputError(
            f"{location}: field '{label}' is {describe_value(value)}, expected text; fix the row"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # e.g. a lone surrogate from a "\ud800" escape: no tokenizer can read it
        raise BituneInputError(f"{location}: field '{label}' holds invalid Unicode; fix the text") from None
    if not value.strip() and not optional:
        raise EmptyFieldError(
            f"{location}: field '{label}' is empty; fill it in, or set empty: drop to skip such rows"
        )
    return value


def _user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def check_columns(columns: Any, format_name: str) -> None:
    """Check the `columns` setting of the data config (it applies to format `columns` only)."""
    if format_name != "columns":
        config_error(
            "columns", f"applies to format 'columns' only, not {format_name!r}; remove one of the two"
        )
    if not isinstance(columns, dict) or set(columns) != {"prompt", "answer"}:
        config_error("columns", f'{columns!r} must be a mapping with exactly the keys "prompt" and "answer"')
    for key, spec in columns.items():
        if not isinstance(spec, str) or not spec.strip():
            config_error(
                f"columns.{key}", f"{spec!r} must be a column name or a template such as '{{question}}'"
            )
        if _is_column_template(spec):
            try:
                parts = _parse_columns(spec)
            except ValueError as error:
                config_error(f"columns.{key}", f"{spec!r} is not a valid template ({error})")
            if any(name == "" or conversion or format_spec for _, name, format_spec, conversion in parts):
                config_error(
                    f"columns.{key}",
                    f"{spec!r}: write fields as {{column}}, with no format spec; use {{{{ for {{",
                )


def _is_column_template(spec: str) -> bool:
    return "{" in spec or "}" in spec


def _parse_columns(spec: str) -> list[tuple[str, str | None, str | None, str | None]]:
    """Literal text and {column} fields of a column template (Python format syntax, values are not formatted)."""
    return list(string.Formatter().parse(spec))


def config_error(name: str, problem: str) -> NoReturn:
    """Raise the error for a bad data-config field."""
    raise BituneInputError(f"data config, field '{name}': {problem}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
